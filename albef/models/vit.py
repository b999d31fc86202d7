"""Image encoder of ALBEF: a pre-norm ViT (Dosovitskiy et al.), built with timm's ``VisionTransformer``.

timm's module names (``patch_embed.proj``, ``blocks.N.attn.qkv``, ``norm`` ...) are exactly the official
``visual_encoder.*`` keys and DeiT's, so both load with a strict state-dict load. The encoder returns all
tokens after the final LayerNorm, CLS at index 0, like the official ``models/vit.py``.

``interpolate_pos_embed`` resizes the patch part of a position embedding with plain bicubic
``F.interpolate(align_corners=False)``, keeping the CLS row, which is what the official code does when a 256 px
checkpoint is fine-tuned at 384 px (timm's ``resample_abs_pos_embed`` anti-aliases by default and differs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class VisionConfig:
    """ViT hyper-parameters (official: ViT-B/16, 768 wide, 12 deep, 12 heads, qkv bias, LN eps 1e-6)."""

    img_size: int = 256
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.0

    def __post_init__(self) -> None:
        if self.img_size % self.patch_size:
            raise ValueError(
                f"vision.img_size={self.img_size} is not a multiple of vision.patch_size={self.patch_size}"
            )
        if self.embed_dim % self.num_heads:
            raise ValueError(f"vision.embed_dim={self.embed_dim} is not divisible by vision.num_heads={self.num_heads}")


def build_vit(cfg: VisionConfig) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(
        img_size=cfg.img_size,
        patch_size=cfg.patch_size,
        embed_dim=cfg.embed_dim,
        depth=cfg.depth,
        num_heads=cfg.num_heads,
        mlp_ratio=cfg.mlp_ratio,
        qkv_bias=True,
        num_classes=0,
        drop_path_rate=cfg.drop_path_rate,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
    )


def set_vit_attn_impl(vit: nn.Module, impl: str) -> None:
    """'sdpa' (fused kernel) or 'eager' (explicit softmax; keeps every intermediate for inspection)."""
    for blk in vit.blocks:
        blk.attn.fused_attn = impl == "sdpa"


def interpolate_pos_embed(pos_embed: torch.Tensor, num_patches: int, num_extra_tokens: int = 1) -> torch.Tensor:
    """Resize ``pos_embed`` (1, extra + g*g, D) to (1, extra + num_patches, D); a no-op when the grid matches."""
    old_grid = int(math.isqrt(pos_embed.shape[1] - num_extra_tokens))
    new_grid = int(math.isqrt(num_patches))
    if old_grid * old_grid != pos_embed.shape[1] - num_extra_tokens or new_grid * new_grid != num_patches:
        raise ValueError(
            f"pos_embed of shape {tuple(pos_embed.shape)} -> {num_patches} patches: only square grids are supported"
        )
    if old_grid == new_grid:
        return pos_embed
    extra, patches = pos_embed[:, :num_extra_tokens], pos_embed[:, num_extra_tokens:]
    dim = pos_embed.shape[-1]
    grid = patches.reshape(1, old_grid, old_grid, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    patches = grid.permute(0, 2, 3, 1).flatten(1, 2).to(pos_embed.dtype)
    return torch.cat([extra, patches], dim=1)
