"""One call from a checkpoint to a usable model: ``albef.load``; and back: ``save_pretrained``, ``push_to_hub``.

    model, preprocess, tokenizer = albef.load("ALBEF_4M.pth", task="retrieval")
    image = preprocess("photo.jpg")[None]                  # (1, 3, H, W), normalised
    text = tokenizer(["a dog on a sofa"], max_length=30)
    sim = model.image_feat(model.encode_image(image)) @ model.text_feat(model.encode_text(**text)).t()

``name_or_path`` may be:

* a checkpoint file: an official ALBEF ``.pth`` or one of ours (``final.pth``/``best.pth`` exports carry their run
  config). Without a config, the architecture is the preset (``albef/configs``) whose widths, depths and fusion
  layer match the tensors, with the image size read from the position embedding and the queue length from the
  queues;
* a run directory (``config.yaml`` beside ``best.pth``, else ``final.pth``);
* a folder written by ``save_pretrained`` (``config.yaml`` + ``model.pth`` + a model card), or the HuggingFace hub
  id of such a folder (fetched with ``huggingface_hub.snapshot_download``; honours ``HF_HUB_OFFLINE`` and the cache).

``task`` is the ``build_model`` kind to build (``retrieval`` for ITC/ITM features and scores, ``pretrain``, ``vqa``,
``nlvr2``, ``snli_ve``...); ``None`` builds the checkpoint's own kind. Weights load through ``load_pretrained``, so a
pretraining checkpoint loads into a retrieval model and anything missing is an error naming the keys. Loads never
run code (``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path
from typing import Mapping, NamedTuple, Optional, Union

import numpy as np
import torch
import yaml

from albef.config import from_dict, load_config
from albef.data.transforms import normalize_images, test_transform
from albef.fsutil import atomic_write
from albef.models import ALBEFBase, ModelConfig, build_model
from albef.models.convert import (
    CheckpointError,
    load_pretrained,
    model_kind_of,
    read_checkpoint,
    save_official,
    unwrap_state_dict,
)
from albef.tokenizer import Tokenizer

PRESETS = ("base", "small", "tiny")  # tried in this order when a checkpoint carries no config
CONFIG_FILE, WEIGHTS_FILE, CARD_FILE = "config.yaml", "model.pth", "README.md"


class Preprocess:
    """The evaluation image transform of a model: a path, bytes or PIL image -> a normalised ``(3, H, W)`` float
    tensor (resize to the model's ``img_size``, bicubic, as the official test transform)."""

    def __init__(self, image_size: int):
        self.image_size = image_size
        self._transform = test_transform(image_size)

    def __call__(self, image) -> torch.Tensor:
        if isinstance(image, (str, Path)):
            data = Path(image).read_bytes()
        elif isinstance(image, (bytes, bytearray)):
            data = bytes(image)
        else:  # a PIL image
            buf = io.BytesIO()
            image.convert("RGB").save(buf, "PNG")
            data = buf.getvalue()
        pixels = torch.from_numpy(np.ascontiguousarray(self._transform(data, None)))
        return normalize_images(pixels[None])[0]


class Loaded(NamedTuple):
    model: ALBEFBase
    preprocess: Preprocess
    tokenizer: Tokenizer


def load(
    name_or_path: Union[str, Path],
    task: Optional[str] = None,
    device: Union[str, torch.device] = "cpu",
    dtype: Optional[torch.dtype] = None,
    model: Union[str, ModelConfig, None] = None,
) -> Loaded:
    """``(model, preprocess, tokenizer)`` from a checkpoint file, run directory, ``save_pretrained`` folder or hub id
    (module docstring). The model is in eval mode on ``device`` in ``dtype`` (float32 by default). ``model`` (a preset name, YAML path or
    ``ModelConfig``) overrides the architecture the checkpoint implies."""
    sd, cfg = _read(name_or_path)
    if model is not None:
        cfg = model if isinstance(model, ModelConfig) else load_config(ModelConfig, model)
    elif cfg is None:
        cfg = infer_model_config(sd, str(name_or_path))
    net = build_model(cfg, task or model_kind_of(sd))
    load_pretrained(net, sd)
    net.to(device=device, dtype=dtype or torch.float32).eval()
    return Loaded(net, Preprocess(cfg.vision.img_size), Tokenizer())


def save_pretrained(
    model: ALBEFBase,
    directory: Union[str, Path],
    *,
    description: str = "",
    training_data: str = "",
    metrics: Optional[Mapping[str, float]] = None,
    name: Optional[str] = None,
) -> Path:
    """A hub-layout folder ``load`` reads: ``model.pth`` (official layout), ``config.yaml`` (the model config) and a
    model card ``README.md`` (architecture, training data, metrics; its usage example loads ``name``, by default the
    folder's name). Upload it with ``push_to_hub``."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    cfg = dataclasses.asdict(model.cfg)
    save_official(model, out / WEIGHTS_FILE)
    atomic_write(out / CONFIG_FILE, yaml.safe_dump({"model": cfg}, sort_keys=False))
    v, t = model.cfg.vision, model.cfg.text
    params = sum(p.numel() for n, p in model.named_parameters() if "_m." not in n and not n.endswith("_m"))
    lines = [
        "---",
        "library_name: albef",
        "tags: [vision-language, albef, image-text-retrieval]",
        "---",
        "",
        f"# ALBEF ({model_kind_of(model.state_dict())})",
        "",
        description or "An ALBEF model.",
        "",
        "## Architecture",
        "",
        f"* ViT: {v.img_size} px images, patch {v.patch_size}, width {v.embed_dim}, depth {v.depth}, "
        f"{v.num_heads} heads",
        f"* BERT: width {t.hidden_size}, {t.num_hidden_layers} layers (fusion from layer {t.fusion_layer}), "
        f"{t.num_attention_heads} heads, vocabulary {t.vocab_size}",
        f"* ITC features: {model.cfg.embed_dim}; queue {model.cfg.queue_size}; {params / 1e6:.1f} M parameters "
        "(without the momentum encoders)",
        "",
        "## Training data",
        "",
        training_data or "Not stated.",
        "",
        "## Metrics",
        "",
    ]
    if metrics:
        lines += ["| metric | value |", "|---|---|"] + [f"| {k} | {float(m):.2f} |" for k, m in metrics.items()]
    else:
        lines.append("Not stated.")
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "import albef",
        "",
        f'model, preprocess, tokenizer = albef.load("{name or out.name}")',
        "```",
        "",
    ]
    atomic_write(out / CARD_FILE, "\n".join(lines))
    return out


def push_to_hub(
    model_or_folder: Union[ALBEFBase, str, Path],
    repo_id: str,
    *,
    token: Optional[str] = None,
    private: Optional[bool] = None,
    revision: Optional[str] = None,
    commit_message: str = "Upload ALBEF model",
    endpoint: Optional[str] = None,
    **card,
) -> str:
    """Upload a model to the HuggingFace hub as one commit to ``repo_id`` (created if missing); returns the commit
    URL. ``model_or_folder`` is a model (saved first by ``save_pretrained`` with ``card``: description, training_data,
    metrics) or a folder ``save_pretrained`` wrote. ``albef.load(repo_id)`` then loads it. ``token``/``endpoint``
    default to huggingface_hub's (``HF_TOKEN``, ``HF_ENDPOINT``)."""
    import tempfile

    from huggingface_hub import CommitOperationAdd, HfApi

    if isinstance(model_or_folder, ALBEFBase):
        with tempfile.TemporaryDirectory() as tmp:
            folder = save_pretrained(model_or_folder, Path(tmp) / "model", name=repo_id, **card)
            return push_to_hub(
                folder,
                repo_id,
                token=token,
                private=private,
                revision=revision,
                commit_message=commit_message,
                endpoint=endpoint,
            )
    if card:
        raise ValueError(f"model card fields {sorted(card)} apply when pushing a model, not a saved folder")
    folder = Path(model_or_folder)
    files = [CONFIG_FILE, WEIGHTS_FILE, CARD_FILE]
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder}: not a save_pretrained folder (missing {', '.join(missing)})")
    api = HfApi(endpoint=endpoint, token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    # One create_commit of the three files: the hub decides per file whether it goes through LFS/Xet.
    operations = [CommitOperationAdd(path_in_repo=f, path_or_fileobj=str(folder / f)) for f in files]
    info = api.create_commit(repo_id, operations, commit_message=commit_message, revision=revision)
    return info.commit_url


# ------------------------------------------------------------------------------------------------------- reading
def _read(name_or_path) -> tuple:
    """(state dict, ModelConfig or None) of any accepted source."""
    p = Path(name_or_path)
    if p.is_file():
        obj = read_checkpoint(p)
        run_cfg = obj.get("config") if isinstance(obj, Mapping) else None
        cfg = _model_config(run_cfg, str(p)) if isinstance(run_cfg, Mapping) and "model" in run_cfg else None
        return unwrap_state_dict(obj, str(p)), cfg
    if not p.exists() and not p.is_absolute() and str(name_or_path).count("/") == 1:
        from huggingface_hub import snapshot_download  # a hub id such as "org/albef-coco"

        p = Path(snapshot_download(str(name_or_path)))
    if p.is_dir():
        weights = next((p / f for f in (WEIGHTS_FILE, "best.pth", "final.pth") if (p / f).is_file()), None)
        if weights is None or not (p / CONFIG_FILE).is_file():
            raise FileNotFoundError(
                f"{p}: expected {CONFIG_FILE} with {WEIGHTS_FILE} (a save_pretrained folder) or "
                "with best.pth / final.pth (a run directory)"
            )
        cfg = _model_config(yaml.safe_load((p / CONFIG_FILE).read_text()), str(p / CONFIG_FILE))
        return unwrap_state_dict(read_checkpoint(weights), str(weights)), cfg
    raise FileNotFoundError(f"{name_or_path}: no such checkpoint file or folder (nor an 'org/name' hub id)")


def _model_config(cfg: Mapping, where: str) -> ModelConfig:
    if not isinstance(cfg, Mapping) or not isinstance(cfg.get("model"), Mapping):
        raise CheckpointError(f"{where}: expected a 'model' section")
    return from_dict(ModelConfig, dict(cfg["model"]), f"{where}:model")


def _shapes(sd: Mapping[str, torch.Tensor]) -> dict:
    """The architecture numbers a state dict's tensors fix (widths, depths, fusion layer, vocabulary)."""

    def first(*keys):
        for k in keys:
            if k in sd:
                return sd[k].shape
        raise CheckpointError(f"checkpoint has none of {keys}: not an ALBEF state dict")

    prefix = "text_encoder.bert." if any(k.startswith("text_encoder.bert.") for k in sd) else "text_encoder."
    layers = {int(k[len(prefix) + 14 :].split(".")[0]) for k in sd if k.startswith(prefix + "encoder.layer.")}
    fusion = [i for i in sorted(layers) if f"{prefix}encoder.layer.{i}.crossattention.self.key.weight" in sd]
    patch = first("visual_encoder.patch_embed.proj.weight")
    return {
        "vision_width": patch[0],
        "patch": patch[-1],
        "depth": len({k.split(".")[2] for k in sd if k.startswith("visual_encoder.blocks.")}),
        "mlp": first("visual_encoder.blocks.0.mlp.fc1.weight")[0],
        "vocab": first(prefix + "embeddings.word_embeddings.weight")[0],
        "text_width": first(prefix + "embeddings.word_embeddings.weight")[1],
        "layers": len(layers),
        "fusion": fusion[0] if fusion else len(layers),
        "intermediate": first(prefix + "encoder.layer.0.intermediate.dense.weight")[0],
        "embed": first("vision_proj.weight")[0],
    }


def _preset_shapes(cfg: ModelConfig) -> dict:
    v, t = cfg.vision, cfg.text
    return {
        "vision_width": v.embed_dim,
        "patch": v.patch_size,
        "depth": v.depth,
        "mlp": int(v.embed_dim * v.mlp_ratio),
        "vocab": t.vocab_size,
        "text_width": t.hidden_size,
        "layers": t.num_hidden_layers,
        "fusion": t.fusion_layer,
        "intermediate": t.intermediate_size,
        "embed": cfg.embed_dim,
    }


def infer_model_config(sd: Mapping[str, torch.Tensor], source: str = "checkpoint") -> ModelConfig:
    """The preset whose architecture numbers match ``sd`` (attention heads cannot be read from tensor shapes),
    with its image size from ``visual_encoder.pos_embed`` and its queue length from ``image_queue``."""
    found = _shapes(sd)
    for name in PRESETS:
        cfg = load_config(ModelConfig, name)
        if _preset_shapes(cfg) == found:
            grid = int(round((sd["visual_encoder.pos_embed"].shape[1] - 1) ** 0.5))
            queue = sd["image_queue"].shape[1] if "image_queue" in sd else cfg.queue_size
            return dataclasses.replace(
                cfg,
                vision=dataclasses.replace(cfg.vision, img_size=grid * cfg.vision.patch_size),
                queue_size=int(queue),
            )
    raise CheckpointError(
        f"{source}: no preset of {list(PRESETS)} has this architecture ({found}); pass "
        "model=<preset or YAML> to albef.load"
    )
