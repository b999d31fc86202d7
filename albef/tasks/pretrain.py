"""Pretraining task (paper §3): ITC + ITM + MLM with momentum distillation, on image-text shards or official JSON.

    python -m pretrain.train pretrain/configs/4m.yaml
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from albef.data import DataConfig, build_pretrain_loader
from albef.engine.flops import pretrain_step_flops
from albef.models import ModelConfig
from albef.tasks.base import InitConfig, Task, TrainConfig, WandbConfig


@dataclass
class PretrainConfig:
    """The whole pretraining YAML. ``model`` may be a preset name (tiny, small, base) or a YAML path."""

    model: ModelConfig = field(default_factory=ModelConfig)
    init: InitConfig = field(default_factory=InitConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)


class PretrainTask(Task):
    name = "pretrain"
    model_kind = "pretrain"
    config_cls = PretrainConfig

    def build_train_loader(self, tokenizer, rank, world_size, micro_batch_size, seed):
        data = dataclasses.replace(self.cfg.data, batch_size=micro_batch_size)
        return build_pretrain_loader(data, tokenizer, rank=rank, world_size=world_size, seed=seed)

    def training_step(self, model, batch, progress):
        out = model(batch["image"], batch["input_ids"], batch["attention_mask"], alpha=progress.alpha,
                    hard_negatives=progress.hard_negatives)  # fmt: skip
        loss = self.cfg.train.mlm_weight * out["loss_mlm"] + out["loss_ita"] + out["loss_itm"]
        return loss, {k: v.detach() for k, v in out.items()}

    def step_flops(self, batch) -> float:
        ids = batch["input_ids"]
        masked = 0.15 * float(batch["attention_mask"][:, 1:].sum()) / ids.shape[0]
        return pretrain_step_flops(self.cfg.model, ids.shape[0], ids.shape[1], masked)
