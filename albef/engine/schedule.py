"""Learning-rate and distillation-weight schedules, as pure functions of the optimizer step.

``albef`` reproduces the official recipe (timm CosineLRScheduler as ALBEF drives it): during the first
``warmup_steps`` iterations the LR rises linearly from ``warmup_lr`` to ``lr`` in stairs of ``warmup_granularity``
iterations (the official ``scheduler.step(i // 100)``, 20 stairs of 100 = 2000 iterations); afterwards it is
constant for the rest of epoch 0 and follows a per-epoch cosine ``min_lr + (lr - min_lr)/2 (1 + cos(pi e / E))``
from epoch ``e >= 1``. ``cosine`` is the per-step variant most users want at scale: linear warmup over
``warmup_steps`` then a cosine over the remaining steps down to ``min_lr``.

Alpha (the MoD weight) ramps linearly from 0 to ``alpha`` over the first ``alpha_warmup_epochs`` epochs
(official: 1, LAVIS: 2), measured in optimizer steps.

The momentum encoders' EMA coefficient can ramp linearly from ``momentum_start`` to the model's ``momentum`` over the
first ``momentum_warmup_steps`` steps (official: no ramp), for training from random weights, where an EMA at 0.995
would keep the keys near the collapsed initial encoders for hundreds of steps.
"""

from __future__ import annotations

import math


def albef_lr(
    step: int,
    steps_per_epoch: int,
    epochs: int,
    lr: float,
    warmup_lr: float,
    min_lr: float,
    warmup_steps: int,
    warmup_granularity: int = 100,
) -> float:
    epoch, i = divmod(step, steps_per_epoch)
    if epoch == 0:
        if warmup_steps <= 0:
            return lr
        stairs = max(1, warmup_steps // max(1, warmup_granularity))
        t = min(i // max(1, warmup_granularity), stairs)
        return warmup_lr + t * (lr - warmup_lr) / stairs
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * epoch / epochs))


def cosine_lr(step: int, total_steps: int, lr: float, warmup_lr: float, min_lr: float, warmup_steps: int) -> float:
    if step < warmup_steps:
        return warmup_lr + (lr - warmup_lr) * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def alpha_at(step: int, steps_per_epoch: int, alpha: float, warmup_epochs: float) -> float:
    if warmup_epochs <= 0:
        return alpha
    return alpha * min(1.0, step / (warmup_epochs * steps_per_epoch))


def momentum_at(step: int, momentum: float, start: float, warmup_steps: int) -> float:
    if step >= warmup_steps:
        return momentum
    return start + (momentum - start) * step / warmup_steps
