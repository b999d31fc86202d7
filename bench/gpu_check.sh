#!/usr/bin/env bash
# Single-GPU check of the BASE model (paper size): pairs/s, MFU and peak GPU memory, fp16 and bf16, DeepSpeed
# ZeRO-2, with and without gradient checkpointing. For a machine without network access:
#
#   bench/gpu_check.sh OUT_DIR [WHEEL_DIR]
#
# WHEEL_DIR (default: bench/wheels beside this script) holds wheel files of the Python packages the machine lacks
# (e.g. deepspeed, timm, tokenizers, webdataset, wandb, opencv-python-headless); they are installed with
# `pip install --no-index --find-links` into a private target directory, nothing else is fetched. Results:
# OUT_DIR/gpu_check.json (one row per variant, see bench/train_step.py) and OUT_DIR/gpu_check.log.
# Budget: under 8 minutes on an H100 (4 variants x 2 runs, 10 timed steps each).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(dirname "$here")"
out="${1:?usage: bench/gpu_check.sh OUT_DIR [WHEEL_DIR]}"
wheels="${2:-$here/wheels}"
mkdir -p "$out"
exec > >(tee "$out/gpu_check.log") 2>&1

python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device visible'; print('torch', torch.__version__, torch.cuda.get_device_name(0))"
if compgen -G "$wheels/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/albef_site "$wheels"/*.whl
  export PYTHONPATH="/tmp/albef_site:$repo${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
  echo "no wheels in $wheels: using the installed packages"
fi
python3 -c "import deepspeed, timm, tokenizers; print('deepspeed', deepspeed.__version__, 'timm', timm.__version__)"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv || true

cd "$repo"
timeout 450 python3 bench/train_step.py --presets base --device cuda --precisions bf16 fp16 \
  --steps 10 --warmup 3 --threads 8 --json "$out/gpu_check.json"
echo "wrote $out/gpu_check.json"
