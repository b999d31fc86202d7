"""ALBEF's image transforms (official ``dataset/__init__.py`` and ``dataset/randaugment.py``), made fast.

Semantics, exactly as the official code (ALBEF_REFERENCE.md A.7):

* pretraining: ``RandomResizedCrop(res, scale=(0.2, 1.0), ratio=(3/4, 4/3), bicubic)``, ``RandomHorizontalFlip``,
  ``RandomAugment(N=2, M=7)`` over Identity, AutoContrast, Equalize, Brightness, Sharpness, ShearX, ShearY,
  TranslateX, TranslateY, Rotate, then ``ToTensor`` and the CLIP normalisation;
* fine-tuning: the same with ``scale=(0.5, 1.0)`` (res 384 in every official fine-tune config);
* test: ``Resize((res, res), bicubic)``.

RandAugment as the official OpenCV implementation: two ops drawn with replacement, each applied with probability
0.5; magnitude M out of 10: Brightness/Sharpness factor ``M/10*1.8+0.1`` (1.36 at M=7, always brightening and
sharpening), shear ``±M/10*0.3`` (±0.21), translate ``±M/10*10`` px (±7), rotate ``±M/10*30`` degrees (±21) about
``(W/2, H/2)``, bilinear ``cv2.warpAffine`` with fill (128, 128, 128); AutoContrast/Equalize are PIL's algorithms
per channel. One deliberate deviation: the official Sharpness casts float to uint8 without clipping, so values
outside [0, 255] at strong edges wrap around (salt-and-pepper noise); we clip, which is what PIL's
``ImageEnhance.Sharpness`` (the op the official code says it reproduces) does.

Where the time goes, and what we do instead of the official PIL/torchvision path (same pixels unless noted):

* decode: JPEGs are decoded by ``albef.data._jpegcrop`` (a small C extension over the system libjpeg-turbo), which
  decodes only the crop: rows above it are entropy-decoded and skipped, columns outside it are not transformed,
  rows below it are never read. RandomResizedCrop keeps 20-100% of the area, so this saves about a third of the
  decode time at 640x480; the pixels are bit-identical to a full decode with Pillow or OpenCV (tested for every
  chroma subsampling, progressive files, restart markers and every DCT scale). Other formats, CMYK JPEGs, and
  installs without the extension (no compiler; a warning says so) use ``cv2.imdecode`` (also bit-identical to
  Pillow) on the whole image. When the crop is at least 4x ``res`` on both sides, JPEGs are decoded at 1/2, 1/4
  or 1/8 size with libjpeg's DCT scaling (what Pillow's ``draft`` mode does) such that the crop keeps >= 2x
  ``res`` pixels per side (Pillow's ``thumbnail`` rule): a pre-reduction before the antialiased resize, never an
  upsampling (``draft=False`` turns it off);
* crop + resize: torch's uint8 antialiased bicubic (the PIL filter, a=-0.5, within +-1 of PIL; tested), ~3x
  faster than Pillow's;
* RandAugment on the 256x256 uint8 array with OpenCV/lookup tables whose parameters are precomputed;
* ``ToTensor`` + ``Normalize`` not in the loader at all: batches carry uint8 pixels (``stack_images``, a quarter
  of the bytes through shared memory, pinned memory and the host-to-device copy) and the engine normalises them on
  the device (``normalize_images``).

Images decoded by OpenCV stay BGR inside the transform, since every op here treats channels alike, and are
returned RGB. Randomness comes from the ``random.Random`` passed in, so the loader can seed every sample from its
position (exact resume).
"""

from __future__ import annotations

import functools
import io
import logging
import math
import random
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import get_worker_info

try:
    from albef.data import _jpegcrop
except ImportError:  # not compiled (setup.py makes it optional): whole-image decoding with OpenCV
    _jpegcrop = None

