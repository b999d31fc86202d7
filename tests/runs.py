"""Running the real training entrypoints from tests: environment, overrides, launch (1 process or torchrun), and
reading a run's metrics back. Shared by the engine and fault-injection tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable


def run_env(**extra):
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1", WANDB_MODE="offline", WANDB_SILENT="true", PYTHONUNBUFFERED="1", DS_ACCELERATOR="cpu"
    )
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS"):
        env.pop(k, None)
    env.update(extra)
    return env


def base_overrides(shards: Path, out: Path, **kw):
    o = {
        "data.shards": f"[{shards}]",
        "data.num_workers": 1,
        "train.output_dir": str(out),
        "train.num_threads": 1,
        "train.log_every": 1,
        "train.max_steps": 6,
        "train.save_every": 0,
        "train.export_final": "false",
        "train.warmup_steps": 0,
        "wandb.mode": "disabled",
    }
    o.update(kw)
    return [f"{k}={v}" for k, v in o.items()]


def launch(overrides, nproc=1, module="pretrain.train", config="pretrain/configs/tiny_cpu.yaml", wait=True, **env):
    if nproc > 1:
        cmd = [str(Path(PY).parent / "torchrun"), "--standalone", f"--nproc_per_node={nproc}", "-m", module]
    else:
        cmd = [PY, "-m", module]
    cmd += [config, *overrides]
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=run_env(**env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    if not wait:
        return proc
    out, _ = proc.communicate(timeout=600)
    return proc.returncode, out


def losses(run_dir: Path):
    rows = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "step" in row and "train/loss" in row:
            rows[row["step"]] = row  # a resumed run re-logs steps after its checkpoint: the last one counts
    return rows


def summary(run_dir: Path):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["summary"] for r in rows if "summary" in r]


def wait_for_step(run: Path, step: int, proc, timeout=300):
    end = time.time() + timeout
    while time.time() < end:
        if (run / "metrics.jsonl").is_file() and step in losses(run):
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended early:\n{proc.stdout.read()[-3000:]}")
        time.sleep(0.2)
    raise AssertionError(f"step {step} never logged")
