"""Turning raw samples into training samples, and training samples into batches.

A training sample is ``{"image": res x res x 3 uint8 RGB array, "caption": str (after pre_caption), "key": str}``,
produced from a tar sample (``sample_from_shard``) or an official JSON entry (``JsonCaptionDataset``). A sample
that cannot be used raises ``BadSample`` with one of the reasons below; the loader counts and logs it by reason.

``collate`` makes the batch the training engine consumes, in the loader worker: ``image`` uint8 ``(B, res, res, 3)``
RGB pixels (``stack_images``; the engine's ``to_device`` normalises them on its device), ``input_ids`` /
``attention_mask`` int64 ``(B, L)`` from the ALBEF tokenizer
(padding to the longest caption, at most ``max_text_len`` tokens, as the official ``Pretrain.py``), plus the
``caption`` and ``key`` lists.
"""

from __future__ import annotations

import hashlib
import random
from typing import Dict, List, Sequence

import cv2

from albef.data.shards import Missing, RawSample
from albef.data.transforms import ImageDecodeError, ImageTransform, stack_images
from albef.tokenizer import pre_caption

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
REASONS = ("decode_error", "missing_image", "missing_caption", "bad_text", "truncated_shard")


def derive_seed(*parts) -> int:
    """A 64-bit seed from a tuple of ints/strings, the same in every process (unlike ``hash``)."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little")


class BadSample(Exception):
    """A sample that is skipped; ``reason`` is one of ``REASONS``."""

    def __init__(self, reason: str, detail: str):
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def parse_captions(raw: bytes) -> List[str]:
    """A ``.txt`` member: UTF-8, one caption per non-empty line."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadSample("bad_text", f"caption is not UTF-8 ({e})") from None
    captions = [line.strip() for line in text.splitlines() if line.strip()]
    if not captions:
        raise BadSample("missing_caption", "empty caption")
    return captions


def make_sample(
    image: bytes, captions: Sequence[str], key: str, transform: ImageTransform, rng: random.Random, max_words: int
) -> Dict:
    """One caption drawn at random per access (official ``pretrain_dataset``), ``pre_caption``, image transform."""
    caption = captions[0] if len(captions) == 1 else rng.choice(captions)
    try:
        pixels = transform(image, rng)
    except (ImageDecodeError, cv2.error) as e:
        raise BadSample("decode_error", str(e).strip().splitlines()[-1]) from None
    return {"image": pixels, "caption": pre_caption(caption, max_words), "key": key}


def sample_from_shard(item, transform: ImageTransform, rng: random.Random, max_words: int) -> Dict:
    """A ``RawSample`` (or ``Missing`` placeholder) from ``albef.data.shards.iter_shard`` -> training sample."""
    if isinstance(item, Missing):
        raise BadSample(item.reason, item.detail)
    assert isinstance(item, RawSample)
    image = next((item.members[ext] for ext in IMAGE_EXTENSIONS if ext in item.members), None)
    if image is None:
        raise BadSample("missing_image", f"no {'/'.join(IMAGE_EXTENSIONS)} member (has {sorted(item.members)})")
    if "txt" not in item.members:
        raise BadSample("missing_caption", f"no txt member (has {sorted(item.members)})")
    return make_sample(image, parse_captions(item.members["txt"]), item.key, transform, rng, max_words)


def collate(samples: Sequence[Dict], tokenizer, max_text_len: int) -> Dict:
    """Training samples -> the batch dict (see the module docstring)."""
    captions = [s["caption"] for s in samples]
    text = tokenizer(captions, max_length=max_text_len)
    return {
        "image": stack_images([s["image"] for s in samples]),
        "input_ids": text["input_ids"],
        "attention_mask": text["attention_mask"],
        "caption": captions,
        "key": [s["key"] for s in samples],
    }
