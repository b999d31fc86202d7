"""Checkpoint interop: the only module that knows foreign layouts and key conversions.

* ``load_pretrained(model, path)`` loads an official ALBEF checkpoint (``ALBEF_4M.pth``, ``ALBEF.pth``, a fine-tuned
  ``{'model': ...}`` file or a bare state dict such as the released ``refcoco.pth``), one of our own exports, or
  a DeepSpeed ``mp_rank_00_model_states.pt`` into any of our models. Conversions: 0-d ``temp`` -> shape [1];
  ``text_encoder.bert.X`` <-> ``text_encoder.X`` between the pretraining and downstream layouts; bicubic
  ``pos_embed`` resizing (CLS row kept) for another image size; momentum twins copied from the online weights
  when a checkpoint has none. Every missing or unexpected key is reported by name, and the load is refused when
  a weight the model needs is missing or has the wrong shape. The official code loads with ``strict=False``
  and so silently ran with random weights after a wrong key (ALBEF issues #84, #50).
* ``export_official(model)`` gives the state dict in the official layout (0-d ``temp``); ``save_official``
  writes it as ``{'model': state_dict}`` exactly as the official scripts do.
* ``init_vit_from_deit(model, path)`` and ``init_text_from_hf(model, name_or_path)`` initialise the encoders
  for pretraining from a DeiT/timm ViT checkpoint file and from a HuggingFace BERT (local directory or hub id).

All ``torch.load`` calls use ``weights_only=True``: a checkpoint file cannot run code.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Union

import torch
from torch import nn

from albef.models.albef import ALBEFBase
from albef.models.vit import interpolate_pos_embed

log = logging.getLogger(__name__)

StateDict = Dict[str, torch.Tensor]
POS_EMBED_KEYS = ("visual_encoder.pos_embed", "visual_encoder_m.pos_embed")
MOMENTUM_PREFIXES = ("visual_encoder_m.", "vision_proj_m.", "text_encoder_m.", "text_proj_m.")
QUEUE_KEYS = ("image_queue", "text_queue", "queue_ptr")
_MLM_HEAD = re.compile(r"^text_encoder(_m)?\.cls\.")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used as asked; the message names the file and the keys."""


@dataclass
class LoadReport:
    """What a load did: keys converted, left at their initial value, or ignored."""

    source: str
    converted: List[str] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)  # accepted as missing (e.g. idx_queue), kept at init
    unexpected: List[str] = field(default_factory=list)  # accepted as unused (e.g. the MLM head)
    momentum_from_online: bool = False

    def summary(self) -> str:
        lines = [f"loaded {self.source}"]
        lines += [f"  converted: {c}" for c in self.converted]
        if self.momentum_from_online:
            lines.append("  momentum encoders (*_m) absent: copied from the online weights")
        if self.missing:
            lines.append(f"  kept at initial value ({len(self.missing)}): {', '.join(self.missing)}")
        if self.unexpected:
            lines.append(f"  unused checkpoint keys ({len(self.unexpected)}): {', '.join(self.unexpected)}")
        return "\n".join(lines)


def read_state_dict(path: Union[str, Path]) -> StateDict:
    """Read a checkpoint file and return its model state dict.

    Accepts ``{'model': sd}`` (official and ours), ``{'module': sd}`` (DeepSpeed model states), ``{'state_dict': sd}``
    or a bare state dict; a ``module.`` prefix (DDP) is removed.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, truncated files, non-tensor objects
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from None
    return unwrap_state_dict(obj, str(path))


def unwrap_state_dict(obj: object, source: str = "checkpoint") -> StateDict:
    if isinstance(obj, Mapping):
        for wrapper in ("model", "module", "state_dict"):
            if wrapper in obj and isinstance(obj[wrapper], Mapping):
                obj = obj[wrapper]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"{source}: expected a state dict or {{'model': state_dict}}, got {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{source}: entries that are not tensors: {bad[:10]}")
    sd = dict(obj)
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd


def _has_bert_prefix(keys) -> bool:
    return any(k.startswith("text_encoder.bert.") for k in keys)


def convert_to_model_layout(sd: StateDict, model: nn.Module, report: Optional[LoadReport] = None) -> StateDict:
    """Translate a foreign-but-known layout into ``model``'s key names and shapes (the one place for renames)."""
    report = report if report is not None else LoadReport("state dict")
    target = model.state_dict()
    sd = dict(sd)

    want_bert, have_bert = _has_bert_prefix(target), _has_bert_prefix(sd)
    if have_bert and not want_bert:
        # Official downstream rule: every key containing 'bert' loses its 'bert.' segment.
        sd = {k.replace("bert.", "") if "bert" in k else k: v for k, v in sd.items()}
        report.converted.append("text_encoder(_m).bert.* -> text_encoder(_m).* (downstream layout)")
    elif want_bert and not have_bert and any(k.startswith("text_encoder.embeddings.") for k in sd):
        sd = {re.sub(r"^(text_encoder(_m)?)\.(embeddings|encoder)\.", r"\1.bert.\3.", k): v for k, v in sd.items()}
        report.converted.append("text_encoder(_m).* -> text_encoder(_m).bert.* (pretraining layout)")

    if "temp" in sd and "temp" in target and sd["temp"].shape != target["temp"].shape:
        sd["temp"] = sd["temp"].reshape(target["temp"].shape)
        report.converted.append("temp: 0-d -> shape [1]")

    for key in POS_EMBED_KEYS:
        if key in sd and key in target and sd[key].shape != target[key].shape:
            before = tuple(sd[key].shape)
            sd[key] = interpolate_pos_embed(sd[key], target[key].shape[1] - 1)
            report.converted.append(f"{key}: {before} -> {tuple(sd[key].shape)} (bicubic, CLS kept)")
    return sd