log = logging.getLogger(__name__)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
RANDAUG_OPS = (
    "Identity",
    "AutoContrast",
    "Equalize",
    "Brightness",
    "Sharpness",
    "ShearX",
    "ShearY",
    "TranslateX",
    "TranslateY",
    "Rotate",
)
PRETRAIN_SCALE = (0.2, 1.0)
FINETUNE_SCALE = (0.5, 1.0)
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
_FILL = (128, 128, 128)
_SHARPEN_KERNEL = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], dtype=np.float32) / 13.0
_DECODE_FLAGS = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION  # PIL (the official loader) ignores EXIF too
_REDUCED_FLAGS = {
    1: cv2.IMREAD_COLOR,
    2: cv2.IMREAD_REDUCED_COLOR_2,
    4: cv2.IMREAD_REDUCED_COLOR_4,
    8: cv2.IMREAD_REDUCED_COLOR_8,
}


class ImageDecodeError(ValueError):
    """The bytes are not an image Pillow and OpenCV can read."""


def random_resized_crop_params(
    height: int, width: int, scale: Sequence[float], ratio: Sequence[float], rng: random.Random
) -> Tuple[int, int, int, int]:
    """``(top, left, h, w)`` with torchvision's ``RandomResizedCrop.get_params`` distribution: up to 10 draws of
    an area fraction in ``scale`` and a log-uniform aspect ratio in ``ratio``; else the largest centred crop
    whose aspect ratio is within ``ratio``."""
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def resize_bicubic(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """PIL's antialiased bicubic resize of an HxWx3 uint8 array (torch's uint8 kernel; within +-1 of PIL)."""
    if img.shape[0] == height and img.shape[1] == width:
        return np.ascontiguousarray(img)
    # channels_last is the layout of torch's fast uint8 kernel
    x = torch.from_numpy(img).permute(2, 0, 1).unsqueeze(0).contiguous(memory_format=torch.channels_last)
    planes = F.interpolate(x, size=(height, width), mode="bicubic", antialias=True, align_corners=False)[0].numpy()
    return cv2.merge([planes[0], planes[1], planes[2]])  # the kernel returns planes; merge is ~10x a numpy transpose


_JPEG_SOI = b"\xff\xd8"
# Pillow's default refusal limit (2 x its default MAX_IMAGE_PIXELS), fixed here: data_prep lifts Pillow's global
MAX_JPEG_PIXELS = 2 * 89_478_485
_CMYK_SPACES = (4, 5)  # libjpeg's JCS_CMYK, JCS_YCCK


def crop_decoder_available() -> bool:
    """Whether the C extension ``albef.data._jpegcrop`` (crop-only JPEG decoding) is built."""
    return _jpegcrop is not None


def _probe(data: bytes) -> Tuple[int, int, str, bool]:
    """``(width, height, format, crop_decodable)`` from the header only."""
    if _jpegcrop is not None and data[:2] == _JPEG_SOI:
        try:
            width, height, _, space = _jpegcrop.header(data)
        except ValueError as e:
            raise ImageDecodeError(str(e)) from None
        if width * height > MAX_JPEG_PIXELS:
            raise ImageDecodeError(
                f"{width}x{height} pixels exceeds the decompression bomb limit of {MAX_JPEG_PIXELS} pixels"
            )
        return width, height, "JPEG", space not in _CMYK_SPACES
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.size[0], im.size[1], im.format or "", False
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, DecompressionBombError...
        raise ImageDecodeError(f"not a readable image ({type(e).__name__}: {e})") from None


def read_image_header(data: bytes) -> Tuple[int, int, str]:
    """``(width, height, format)`` from the header only (no decode)."""
    return _probe(data)[:3]


def decode_jpeg_crop(data: bytes, top: int, left: int, height: int, width: int, reduce: int = 1) -> np.ndarray:
    """Rows ``[top, top + height)`` and columns ``[left, left + width)`` of a JPEG decoded at 1/``reduce`` size
    (coordinates in the reduced image, ``ceil(W / reduce) x ceil(H / reduce)``): an HxWx3 uint8 RGB array equal to
    the same crop of a full decode. Needs the C extension (``crop_decoder_available()``)."""
    try:
        pixels = _jpegcrop.decode_crop(data, top, left, height, width, reduce)
    except ValueError as e:
        raise ImageDecodeError(str(e)) from None
    return np.frombuffer(pixels, dtype=np.uint8).reshape(height, width, 3)


def decode_bgr(data: bytes, reduce: int = 1) -> np.ndarray:
    """Decode to an HxWx3 uint8 BGR array, at 1/``reduce`` size for JPEGs (``reduce`` in 1, 2, 4, 8)."""
    img = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), _REDUCED_FLAGS[reduce])
    if img is None or img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise ImageDecodeError("OpenCV could not decode the image")
    return img


