"""A supervised image encoder for the demo world: the stand-in for the DeiT weights that the official recipe starts
its ViT from. The demo trains it on a labelled world of its own seed and starts pretraining from it (README
"The fusion encoder learns shape when the ViT carries it").

    python -m albef.demo.vit --world /tmp/labelled_world --out /tmp/world_vit.pth [--model demo] [--steps 1500]
    python -m pretrain.train pretrain/configs/demo.yaml init.vit=/tmp/world_vit.pth ...

``--world`` is a world made by ``python -m albef.demo.world`` at the model's resolution, drawn with a seed of its
own (the labelled "ImageNet" of this world, not the images pretraining sees). The preset's ViT is trained from
random weights with a linear head per attribute on each patch token against its grid cell's object (colour, shape,
size; empty cells carry no loss) and, unless ``--no-scene``, two heads on the [CLS] token: which colours, shapes and
sizes the scene holds, and how many objects. The ViT is saved under timm's key names, so pretraining loads it
through ``init.vit`` (``albef.models.convert.init_vit_from_deit``), the official DeiT path; the heads are dropped.
Prints one JSON line: the held-out (val split) accuracy of each head (``present``: of each value flag). Labels per
cell rather than per image because image-level labels alone do not train this two-block ViT in minutes (README).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from albef.data.transforms import normalize_images, test_transform
from albef.models import build_model, model_config


def load_images(world: Path, names, res: int) -> torch.Tensor:
    transform, rng = test_transform(res), random.Random(0)
    return normalize_images(
        torch.stack([torch.as_tensor(transform((world / "images" / n).read_bytes(), rng)) for n in names])
    )


def cell_index(obj: dict) -> int:
    """The world's 3x3 cell of an object: row * 3 + col."""
    return obj["row"] * 3 + obj["col"]


ATTRIBUTES = {"colour": "colours", "shape": "shapes", "size": "sizes"}  # object key -> world.json vocabulary key


def cell_labels(scenes: dict, ids: list, key: str, vocab: list) -> torch.Tensor:
    """(images, 9) index in ``vocab`` of the ``key`` of the object in each cell, ``len(vocab)`` where it is empty."""
    labels = torch.full((len(ids), 9), len(vocab))
    for k, i in enumerate(ids):
        for o in scenes[i]["objects"]:
            labels[k, cell_index(o)] = vocab.index(o[key])
    return labels


def accuracy(pred: torch.Tensor, truth: torch.Tensor, empty: int) -> float:
    occupied = truth != empty
    return round(100 * (pred[occupied] == truth[occupied]).float().mean().item(), 1)


def train_vit(vit, images, cells: dict, sizes: dict, steps: int, scene=None, lr: float = 1e-3, batch: int = 64):
    """Train ``vit`` in place with a linear head per attribute on each patch token against its cell's label
    (``cells``: attribute -> (images, 9) labels; empty cells carry no loss), and with ``scene`` = (present, count)
    also two heads on the [CLS] token: which attribute values the scene holds (multi-label) and how many objects
    (classes 0..3 for 1..4). Returns the heads."""
    width = vit.num_features
    heads = torch.nn.ModuleDict({k: torch.nn.Linear(width, n) for k, n in sizes.items()})
    if scene is not None:
        heads["present"], heads["count"] = torch.nn.Linear(width, scene[0].shape[1]), torch.nn.Linear(width, 4)
    opt = torch.optim.AdamW(list(vit.parameters()) + list(heads.parameters()), lr=lr)
    gen = torch.Generator().manual_seed(0)
    vit.train()
    for _ in range(steps):
        idx = torch.randint(len(images), (min(batch, len(images)),), generator=gen)
        out = vit.forward_features(images[idx])
        tokens = out[:, 1:]
        loss = sum(
            F.cross_entropy(heads[k](tokens).flatten(0, 1), y[idx].flatten(), ignore_index=sizes[k])
            for k, y in cells.items()
        )
        if scene is not None:
            present, count = scene
            loss = loss + F.binary_cross_entropy_with_logits(heads["present"](out[:, 0]), present[idx])
            loss = loss + F.cross_entropy(heads["count"](out[:, 0]), count[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    vit.eval()
    return heads


def scene_labels(scenes: dict, ids: list, vocabulary: dict):
    """(images, values) 0/1: whether the scene holds an object of each colour, shape and size; (images,) objects - 1."""
    values = [(key, v) for key, vocab in ATTRIBUTES.items() for v in vocabulary[vocab]]
    present = torch.tensor([[float(any(o[k] == v for o in scenes[i]["objects"])) for k, v in values] for i in ids])
    count = torch.tensor([len(scenes[i]["objects"]) - 1 for i in ids])
    return present, count


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--world", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True, help="the ViT's weights, timm key names (init.vit)")
    ap.add_argument("--model", default="demo", help="model preset whose ViT is trained (albef/configs)")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--no-scene", action="store_true", help="no [CLS] heads: the cells' labels only")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if not (args.world / "world.json").is_file():
        ap.error(f"{args.world / 'world.json'} not found: --world takes a folder made by python -m albef.demo.world")
    meta = json.loads((args.world / "world.json").read_text())
    scenes, vocabulary = meta["scenes"], meta["vocabulary"]
    settings = model_config(args.model)
    res = settings.vision.img_size
    if meta["image_size"] != res or res // settings.vision.patch_size != 3:
        ap.error(
            f"{args.world} has {meta['image_size']} px images; the {args.model!r} ViT needs {res} px in 3x3 patches"
        )
    ids = {split: sorted(i for i in scenes if scenes[i]["split"] == split) for split in ("train", "val")}
    sizes = {k: len(vocabulary[v]) for k, v in ATTRIBUTES.items()}
    cells = {s: {k: cell_labels(scenes, ids[s], k, list(vocabulary[v])) for k, v in ATTRIBUTES.items()} for s in ids}
    images = {s: load_images(args.world, [scenes[i]["image"] for i in ids[s]], res) for s in ids}
    scene = {s: scene_labels(scenes, ids[s], vocabulary) for s in ids}
    vit = build_model(settings, "pretrain", seed=0).visual_encoder
    heads = train_vit(
        vit, images["train"], cells["train"], sizes, args.steps, None if args.no_scene else scene["train"]
    )
    with torch.no_grad():
        out = vit.forward_features(images["val"])
        row = {k: accuracy(heads[k](out[:, 1:]).argmax(-1), y, sizes[k]) for k, y in cells["val"].items()}
        if not args.no_scene:
            present, count = scene["val"]
            row["present"] = round(
                100 * ((heads["present"](out[:, 0]) > 0).float() == present).float().mean().item(), 1
            )
            row["count"] = round(100 * (heads["count"](out[:, 0]).argmax(-1) == count).float().mean().item(), 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(vit.state_dict(), args.out)
    print(json.dumps({"out": str(args.out), "steps": args.steps, "val": row}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
