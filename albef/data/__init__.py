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

import importlib

# The names below load their module on first use (PEP 562), so that ``albef.data.shards``, the torch-free shard
# format, imports without torch (data_prep writes shards with it); the rest of the package needs torch.
_EXPORTS = {
    "DataConfig": "config",
    "JsonCaptionDataset": "json_dataset",
    "load_json_entries": "json_dataset",
    "PretrainLoader": "loader",
    "build_pretrain_loader": "loader",
    "shuffle_events": "loader",
    "worker_batch_counts": "loader",
    "REASONS": "samples",
    "BadSample": "samples",
    "collate": "samples",
    "make_sample": "samples",
    "sample_from_shard": "samples",
    "Shard": "shards",
    "expand_dataset": "shards",
    "iter_shard": "shards",
    "load_manifest": "shards",
    "CLIP_MEAN": "transforms",
    "CLIP_STD": "transforms",
    "FINETUNE_SCALE": "transforms",
    "PRETRAIN_SCALE": "transforms",
    "RANDAUG_OPS": "transforms",
    "ImageTransform": "transforms",
    "RandAugment": "transforms",
    "finetune_transform": "transforms",
    "normalize_images": "transforms",
    "pretrain_transform": "transforms",
    "random_resized_crop_params": "transforms",
    "stack_images": "transforms",
    "test_transform": "transforms",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'albef.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"albef.data.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value
