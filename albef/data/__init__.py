"""Training data: webdataset shards or official ALBEF JSON files -> ALBEF batches.

    from albef.data import DataConfig, build_pretrain_loader
    loader = build_pretrain_loader(cfg.data, Tokenizer(), rank, world_size, seed)

* ``config.py``: ``DataConfig``, the ``data:`` section of a training YAML.
* ``loader.py``: ``build_pretrain_loader`` / ``PretrainLoader``: exact epochs, equal batch counts on every rank,
  mid-epoch resume; its docstring defines the epoch, shuffle, bad-sample and resume semantics.
* ``shards.py``: dataset specs (directories with manifest.json, brace patterns, http(s), ``pipe:``) -> shards
  with sizes; reading samples from a shard.
* ``json_dataset.py``: ``JsonCaptionDataset``, the official pretraining JSON as a map-style dataset.
* ``transforms.py``: ALBEF's pretrain / fine-tune / test image transforms, RandAugment, CLIP normalisation.
* ``samples.py``: raw sample -> training sample, and the batch collation (tokenisation included).
"""

from albef.data.config import DataConfig
from albef.data.json_dataset import JsonCaptionDataset, load_json_entries
from albef.data.loader import PretrainLoader, build_pretrain_loader, shuffle_events, worker_batch_counts
from albef.data.samples import REASONS, BadSample, collate, make_sample, sample_from_shard
from albef.data.shards import Shard, expand_dataset, iter_shard, load_manifest
from albef.data.transforms import (
    CLIP_MEAN,
    CLIP_STD,
    FINETUNE_SCALE,
    PRETRAIN_SCALE,
    RANDAUG_OPS,
    ImageTransform,
    RandAugment,
    finetune_transform,
    normalize_images,
    pretrain_transform,
    random_resized_crop_params,
    stack_images,
    test_transform,
)

__all__ = [
    "DataConfig",
    "PretrainLoader",
    "build_pretrain_loader",
    "shuffle_events",
    "worker_batch_counts",
    "JsonCaptionDataset",
    "load_json_entries",
    "REASONS",
    "BadSample",
    "collate",
    "make_sample",
    "sample_from_shard",
    "Shard",
    "expand_dataset",
    "iter_shard",
    "load_manifest",
    "CLIP_MEAN",
    "CLIP_STD",
    "FINETUNE_SCALE",
    "PRETRAIN_SCALE",
    "RANDAUG_OPS",
    "ImageTransform",
    "RandAugment",
    "finetune_transform",
    "normalize_images",
    "pretrain_transform",
    "random_resized_crop_params",
    "stack_images",
    "test_transform",
]
