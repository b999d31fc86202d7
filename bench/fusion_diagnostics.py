"""What does a pretraining checkpoint's fusion encoder do with the image? Six probes on the demo world (issue 16).

    python bench/fusion_diagnostics.py runs/demo/pretrain/final.pth --world /tmp/world [more checkpoints ...]

``--world`` is a world made by ``python -m albef.demo.world`` at the checkpoint's resolution (its held-out split is
probed; the locality probe also fits on training images). Each checkpoint's model settings are read from the
``config.yaml`` next to it (the run folder), or from ``--config``. ``none`` probes the untrained model of the first
checkpoint's settings. One JSON line per checkpoint:

* ``locality``: does the ViT's patch token of a grid cell carry that cell's object, and only that? Linear probes
  (fitted on training images) read the colour, the shape and the size of the object in cell p from the final patch
  token p (``own``), and from the token of the diagonally opposite cell (``opposite``); accuracy on the occupied
  cells of held-out images. The cell probes need one ViT patch per world cell (48 px, 16 px patches); otherwise
  they say skipped.
* ``supervised``: what the same ViT can hold when it is trained for it: a copy of the checkpoint's ViT with one
  linear head per attribute on each patch token, trained on the training images' cell labels
  (``--supervised-steps`` of 64 images, AdamW 1e-3), then read on the held-out cells. ``locality`` far below
  ``supervised`` means pretraining did not ask the ViT for that attribute, not that the ViT cannot see it.
* ``mlm``: masked-word accuracy of the multimodal MLM on held-out captions, every colour word (then every shape
  word) of a caption masked at once, with the caption's own image and with another image. Own > other means MLM
  reads the image.
* ``retrieval``: image -> caption retrieval on the held-out images, ITC's top-1 caption and ITM's re-ranking of
  ITC's top ``--k-test`` (the official evaluation): ``r1`` against the instance ground truth (an image's own five
  captions), ``true`` the share of top-1 captions that are true of the image (decided from the scene graphs by
  ``albef.demo.world.caption_holds``), and for the ``wrong`` top-1 captions (another image's) how many are true
  of the image anyway and how many name its object count, colours, shapes and sizes.
* ``attention``: for the held-out referring expressions, how often the referred object's cell gets the most of the
  fusion layers' cross-attention (summed over the expression's words except "the", mean over heads), and of the
  official ``itm`` Grad-CAM, among the cells that hold an object; ``chance`` is the mean of 1 / objects.

* ``minimal_pairs``: does a one-attribute change move ITC's similarity and ITM's match probability the right way?
  In every held-out scene without a star, each object in turn gets another colour, shape (circle, square or
  triangle) or size; the scene is drawn twice on the same fresh background, as it is and with that change, and its
  full description (the first caption, which names every object's colour, shape and place, and sizes below four
  objects) is changed in that object's words. ``itc_image`` / ``itm_image``: how often the description scores
  higher with its own scene than with the changed one; ``itc_text`` / ``itm_text``: how often the scene scores its
  own description higher than the changed description. 50% = blind to that attribute.

A diagnostic, not a benchmark of speed: one process, no DeepSpeed.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from albef.config import from_dict  # noqa: E402
from albef.data.transforms import normalize_images, test_transform  # noqa: E402
from albef.demo.vit import ATTRIBUTES, accuracy, cell_index, cell_labels, load_images, train_vit  # noqa: E402
from albef.demo.world import (  # noqa: E402
    COLOURS,
    SIZES,
    background,
    caption_holds,
    desc,
    join_list,
    jpeg,
    paint,
    where_phrase,
)
from albef.eval.grounding import gradcam  # noqa: E402
from albef.eval.retrieval import encode_images, encode_texts, itm_rerank  # noqa: E402
from albef.models import ModelConfig, build_model  # noqa: E402
from albef.models.convert import load_pretrained  # noqa: E402
from albef.tasks.retrieval import RetrievalDataConfig  # noqa: E402
from albef.tokenizer import Tokenizer, pre_caption  # noqa: E402

SHAPE_WORDS = ["circle", "square", "triangle", "star", "circles", "squares", "triangles", "stars"]


def grid_cells(objects) -> dict:
    """The cell of each object, keyed by its box."""
    return {tuple(o["box"]): cell_index(o) for o in objects}


def fit_probe(x: torch.Tensor, y: torch.Tensor, classes: int, steps: int = 300) -> torch.nn.Linear:
    torch.manual_seed(0)
    lin = torch.nn.Linear(x.shape[1], classes)
    opt = torch.optim.Adam(lin.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(lin(x), y).backward()
        opt.step()
    return lin


@torch.no_grad()
def locality(model, train_images, ytr: dict, val_images, yva: dict, sizes: dict) -> dict:
    """Per attribute: the linear probe's held-out accuracy from the own cell's token and the opposite cell's.
    ``sizes``: each attribute's vocabulary size, which is also its "empty" label."""
    xtr, xva = model.encode_image(train_images)[:, 1:], model.encode_image(val_images)[:, 1:]
    mu, sd = xtr.reshape(-1, xtr.shape[-1]).mean(0), xtr.reshape(-1, xtr.shape[-1]).std(0) + 1e-6
    out = {}
    for key in ytr:
        out[key] = {}
        for name, perm in (("own", list(range(9))), ("opposite", list(range(8, -1, -1)))):
            with torch.enable_grad():
                x, y = ((xtr - mu) / sd).reshape(-1, xtr.shape[-1]), ytr[key][:, perm].reshape(-1)
                lin = fit_probe(x, y, sizes[key] + 1)  # the vocabulary and "empty"
            pred = lin(((xva - mu) / sd).reshape(-1, xva.shape[-1])).argmax(1)
            out[key][name] = accuracy(pred, yva[key][:, perm].reshape(-1), sizes[key])
    return out


