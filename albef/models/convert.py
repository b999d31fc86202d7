"""Checkpoint interop: the only module that knows foreign layouts and key conversions.

* ``load_pretrained(model, path)`` loads an official ALBEF checkpoint (``ALBEF_4M.pth``, ``ALBEF.pth``, a fine-tuned
  ``{'model': ...}`` file or a bare state dict such as the released ``refcoco.pth``), one of our own exports, or
  a DeepSpeed ``mp_rank_00_model_states.pt`` into any of our models. Conversions: 0-d ``temp`` -> shape [1];
  ``text_encoder.bert.X`` <-> ``text_encoder.X`` between the pretraining and downstream layouts; bicubic
  ``pos_embed`` resizing (CLS row kept) for another image size; momentum twins copied from the online weights
  when a checkpoint has none. Every missing or unexpected key is reported by name, and the load is refused when
  a weight the model needs is missing or has the wrong shape. The official code loads with ``strict=False``
  and so silently ran with random weights after a wrong key (ALBEF issues #84, #50).
* Downstream task layouts (ALBEF_REFERENCE D.2): a pretraining checkpoint loaded into the VQA model fills the
  answer decoder from the fusion layers (``pretrain_to_vqa``: layer k -> decoder layer k - fusion_layer, embeddings
  and MLM head copied, online and momentum); into the NLVR2 / text-assignment models it duplicates every fusion
  layer (``pretrain_to_nlvr``: k -> 2(k - f) + f and 2(k - f) + f + 1). ``task_load_rules`` lists what such a load
  may leave out (a new ``cls_head`` / ``ta_head``) or ignore (ITC/ITM weights, queues), by name in the report.
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
    return unwrap_state_dict(read_checkpoint(path), str(path))


def read_checkpoint(path: Union[str, Path]) -> object:
    """The object saved in a checkpoint file, loaded without running code (``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, truncated files, non-tensor objects
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from None


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
    sd = adapt_task_layout(dict(sd), model, report)  # VQA decoder / NLVR2 layers from a pretraining layout

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


def _accepted_missing(model: nn.Module, missing: List[str], sd_keys, momentum_prefixes=MOMENTUM_PREFIXES) -> tuple:
    """Split missing keys into those a load may leave at init and the rest."""
    ok, momentum = [], []
    for k in missing:
        if k == "idx_queue" or k in QUEUE_KEYS:
            ok.append(k)  # retrieval's image-id queue starts at -100; queues start random, as in a fresh run
        elif k.startswith(momentum_prefixes):
            momentum.append(k)
    has_any_momentum = any(k.startswith(momentum_prefixes) for k in sd_keys)
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
    rules = task_load_rules(model)  # empty for the pretraining/retrieval models
    momentum_prefixes = MOMENTUM_PREFIXES + rules.momentum
    accepted, momentum_from_online = _accepted_missing(model, missing, sd.keys(), momentum_prefixes)
    accepted += [k for k in missing if k.startswith(tuple(allow_missing) + rules.missing) and k not in accepted]
    fatal_missing = [k for k in missing if k not in accepted]
    if fatal_missing:
        raise CheckpointError(
            f"{name}: {len(fatal_missing)} weight(s) the model needs are missing from the checkpoint: "
            + ", ".join(fatal_missing[:40])
            + (" ..." if len(fatal_missing) > 40 else "")
            + ". Is this the right checkpoint for this model/preset?"
        )
    droppable = [k for k in unexpected if _MLM_HEAD.match(k) or k.startswith(rules.unexpected)]
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
    report.missing = [k for k in accepted if not k.startswith(momentum_prefixes)]
    report.unexpected = unexpected
    report.momentum_from_online = momentum_from_online
    log.info(report.summary())
    return report


def export_official(model: ALBEFBase) -> StateDict:
    """The model's state dict in the official layout: same keys, ``temp`` 0-d, tied tensors kept tied."""
    sd = dict(model.state_dict())
    if "temp" in sd:  # the task-head models (VQA, NLVR2, SNLI-VE) have no temperature
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
    mismatched = [
        f"{k}: {tuple(v.shape)} vs {tuple(target[k].shape)}"
        for k, v in sd.items()
        if k in target and v.shape != target[k].shape
    ]
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
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "max_position_embeddings",
    "type_vocab_size",
)


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
    diffs = [
        f"{f}: {getattr(hf_cfg, f)} (checkpoint) vs {getattr(ours, f)} (model.text)"
        for f in _HF_FIELDS
        if getattr(hf_cfg, f) != getattr(ours, f)
    ]
    if diffs:
        raise CheckpointError(
            f"{name_or_path}: BERT architecture differs from the model config:\n  " + "\n  ".join(diffs)
        )
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


