"""AdamW with ALBEF's weight-decay grouping (official ``optim/optim_factory.py``).

Frozen parameters (the momentum encoders) are not given to the optimizer. Biases and 1-d parameters (LayerNorm
weights, ...) get no weight decay; every other parameter does, including ``pos_embed``, ``cls_token`` and ``temp``:
the official wrapper never consults the ViT's no-weight-decay list, and its 0-d ``temp`` fails the ``ndim == 1``
test. Our ``temp`` is stored with shape [1] (DeepSpeed), so it is named explicitly to keep the official behaviour.
"""

from __future__ import annotations

from typing import Dict, List, Sequence

import torch
from torch import nn

DECAYED_DESPITE_SHAPE = ("temp",)


def param_groups(model: nn.Module, weight_decay: float) -> List[Dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if (p.ndim <= 1 or name.endswith(".bias")) and name not in DECAYED_DESPITE_SHAPE:
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


class FiniteAdamW(torch.optim.AdamW):
    """AdamW that skips a step whose gradients are not all finite and says so in ``overflow``: the attribute
    DeepSpeed's engine reads to count a skipped step. DeepSpeed's ZeRO-1/2 optimizers check the gradients
    themselves before calling this one; without ZeRO nothing else does."""

    overflow = False

    @torch.no_grad()
    def step(self, closure=None):
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        self.overflow = bool(grads) and not bool(torch.isfinite(torch.stack(torch._foreach_norm(grads))).all())
        if self.overflow:
            return None
        return super().step(closure)


def build_optimizer(
    model: nn.Module, lr: float, weight_decay: float, betas: Sequence[float], eps: float, check_finite: bool = False
):
    """AdamW over ``param_groups``; ``check_finite``: skip steps with non-finite gradients (``FiniteAdamW``), for
    engines that do not check (no ZeRO)."""
    cls = FiniteAdamW if check_finite else torch.optim.AdamW
    groups = param_groups(model, weight_decay)
    return cls(groups, lr=lr, betas=tuple(betas), eps=eps, fused=_fused_supported(groups))


def _fused_supported(groups: List[Dict]) -> bool:
    """torch's fused AdamW (one pass over each tensor) where it has a kernel: floating tensors on CPU or CUDA.
    Measured on the SMALL preset's 35.7M trainable parameters, 2 CPU threads: 0.026 s per step against 0.21 s for
    the default for-loop implementation and 0.13 s for foreach (bench/train_step.py shows it in the ``opt``
    phase)."""
    params = [p for g in groups for p in g["params"]]
    return bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
