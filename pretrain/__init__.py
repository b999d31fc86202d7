"""ALBEF pretraining entrypoints: ``python -m pretrain.train CONFIG [key=value ...]`` and ``python -m pretrain.export``."""
