"""Weakly supervised visual grounding (official ``Grounding.py`` and ``grounding_eval`` in ``dataset/utils.py``).

A referring expression is grounded without any box supervision: Grad-CAM of the fine-tuned retrieval model gives a
patch-grid heat map of where the expression "is", and the proposal box holding the most heat per sqrt(area) wins.

Pure functions (tensors and lists in, tensors and numbers out):

* ``box_iou(a, b)``: IoU of two ``[x, y, w, h]`` pixel boxes (COCO/REFER convention, as the official
  ``computeIoU``: a box covers columns ``x .. x+w-1``).
* ``box_scores(heatmap, boxes, alpha)``: ``sum(heatmap inside box) / area**alpha`` per box (official alpha 0.5),
  ``select_box`` the index of the best one (the first on ties).
* ``upsample_map(cam, (height, width))``: bicubic resize of a grid map to the image size (``align_corners=False``).
* ``gradcam_from_cross_attention(attention, gradients, text_mask)``: the official ``itm`` recipe, from a fusion
  layer's cross-attention probabilities ``(B, heads, L_text, 1 + g*g)`` and their gradient: drop the CLS column,
  ``attention * gradient.clamp(min=0)``, zero the padded text rows, mean over heads and text tokens (padding rows
  count in the mean, as official) -> ``(B, g, g)``.
* ``gradcam_from_vit_attention(attention, gradients)``: the official ``itc`` recipe, from a ViT block's
  self-attention ``(B, heads, 1 + g*g, 1 + g*g)``: the CLS row over the patches, ``attention * gradient.clamp(0)``,
  mean over heads -> ``(B, g, g)``.
* ``ground(cam, height, width, proposals, gt_box)``: one referring expression end to end (upsample, score,
  select, IoU); ``centre_choice`` and ``random_choice_accuracy``: the no-model baselines over the same proposals.

The model side, ``gradcam(model, image, input_ids, attention_mask, mode, block_num)``:

* ``itm`` (official default, ``block_num`` 8 = the 9th BERT layer, the 3rd fusion layer of BERT-base): the image
  and text are encoded without a graph, the fusion layers run with ``save_attention`` set on the cross-attention
  of layer ``block_num``, and the gradient of ``sum(ITM logit[:, 1])`` with respect to that layer's attention
  probabilities is taken.
* ``itc``: a forward hook records the attention probabilities of ViT block ``block_num`` (its explicit-softmax
  path is switched on for the call only; timm's ``attn_drop`` receives exactly those probabilities), and the
  gradient of the ITC similarity ``image_feat . text_feat / temp`` of each pair is taken with respect to them.

Gradients are taken with ``torch.autograd.grad`` with respect to the attention probabilities only, never with
``backward()``: no parameter ``.grad`` is written, so the function is safe inside a training run (DeepSpeed's
gradient-partitioning hooks never fire, the optimizer state is untouched) and works with frozen or bf16 weights.
The maps are the official ones: the official code's ``loss.backward()`` gives the same gradient at the attention
map. Gradient checkpointing is switched off for the call (a recomputed block would record its attention twice).
"""

from __future__ import annotations

import contextlib
import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

Box = Sequence[float]  # [x, y, w, h] in pixels
GRADCAM_MODES = ("itm", "itc")


# ------------------------------------------------------------------------------------------------ boxes and maps
def box_iou(box1: Box, box2: Box) -> float:
    """IoU of two ``[x, y, w, h]`` boxes, pixel-inclusive like the official ``computeIoU``.

    One deliberate difference: the official code counts an intersection only when it is at least 2 pixels wide
    and tall (``inter_x1 < inter_x2``); here a 1-pixel intersection counts too (``<=``), so a box is always an IoU-1
    match of itself. Accuracies at IoU >= 0.5 are the same except for boxes 1-2 pixels wide.
    """
    x1, y1 = max(box1[0], box2[0]), max(box1[1], box2[1])
    x2 = min(box1[0] + box1[2] - 1, box2[0] + box2[2] - 1)
    y2 = min(box1[1] + box1[3] - 1, box2[1] + box2[3] - 1)
    inter = (x2 - x1 + 1) * (y2 - y1 + 1) if x1 <= x2 and y1 <= y2 else 0.0
    union = box1[2] * box1[3] + box2[2] * box2[3] - inter
    return float(inter) / union if union > 0 else 0.0