def _accepted_missing(model: nn.Module, missing: List[str], sd_keys) -> tuple:
    """Split missing keys into those a load may leave at init and the rest."""
    ok, momentum = [], []
    for k in missing:
        if k == "idx_queue" or k in QUEUE_KEYS:
            ok.append(k)  # retrieval's image-id queue starts at -100; queues start random, as in a fresh run
        elif k.startswith(MOMENTUM_PREFIXES):
            momentum.append(k)
    has_any_momentum = any(k.startswith(MOMENTUM_PREFIXES) for k in sd_keys)
    if momentum and not has_any_momentum:
        ok += momentum
        return ok, True
    return ok, False


def load_pretrained(
    model: ALBEFBase,
    source: Union[str, Path, Mapping],
    *,
    allow_missing: tuple = (),
    allow_unexpected: bool = False,
) -> LoadReport:
    """Load ``source`` (a path or a state dict) into ``model``; raise ``CheckpointError`` naming the keys when the
    checkpoint does not provide every weight the model needs.

    Accepted without error (and listed in the report): a missing ``idx_queue`` or queues (kept at init), a
    checkpoint without any momentum twin (copied from the online weights), and the MLM head of a pretraining
    checkpoint loaded into a model without one. ``allow_missing`` names further key prefixes that may stay at
    their initial value; ``allow_unexpected`` tolerates other unused keys.
    """
    name = str(source) if not isinstance(source, Mapping) else "state dict"
    sd = read_state_dict(source) if not isinstance(source, Mapping) else unwrap_state_dict(source, name)
    report = LoadReport(name)
    sd = convert_to_model_layout(sd, model, report)
    target = model.state_dict()

    mismatched = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(target[k].shape)}"
        for k, v in sd.items()
        if k in target and v.shape != target[k].shape
    ]
    if mismatched:
        hint = ""
        if any(m.split(":")[0] in QUEUE_KEYS for m in mismatched):
            hint = " (queues: set model.queue_size / model.embed_dim to the checkpoint's)"
        raise CheckpointError(f"{name}: shape mismatch{hint}:\n  " + "\n  ".join(mismatched))

    missing = [k for k in target if k not in sd]
    unexpected = [k for k in sd if k not in target]
    accepted, momentum_from_online = _accepted_missing(model, missing, sd.keys())
    accepted += [k for k in missing if k.startswith(tuple(allow_missing)) and k not in accepted]
    fatal_missing = [k for k in missing if k not in accepted]
    if fatal_missing:
        raise CheckpointError(
            f"{name}: {len(fatal_missing)} weight(s) the model needs are missing from the checkpoint: "
            + ", ".join(fatal_missing[:40])
            + (" ..." if len(fatal_missing) > 40 else "")
            + ". Is this the right checkpoint for this model/preset?"
        )
    droppable = [k for k in unexpected if _MLM_HEAD.match(k)]
    other_unexpected = [k for k in unexpected if k not in droppable]
    if other_unexpected and not allow_unexpected:
        raise CheckpointError(
            f"{name}: {len(other_unexpected)} checkpoint key(s) have no place in this model: "
            + ", ".join(other_unexpected[:40])
            + ". Pass allow_unexpected=True to ignore them."
        )

    result = model.load_state_dict({k: v for k, v in sd.items() if k in target}, strict=False)
    assert sorted(result.missing_keys) == sorted(missing), (result.missing_keys, missing)
    if momentum_from_online:
        model.copy_params()
    report.missing = [k for k in accepted if not k.startswith(MOMENTUM_PREFIXES)]
    report.unexpected = unexpected
    report.momentum_from_online = momentum_from_online
    log.info(report.summary())
    return report


def export_official(model: ALBEFBase) -> StateDict:
    """The model's state dict in the official layout: same keys, ``temp`` 0-d, tied tensors kept tied."""
    sd = dict(model.state_dict())
    sd["temp"] = sd["temp"].detach().reshape(())
    return sd


