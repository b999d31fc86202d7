"""What the engine runs: the Task interface and the run-config sections every task shares.

A task (``albef.tasks``) builds its model and its training data, turns one batch into a loss, and (optionally)
evaluates. The engine (``albef.engine.trainer``) owns everything around that: DeepSpeed, schedules, logging,
checkpoints. This module lives in the engine so that the tasks import the engine and never the other way round.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch

from albef.engine.metrics import WandbConfig
from albef.models import ALBEFBase, ModelConfig


@dataclass
class InitConfig:
    """Where the weights come from before training starts (all optional; a resumed run ignores them)."""

    checkpoint: Optional[str] = None  # an official ALBEF / our checkpoint file (albef.models.convert.load_pretrained)
    vit: Optional[str] = None  # a DeiT / timm ViT checkpoint file (official pretraining: DeiT-B/16 224px)
    bert: Optional[str] = None  # a HuggingFace BERT: hub id (bert-base-uncased) or local directory


@dataclass
class TrainConfig:
    """Optimisation and run bookkeeping (the ``train:`` section)."""

    output_dir: str = "runs/pretrain"  # the run folder: config, metrics.jsonl, checkpoints/, wandb/, final.pth
    epochs: int = 30
    max_steps: int = 0  # stop after this many optimizer steps (0: train all epochs)
    global_batch_size: int = 512  # = micro_batch_size x gradient accumulation x world size
    micro_batch_size: int = 64  # per rank and forward pass
    ds_config: str = "ds_configs/zero2_bf16.json"  # DeepSpeed engine knobs (ZeRO stage, precision, clipping)
    seed: int = 42
    lr: float = 1e-4
    weight_decay: float = 0.02
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW's (beta1, beta2)
    eps: float = 1e-8
    schedule: str = "albef"  # "albef" (official warmup stairs + per-epoch cosine) or "cosine" (per step)
    warmup_lr: float = 1e-5
    min_lr: float = 1e-5
    warmup_steps: int = 2000
    warmup_granularity: int = 100  # "albef" schedule: the LR changes every this many steps during warmup
    alpha: float = 0.4  # momentum-distillation weight
    alpha_warmup_epochs: float = 1.0  # alpha ramps from 0 over this many epochs (official 1, LAVIS 2)
    # ITM negatives drawn uniformly from the batch (not by ITC similarity) for the first N steps; official: 0 (always
    # hard). From random weights, hard negatives from the start leave the fusion encoder image-blind (README, demo)
    itm_random_negative_steps: int = 0
    # pretraining's loss = mlm_weight x MLM + ITC + ITM; official 1. From random weights at the demo's width, MLM at
    # weight 1 keeps ITM from learning the hard negatives in the shared fusion layers (README, demo)
    mlm_weight: float = 1.0
    # The official recipe from random weights, in two warm-ups (both 0 = official from step 0; README "The offline
    # demo"): ITC's keys are the batch's momentum features only, and the feature queue is neither read nor written,
    # until step queue_start_step; the EMA coefficient rises linearly from momentum_start to model.momentum over the
    # first momentum_warmup_steps steps. Tasks without momentum queues refuse them.
    queue_start_step: int = 0
    momentum_warmup_steps: int = 0
    momentum_start: float = 0.5
    log_every: int = 10  # steps between metric rows
    save_every: int = 1000  # steps between checkpoints (0: only at the end and on signals)
    keep_last: int = 3  # complete checkpoints kept
    resume: str = "auto"  # auto (latest complete checkpoint of output_dir, if any) | none | <checkpoint dir or tag dir>
    max_nonfinite_steps: int = 5  # consecutive non-finite losses before the run stops
    peak_tflops: float = 0.0  # device matmul peak for MFU in the training dtype (0: measured at start)
    num_threads: int = 0  # torch intra-op threads per rank (0: torch's default)
    collective_timeout_s: int = 1800  # a collective (all-reduce, barrier) that waits longer fails the run
    eval_every_epochs: int = 1  # evaluate the task's splits every this many epochs (tasks with an evaluation)
    eval_every_steps: int = 0  # ... and every this many optimizer steps (0: only at epoch ends and at the end)
    evaluate_only: bool = False  # evaluate init.checkpoint on the task's splits and exit, no training
    export_final: bool = True  # write final.pth (and best.pth) in the official layout at the end (rank 0)

    def __post_init__(self) -> None:
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"train.betas={self.betas}: expected two numbers in [0, 1), AdamW's (beta1, beta2)")
        for key, low in (
            ("log_every", 1),
            ("eval_every_epochs", 1),
            ("max_nonfinite_steps", 1),
            ("epochs", 1),
            ("save_every", 0),
            ("max_steps", 0),
            ("keep_last", 0),
            ("warmup_granularity", 1),
            ("itm_random_negative_steps", 0),
            ("mlm_weight", 0),
            ("queue_start_step", 0),
            ("momentum_warmup_steps", 0),
            ("momentum_start", 0),
            ("eval_every_steps", 0),
            ("collective_timeout_s", 1),
        ):
            if getattr(self, key) < low:
                raise ValueError(f"train.{key}={getattr(self, key)}: must be >= {low}")
        if self.momentum_start >= 1.0:
            raise ValueError(f"train.momentum_start={self.momentum_start}: must be in [0, 1)")
        if self.schedule not in ("albef", "cosine"):
            raise ValueError(f"train.schedule={self.schedule!r}: expected 'albef' or 'cosine'")
        if self.micro_batch_size <= 0 or self.global_batch_size % self.micro_batch_size:
            raise ValueError(
                f"train.global_batch_size={self.global_batch_size} must be a positive multiple of "
                f"train.micro_batch_size={self.micro_batch_size}"
            )


@dataclass
class RunConfig:
    """The sections every run YAML has. A task's schema subclasses it and adds its typed ``data`` (and ``eval``)
    sections; the values that two sections both mention are checked here, once, for every task."""

    model: ModelConfig = field(default_factory=ModelConfig)
    init: InitConfig = field(default_factory=InitConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def __post_init__(self) -> None:
        data = getattr(self, "data", None)
        res = getattr(data, "image_res", None)
        if res is not None and res != self.model.vision.img_size:
            raise ValueError(
                f"data.image_res={res} must equal model.vision.img_size={self.model.vision.img_size}: "
                "set both (the ViT's patch grid and position embedding are built for that size; "
                "checkpoints are resized to the model's size on load)"
            )
        batch = getattr(data, "batch_size", None)  # the pretraining loader's; its one owner is the train section
        if batch is not None and batch not in (0, self.train.micro_batch_size):
            raise ValueError(
                f"data.batch_size={batch}: the per-rank batch is train.micro_batch_size="
                f"{self.train.micro_batch_size}; leave data.batch_size unset"
            )


# the train.* warm-ups of the recipe from random weights, each applied by the tasks with ITC queues and ITM
ITC_ITM_WARMUPS = ("itm_random_negative_steps", "queue_start_step", "momentum_warmup_steps")


@dataclass
class Progress:
    """Where training stands, handed to ``training_step`` (drives the alpha ramp)."""

    step: int
    epoch: int
    alpha: float
    hard_negatives: bool = True  # ITM negatives by similarity (False during train.itm_random_negative_steps)
    use_queue: bool = True  # ITC reads and writes the feature queue (False before train.queue_start_step)
    momentum: Optional[float] = None  # the EMA coefficient this step (None: model.momentum)


class Task:
    """Subclass per task. ``model_kind`` selects the model class; ``config_cls`` the YAML schema."""

    name: str = "task"
    model_kind: str = "pretrain"
    config_cls: type = None  # a dataclass with at least model, init, data, train, wandb sections
    # e.g. ("val", "test"); the first one selects the best checkpoint. A split whose ``data.<split>_file`` is ""
    # is left out (no validation: best = last).
    eval_splits: tuple = ()
    primary_metric: Optional[str] = None  # e.g. "r_mean"; higher is better
    # the train.* warm-ups whose ``Progress`` fields this task's training step hands to its model; a run that sets
    # another one is refused rather than silently trained without it
    train_warmups: tuple = ()

    def __init__(self, cfg):
        self.cfg = cfg
        train = getattr(cfg, "train", None)
        for key in ITC_ITM_WARMUPS:
            if getattr(train, key, 0) and key not in self.train_warmups:
                raise ValueError(
                    f"train.{key}={getattr(train, key)}: the {self.name} task does not use it (the tasks with ITC "
                    "queues and ITM do: pretrain, retrieval, grounding); leave it 0"
                )
        data = getattr(cfg, "data", None)
        self.eval_splits = tuple(s for s in type(self).eval_splits if getattr(data, f"{s}_file", None) != "")
        # W&B-only values (images, tables) made by the last evaluation; the engine logs them in the evaluation's
        # metrics row (same step) and clears them. Filled only while a W&B run is active (see ``wandb_module``).
        self.media: Dict[str, Any] = {}

    @staticmethod
    def wandb_module():
        """The ``wandb`` module when the engine's MetricsLogger has started a run (rank 0), else None."""
        wandb = sys.modules.get("wandb")
        return wandb if wandb is not None and getattr(wandb, "run", None) is not None else None

    def pop_media(self) -> Dict[str, Any]:
        media, self.media = self.media, {}
        return media

    def build_model(self) -> ALBEFBase:
        from albef.models import build_model

        return build_model(self.cfg.model, self.model_kind)

    def train_files(self) -> List[str]:
        """``data.train_files``, refused when empty."""
        if not self.cfg.data.train_files:
            raise ValueError("data.train_files is empty: nothing to fine-tune on")
        return self.cfg.data.train_files

    def build_train_loader(self, tokenizer, rank: int, world_size: int, micro_batch_size: int, seed: int):
        """A loader with ``len``, ``set_epoch``, ``state_dict``/``load_state_dict`` yielding dict batches; images as
        uint8 pixels ``(..., H, W, 3)`` (``stack_images``): the engine normalises every uint8 tensor on its device."""
        raise NotImplementedError

    def training_step(self, model, batch: Dict, progress: Progress) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """The loss of one batch already on the device (images normalised, floats in the training dtype)."""
        raise NotImplementedError

    def evaluate(self, model, split: str, device: torch.device, dtype: torch.dtype) -> Dict[str, float]:
        """Metrics of ``model`` on ``split``, identical on every rank (tasks with ``eval_splits`` implement it)."""
        raise NotImplementedError(f"task {self.name} has no evaluation")

    def check_batch_geometry(self, model_cfg: ModelConfig, global_micro_batch: int) -> None:
        """Refuse configurations the model cannot run (queue sizes)."""
        if model_cfg.queue_size % global_micro_batch:
            raise ValueError(
                f"model.queue_size={model_cfg.queue_size} is not divisible by the global micro-batch "
                f"(train.micro_batch_size x world size = {global_micro_batch}): the queue pointer would run past "
                "the end. Choose a queue size that is a multiple of it."
            )

    def step_flops(self, batch: Dict) -> float:
        """Matmul FLOPs of one training step on this batch (0: MFU not reported)."""
        return 0.0


__all__ = ["InitConfig", "Progress", "RunConfig", "Task", "TrainConfig", "WandbConfig"]
