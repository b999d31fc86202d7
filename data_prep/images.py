"""Decode, check, resize and re-encode one image: the CPU half of every data_prep step (not a CLI).

``process_image(data, ImageOptions(...))`` takes the original bytes (any format Pillow reads: JPEG, PNG, WebP,
GIF, ...) and returns JPEG bytes plus sizes, or raises ``SampleError(status, message)``. The steps, in order:

1. read the header only and refuse decompression bombs (``max_image_pixels``, checked before any pixel is decoded),
   images below ``min_image_size`` (shortest side), above ``max_aspect_ratio`` (default 10) and images whose
   output would exceed ``max_output_pixels`` (default ``max_aspect_ratio * image_size**2``, 10 squares without an
   aspect cap: a 1x100 strip scaled to a 384 px shortest side would be 384x38400);
2. for JPEG, let libjpeg decode at 1/2, 1/4 or 1/8 scale when the target is that much smaller (``Image.draft``:
   never below the target size, so quality is kept while decoding gets several times faster);
3. apply the EXIF orientation, convert to RGB (transparent pixels over white);
4. resize (area averaging to shrink, bicubic to enlarge). ``keep_ratio``: the shortest or longest side becomes
   ``image_size``; ``center_crop``: shortest side, then a centred square; ``border``: longest side, then white
   borders to a square; ``no``: unchanged. Then encode as JPEG.

With ``resize_mode="no"`` an RGB JPEG without EXIF rotation keeps its original bytes (no generation loss).
``ImageOptions.add_arguments(parser)`` adds the shared command-line options of the CLIs.

Memory and time per process are bounded by ``DecodeLimits`` (not part of the output's settings): a ``PixelBudget``
shared by the process's threads admits an image only while the decoded pixels in flight stay under
``max_pixels_in_flight`` (one image alone is always admitted), and a decode that reads its input past
``decode_timeout`` seconds is abandoned (status ``failed_to_decode``, "decode timeout"). Pillow's own process-wide
bomb limit stays on, at ``max_image_pixels``.
"""

from __future__ import annotations

import argparse
import io
import math
import threading
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Optional, Tuple

from PIL import Image, ImageOps, UnidentifiedImageError

RESIZE_MODES = ("keep_ratio", "center_crop", "border", "no")
RESIZE_SIDES = ("shortest", "longest")
_ORIENTATION = 0x0112
_WHITE = (255, 255, 255)
DEFAULT_ASPECT_BUDGET = 10.0  # the output budget, in squares of image_size, when there is no aspect-ratio cap


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
    max_aspect_ratio: Optional[float] = 10.0
    max_image_pixels: int = 89_478_485  # Pillow's own default limit
    max_output_pixels: Optional[int] = None  # None: max_aspect_ratio (10 when off) * image_size**2; "no" mode: none

    @property
    def output_pixel_budget(self) -> Optional[int]:
        if self.max_output_pixels is not None:
            return self.max_output_pixels
        if self.resize_mode == "no":
            return None  # the output is the input, already bounded by max_image_pixels
        return int(max(self.max_aspect_ratio or DEFAULT_ASPECT_BUDGET, 1.0) * self.image_size**2)

    def __post_init__(self):
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {self.resize_mode!r}")
        if self.resize_side not in RESIZE_SIDES:
            raise ValueError(f"resize_side must be one of {RESIZE_SIDES}, got {self.resize_side!r}")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"quality must be in 1..100, got {self.quality}")
        if self.max_aspect_ratio is not None and self.max_aspect_ratio < 1:
            raise ValueError(f"max_aspect_ratio must be >= 1 (or 0 for none), got {self.max_aspect_ratio}")
        if self.max_image_pixels < 1 or (self.max_output_pixels is not None and self.max_output_pixels < 1):
            raise ValueError("max_image_pixels and max_output_pixels must be positive")

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        d = ImageOptions()
        g = parser.add_argument_group("image processing")
        g.add_argument(
            "--image-size", type=int, default=d.image_size, help="target size in pixels (default %(default)s)"
        )
        g.add_argument(
            "--resize-mode",
            choices=RESIZE_MODES,
            default=d.resize_mode,
            help="keep_ratio: scale so --resize-side becomes --image-size; center_crop: square crop; "
            "border: square with white borders; no: keep the size (default %(default)s)",
        )
        g.add_argument(
            "--resize-side",
            choices=RESIZE_SIDES,
            default=d.resize_side,
            help="which side keep_ratio scales to --image-size (default %(default)s)",
        )
        g.add_argument("--resize-only-if-bigger", action="store_true", help="never upscale")
        g.add_argument("--quality", type=int, default=d.quality, help="JPEG quality (default %(default)s)")
        g.add_argument(
            "--min-image-size",
            type=int,
            default=d.min_image_size,
            help="drop images whose shortest side is smaller (status filtered; default %(default)s)",
        )
        g.add_argument(
            "--max-aspect-ratio",
            type=float,
            default=d.max_aspect_ratio,
            help="drop images with longer/shorter side above this (status filtered; 0: no limit; default %(default)s)",
        )
        g.add_argument(
            "--max-image-pixels",
            type=int,
            default=d.max_image_pixels,
            help="decompression-bomb guard: refuse images with more pixels (default %(default)s)",
        )
        g.add_argument(
            "--max-output-pixels",
            type=int,
            default=d.max_output_pixels,
            help="drop images whose resized output would have more pixels (status filtered; default: "
            "max-aspect-ratio x image-size^2, none with --resize-mode no)",
        )
        DecodeLimits.add_arguments(g)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "ImageOptions":
        values = {k: getattr(args, k) for k in asdict(cls())}
        values["max_aspect_ratio"] = values["max_aspect_ratio"] or None  # 0: no limit
        return cls(**values)