def supervised(model, train_images, ytr: dict, val_images, yva: dict, sizes: dict, steps: int) -> dict:
    """Per attribute: held-out accuracy of a copy of the ViT trained with a linear head per attribute on its own
    cells' labels (``train_vit``)."""
    vit = copy.deepcopy(model.visual_encoder)
    heads = train_vit(vit, train_images, ytr, sizes, steps)
    with torch.no_grad():
        tokens = vit.forward_features(val_images)[:, 1:]
        return {k: accuracy(heads[k](tokens).argmax(-1), y, sizes[k]) for k, y in yva.items()}


@torch.no_grad()
def mlm(model, tok: Tokenizer, images: torch.Tensor, captions: list, owner: torch.Tensor, words: dict) -> dict:
    t = tok(captions)
    ids, mask = t["input_ids"], t["attention_mask"]
    embeds = model.encode_image(images)
    other = (owner + 1 + torch.randint(len(images) - 1, owner.shape, generator=torch.Generator().manual_seed(0))) % len(
        images
    )
    out = {}
    for kind, ws in words.items():
        wanted = torch.tensor(sorted(tok.vocab[w] for w in ws if w in tok.vocab))
        rows, cols = torch.isin(ids, wanted).nonzero(as_tuple=True)
        masked = ids.clone()
        masked[rows, cols] = tok.mask_token_id
        acc = {}
        for name, which in (("own", owner), ("other", other)):
            logits = model.mlm_head(model.mlm_hidden(masked, mask, embeds[which])[rows, cols])
            acc[name] = round(100 * (logits.argmax(-1) == ids[rows, cols]).float().mean().item(), 1)
        out[kind] = dict(acc, words=int(len(rows)))
    return out


