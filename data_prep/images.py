"""Decode, check, resize and re-encode one image: the CPU half of every data_prep step (not a CLI).

``process_image(data, ImageOptions(...))`` takes the original bytes (any format Pillow reads: JPEG, PNG, WebP,
GIF, ...) and returns JPEG bytes plus sizes, or raises ``SampleError(status, message)``. The steps, in order:

1. read the header only and refuse decompression bombs (``max_image_pixels``, checked before any pixel is decoded),
   images below ``min_image_size`` (shortest side) and above ``max_aspect_ratio``;
2. for JPEG, let libjpeg decode at 1/2, 1/4 or 1/8 scale when the target is that much smaller (``Image.draft``:
   never below the target size, so quality is kept while decoding gets several times faster);
3. apply the EXIF orientation, convert to RGB (transparent pixels over white);
4. resize (area averaging to shrink, bicubic to enlarge). ``keep_ratio``: the shortest or longest side becomes
   ``image_size``; ``center_crop``: shortest side, then a centred square; ``border``: longest side, then white
   borders to a square; ``no``: unchanged. Then encode as JPEG.

With ``resize_mode="no"`` an RGB JPEG without EXIF rotation keeps its original bytes (no generation loss).
``ImageOptions.add_arguments(parser)`` adds the shared command-line options of the CLIs.
"""
from __future__ import annotations

import argparse
import io
import math
from dataclasses import asdict, dataclass
from typing import Optional, Tuple

from PIL import Image, ImageOps, UnidentifiedImageError

RESIZE_MODES = ("keep_ratio", "center_crop", "border", "no")
RESIZE_SIDES = ("shortest", "longest")
_ORIENTATION = 0x0112
_WHITE = (255, 255, 255)


class SampleError(Exception):
    """A sample that cannot be used: ``status`` is its stats bucket, ``str(error)`` the short error message."""

    def __init__(self, status: str, message: str):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ImageOptions:
    image_size: int = 384
    resize_mode: str = "keep_ratio"
    resize_side: str = "shortest"
    resize_only_if_bigger: bool = False
    quality: int = 95
    min_image_size: int = 0
    max_aspect_ratio: Optional[float] = None
    max_image_pixels: int = 89_478_485  # Pillow's own default limit

    def __post_init__(self):
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {self.resize_mode!r}")
        if self.resize_side not in RESIZE_SIDES:
            raise ValueError(f"resize_side must be one of {RESIZE_SIDES}, got {self.resize_side!r}")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"quality must be in 1..100, got {self.quality}")

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        d = ImageOptions()
        g = parser.add_argument_group("image processing")
        g.add_argument("--image-size", type=int, default=d.image_size,
                       help="target size in pixels (default %(default)s)")
        g.add_argument("--resize-mode", choices=RESIZE_MODES, default=d.resize_mode,
                       help="keep_ratio: scale so --resize-side becomes --image-size; center_crop: square crop; "
                            "border: square with white borders; no: keep the size (default %(default)s)")
        g.add_argument("--resize-side", choices=RESIZE_SIDES, default=d.resize_side,
                       help="which side keep_ratio scales to --image-size (default %(default)s)")
        g.add_argument("--resize-only-if-bigger", action="store_true", help="never upscale")
        g.add_argument("--quality", type=int, default=d.quality, help="JPEG quality (default %(default)s)")
        g.add_argument("--min-image-size", type=int, default=d.min_image_size,
                       help="drop images whose shortest side is smaller (status filtered; default %(default)s)")
        g.add_argument("--max-aspect-ratio", type=float, default=d.max_aspect_ratio,
                       help="drop images with longer/shorter side above this (status filtered; default off)")
        g.add_argument("--max-image-pixels", type=int, default=d.max_image_pixels,
                       help="decompression-bomb guard: refuse images with more pixels (default %(default)s)")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "ImageOptions":
        return cls(**{k: getattr(args, k) for k in asdict(cls())})


@dataclass
class ProcessedImage:
    data: bytes
    width: int
    height: int
    original_width: int
    original_height: int


def prepare_pillow() -> None:
    """Pillow's global bomb check warns or raises at its own limit; ours (``max_image_pixels``) replaces it."""
    Image.MAX_IMAGE_PIXELS = None


def _scale(w: int, h: int, opt: ImageOptions) -> float:
    if opt.resize_mode == "no":
        return 1.0
    shortest = opt.resize_mode == "center_crop" or (opt.resize_mode == "keep_ratio" and opt.resize_side == "shortest")
    scale = opt.image_size / (min(w, h) if shortest else max(w, h))
    return min(scale, 1.0) if opt.resize_only_if_bigger else scale


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        background = Image.new("RGB", im.size, _WHITE)
        background.paste(im, mask=im.getchannel("A"))
        return background
    return im if im.mode == "RGB" else im.convert("RGB")


def _fit(im: Image.Image, size: Tuple[int, int], opt: ImageOptions) -> Image.Image:
    if im.size != size:  # area averaging (BOX) to shrink, as OpenCV's INTER_AREA; bicubic to enlarge
        im = im.resize(size, Image.Resampling.BOX if size[0] < im.width else Image.Resampling.BICUBIC)
    if opt.resize_mode == "center_crop":
        cw, ch = min(opt.image_size, im.width), min(opt.image_size, im.height)
        left, top = (im.width - cw) // 2, (im.height - ch) // 2
        im = im.crop((left, top, left + cw, top + ch))
    elif opt.resize_mode == "border":
        canvas = Image.new("RGB", (opt.image_size, opt.image_size), _WHITE)
        canvas.paste(im, ((opt.image_size - im.width) // 2, (opt.image_size - im.height) // 2))
        im = canvas
    return im


def process_image(data: bytes, opt: ImageOptions) -> ProcessedImage:
    try:
        im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise SampleError("failed_to_decode", "decompression bomb") from None
    except (UnidentifiedImageError, OSError, ValueError):
        raise SampleError("failed_to_decode", "unidentified image format") from None
    w, h = im.size
    if w * h > opt.max_image_pixels:
        raise SampleError("failed_to_decode", "decompression bomb")
    if w < 1 or h < 1 or min(w, h) < opt.min_image_size:
        raise SampleError("filtered", "image too small")
    if opt.max_aspect_ratio and max(w, h) / min(w, h) > opt.max_aspect_ratio:
        raise SampleError("filtered", "aspect ratio too large")
    orientation = im.getexif().get(_ORIENTATION, 1)
    ow, oh = (h, w) if orientation in (5, 6, 7, 8) else (w, h)
    scale = _scale(w, h, opt)
    keep_bytes = opt.resize_mode == "no" and im.format == "JPEG" and im.mode == "RGB" and orientation in (None, 1)
    try:
        if scale < 1 and im.format == "JPEG":
            im.draft("RGB", (math.ceil(w * scale), math.ceil(h * scale)))  # uniform scale: orientation-proof
        im.load()
        if keep_bytes:
            return ProcessedImage(data, ow, oh, ow, oh)
        if orientation not in (None, 1):
            im = ImageOps.exif_transpose(im)
        im = _to_rgb(im)
        im = _fit(im, (max(1, round(ow * scale)), max(1, round(oh * scale))), opt)
        out = io.BytesIO()
        im.save(out, "JPEG", quality=opt.quality)
    except Exception as e:  # Pillow raises OSError, ValueError, SyntaxError, ... on broken files
        message = "truncated image" if "truncated" in str(e) else f"decode error ({type(e).__name__})"
        raise SampleError("failed_to_decode", message) from None
    return ProcessedImage(out.getvalue(), im.width, im.height, ow, oh)