# ---------------------------------------------------------------------------------------------------------------
# Downstream task layouts: the VQA answer decoder and the NLVR2 two-image encoder (ALBEF_REFERENCE D.2, C.2, C.3)

_TEXT_KEY = re.compile(r"^(text_encoder(?:_m)?)\.(?:bert\.)?(.*)$")  # pretraining (bert.) or downstream layout
_LAYER_KEY = re.compile(r"^encoder\.layer\.(\d+)\.(.*)$")
_PRETRAIN_ONLY = (
    "vision_proj",
    "text_proj",
    "itm_head.",
    "temp",
    "image_queue",
    "text_queue",
    "queue_ptr",
    "idx_queue",
)


def pretrain_to_vqa(sd: StateDict, fusion_layer: int) -> StateDict:
    """A pretraining (or downstream) state dict -> the VQA layout, for the online and the ``_m`` text encoder.

    The encoder gets the ``bert.``-less copy of every text-encoder key (the MLM head excepted). The answer decoder
    ``text_decoder(_m).bert`` gets fusion layer ``k >= fusion_layer`` as its layer ``k - fusion_layer`` (the
    fusion layers' cross-attention becomes the decoder's cross-attention to the question states) and a copy of the
    embeddings; ``text_decoder(_m).cls`` is the MLM head (official ``VQA.py``). Other keys pass unchanged.
    """
    out: StateDict = {}
    for key, value in sd.items():
        m = _TEXT_KEY.match(key)
        if m is None:
            out[key] = value
            continue
        encoder, rest = m.groups()
        decoder = encoder.replace("text_encoder", "text_decoder")
        layer = _LAYER_KEY.match(rest)
        if rest.startswith("cls."):
            out[f"{decoder}.{rest}"] = value
            continue
        out[f"{encoder}.{rest}"] = value
        if layer is None:
            out[f"{decoder}.bert.{rest}"] = value  # embeddings (and position_ids)
        elif int(layer.group(1)) >= fusion_layer:
            out[f"{decoder}.bert.encoder.layer.{int(layer.group(1)) - fusion_layer}.{layer.group(2)}"] = value
    return out


def pretrain_to_nlvr(sd: StateDict, fusion_layer: int) -> StateDict:
    """A pretraining (or downstream) state dict -> the two-image layout of NLVR2 / text assignment.

    Text-encoder keys lose ``bert.``; layers below ``fusion_layer`` keep their index; fusion layer ``k`` becomes
    layers ``f + 2(k - f)`` and ``f + 2(k - f) + 1`` (official ``Pretrain_nlvr.py``), so both layers reading image
    0 and image 1 start from the same pretrained layer, and the shared cross-attention key/value receive one
    value. Read from the original dict into a new one, so no renamed key can overwrite a source key.
    """
    out: StateDict = {}
    for key, value in sd.items():
        m = _TEXT_KEY.match(key)
        if m is None:
            out[key] = value
            continue
        encoder, rest = m.groups()
        layer = _LAYER_KEY.match(rest)
        if layer is None or int(layer.group(1)) < fusion_layer:
            out[f"{encoder}.{rest}"] = value
            continue
        first = fusion_layer + 2 * (int(layer.group(1)) - fusion_layer)
        for index in (first, first + 1):
            out[f"{encoder}.encoder.layer.{index}.{layer.group(2)}"] = value
    return out


