"""Analytic matmul FLOPs of an ALBEF training step and a measured matmul peak, for MFU.

MFU = (matmul FLOPs per step) / (step time) / (peak matmul FLOP/s of the device in the training dtype). The count
follows the pretraining forward exactly (online: ViT, text layers, fusion on B positives and 2B negatives, the
full multimodal MLM pass, the MLM head on the masked tokens; momentum: ViT, text layers, MLM pass and head, forward
only); backward is twice the online forward. Text layers count a batch's real tokens: padding is not model work
(the official code computes it; token packing skips it), so the same batch has the same count in every variant.
tests/test_engine.py checks it against torch's FlopCounterMode.
"""

from __future__ import annotations

import time

import torch

from albef.models.albef import ModelConfig


def _layer(n: int, d: int, ffn: int, kv_len: int = 0, kv_width: int = 0) -> float:
    """Forward matmul FLOPs of one transformer layer on n tokens (+ cross-attention to kv_len tokens)."""
    f = 2 * n * d * (3 * d) + 2 * 2 * n * n * d + 2 * n * d * d + 2 * 2 * n * d * ffn
    if kv_len:
        f += 2 * n * d * d + 2 * 2 * kv_len * kv_width * d + 2 * 2 * n * kv_len * d + 2 * n * d * d
    return f


def _cls_layer(n: int, d: int, ffn: int, kv_len: int = 0, kv_width: int = 0) -> float:
    """The same layer computed at [CLS] only: keys and values of all n tokens, everything else for one row."""
    f = 2 * n * d * (2 * d) + 2 * d * d + 2 * 2 * n * d + 2 * d * d + 2 * 2 * d * ffn
    if kv_len:
        f += 2 * d * d + 2 * 2 * kv_len * kv_width * d + 2 * 2 * kv_len * d + 2 * d * d
    return f


def pretrain_step_flops(cfg: ModelConfig, batch: int, text_len: float, masked_per_sample: float) -> float:
    """``text_len``: real (non-padding) tokens per caption, on average over the batch. The ITM fusion passes and the
    momentum ITC text pass read [CLS] only, so their last layer counts at [CLS] (``BertModel``'s ``cls_only``)."""
    v, t = cfg.vision, cfg.text
    n_img = (v.img_size // v.patch_size) ** 2 + 1
    vit = 2 * (n_img - 1) * 3 * v.patch_size**2 * v.embed_dim + v.depth * _layer(
        n_img, v.embed_dim, int(v.embed_dim * v.mlp_ratio)
    )
    d, ffn, f = t.hidden_size, t.intermediate_size, t.fusion_layer
    text = f * _layer(text_len, d, ffn)
    text_cls = (f - 1) * _layer(text_len, d, ffn) + _cls_layer(text_len, d, ffn)
    fusion_layer = _layer(text_len, d, ffn, n_img, t.encoder_width)
    fusion = (t.num_hidden_layers - f) * fusion_layer
    fusion_cls = fusion - fusion_layer + _cls_layer(text_len, d, ffn, n_img, t.encoder_width)
    head = masked_per_sample * (2 * d * d + 2 * d * t.vocab_size)
    proj = 2 * (v.embed_dim + d) * cfg.embed_dim
    online_fwd = batch * (vit + text + 3 * fusion_cls + text + fusion + head + proj + 2 * 3 * d)
    momentum_fwd = batch * (vit + text_cls + text + fusion + head + proj)
    return 3 * online_fwd + momentum_fwd


def measured_matmul_peak(dtype: torch.dtype, device: torch.device, n: int = 2048, seconds: float = 0.5) -> float:
    """Peak matmul FLOP/s of this device and dtype (best of a short run of n x n GEMMs).

    The size grows from 256 up to ``n`` only while one GEMM takes under 20 ms, so the measurement stays within about
    ``seconds`` everywhere: on a CPU without bf16 units (AVX2 only) a 2048^3 bf16 GEMM takes half a minute."""

    def timed(a, b, reps: int) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) / reps

    size = min(256, n)
    while True:
        a = torch.randn(size, size, device=device).to(dtype)
        b = torch.randn(size, size, device=device).to(dtype)
        a @ b  # warm-up
        if size >= n or timed(a, b, 1) > 0.02:
            break
        size *= 2
    best = 0.0
    end = time.perf_counter() + seconds
    while True:
        best = max(best, 2 * size**3 / timed(a, b, 2))
        if time.perf_counter() >= end:
            return best
