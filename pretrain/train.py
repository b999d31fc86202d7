"""Pretrain ALBEF (ITC + ITM + MLM with momentum distillation) with DeepSpeed ZeRO.

python -m pretrain.train pretrain/configs/tiny_cpu.yaml train.max_steps=20
torchrun --nproc_per_node 8 -m pretrain.train pretrain/configs/4m.yaml
sbatch slurm/pretrain.sbatch pretrain/configs/4m.yaml
"""

from albef.engine.cli import main
from albef.tasks.pretrain import PretrainTask

if __name__ == "__main__":
    main(PretrainTask)