def _reduce_box(
    box: Tuple[int, int, int, int], height: int, width: int, new_height: int, new_width: int
) -> Tuple[int, int, int, int]:
    """A ``(top, left, h, w)`` crop of a ``height x width`` image mapped onto its DCT-scaled version."""
    top, left, crop_h, crop_w = box
    sy, sx = new_height / height, new_width / width
    y0, x0 = round(top * sy), round(left * sx)
    y1 = min(new_height, max(y0 + 1, round((top + crop_h) * sy)))
    x1 = min(new_width, max(x0 + 1, round((left + crop_w) * sx)))
    return y0, x0, y1 - y0, x1 - x0


def _draft_factor(width: int, height: int, crop_w: float, crop_h: float, res: int, fmt: str) -> int:
    """Largest DCT scaling 1/f (f in 8, 4, 2) that keeps >= 2 * res pixels on both sides of the crop (Pillow's
    ``thumbnail`` rule, ``reducing_gap=2``: the antialiased resize still does the last >= 2x reduction)."""
    if fmt != "JPEG":
        return 1
    room = min(crop_w, crop_h) / (2 * res)
    for f in (8, 4, 2):
        if room >= f:
            return f
    return 1


class RandAugment:
    """ALBEF's ``RandomAugment(N, M, isPIL=True, augs=...)`` on HxWx3 uint8 arrays (see the module docstring)."""

    def __init__(self, num_ops: int = 2, magnitude: int = 7, ops: Sequence[str] = RANDAUG_OPS, max_level: int = 10):
        unknown = [op for op in ops if op not in RANDAUG_OPS]
        if unknown:
            raise ValueError(f"RandAugment ops {unknown} are not ALBEF ops {list(RANDAUG_OPS)}")
        self.num_ops = num_ops
        self.ops = tuple(ops)
        level = magnitude / max_level
        self.magnitudes: Dict[str, float] = {
            "Brightness": level * 1.8 + 0.1,
            "Sharpness": level * 1.8 + 0.1,
            "ShearX": level * 0.3,
            "ShearY": level * 0.3,
            "TranslateX": level * 10.0,
            "TranslateY": level * 10.0,
            "Rotate": level * 30.0,
        }
        self._brightness_lut = (
            (np.arange(256, dtype=np.float32) * np.float32(self.magnitudes["Brightness"])).clip(0, 255).astype(np.uint8)
        )

    def draw(self, rng: random.Random) -> List[Tuple[str, float]]:
        """The ops to apply, with their signs: N draws with replacement, each kept with probability 0.5."""
        chosen = [rng.choice(self.ops) for _ in range(self.num_ops)]  # like np.random.choice(augs, N)
        return [(name, -1.0 if rng.random() < 0.5 else 1.0) for name in chosen if rng.random() <= 0.5]

    def __call__(self, img: np.ndarray, rng: random.Random) -> np.ndarray:
        for name, sign in self.draw(rng):
            img = self.apply(name, img, sign)
        return img

    def apply(self, name: str, img: np.ndarray, sign: float = 1.0) -> np.ndarray:
        """One op at this instance's magnitude; ``sign`` flips the direction of the geometric ops."""
        if name == "Identity":
            return img
        if name == "AutoContrast":
            return _per_channel_lut(img, _autocontrast_lut)
        if name == "Equalize":
            return _per_channel_lut(img, _equalize_lut)
        if name == "Brightness":
            return cv2.LUT(img, self._brightness_lut)
        if name == "Sharpness":
            return _sharpen(img, self.magnitudes["Sharpness"])
        h, w = img.shape[:2]
        m = sign * self.magnitudes.get(name, 0.0)
        if name in ("TranslateX", "TranslateY") and float(np.float32(m)).is_integer():
            return _shift(img, int(m), axis=1 if name == "TranslateX" else 0)  # warpAffine's pixels, 40x faster
        if name == "ShearX":
            matrix = np.float32([[1, m, 0], [0, 1, 0]])
        elif name == "ShearY":
            matrix = np.float32([[1, 0, 0], [m, 1, 0]])
        elif name == "TranslateX":
            matrix = np.float32([[1, 0, -m], [0, 1, 0]])
        elif name == "TranslateY":
            matrix = np.float32([[1, 0, 0], [0, 1, -m]])
        elif name == "Rotate":
            matrix = cv2.getRotationMatrix2D((w / 2, h / 2), m, 1)
        else:
            raise ValueError(f"unknown RandAugment op {name!r}")
        return cv2.warpAffine(img, matrix, (w, h), flags=cv2.INTER_LINEAR, borderValue=_FILL)