def box_scores(heatmap: torch.Tensor, boxes: Sequence[Box], alpha: float = 0.5) -> torch.Tensor:
    """``sum(heatmap[y:y+h, x:x+w]) / (w*h)**alpha`` for every ``[x, y, w, h]`` box (float64, on the map's device).

    The pixel region is ``int(y) : int(y + h)``, ``int(x) : int(x + w)`` as in the official ``grounding_eval``,
    clipped to the map (a box covering no pixel there scores 0, as official). Box sums come from a summed-area
    table, so the cost per box is constant. A box with no area (w or h <= 0) scores ``-inf``: never picked.
    """
    if heatmap.dim() != 2:
        raise ValueError(f"heatmap must be (H, W), got shape {tuple(heatmap.shape)}")
    if len(boxes) == 0:
        raise ValueError("no proposal boxes to score")
    h, w = heatmap.shape
    table = F.pad(heatmap.double().cumsum(0).cumsum(1), (1, 0, 1, 0))  # table[i, j] = sum(map[:i, :j])
    b = torch.tensor([[float(v) for v in box[:4]] for box in boxes], dtype=torch.float64)
    x0, y0 = b[:, 0].trunc().clamp(0, w).long(), b[:, 1].trunc().clamp(0, h).long()
    x1, y1 = (b[:, 0] + b[:, 2]).trunc().clamp(0, w).long(), (b[:, 1] + b[:, 3]).trunc().clamp(0, h).long()
    x1, y1 = torch.maximum(x0, x1), torch.maximum(y0, y1)
    x0, y0, x1, y1 = (t.to(heatmap.device) for t in (x0, y0, x1, y1))
    mass = table[y1, x1] - table[y0, x1] - table[y1, x0] + table[y0, x0]
    area = (b[:, 2] * b[:, 3]).to(heatmap.device)
    score = mass / area.clamp(min=1e-12) ** alpha
    return torch.where(area <= 0, torch.full_like(score, float("-inf")), score)


def select_box(heatmap: torch.Tensor, boxes: Sequence[Box], alpha: float = 0.5) -> Tuple[int, torch.Tensor]:
    """Index of the best-scoring box (the first one on ties) and all scores."""
    scores = box_scores(heatmap, boxes, alpha)
    best = int(torch.argmax(scores).item())  # argmax returns the first maximal index
    return best, scores


