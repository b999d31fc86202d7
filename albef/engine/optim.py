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


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: Sequence[float], eps: float,
                    check_finite: bool = False):
    """AdamW over ``param_groups``; ``check_finite``: skip steps with non-finite gradients (``FiniteAdamW``), for
    engines that do not check (no ZeRO)."""
    cls = FiniteAdamW if check_finite else torch.optim.AdamW
    return cls(param_groups(model, weight_decay), lr=lr, betas=tuple(betas), eps=eps)