def save_official(model: ALBEFBase, path: Union[str, Path], **extra) -> None:
    """Write ``{'model': state_dict, **extra}`` as the official training scripts do; loadable by the official code."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save({"model": export_official(model), **extra}, tmp)
    tmp.replace(path)  # never leave a half-written checkpoint under the final name


# ---------------------------------------------------------------------------------------------------------------
# Encoder initialisation for pretraining


def init_vit_from_deit(model: ALBEFBase, path: Union[str, Path]) -> List[str]:
    """Initialise ``visual_encoder`` (and its momentum twin) from a DeiT/timm ViT checkpoint file.

    The classifier (``head.*``, ``head_dist.*``) is dropped; a distillation token (DeiT-distilled) is dropped with
    its position row; ``pos_embed`` is resized to the model's grid. Every other ViT weight must be present with the
    right shape. Returns the dropped keys.
    """
    sd = read_state_dict(path)
    dropped = [k for k in sd if k.startswith(("head.", "head_dist.", "fc_norm.")) or k == "dist_token"]
    if "dist_token" in sd:
        pe = sd["pos_embed"]
        sd["pos_embed"] = torch.cat([pe[:, :1], pe[:, 2:]], dim=1)
    sd = {k: v for k, v in sd.items() if k not in dropped}
    vit = model.visual_encoder
    if "pos_embed" in sd:
        sd["pos_embed"] = interpolate_pos_embed(sd["pos_embed"], vit.patch_embed.num_patches)
    target = vit.state_dict()
    mismatched = [f"{k}: {tuple(v.shape)} vs {tuple(target[k].shape)}" for k, v in sd.items()
                  if k in target and v.shape != target[k].shape]  # fmt: skip
    missing = [k for k in target if k not in sd]
    unexpected = [k for k in sd if k not in target]
    if mismatched or missing or unexpected:
        raise CheckpointError(
            f"{path}: not a ViT checkpoint for vision config {model.cfg.vision}: "
            f"missing={missing[:20]} unexpected={unexpected[:20]} shape mismatch={mismatched[:20]}"
        )
    vit.load_state_dict(sd, strict=True)
    with torch.no_grad():
        for p, p_m in zip(vit.parameters(), model.visual_encoder_m.parameters()):
            p_m.copy_(p)
    return dropped


_HF_FIELDS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
    "max_position_embeddings", "type_vocab_size",
)  # fmt: skip


def init_text_from_hf(model: ALBEFBase, name_or_path: str) -> LoadReport:
    """Initialise the text encoder (and its momentum twin) from a HuggingFace BERT: a local directory or a hub id.

    Embeddings and every layer's self-attention and FFN come from the BERT; the cross-attention blocks of the
    fusion layers keep their fresh N(0, 0.02) init (BERT has none), as in the official code. A pretraining model's
    MLM head is loaded when the checkpoint has one (``bert-base-uncased`` does) and is otherwise left at init.
    The BERT's architecture must equal ``model.cfg.text``; a mismatch is an error naming the fields.
    """
    from transformers import BertConfig as HFBertConfig
    from transformers import BertForMaskedLM as HFBertForMaskedLM

    local = Path(name_or_path).is_dir()
    hf_cfg = HFBertConfig.from_pretrained(name_or_path, local_files_only=local)
    ours = model.cfg.text
    diffs = [f"{f}: {getattr(hf_cfg, f)} (checkpoint) vs {getattr(ours, f)} (model.text)" for f in _HF_FIELDS
             if getattr(hf_cfg, f) != getattr(ours, f)]  # fmt: skip
    if diffs:
        raise CheckpointError(f"{name_or_path}: BERT architecture differs from the model config:\n  " + "\n  ".join(diffs))
    hf, info = HFBertForMaskedLM.from_pretrained(name_or_path, local_files_only=local, output_loading_info=True)
    head_missing = any(k.startswith("cls.") for k in info["missing_keys"])
    hf_sd = {k: v for k, v in hf.state_dict().items() if not k.startswith("bert.pooler.")}
    if head_missing:
        hf_sd = {k: v for k, v in hf_sd.items() if not k.startswith("cls.")}
    prefix = "text_encoder." if isinstance(model.text_encoder, nn.Module) else ""
    if not _has_bert_prefix(model.state_dict()):
        hf_sd = {k[len("bert.") :]: v for k, v in hf_sd.items() if k.startswith("bert.")}
    report = LoadReport(str(name_or_path))
    target = model.text_encoder.state_dict()
    unexpected = [k for k in hf_sd if k not in target]
    if unexpected:
        raise CheckpointError(f"{name_or_path}: BERT keys with no place in the text encoder: {unexpected[:20]}")
    model.text_encoder.load_state_dict(hf_sd, strict=False)
    report.missing = [prefix + k for k in target if k not in hf_sd]
    with torch.no_grad():
        for p, p_m in zip(model.text_encoder.parameters(), model.text_encoder_m.parameters()):
            p_m.copy_(p)
    log.info(report.summary())
    return report