@torch.no_grad()
def retrieval(model, tok: Tokenizer, images: torch.Tensor, entries: list, scenes: dict, k_test: int) -> dict:
    captions = [c for e in entries for c in e["caption"]]
    source = [(i, k) for i, e in enumerate(entries) for k in range(len(e["caption"]))]  # caption -> (image, kind)
    objs = [scenes[Path(e["image"]).stem]["objects"] for e in entries]
    d = RetrievalDataConfig()  # the retrieval evaluation's text: 30 words, 30 tokens (pretraining cuts at 25)
    t = tok([pre_caption(c, d.max_words) for c in captions], max_length=d.max_text_len)
    image_embeds, image_feat = encode_images(model, [images])
    text_embeds, text_feat = encode_texts(model, t["input_ids"], t["attention_mask"])
    sims = image_feat.float() @ text_feat.float().t()
    itm, _ = itm_rerank(model, sims, image_embeds, text_embeds, t["attention_mask"], k_test)

    def named(scene, key):
        return sorted(o[key] for o in scene)

    out = {}
    for name, scores in (("itc", sims), ("itm", itm)):
        row = dict.fromkeys(("r1", "true", "wrong", "wrong_true", "count", "colours", "shapes", "sizes"), 0)
        for i, j in enumerate(scores.argmax(1).tolist()):
            owner, kind = source[j]
            holds = caption_holds(kind, captions[j], objs[owner], objs[i])
            row["r1"] += owner == i
            row["true"] += holds
            if owner != i:
                row["wrong"] += 1
                row["wrong_true"] += holds
                row["count"] += len(objs[owner]) == len(objs[i])
                for key, word in (("colour", "colours"), ("shape", "shapes"), ("size", "sizes")):
                    row[word] += named(objs[owner], key) == named(objs[i], key)
        row["r1"], row["true"] = (round(100 * row[k] / len(entries), 1) for k in ("r1", "true"))
        out[name] = row
    return out


PLAIN_SHAPES = ("circle", "square", "triangle")  # drawn in their box; a star's box is narrower than its square


def render(objects: list, res: int, rng) -> Image.Image:
    """A world scene drawn again from its objects (circles, squares, triangles) on a background drawn with ``rng``."""
    image = background(rng, res)
    draw = ImageDraw.Draw(image)
    for o in objects:
        x0, y0, d, _ = o["box"]
        paint(draw, o["shape"], x0, y0, d, o["rgb"])
    return image


