"""``DataConfig``: the ``data:`` section of a training YAML (parsed by ``albef.config.from_dict``).

Plain fields with defaults (and the nested ``augment:`` section), so ``albef.config`` can type-check every key. Invalid values raise
``ValueError`` naming the field and the value (``from_dict`` turns it into a ``ConfigError`` with the file).

    data:
      shards: [/data/cc3m, /data/sbu, "/data/coco/{000000..000011}.tar", "pipe:aws s3 cp s3://b/vg/{000..099}.tar -"]
      batch_size: 64
      num_workers: 8
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

from albef.data.transforms import PRETRAIN_SCALE, AugmentConfig


@dataclass
class DataConfig:
    # One entry per dataset: a directory holding manifest.json and its shards, a brace pattern of local tar
    # files, http(s) URLs or a ``pipe:`` command (expanded with braceexpand).
    shards: List[str] = field(default_factory=list)
    # Optional manifest per dataset (path or URL; "" = look for manifest.json beside the shards, else count).
    manifests: List[str] = field(default_factory=list)
    # Resampled mode only: relative share of each dataset in the sample stream (default: proportional to size).
    weights: List[float] = field(default_factory=list)
    # The official ALBEF alternative to shards: JSON files of [{"image": path, "caption": str | [str]}].
    json_files: List[str] = field(default_factory=list)
    # Prefix for relative image paths in json_files ("" = paths are used as written, as the official code does).
    image_root: str = ""
    image_res: int = 256
    # Per-rank micro batch of the loader. A run sets it from train.micro_batch_size (its one owner); leave it 0
    # (unset) in a run YAML.
    batch_size: int = 0
    num_workers: int = 4
    # Raw samples held per worker for sample-level shuffling (0 or 1 = no buffer); shards only.
    shuffle_buffer: int = 2000
    # Draw shards with replacement (weighted across datasets) instead of one exact pass per epoch.
    resampled: bool = False
    # Resampled mode: samples per epoch over all ranks (0 = the total of the manifests).
    samples_per_epoch: int = 0
    max_words: int = 30
    max_text_len: int = 25
    # Training augmentation; the default is the official pretraining transform (crop scale 0.2-1, flip, RandAugment).
    # Turn flips off for data whose captions say "left"/"right" (the demo world).
    augment: AugmentConfig = field(default_factory=lambda: AugmentConfig(crop_scale=list(PRETRAIN_SCALE)))
    prefetch_factor: int = 2
    # Pin batches for faster host-to-GPU copies (ignored without CUDA).
    pin_memory: bool = True
    # Decode JPEGs at 1/2, 1/4 or 1/8 size (libjpeg DCT scaling) when the crop keeps >= 2 x image_res pixels.
    draft: bool = True
    # Bad samples logged at WARNING per worker and epoch before the rest go to DEBUG (all are counted).
    log_bad_samples: int = 20
    # A worker whose bad samples (undecodable, missing, lost with a truncated or vanished shard) pass this fraction
    # of its epoch's samples stops the run with an error instead of filling its batches with repeats (1.0: never).
    max_bad_fraction: float = 0.1

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"data.{name}={getattr(self, name)!r}: {why}")

        for name in ("image_res", "max_words", "max_text_len", "prefetch_factor"):
            if getattr(self, name) < 1:
                raise bad(name, "must be >= 1")
        for name in ("batch_size", "num_workers", "shuffle_buffer", "samples_per_epoch", "log_bad_samples"):
            if getattr(self, name) < 0:
                raise bad(name, "must be >= 0")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise bad("max_bad_fraction", "must be in [0, 1]")
        if self.shards and self.json_files:  # neither (the default) is an error only when a loader is built
            raise ValueError(
                f"data.shards={self.shards!r}, data.json_files={self.json_files!r}: set one of the two, not both"
            )
        if any(not isinstance(s, str) or not s.strip() for s in self.shards):
            raise bad("shards", "entries must be non-empty strings")
        if self.manifests and len(self.manifests) != len(self.shards):
            raise bad("manifests", f"needs one entry per data.shards entry ({len(self.shards)}), or none")
        if self.weights:
            if not self.resampled:
                raise bad(
                    "weights",
                    "mixing weights need data.resampled: true (a non-resampled epoch visits "
                    "every shard exactly once; list a dataset twice to upsample it)",
                )
            if len(self.weights) != len(self.shards):
                raise bad("weights", f"needs one weight per data.shards entry ({len(self.shards)})")
            if any(w <= 0 for w in self.weights):
                raise bad("weights", "every weight must be > 0")
        if self.json_files and self.resampled:
            raise bad("resampled", "resampled mode needs data.shards (json_files are read one exact pass per epoch)")
        if self.samples_per_epoch and not self.resampled:
            raise bad(
                "samples_per_epoch",
                "only resampled mode has a configurable epoch length; a "
                "non-resampled epoch is one pass over the manifests",
            )
