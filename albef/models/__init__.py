"""Model code: ``build_model(preset_or_yaml, task, overrides)`` is the one way to construct an ALBEF model."""

from __future__ import annotations

from typing import Iterable, Optional, Union

from albef.config import load_config
from albef.models.albef import MODEL_CLASSES, ALBEFBase, ALBEFPretrain, ALBEFRetrieval, ModelConfig
from albef.models.bert import BertConfig
from albef.models.downstream import ALBEFNLVR, ALBEFVE, ALBEFVQA, TASK_MODEL_CLASSES, ALBEFNLVRPretrain
from albef.models.vit import VisionConfig

__all__ = [
    "ALBEFBase",
    "ALBEFPretrain",
    "ALBEFRetrieval",
    "ALBEFVQA",
    "ALBEFNLVR",
    "ALBEFNLVRPretrain",
    "ALBEFVE",
    "BertConfig",
    "ModelConfig",
    "VisionConfig",
    "build_model",
    "model_config",
]

MODEL_CLASSES.update(
    TASK_MODEL_CLASSES
)  # the downstream heads (albef/models/downstream.py) live beside the core models


#: model kinds renamed to their task names (2026-12): the old name fails with the new one in the message
_RENAMED = {"nlvr": "nlvr2", "nlvr_ta": "nlvr2_ta", "ve": "snli_ve"}


def model_config(preset: Union[str, ModelConfig] = "base", overrides: Iterable[str] = ()) -> ModelConfig:
    if isinstance(preset, ModelConfig):
        if list(overrides):
            raise ValueError("overrides apply to a preset name or YAML path, not to a ModelConfig object")
        return preset
    return load_config(ModelConfig, preset, overrides)


def build_model(
    preset: Union[str, ModelConfig] = "base",
    task: str = "pretrain",
    overrides: Iterable[str] = (),
    seed: Optional[int] = None,
) -> ALBEFBase:
    """Build a randomly initialised model; load weights with ``albef.models.convert``."""
    if task in _RENAMED:
        raise ValueError(f"task={task!r} is now {_RENAMED[task]!r}, the name of its fine-tuning task")
    if task not in MODEL_CLASSES:
        raise ValueError(f"task={task!r}: expected one of {sorted(MODEL_CLASSES)}")
    cfg = model_config(preset, overrides)
    if seed is not None:
        import torch

        torch.manual_seed(seed)
    return MODEL_CLASSES[task](cfg)