def changed(obj: dict, key: str, res: int, rng: random.Random) -> dict:
    """``obj`` with another value of ``key``: a colour keeps the object's colour jitter, a size keeps its centre
    (within its cell)."""
    new = dict(obj)
    if key == "colour":
        new["colour"] = rng.choice([c for c in COLOURS if c != obj["colour"]])
        offset = [v - b for v, b in zip(obj["rgb"], COLOURS[obj["colour"]])]
        new["rgb"] = [min(255, max(0, b + o)) for b, o in zip(COLOURS[new["colour"]], offset)]
    elif key == "shape":
        new["shape"] = rng.choice([s for s in PLAIN_SHAPES if s != obj["shape"]])
    else:
        cell = res / 3
        new["size"] = next(s for s in SIZES if s != obj["size"])
        x0, y0, d, _ = obj["box"]
        nd = round(SIZES[new["size"]] * cell)
        x0, y0 = (
            int(min(max(v + (d - nd) // 2, k * cell), (k + 1) * cell - nd))
            for v, k in ((x0, obj["col"]), (y0, obj["row"]))
        )
        new["box"] = [x0, y0, nd, nd]
    return new


def redescribed(full: str, objs: list, scene: list) -> str:
    """The full description of ``scene`` (``objs`` with one object changed), with ``full``'s opening words."""

    def listed(objects):
        return join_list([f"{desc(o, len(objects) < 4)} {where_phrase(o['position'])}" for o in objects])

    if not full.endswith(listed(objs)):
        raise ValueError(f"{full!r} is not the full description of {objs}")
    return full[: len(full) - len(listed(objs))] + listed(scene)


@torch.no_grad()
def minimal_pairs(model, tok: Tokenizer, entries: list, scenes: dict, res: int) -> dict:
    rng = random.Random(0)
    pairs = {k: ([], [], [], []) for k in ATTRIBUTES}  # image, changed image, description, changed description
    for e in entries:
        objs = scenes[Path(e["image"]).stem]["objects"]
        if any(o["shape"] not in PLAIN_SHAPES for o in objs):
            continue
        sized, full = len(objs) < 4, e["caption"][0]  # the full description names sizes below 4 objects
        for k, key in ((k, key) for k in range(len(objs)) for key in pairs if sized or key != "size"):
            images, others, texts, other_texts = pairs[key]
            new, base = changed(objs[k], key, res, rng), rng.randrange(2**31)
            scene = [new if j == k else o for j, o in enumerate(objs)]
            images.append(render(objs, res, np.random.default_rng(base)))
            others.append(render(scene, res, np.random.default_rng(base)))
            texts.append(full)
            other_texts.append(redescribed(full, objs, scene))
    d, transform = RetrievalDataConfig(), test_transform(res)

    def encode(batch):
        x = normalize_images(torch.stack([torch.as_tensor(transform(jpeg(im), random.Random(0))) for im in batch]))
        return encode_images(model, [x])

    def tokens(texts):
        return tok([pre_caption(c, d.max_words) for c in texts], max_length=d.max_text_len)

    def match(text_embeds, mask, image_embeds):
        return F.softmax(model.itm_logits(text_embeds, mask, image_embeds).float(), dim=-1)[:, 1]

    def share(a, b):
        return round(100 * (a > b).float().mean().item(), 1)

    out = {}
    for key, (images, others, texts, other_texts) in pairs.items():
        (ie, iff), (oe, of) = encode(images), encode(others)
        t, ot = tokens(texts), tokens(other_texts)
        (te, tf), (ote, otf) = (encode_texts(model, x["input_ids"], x["attention_mask"]) for x in (t, ot))
        own_itc, own_itm = (iff * tf).sum(1), match(te, t["attention_mask"], ie)
        out[key] = {
            "pairs": len(images),
            "itc_image": share(own_itc, (of * tf).sum(1)),
            "itm_image": share(own_itm, match(te, t["attention_mask"], oe)),
            "itc_text": share(own_itc, (iff * otf).sum(1)),
            "itm_text": share(own_itm, match(ote, ot["attention_mask"], ie)),
        }
    return out


def attention(model, tok: Tokenizer, images, texts, target, occupied) -> dict:
    t = tok(texts)
    ids, mask = t["input_ids"], t["attention_mask"]
    content = mask.clone()  # the expression's words, without [CLS] (ALBEF's tokenizer adds no [SEP]) and "the"
    content[:, 0] = 0
    content[ids == tok.vocab["the"]] = 0

    def hit(scores):
        return round(100 * (scores.masked_fill(~occupied, -1e9).argmax(1) == target).float().mean().item(), 1)

    out = {"chance": round(100 * (1 / occupied.sum(1).float()).mean().item(), 1)}
    with torch.no_grad():
        text_embeds, image_embeds = model.encode_text(ids, mask), model.encode_image(images)
    for layer in range(model.cfg.text.fusion_layer, model.cfg.text.num_hidden_layers):
        attn = model.bert.encoder.layer[layer].crossattention.self
        attn.save_attention = True
        try:
            with torch.no_grad():
                model.itm_logits(text_embeds, mask, image_embeds)
            probs = attn.attention_map[..., 1:]  # (B, heads, L, cells)
        finally:
            attn.save_attention, attn.attention_map = False, None
        out[f"attention_layer{layer}"] = hit((probs * content[:, None, :, None]).sum(2).mean(1))
        out[f"gradcam_layer{layer}"] = hit(gradcam(model, images, ids, mask, "itm", layer).flatten(1))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoints", nargs="+", help="pretraining checkpoints (final.pth), or 'none'")
    ap.add_argument("--world", type=Path, required=True)
    ap.add_argument("--config", type=Path, help="run config.yaml (default: next to each checkpoint)")
    ap.add_argument("--num-train", type=int, default=1500, help="training images for the locality probes")
    ap.add_argument("--supervised-steps", type=int, default=500, help="training steps of the supervised ViT copy")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--k-test", type=int, default=16, help="ITC candidates ITM re-ranks (the demo's eval.k_test)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    world = args.world
    meta = json.loads((world / "world.json").read_text())
    scenes, vocabulary = meta["scenes"], meta["vocabulary"]
    colours = list(vocabulary["colours"])
    tok = Tokenizer()
    val = json.loads((world / "retrieval_val.json").read_text())
    refs_meta = json.loads((world / "refcoco+_refs.json").read_text())
    refs = json.loads((world / "refcoco+_val.json").read_text())
    target, occupied = [], torch.zeros(len(refs), 9, dtype=torch.bool)
    for k, r in enumerate(refs):
        ref = refs_meta[str(r["ref_id"])]
        cells = grid_cells(scenes[ref["image_id"]]["objects"])
        target.append(cells[tuple(ref["bbox"])])
        occupied[k, list(cells.values())] = True
    target = torch.tensor(target)
    captions = [c for e in val for c in e["caption"]]
    owner = torch.tensor([i for i, e in enumerate(val) for _ in e["caption"]])
    train_ids = sorted(i for i in scenes if i.startswith("train"))[: args.num_train]
    val_ids = sorted(i for i in scenes if i.startswith("val"))
    sizes = {k: len(vocabulary[v]) for k, v in ATTRIBUTES.items()}
    ytr, yva = (
        {k: cell_labels(scenes, ids, k, list(vocabulary[v])) for k, v in ATTRIBUTES.items()}
        for ids in (train_ids, val_ids)
    )
    sets = {
        "train": [scenes[i]["image"] for i in train_ids],
        "val": [scenes[i]["image"] for i in val_ids],
        "captions": [e["image"] for e in val],
        "refs": [r["image"] for r in refs],
    }
    loaded = {}  # (set, resolution) -> normalized images: each set is decoded once for all checkpoints

    def images(name: str, res: int) -> torch.Tensor:
        if (name, res) not in loaded:
            loaded[name, res] = load_images(world, sets[name], res)
        return loaded[name, res]

    first = next((c for c in args.checkpoints if c != "none"), None)
    if args.config is None and first is None:
        ap.error("'none' alone needs --config (the model settings to build)")
    for ck in args.checkpoints:
        config = args.config or Path(first if ck == "none" else ck).parent / "config.yaml"
        settings = from_dict(ModelConfig, yaml.safe_load(config.read_text())["model"])
        res = settings.vision.img_size
        model = build_model(settings, "pretrain", seed=0).eval()
        if ck != "none":
            load_pretrained(model, ck)
        row = {"checkpoint": ck}
        row["mlm"] = mlm(
            model, tok, images("captions", res), captions, owner, {"colour": colours, "shape": SHAPE_WORDS}
        )
        row["retrieval"] = retrieval(model, tok, images("captions", res), val, scenes, args.k_test)
        row["minimal_pairs"] = minimal_pairs(model, tok, val, scenes, res)
        grid = res // settings.vision.patch_size
        if grid != 3:  # the cell probes need one ViT patch per world cell
            skipped = f"skipped: a {grid}x{grid} patch grid, not the world's 3x3 cells"
            row["locality"] = row["supervised"] = row["attention"] = skipped
        else:
            train_images, val_images = images("train", res), images("val", res)
            row["locality"] = locality(model, train_images, ytr, val_images, yva, sizes)
            row["supervised"] = supervised(model, train_images, ytr, val_images, yva, sizes, args.supervised_steps)
            texts = [r["text"] for r in refs]
            row["attention"] = attention(model, tok, images("refs", res), texts, target, occupied)
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
