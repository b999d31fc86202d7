"""Pictures: heat-map overlays with boxes and a caption, drawn with Pillow and numpy only (no matplotlib).

    from albef.viz import render_overlay
    img = render_overlay(Image.open("cat.jpg"), heatmap, pred_box=[x, y, w, h], true_box=[x, y, w, h],
                         label="the cat on the left | IoU 0.81")
    img.save("overlay.png")

* ``colormap(values)``: a jet-like colour ramp (dark blue -> blue -> cyan -> yellow -> red -> dark red) by
  piecewise-linear interpolation, for values in [0, 1].
* ``save_grounding_overlay``: one grounding expression's overlay PNG, its map upsampled as it was scored.
* ``render_overlay``: the heat map (any ``(h, w)`` map; resized bicubically to the image when it is a grid) is
  clipped at 0 and scaled by its maximum, coloured, and alpha-blended with a per-pixel weight ``alpha * value``,
  so cold regions keep the photo's own pixels. The predicted box is drawn in magenta on its pixels, the true box
  in green just outside its pixels (both visible when they coincide), and the label on a dark band at the top.
  The output has exactly the input image's size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
from PIL import Image, ImageDraw, ImageFont

PRED_COLOUR = (255, 40, 255)  # magenta
TRUE_COLOUR = (40, 255, 40)  # green
_RAMP_POS = np.array([0.0, 0.125, 0.375, 0.625, 0.875, 1.0])
_RAMP_RGB = np.array(
    [[0, 0, 128], [0, 0, 255], [0, 255, 255], [255, 255, 0], [255, 0, 0], [128, 0, 0]], dtype=np.float64
)


def colormap(values: np.ndarray) -> np.ndarray:
    """Values (any shape, clipped to [0, 1]) -> uint8 RGB of shape ``values.shape + (3,)``."""
    v = np.clip(np.asarray(values, dtype=np.float64), 0.0, 1.0)
    rgb = np.stack([np.interp(v, _RAMP_POS, _RAMP_RGB[:, c]) for c in range(3)], axis=-1)
    return np.round(rgb).astype(np.uint8)


def _as_rgb_array(image: Union[Image.Image, np.ndarray]) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"image must be a PIL image or an HxWx3 uint8 array, got {arr.shape} {arr.dtype}")
    return arr


def _fit_heatmap(heatmap, height: int, width: int) -> np.ndarray:
    """A float map at the image's size: as is when it already matches, else a bicubic resize (PIL, float32)."""
    if hasattr(heatmap, "detach"):
        heatmap = heatmap.detach().float().cpu().numpy()
    heat = np.asarray(heatmap, dtype=np.float32)
    if heat.ndim != 2:
        raise ValueError(f"heatmap must be 2-D, got shape {heat.shape}")
    if heat.shape != (height, width):
        heat = np.asarray(Image.fromarray(heat, mode="F").resize((width, height), Image.Resampling.BICUBIC))
    return heat


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: a fixed bitmap font
        return ImageFont.load_default()


def render_overlay(
    image: Union[Image.Image, np.ndarray],
    heatmap,
    pred_box: Optional[Sequence[float]] = None,
    true_box: Optional[Sequence[float]] = None,
    label: Optional[str] = None,
    alpha: float = 0.6,
) -> Image.Image:
    """The image with the heat map blended in, the boxes (``[x, y, w, h]`` pixels) and the label; same size."""
    rgb = _as_rgb_array(image)
    height, width = rgb.shape[:2]
    heat = np.clip(_fit_heatmap(heatmap, height, width), 0.0, None)
    peak = float(heat.max())
    heat = heat / peak if peak > 0 else np.zeros_like(heat)
    weight = (alpha * heat)[..., None]
    blended = rgb.astype(np.float32) * (1.0 - weight) + colormap(heat).astype(np.float32) * weight
    out = Image.fromarray(np.clip(np.round(blended), 0, 255).astype(np.uint8), "RGB")

    draw = ImageDraw.Draw(out)
    line = max(1, round(min(width, height) / 100))
    # the true box is drawn just outside its pixels and the prediction on its pixels: both stay visible when equal
    for box, colour, pad in ((true_box, TRUE_COLOUR, line), (pred_box, PRED_COLOUR, 0)):
        if box is not None:
            x, y, w, h = (float(v) for v in box[:4])
            draw.rectangle(
                [x - pad, y - pad, x + max(w - 1, 0) + pad, y + max(h - 1, 0) + pad], outline=colour, width=line
            )
    if label:
        font = _font(max(8, min(width, height) // 24))
        left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
        band = Image.new("RGBA", out.size, (0, 0, 0, 0))
        ImageDraw.Draw(band).rectangle([0, 0, width, bottom - top + 2 * line + 2], fill=(0, 0, 0, 160))
        out = Image.alpha_composite(out.convert("RGBA"), band).convert("RGB")
        ImageDraw.Draw(out).text((line + 1 - left, line + 1 - top), label, fill=(255, 255, 255), font=font)
    return out


def save_overlay(path: Union[str, Path], image, heatmap, **kwargs) -> Path:
    """``render_overlay`` written as a PNG (parent folders created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    render_overlay(image, heatmap, **kwargs).save(path, format="PNG")
    return path


def save_grounding_overlay(path, image_path: str, cam, pred_box, gt_box, label: str) -> Path:
    """The overlay PNG of one grounding expression: the original image with the Grad-CAM map ``cam`` (a tensor)
    upsampled to its size (as scored)."""
    from albef.eval.grounding import upsample_map

    with Image.open(image_path) as im:
        image = im.convert("RGB")
    heat = upsample_map(cam, (image.height, image.width))
    return save_overlay(path, image, heat, pred_box=pred_box, true_box=gt_box, label=label)
