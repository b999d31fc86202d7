"""The momentum machinery every ALBEF model shares: EMA twins of online modules (paper §3.3, momentum distillation).

A model lists in ``momentum_names`` the online modules that have a frozen ``<name>_m`` twin and calls
``make_momentum_twins()`` once they exist. The EMA (``momentum_update``), ``copy_params``, the float32 bookkeeping
under half-precision training, and the model-wide switches (attention kernel, token packing, gradient
checkpointing) are this class's, for the pretraining/retrieval models (``albef.models.albef``) and the downstream
ones (``albef.models.downstream``) alike.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from albef.models.bert import BertModel
from albef.models.vit import set_vit_attn_impl


class MomentumModel(nn.Module):
    momentum_names: Tuple[str, ...] = ()  # online modules with an ``<name>_m`` twin, in registration order

    def make_momentum_twins(self) -> None:
        """Register each ``<name>_m`` as a frozen copy of its online module (equal weights)."""
        for name in self.momentum_names:
            setattr(self, name + "_m", copy.deepcopy(getattr(self, name)))
        for p in self.momentum_parameters():
            p.requires_grad_(False)

    def apply_switches(self) -> None:
        """The model-wide settings of ``cfg``: attention kernel, token packing, gradient checkpointing."""
        self.set_attn_impl(self.cfg.attn_impl)
        self.set_text_packing(self.cfg.text_packing)
        self.set_grad_checkpointing(self.cfg.grad_checkpointing)

    @property
    def model_pairs(self) -> List[Tuple[nn.Module, nn.Module]]:
        return [(getattr(self, n), getattr(self, n + "_m")) for n in self.momentum_names]

    def momentum_parameters(self):
        for _, m in self.model_pairs:
            yield from m.parameters()

    def set_attn_impl(self, impl: str) -> None:
        for m in self.modules():
            if hasattr(m, "attn_impl"):
                m.attn_impl = impl
            if hasattr(m, "blocks") and hasattr(m, "patch_embed"):  # a timm ViT
                set_vit_attn_impl(m, impl)

    def set_text_packing(self, enable: bool = True) -> None:
        for m in self.modules():
            if isinstance(m, BertModel):
                m.packing = enable

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute activations of every ViT block and BERT layer in backward (online encoders only: the
        momentum encoders run without gradient)."""
        self.visual_encoder.set_grad_checkpointing(enable)
        self.text_encoder.set_grad_checkpointing(enable)

    @torch.no_grad()
    def copy_params(self) -> None:
        """Make every momentum parameter equal to its online counterpart."""
        for online, mom in self.model_pairs:
            for p, p_m in zip(online.parameters(), mom.parameters()):
                p_m.data.copy_(p.data)

    @torch.no_grad()
    def momentum_update(self, momentum: Optional[float] = None) -> None:
        """``m <- m * momentum + p * (1 - momentum)``: two products and a sum, the official float32 formula.
        ``momentum`` defaults to ``cfg.momentum`` (a training warm-up passes its own, ``train.momentum_warmup_steps``).

        Tied tensors (the MLM decoder) are updated once, since ``parameters()`` yields each tensor once.
        """
        online = [p.data for o, _ in self.model_pairs for p in o.parameters()]
        mom = [p.data for _, m in self.model_pairs for p in m.parameters()]
        if online[0].dtype != mom[0].dtype:  # half-precision training keeps the momentum weights in float32
            online = [p.to(mom[0].dtype) for p in online]
        momentum = self.cfg.momentum if momentum is None else momentum
        torch._foreach_mul_(mom, momentum)
        torch._foreach_add_(mom, torch._foreach_mul(online, 1.0 - momentum))

    def keep_momentum_fp32(self, fp32_state: Dict[str, torch.Tensor]) -> None:
        """Put float32 values back into the momentum parameters after an engine cast the model to fp16/bf16.

        The EMA adds 0.5% of the online weight per step: in bf16 (8 mantissa bits) most of these updates would
        round away, so the momentum encoders keep float32 weights and run under autocast (``_momentum_ctx``).
        """
        for name, p in self.named_parameters():
            if name in fp32_state:
                p.data = fp32_state[name].to(p.device, torch.float32)

    def momentum_state_fp32(self) -> Dict[str, torch.Tensor]:
        return {n: p.detach().float().clone() for n, p in self.named_parameters() if n.split(".")[0].endswith("_m")}

    def _momentum_ctx(self):
        """Autocast the float32 momentum modules to the online dtype under half-precision training."""
        if not self.momentum_names:
            return contextlib.nullcontext()
        online, mom = (next(m.parameters()) for m in self.model_pairs[0])
        if online.dtype == mom.dtype:
            return contextlib.nullcontext()
        return torch.autocast(online.device.type, dtype=online.dtype)