def _text_layer_count(sd: Mapping[str, torch.Tensor]) -> int:
    """Number of layers of the online text encoder in ``sd`` (either layout)."""
    found = (re.match(r"^text_encoder\.(?:bert\.)?encoder\.layer\.(\d+)\.", k) for k in sd)
    return max((int(m.group(1)) + 1 for m in found if m), default=0)


def adapt_task_layout(sd: StateDict, model: nn.Module, report: LoadReport) -> StateDict:
    """Map a pretraining-layout checkpoint onto a VQA / NLVR2 model; a no-op for every other model or when the
    checkpoint is already in the model's layout (a fine-tuned checkpoint)."""
    from albef.models.downstream import ALBEFNLVR, ALBEFVQA, ALBEFNLVRPretrain

    if isinstance(model, ALBEFVQA) and not any(k.startswith("text_decoder.") for k in sd):
        f = model.cfg.text.fusion_layer
        report.converted.append(
            f"text_encoder(_m) layers >= {f} -> text_decoder(_m).bert layers 0.., embeddings and "
            "MLM head copied to text_decoder(_m) (VQA answer decoder)"
        )
        return pretrain_to_vqa(sd, f)
    if isinstance(model, (ALBEFNLVR, ALBEFNLVRPretrain)):
        f, n = model.cfg.text.fusion_layer, model.cfg.text.num_hidden_layers
        if _text_layer_count(sd) == n != model.text_encoder.cfg.num_hidden_layers:
            report.converted.append(
                f"text_encoder(_m) layer k >= {f} -> layers {f}+2(k-{f}) and {f}+2(k-{f})+1 (NLVR2 two-image layout)"
            )
            return pretrain_to_nlvr(sd, f)
    return sd


@dataclass(frozen=True)
class TaskLoadRules:
    """What a load into a task model accepts besides the core rules of ``load_pretrained``."""

    missing: tuple = ()  # key prefixes that may stay at their initial value (a new task head)
    unexpected: tuple = ()  # checkpoint key prefixes the model has no use for (pretraining-only weights)
    momentum: tuple = ()  # further momentum twins, copied from the online weights when the checkpoint has no twin


def task_load_rules(model: nn.Module) -> TaskLoadRules:
    from albef.models.downstream import ALBEFVQA, ALBEFNLVRPretrain, FusionClassifier

    if isinstance(model, ALBEFVQA):  # the decoder must come from the checkpoint: nothing new may stay at init
        return TaskLoadRules(unexpected=_PRETRAIN_ONLY, momentum=("text_decoder_m.",))
    if isinstance(model, FusionClassifier):  # NLVR2 and SNLI-VE: the classifier is new unless fine-tuned
        return TaskLoadRules(
            missing=("cls_head.", "cls_head_m."), unexpected=_PRETRAIN_ONLY + ("ta_head.",), momentum=("cls_head_m.",)
        )
    if isinstance(model, ALBEFNLVRPretrain):  # no momentum model at all
        return TaskLoadRules(missing=("ta_head.",), unexpected=_PRETRAIN_ONLY + MOMENTUM_PREFIXES)
    return TaskLoadRules()


def model_kind_of(sd: Mapping[str, torch.Tensor]) -> str:
    """The ``build_model`` kind whose layout ``sd`` has (used to export a run's checkpoint without its task)."""
    if any(k.startswith("text_decoder.") for k in sd):
        return "vqa"
    if "ta_head.weight" in sd:
        return "nlvr2_ta"
    if "cls_head.2.weight" in sd:
        return {2: "nlvr2", 3: "snli_ve"}[sd["cls_head.2.weight"].shape[0]]
    return "pretrain" if any(k.startswith("text_encoder.bert.") for k in sd) else "retrieval"