def upsample_map(cam: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """``(g, g)`` or ``(B, g, g)`` grid map -> ``(H, W)`` / ``(B, H, W)``: bicubic, ``align_corners=False``, in
    float32 (as the official evaluation). Bicubic overshoot can leave small negative values, as official."""
    squeeze = cam.dim() == 2
    x = cam.float().reshape((1, 1) + tuple(cam.shape) if squeeze else (cam.shape[0], 1) + tuple(cam.shape[1:]))
    out = F.interpolate(x, size=(int(size[0]), int(size[1])), mode="bicubic", align_corners=False)
    return out[0, 0] if squeeze else out[:, 0]


def _grid_side(num_patches: int) -> int:
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise ValueError(f"{num_patches} image patches do not form a square grid")
    return side


def gradcam_from_cross_attention(
    attention: torch.Tensor, gradients: torch.Tensor, text_mask: torch.Tensor
) -> torch.Tensor:
    """Official ``itm`` Grad-CAM: ``(B, heads, L, 1 + g*g)`` attention and gradient, ``(B, L)`` text mask ->
    ``(B, g, g)`` non-negative float32 map."""
    if attention.shape != gradients.shape or attention.dim() != 4:
        raise ValueError(
            f"attention {tuple(attention.shape)} and gradients {tuple(gradients.shape)} must both be "
            "(B, heads, L_text, N_image)"
        )
    b, _, length, n = attention.shape
    if tuple(text_mask.shape) != (b, length):
        raise ValueError(f"text_mask {tuple(text_mask.shape)} does not match attention rows ({b}, {length})")
    g = _grid_side(n - 1)
    mask = text_mask.float().view(b, 1, length, 1)
    cam = attention[..., 1:].float() * gradients[..., 1:].float().clamp(min=0) * mask
    return cam.mean(dim=(1, 2)).view(b, g, g)


def gradcam_from_vit_attention(attention: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
    """Official ``itc`` Grad-CAM: ViT self-attention ``(B, heads, 1 + g*g, 1 + g*g)`` and its gradient -> the CLS
    query's row over the patches, ``attention * gradient.clamp(0)``, mean over heads: ``(B, g, g)``."""
    if attention.shape != gradients.shape or attention.dim() != 4:
        raise ValueError(
            f"attention {tuple(attention.shape)} and gradients {tuple(gradients.shape)} must both be (B, heads, N, N)"
        )
    b, n = attention.shape[0], attention.shape[-1]
    g = _grid_side(n - 1)
    cam = attention[:, :, 0, 1:].float() * gradients[:, :, 0, 1:].float().clamp(min=0)
    return cam.mean(dim=1).view(b, g, g)


# ------------------------------------------------------------------------------------------- one expression
def ground(
    cam: torch.Tensor,
    height: int,
    width: int,
    proposals: Sequence[Box],
    gt_box: Optional[Box] = None,
    alpha: float = 0.5,
    iou_threshold: float = 0.5,
) -> Dict:
    """Upsample ``cam`` (g, g) to the image, pick the best proposal; with ``gt_box``, its IoU and correctness.

    Returns ``{"pred_index", "pred_box", "score"}`` plus ``"iou"`` and ``"correct"`` when ``gt_box`` is given.
    """
    heat = upsample_map(cam, (height, width))
    best, scores = select_box(heat, proposals, alpha)
    out = {"pred_index": best, "pred_box": [float(v) for v in proposals[best][:4]], "score": float(scores[best])}
    if gt_box is not None:
        out["iou"] = box_iou(out["pred_box"], gt_box)
        out["correct"] = out["iou"] >= iou_threshold
    return out


def centre_choice(proposals: Sequence[Box], width: int, height: int) -> int:
    """Baseline without a model: the proposal whose centre is nearest the image centre (the first on ties)."""
    cx, cy = width / 2.0, height / 2.0
    dist = [(b[0] + b[2] / 2.0 - cx) ** 2 + (b[1] + b[3] / 2.0 - cy) ** 2 for b in proposals]
    return min(range(len(proposals)), key=lambda i: dist[i])


def random_choice_accuracy(proposals: Sequence[Box], gt_box: Box, iou_threshold: float = 0.5) -> float:
    """Expected correctness of a uniformly random proposal: the fraction of proposals with IoU >= threshold."""
    return sum(box_iou(b[:4], gt_box) >= iou_threshold for b in proposals) / len(proposals)


# ------------------------------------------------------------------------------------------------ model side
def check_block(model_cfg, mode: str, block_num: int) -> None:
    """Refuse a Grad-CAM layer that a model of config ``model_cfg`` (a ``ModelConfig``) does not have, naming the
    valid range."""
    if mode not in GRADCAM_MODES:
        raise ValueError(f"Grad-CAM mode {mode!r}: expected one of {GRADCAM_MODES}")
    if mode == "itm":
        text = model_cfg.text
        if not text.fusion_layer <= block_num < text.num_hidden_layers:
            raise ValueError(
                f"block_num={block_num} is not a fusion layer of this model: 'itm' Grad-CAM reads the cross-attention "
                f"of a BERT layer in [fusion_layer={text.fusion_layer}, num_hidden_layers={text.num_hidden_layers}) "
                "(official: 8 with BERT-base)"
            )
    else:
        depth = model_cfg.vision.depth
        if not 0 <= block_num < depth:
            raise ValueError(
                f"block_num={block_num} is not a ViT block of this model: 'itc' Grad-CAM reads the "
                f"self-attention of a block in [0, {depth})"
            )


class ViTAttentionRecorder:
    """Context manager: records the attention probabilities of one timm ViT ``Attention`` module.

    On entry it switches the module to its explicit-softmax path (``fused_attn = False``) and hooks ``attn_drop``,
    whose input is the softmax output; on exit both are undone, so the model behaves as before. ``maps`` holds
    the probabilities of every forward inside the block (``(B, heads, N, N)`` each).
    """

    def __init__(self, attn_module):
        for name in ("fused_attn", "attn_drop", "qkv"):
            if not hasattr(attn_module, name):
                raise TypeError(
                    f"{type(attn_module).__name__} has no {name!r}: not a timm ViT Attention module "
                    "(the itc Grad-CAM needs timm's Attention with an explicit-softmax path)"
                )
        self.attn = attn_module
        self.maps: List[torch.Tensor] = []
        self._handle = None
        self._fused = None

    def _hook(self, module, inputs, output) -> None:
        self.maps.append(inputs[0])

    def __enter__(self) -> "ViTAttentionRecorder":
        self._fused = self.attn.fused_attn
        self.attn.fused_attn = False
        self._handle = self.attn.attn_drop.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()
        self.attn.fused_attn = self._fused


@contextlib.contextmanager
def _no_grad_checkpointing(model):
    vit, bert = model.visual_encoder, model.bert.encoder
    saved = (getattr(vit, "grad_checkpointing", False), bert.grad_checkpointing)
    vit.grad_checkpointing, bert.grad_checkpointing = False, False
    try:
        yield
    finally:
        vit.grad_checkpointing, bert.grad_checkpointing = saved


def gradcam(
    model,
    image: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    mode: str = "itm",
    block_num: int = 8,
) -> torch.Tensor:
    """Grad-CAM maps ``(B, g, g)`` (float32, non-negative, detached) of (image b, expression b) pairs.

    ``model`` is an ``ALBEFRetrieval`` (or any ``ALBEFBase``) on the device and in the dtype of ``image``; call
    ``model.eval()`` first for the official maps (no dropout). Works under ``torch.no_grad()`` callers: the graph
    is built inside ``torch.enable_grad()``.
    """
    check_block(model.cfg, mode, block_num)
    with _no_grad_checkpointing(model):
        if mode == "itm":
            return _gradcam_itm(model, image, input_ids, attention_mask, block_num)
        return _gradcam_itc(model, image, input_ids, attention_mask, block_num)


def _gradcam_itm(model, image, input_ids, attention_mask, block_num) -> torch.Tensor:
    attn = model.bert.encoder.layer[block_num].crossattention.self
    with torch.no_grad():
        image_embeds = model.encode_image(image)
        text_embeds = model.encode_text(input_ids, attention_mask)
    # The image states are the graph's source, so the attention map has a gradient even with frozen weights.
    image_embeds = image_embeds.detach().requires_grad_(True)
    saved = attn.save_attention
    attn.save_attention = True
    try:
        with torch.enable_grad():
            logits = model.itm_logits(text_embeds, attention_mask, image_embeds)
            probs = attn.attention_map
            (grads,) = torch.autograd.grad(logits[:, 1].float().sum(), probs)
    finally:
        attn.save_attention = saved
        attn.attention_map, attn.attn_gradients = None, None
    return gradcam_from_cross_attention(probs.detach(), grads, attention_mask)


def _gradcam_itc(model, image, input_ids, attention_mask, block_num) -> torch.Tensor:
    with torch.no_grad():
        text_feat = model.text_feat(model.encode_text(input_ids, attention_mask))
    with ViTAttentionRecorder(model.visual_encoder.blocks[block_num].attn) as rec, torch.enable_grad():
        pixels = image.detach().requires_grad_(True)  # graph source independent of requires_grad on weights
        image_feat = model.image_feat(model.encode_image(pixels))
        sim = (image_feat.float() * text_feat.float()).sum(-1) / model.temp.float()  # diag(image_feat @ text_feat.T)
        if len(rec.maps) != 1:
            raise RuntimeError(f"ViT block {block_num} ran {len(rec.maps)} times in one forward; expected once")
        probs = rec.maps[0]
        (grads,) = torch.autograd.grad(sim.sum(), probs)
    return gradcam_from_vit_attention(probs.detach(), grads)


def grounding_metrics(rows: List[Dict], split: str) -> Dict[str, float]:
    """Accuracies in percent from per-expression rows (``correct``, ``centre_correct``, ``random_correct``,
    ``split``): ``acc``, ``acc_<split>`` when the rows mix ground-truth splits (or name another one), the two
    baselines and ``num_refs``."""
    if not rows:
        raise ValueError(f"grounding evaluation of {split!r}: no referring expressions")
    n = len(rows)
    metrics = {
        "acc": 100.0 * sum(r["correct"] for r in rows) / n,
        "baseline_centre": 100.0 * sum(r["centre_correct"] for r in rows) / n,
        "baseline_random": 100.0 * sum(r["random_correct"] for r in rows) / n,
        "num_refs": float(n),
    }
    splits = sorted({r["split"] for r in rows})
    if splits != [split]:
        for s in splits:
            part = [r for r in rows if r["split"] == s]
            metrics[f"acc_{s}"] = 100.0 * sum(r["correct"] for r in part) / len(part)
    return metrics