def _shift(img: np.ndarray, d: int, axis: int) -> np.ndarray:
    """``out[i] = img[i + d]`` along ``axis``, ``_FILL`` where that is outside: what ``cv2.warpAffine`` with a
    whole-pixel translation of ``-d`` computes (bilinear weights 1 and 0), as two copies."""
    out = np.empty_like(img)
    n = img.shape[axis]
    k = min(abs(d), n)
    src, dst, fill = [slice(None)] * 2, [slice(None)] * 2, [slice(None)] * 2
    if d >= 0:
        src[axis], dst[axis], fill[axis] = slice(k, n), slice(0, n - k), slice(n - k, n)
    else:
        src[axis], dst[axis], fill[axis] = slice(0, n - k), slice(k, n), slice(0, k)
    out[tuple(dst)] = img[tuple(src)]
    out[tuple(fill)] = _FILL
    return out


def _per_channel_lut(img: np.ndarray, make_lut) -> np.ndarray:
    lut = np.empty((1, 256, 3), dtype=np.uint8)
    for c in range(3):
        hist = cv2.calcHist([img], [c], None, [256], [0, 256]).ravel().astype(np.int64)
        lut[0, :, c] = make_lut(hist)
    return cv2.LUT(img, lut)


def _autocontrast_lut(hist: np.ndarray) -> np.ndarray:
    """PIL ``ImageOps.autocontrast`` (cutoff 0): stretch [min, max] to [0, 255], truncating."""
    nonzero = np.flatnonzero(hist)
    low, high = nonzero[0], nonzero[-1]
    if high <= low:
        return np.arange(256, dtype=np.uint8)
    scale = 255.0 / (high - low)
    return (np.arange(256) * scale - low * scale).clip(0, 255).astype(np.uint8)