@dataclass(frozen=True)
class DecodeLimits:
    """Per-process bounds on decoding (they never change a successful sample, so they are not run settings)."""

    max_pixels_in_flight: int = 256 * 2**20  # decoded pixels of all threads together (~4 bytes each, x2 to resize)
    decode_timeout: float = 30.0  # seconds to decode, convert, resize and encode one image

    def __post_init__(self):
        if self.max_pixels_in_flight < 1 or self.decode_timeout <= 0:
            raise ValueError("max_pixels_in_flight and decode_timeout must be positive")

    @staticmethod
    def add_arguments(g) -> None:
        d = DecodeLimits()
        g.add_argument(
            "--max-pixels-in-flight",
            type=int,
            default=d.max_pixels_in_flight,
            help="per process: decoded pixels all threads may hold at once; an image waits until it "
            "fits (one image alone always does; default %(default)s, about 1-2 GB)",
        )
        g.add_argument(
            "--decode-timeout",
            type=float,
            default=d.decode_timeout,
            help="seconds one image may take to decode and resize (status failed_to_decode; default %(default)s)",
        )

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "DecodeLimits":
        return cls(**{k: getattr(args, k) for k in asdict(cls())})


class PixelBudget:
    """A counting semaphore over decoded pixels, shared by the threads of one process."""

    def __init__(self, limit: int):
        self.limit = limit
        self.in_flight = 0
        self.peak = 0
        self._cond = threading.Condition()

    def acquire(self, pixels: int) -> int:
        with self._cond:
            while self.in_flight and self.in_flight + pixels > self.limit:
                self._cond.wait()
            self.in_flight += pixels
            self.peak = max(self.peak, self.in_flight)
        return pixels

    def release(self, pixels: int) -> None:
        with self._cond:
            self.in_flight -= pixels
            self._cond.notify_all()


class _DeadlineReader(io.BytesIO):
    """The encoded bytes, read by Pillow's decoder in blocks: past the deadline a read raises, ending the decode."""

    deadline = math.inf

    def read(self, *args):
        if time.monotonic() > self.deadline:
            raise TimeoutError("decode timeout")
        return super().read(*args)


@dataclass
class ProcessedImage:
    data: bytes
    width: int
    height: int
    original_width: int
    original_height: int


def prepare_pillow(opt: ImageOptions) -> None:
    """Pillow's process-wide bomb check stays on, at our ``max_image_pixels`` (Pillow raises above twice it).

    Its warning between one and two times the limit is silenced: ``process_image`` refuses those images itself,
    before decoding, with status ``failed_to_decode``."""
    Image.MAX_IMAGE_PIXELS = opt.max_image_pixels
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


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


def _output_size(ow: int, oh: int, scale: float, opt: ImageOptions) -> Tuple[Tuple[int, int], int]:
    """(the resized size, the stored image's pixel count: a crop or a border square where the mode makes one)."""
    size = (max(1, round(ow * scale)), max(1, round(oh * scale)))
    if opt.resize_mode == "center_crop":
        return size, min(opt.image_size, size[0]) * min(opt.image_size, size[1])
    if opt.resize_mode == "border":
        return size, max(opt.image_size**2, size[0] * size[1])
    return size, size[0] * size[1]


def process_image(
    data: bytes, opt: ImageOptions, budget: Optional[PixelBudget] = None, limits: DecodeLimits = DecodeLimits()
) -> ProcessedImage:
    source = _DeadlineReader(data)
    try:
        im = Image.open(source)
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
    size, out_pixels = _output_size(ow, oh, scale, opt)
    cap = opt.output_pixel_budget
    if cap is not None and out_pixels > cap:
        raise SampleError("filtered", f"output too large ({out_pixels} pixels > {cap})")
    keep_bytes = opt.resize_mode == "no" and im.format == "JPEG" and im.mode == "RGB" and orientation in (None, 1)
    if scale < 1 and im.format == "JPEG":
        im.draft("RGB", (math.ceil(w * scale), math.ceil(h * scale)))  # uniform scale: orientation-proof
    # Held at once, at worst: the decoded image, an RGB(A) converted or rotated copy, and the output.
    held = budget.acquire(2 * im.size[0] * im.size[1] + out_pixels) if budget is not None else 0
    source.deadline = time.monotonic() + limits.decode_timeout
    try:
        im.load()
        if keep_bytes:
            return ProcessedImage(data, ow, oh, ow, oh)
        if orientation not in (None, 1):
            im = ImageOps.exif_transpose(im)
        im = _to_rgb(im)
        im = _fit(im, size, opt)
        if time.monotonic() > source.deadline:
            raise TimeoutError("decode timeout")
        out = io.BytesIO()
        im.save(out, "JPEG", quality=opt.quality)
    except Exception as e:  # Pillow raises OSError, ValueError, SyntaxError, ... on broken files
        if isinstance(e, TimeoutError) or isinstance(e.__context__, TimeoutError):
            message = f"decode timeout (over {limits.decode_timeout:g} s)"
        else:
            message = "truncated image" if "truncated" in str(e) else f"decode error ({type(e).__name__})"
        raise SampleError("failed_to_decode", message) from None
    finally:
        if budget is not None:
            budget.release(held)
    return ProcessedImage(out.getvalue(), im.width, im.height, ow, oh)