def _equalize_lut(hist: np.ndarray) -> np.ndarray:
    """PIL ``ImageOps.equalize``: cumulative histogram in steps of (pixels not in the top level) // 255."""
    nonzero = hist[hist != 0]
    step = int(nonzero[:-1].sum()) // 255
    if step == 0:
        return np.arange(256, dtype=np.uint8)
    shifted = np.empty(256, dtype=np.int64)
    shifted[0] = step // 2
    shifted[1:] = hist[:-1]
    return (np.cumsum(shifted) // step).clip(0, 255).astype(np.uint8)


def _sharpen(img: np.ndarray, factor: float) -> np.ndarray:
    """Blend with the 3x3 smoothing filter (PIL's SMOOTH kernel) by ``factor``, border pixels kept."""
    smooth = cv2.filter2D(img, -1, _SHARPEN_KERNEL)
    base = smooth.astype(np.float32)
    blended = img.astype(np.float32)
    blended -= base
    blended *= np.float32(factor)
    blended += base  # smooth + factor * (img - smooth) in float32, the official order (exact same values)
    out = np.clip(blended, 0, 255, out=blended).astype(np.uint8)  # astype truncates, as the official code
    out[0], out[-1], out[:, 0], out[:, -1] = img[0], img[-1], img[:, 0], img[:, -1]
    return out


@functools.cache
def _warn_if_no_crop_decoder() -> None:
    if _jpegcrop is None:
        log.warning(
            "albef.data._jpegcrop is not built (it needs gcc and libjpeg-turbo's headers, Debian: "
            "libjpeg62-turbo-dev, then `pip install -e .`): JPEGs are decoded whole with OpenCV, same "
            "pixels, about a third slower at 640x480"
        )


class ImageTransform:
    """Encoded image bytes -> ``res x res x 3`` uint8 RGB array, with ALBEF's augmentation.

    ``crop_scale=None`` resizes the whole image to ``(res, res)`` (the test transform); otherwise a
    RandomResizedCrop with that area range. ``flip`` and ``randaugment`` add the training augmentations.
    """

    def __init__(
        self,
        res: int,
        crop_scale: Optional[Tuple[float, float]] = PRETRAIN_SCALE,
        flip: bool = True,
        randaugment: bool = True,
        draft: bool = True,
    ):
        if res < 1:
            raise ValueError(f"image resolution must be >= 1, got {res}")
        self.res = res
        self.crop_scale = tuple(crop_scale) if crop_scale is not None else None
        self.flip = flip
        self.randaugment = RandAugment(2, 7) if randaugment else None
        self.draft = draft
        _warn_if_no_crop_decoder()

    def __call__(self, data: bytes, rng: random.Random) -> np.ndarray:
        width, height, fmt, crop_decodable = _probe(data)
        if self.crop_scale is None:
            box = (0, 0, height, width)
        else:
            box = random_resized_crop_params(height, width, self.crop_scale, CROP_RATIO, rng)
        factor = _draft_factor(width, height, box[3], box[2], self.res, fmt) if self.draft else 1
        if crop_decodable:  # only the crop, in RGB
            if factor > 1:
                box = _reduce_box(box, height, width, -(-height // factor), -(-width // factor))
            img, bgr = decode_jpeg_crop(data, *box, factor), False
        else:
            img, bgr = decode_bgr(data, factor), True
            if img.shape[:2] != (height, width):
                box = _reduce_box(box, height, width, img.shape[0], img.shape[1])
            top, left, crop_h, crop_w = box
            img = img[top : top + crop_h, left : left + crop_w]
        img = resize_bicubic(img, self.res, self.res)
        if self.flip and rng.random() < 0.5:
            img = cv2.flip(img, 1)
        if self.randaugment is not None:
            img = self.randaugment(img, rng)
        return cv2.cvtColor(img, cv2.COLOR_BGR2RGB) if bgr else img


@dataclass
class AugmentConfig:
    """Train-time image augmentation (the ``augment:`` section of a task's ``data``); the defaults are the official
    fine-tuning transform, the pretraining loader defaults to its 0.2-1 crop."""

    crop_scale: List[float] = field(default_factory=lambda: list(FINETUNE_SCALE))  # RandomResizedCrop area; [] = resize
    flip: bool = True  # random horizontal flip (wrong for text that says left/right)
    randaugment: bool = True  # RandAugment(2, 7) without colour ops

    def __post_init__(self) -> None:
        if self.crop_scale and not (len(self.crop_scale) == 2 and 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1):
            raise ValueError(
                f"data.augment.crop_scale={self.crop_scale!r}: expected [] or [lo, hi] with 0 < lo <= hi <= 1"
            )

    def transform(self, res: int, draft: bool = True) -> "ImageTransform":
        return ImageTransform(
            res, tuple(self.crop_scale) or None, flip=self.flip, randaugment=self.randaugment, draft=draft
        )


def pretrain_transform(res: int = 256, draft: bool = True) -> ImageTransform:
    return ImageTransform(res, PRETRAIN_SCALE, flip=True, randaugment=True, draft=draft)


def finetune_transform(res: int = 384, draft: bool = True) -> ImageTransform:
    return ImageTransform(res, FINETUNE_SCALE, flip=True, randaugment=True, draft=draft)


def test_transform(res: int = 384, draft: bool = True) -> ImageTransform:
    return ImageTransform(res, None, flip=False, randaugment=False, draft=draft)


test_transform.__test__ = False  # not a pytest test despite the name

# (x / 255 - mean) / std == x * _SCALE + _BIAS, per channel
_SCALE = tuple(1.0 / (255.0 * s) for s in CLIP_STD)
_BIAS = tuple(-m / s for m, s in zip(CLIP_MEAN, CLIP_STD))


def stack_images(images: Sequence[np.ndarray]) -> torch.Tensor:
    """HxWx3 uint8 RGB arrays -> the uint8 ``(B, H, W, 3)`` pixels of a batch. Inside a DataLoader worker the batch
    is built in shared memory, so it reaches the main process without another copy; uint8 is a quarter of the
    float32 bytes to share, pin and copy to the GPU, where ``normalize_images`` turns it into the model's input."""
    if not len(images):
        raise ValueError("stack_images needs at least one image")
    h, w = images[0].shape[:2]
    for i, img in enumerate(images):
        if img.shape != (h, w, 3) or img.dtype != np.uint8:
            raise ValueError(f"image {i}: expected a {h}x{w}x3 uint8 array, got {img.shape} {img.dtype}")
    out = torch.empty((len(images), h, w, 3), dtype=torch.uint8)
    if get_worker_info() is not None:
        out.share_memory_()
    np.stack(images, out=out.numpy())
    return out


def normalize_images(pixels: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``ToTensor`` + CLIP ``Normalize`` of uint8 RGB pixels ``(..., H, W, 3)`` (``stack_images``; any leading
    dimensions, any device): ``(..., 3, H, W)`` contiguous in ``dtype``, equal to ``(x / 255 - mean) / std``
    computed in float32. The engine calls it after moving a batch to its device, so on a GPU it costs nothing."""
    if pixels.dtype != torch.uint8 or pixels.dim() < 3 or pixels.shape[-1] != 3:
        raise ValueError(
            f"normalize_images: expected uint8 pixels (..., H, W, 3), got {tuple(pixels.shape)} {pixels.dtype}"
        )
    if pixels.device.type != "cpu":
        return _normalize_torch(pixels, dtype)
    lead, (h, w) = pixels.shape[:-3], pixels.shape[-3:-1]
    out = torch.empty((*lead, 3, h, w), dtype=torch.float32)
    planes, src = out.view(-1, 3, h, w).numpy(), pixels.reshape(-1, h, w, 3).numpy()
    for i in range(src.shape[0]):  # on CPU one OpenCV pass per plane: ~2x torch over a channels-last view
        for c, channel in enumerate(cv2.split(src[i])):
            cv2.addWeighted(channel, _SCALE[c], channel, 0.0, _BIAS[c], dst=planes[i, c], dtype=cv2.CV_32F)
    return out.to(dtype)


def to_device(value, device: torch.device, dtype: torch.dtype):
    """One batch entry onto the model's device: uint8 tensors are image pixels ``(..., H, W, 3)``, normalised there
    (``normalize_images``: a quarter of the bytes cross to the GPU); other floats take ``dtype``; the rest as is."""
    if not torch.is_tensor(value):
        return value
    if value.dtype == torch.uint8:
        return normalize_images(value.to(device, non_blocking=True), dtype)
    return value.to(device, dtype) if value.is_floating_point() else value.to(device)


def _normalize_torch(pixels: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``normalize_images`` on an accelerator."""
    scale = torch.tensor(_SCALE, dtype=torch.float32, device=pixels.device).view(3, 1, 1)
    bias = torch.tensor(_BIAS, dtype=torch.float32, device=pixels.device).view(3, 1, 1)
    return torch.addcmul(bias, pixels.movedim(-1, -3).float(), scale).to(dtype).contiguous()
