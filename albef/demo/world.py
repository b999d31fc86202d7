"""A seeded procedural vision-language world for the offline demo (issue #10), in ALBEF's official data formats.

Each image shows 1-4 objects on a dark, lightly noisy grey background. The image is split into a 3x3 grid and
each object sits alone in one grid cell, so objects never overlap and every position word is exact. Each object
has a shape (circle, square, triangle, star), a colour (red, green, blue, yellow, purple, white) and a size
(small, large).

Positions use the names of the 3x3 cells: "top left", "top", "top right", "left", "center", "right",
"bottom left", "bottom", "bottom right". These names are the answers to "where is ...?". In descriptions each word
is a filter: "at the top" means the top row, "on the left" means the left column, "at the top left" means that
corner and "in the center" means the middle cell.

Everything is generated from the scene graph, so every annotation is correct by construction:
* captions describe the scene;
* a question is asked only when its answer is determined;
* a referring expression is used only when exactly one object matches it;
* neutral SNLI-VE hypotheses presuppose only objects that exist, and state properties a picture cannot show
  (material, weight, feel).

The world is small on purpose: a tiny model learns it in a few minutes of CPU training. At 128 px, a large object
spans ~36 px and a small one ~21 px.

Augmentation caveat: the official transforms flip images horizontally, which makes every "left"/"right" in the
annotations wrong. Their random crops (down to 20% of the area in pretraining, 50% in fine-tuning) can cut objects
out, which breaks counts and "there is/are no" claims. So train on this world with a plain resize, or with a mild
crop (scale >= 0.8) and no flip. Colour-free RandAugment is harmless (ALBEF's has no colour ops).

Determinism: images and JSON files are byte-identical for a seed (with the same Pillow/libjpeg). Image i of a
split uses its own ``numpy.random.Generator`` seeded with ``[seed, split, 0, i]``, so changing one split's count
never changes the other splits. The code never uses the global RNG, the time, or set/dict-order-dependent draws.

Output (``image_root`` = ``OUT/images`` for every task; all image paths below are relative to it except in
pretraining):
* ``images/{train,val,test}_NNNNN.jpg``: the images (JPEG q92, 4:4:4 chroma).
* ``pretrain.json`` (train images): ``[{"image": absolute path, "caption": [5 captions]}]``.
* ``retrieval_train.json``: ``[{"image", "caption": str, "image_id": "train_00000"}]`` (one entry per caption).
  ``retrieval_val.json`` and ``retrieval_test.json``: ``[{"image", "caption": [5 captions]}]`` (COCO/Flickr layout).
* ``vqa_train.json`` and ``vqa_val.json``:
  ``[{"question_id": int, "question", "answer": [answer], "image", "dataset": "vqa"}]``. The single answer has
  weight 1.
  ``vqa_test.json``: ``[{"question_id", "question", "image", "dataset": "vqa"}]``.
  ``vqa_test_answers.json``: ``{str(question_id): [answer] * 10}``, the 10 annotator answers of VQA v2. All 10
  agree, so the official VQA accuracy ``min(#matches / 3, 1)`` equals exact match.
  ``answer_list.json``: every possible answer (colours, shapes, sizes, positions, "0"-"4", "yes", "no").
  The question types are colour, shape, size, position ("where is ...?"), count ("how many ...?") and existence
  ("is there ...?").
* ``nlvr_{train,dev,test}.json``: ``[{"images": [left, right], "sentence", "label": "True"|"False"}]``. There is one
  pair per image of the split, and labels are exactly balanced.
* ``ve_{train,dev,test}.json``: ``[{"image": "train_00000" (no ".jpg": the official loader appends it), "sentence",
  "label": "entailment"|"neutral"|"contradiction"}]``. Each image has one hypothesis per label.
* Grounding (RefCOCO+ layout, weakly supervised). Only images with at least 2 objects are used, with one
  expression per referable object.
  * ``refcoco+_train.json``: ``[{"image", "text", "ref_id": int}]``.
  * ``refcoco+_val.json`` and ``refcoco+_test.json``: ``[{"image", "text", "ref_id"}]``.
  * ``refcoco+_refs.json``: the ground truth the REFER API gives officially:
    ``{str(ref_id): {"image_id": "val_00003", "image", "bbox": [x, y, w, h], "split", "height", "width"}}``.
  * ``dets.json``: proposals, ``{image_id: [[x, y, w, h], ...]}`` for every image. These are the exact boxes of
    all its objects, as a perfect detector would give.
  Boxes are in pixels and tight: x and y are the first pixel column and row, w and h are pixel counts.
* ``zeroshot_val.json`` and ``zeroshot_test.json``: ``[{"image", "label": "red circle"}]``, the split's images with
  exactly one object, labelled with its colour and shape (24 classes), for zero-shot classification.
* ``world.json``: ``{"seed", "image_size", "image_root", "counts", "vocabulary", "scenes": {image_id: {"image",
  "split", "objects": [{"shape", "colour", "size", "position", "row", "col", "box", "rgb"}]}}}``. ``rgb`` is the
  object's exact fill colour.

Run: ``python -m albef.demo.world --out /tmp/world --seed 0 [--num-train 2000 --num-val 250 --num-test 250
--image-size 128]``.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import time
from collections import Counter
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 90, 235),
    "yellow": (240, 210, 30),
    "purple": (150, 60, 200),
    "white": (235, 235, 235),
}
SIZES = {"small": 0.5, "large": 0.85}  # side of the object's square, as a fraction of a grid cell
VOCAB = {"size": tuple(SIZES), "colour": tuple(COLOURS), "shape": SHAPES}
ATTRS = tuple(VOCAB)
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
NUMBERS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
MATERIALS = ("wood", "metal", "paper", "plastic", "glass")
FEELS = ("warm", "cold", "smooth", "rough")
ANSWERS = (*COLOURS, *SHAPES, *SIZES, *POSITIONS, "0", "1", "2", "3", "4", "yes", "no")
QUESTION_KINDS = ("colour", "shape", "size", "where", "count", "exist")
CAPTIONS_PER_IMAGE = 5
QUESTIONS_PER_IMAGE = 4
COLOUR_JITTER = 12
SPLITS = ("train", "val", "test")
NLVR_VE_SPLIT = {"train": "train", "val": "dev", "test": "test"}
_WORD_OK = {
    "top": lambda r, c: r == 0,
    "bottom": lambda r, c: r == 2,
    "left": lambda r, c: c == 0,
    "right": lambda r, c: c == 2,
    "center": lambda r, c: r == 1 and c == 1,
}
_WHERES = {
    (r, c): tuple(w for w in POSITIONS if all(_WORD_OK[x](r, c) for x in w.split())) for r in range(3) for c in range(3)
}  # the region names each grid cell satisfies


def pick(rng: np.random.Generator, seq):
    return seq[int(rng.integers(len(seq)))]


# ----------------------------------------------------------------------------------------------- scene language
def at(obj: dict, where: str) -> bool:
    """Whether obj lies in the region named by `where` (every word of it must hold)."""
    return where in _WHERES[obj["row"], obj["col"]]


def wheres(obj: dict) -> Tuple[str, ...]:
    return _WHERES[obj["row"], obj["col"]]


def where_phrase(where: str) -> str:
    return "in the center" if where == "center" else ("on the " if where in ("left", "right") else "at the ") + where


def matches(obj: dict, spec: dict) -> bool:
    for k, v in spec.items():
        if not (at(obj, v) if k == "where" else obj[k] == v):
            return False
    return True


def count(objs: List[dict], spec: dict) -> int:
    return sum(matches(o, spec) for o in objs)


def noun_phrase(spec: dict, plural: bool = False) -> str:
    """{"colour": "red", "where": "top"} -> "red object at the top" (size, colour, shape/object, position)."""
    words = [spec[k] for k in ("size", "colour") if k in spec] + [spec.get("shape", "object") + "s" * plural]
    return " ".join(words + ([where_phrase(spec["where"])] if "where" in spec else []))


def indefinite(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def exactly(n: int, spec: dict) -> str:
    return f"no {noun_phrase(spec, True)}" if n == 0 else f"exactly {NUMBERS[n]} {noun_phrase(spec, n != 1)}"


def join_list(items: List[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def counted(objs: List[dict], keys) -> str:
    """Objects grouped by the given attributes: "two red circles and a blue star"."""
    groups: Dict[tuple, int] = {}
    for o in objs:
        groups[tuple(o[k] for k in keys)] = groups.get(tuple(o[k] for k in keys), 0) + 1
    return join_list([f"{NUMBERS[n]} {' '.join(g)}s" if n > 1 else indefinite(" ".join(g)) for g, n in groups.items()])


def refer(rng, obj: dict, objs: List[dict], omit=()) -> Optional[dict]:
    """A spec that obj matches and no other object does, without the keys in `omit`; None if there is none.
    Short specs without a position are preferred (RefCOCO+ favours appearance over location)."""
    keys = [k for k in ATTRS if k not in omit]
    # each other object as (bitmask of the keys on which it agrees with obj, the regions it lies in)
    others = [(sum(1 << i for i, k in enumerate(keys) if o[k] == obj[k]), wheres(o)) for o in objs if o is not obj]
    cands = []
    for mask in range(1 << len(keys)):
        for where in (None,) + (() if "where" in omit else wheres(obj)):
            if all(mask & ~agree or (where is not None and where not in ws) for agree, ws in others):
                spec = {k: obj[k] for i, k in enumerate(keys) if mask >> i & 1}
                if where:
                    spec["where"] = where
                cands.append((len(spec) + 2 * (where is not None), spec))
    if not cands:
        return None
    best = min(c for c, _ in cands)
    return pick(rng, [s for c, s in cands if c <= best + 1])


def sample_spec(rng, objs: List[dict], present: bool, where: bool = False) -> Optional[dict]:
    """A random spec that matches at least one object (present) or none (absent); None if 20 draws failed."""
    for _ in range(20):
        obj = pick(rng, objs)
        keep = 0.5 if present else 0.6
        spec = {k: obj[k] if present else pick(rng, VOCAB[k]) for k in ATTRS if rng.random() < keep}
        if where and rng.random() < 0.3:
            spec["where"] = pick(rng, wheres(obj) if present else POSITIONS)
        if (count(objs, spec) > 0) == present:
            return spec
    return None


def retry(fn, rng, *args):
    """fn(rng, *args, kind) until it returns something: 30 draws of one random kind (so that every kind of
    sentence gets both labels about equally often), then any kind."""
    kind = int(rng.integers(1 << 16))
    for attempt in range(200):
        out = fn(rng, *args, kind if attempt < 30 else None)
        if out is not None:
            return out
    raise RuntimeError(f"{fn.__name__} found nothing in 200 draws")


# ------------------------------------------------------------------------------------------------- annotations
CAPTION_KINDS = ("full", "inventory", "grouped", "relation", "sizes")  # the order of captions()


def desc(o: dict, size: bool = True) -> str:
    return indefinite(f"{o['size']} " * size + f"{o['colour']} {o['shape']}")


def relation(a: dict, b: dict) -> str:
    """Where object a lies relative to b, as a relation caption says it: by column first, then by row."""
    if a["col"] != b["col"]:
        return "to the left of" if a["col"] < b["col"] else "to the right of"
    return "above" if a["row"] < b["row"] else "below"


def caption_holds(kind: int, caption: str, source: List[dict], objs: List[dict]) -> bool:
    """Whether ``caption``, number ``kind`` of the captions() of the scene ``source``, is true of the scene ``objs``.

    The full description, the inventory, the grouped counts and the sizes with shapes name every object, so they
    hold exactly when the multisets of the attributes they name agree (the full description names positions, and
    sizes only below four objects). The relation holds when ``objs`` has two objects of its words in that relation;
    a lone object's caption, when ``objs`` is that object alone in the same place."""

    def named(scene, keys):
        return Counter(tuple(o[k] for k in keys) for o in scene)

    keys = {
        "full": ("colour", "shape", "position") + ("size",) * (len(source) < 4),
        "inventory": ("colour", "shape"),
        "grouped": ("colour", "shape"),
        "sizes": ("size", "shape"),
    }.get(CAPTION_KINDS[kind])
    if keys is None and len(source) == 1:  # a lone object's relation caption: that object alone in its place
        keys = ("size", "colour", "shape", "position")
    if keys is not None:
        return named(objs, keys) == named(source, keys)
    said = [(a, b) for a in source for b in source if a is not b and f"{desc(a)} {relation(a, b)} {desc(b)}" == caption]
    if not said:
        raise ValueError(f"{caption!r} is not a relation caption of the given scene")
    a, b = said[0]
    return any(
        desc(x) == desc(a) and desc(y) == desc(b) and relation(x, y) == relation(a, b)
        for x in objs
        for y in objs
        if x is not y
    )


def captions(rng, objs: List[dict]) -> List[str]:
    """Five varied captions (``CAPTION_KINDS``): the full description in reading order, a shape inventory, grouped
    counts, a spatial relation (or the lone object's place), and sizes with shapes. Each has at most 30 words."""
    n, shuffled = len(objs), [objs[i] for i in rng.permutation(len(objs))]
    # the full description fits ALBEF's 30-word caption limit: 4 objects go without sizes and without a prefix
    full = (pick(rng, ("", "a picture of ", "an image with ")) if n < 4 else "") + join_list(
        [f"{desc(o, n < 4)} {where_phrase(o['position'])}" for o in objs]
    )
    inventory = f"{NUMBERS[n]} shape{'s' * (n > 1)}: " + join_list([desc(o, False) for o in shuffled])
    grouped = counted(shuffled, ("colour", "shape")) + pick(rng, ("", " on a grey background", " on a dark background"))
    if n == 1:
        said = f"{desc(objs[0])} alone {where_phrase(objs[0]['position'])}"
    else:
        a, b = shuffled[:2]
        said = f"{desc(a)} {relation(a, b)} {desc(b)}"
    return [full, inventory, grouped, said, counted(shuffled, ("size", "shape"))]


def question(rng, objs: List[dict], kind: str):
    """A VQA (question, answer) of the given kind, or None if this draw cannot ask one with a determined answer."""
    if kind in ("count", "exist"):
        present = rng.random() < (0.8 if kind == "count" else 0.5)
        spec = sample_spec(rng, objs, present, where=True)
        if spec is None:
            return None
        if kind == "count":
            return f"how many {noun_phrase(spec, True)} are there?", str(count(objs, spec))
        return f"is there {indefinite(noun_phrase(spec))}?", "yes" if present else "no"
    obj = pick(rng, objs)
    spec = refer(rng, obj, objs, omit=(kind,))
    if spec is None:
        return None
    if kind == "where":
        return f"where is the {noun_phrase(spec)}?", obj["position"]
    return f"what {kind} is the {noun_phrase(spec)}?", obj[kind]


def _kind(rng, kinds: tuple, kind: Optional[int]):
    return kinds[kind % len(kinds)] if kind is not None else pick(rng, kinds)


def fact(rng, objs: List[dict], truth: bool, kind: Optional[int] = None) -> Optional[str]:
    """A statement about one scene with the given truth value (existence, exact count, attribute or position)."""
    kind = _kind(rng, ("exist", "count", "attr", "where"), kind)
    if kind == "exist":
        negated = rng.random() < 0.3
        spec = sample_spec(rng, objs, present=truth != negated, where=True)
        if spec is None:
            return None
        return f"there are no {noun_phrase(spec, True)}" if negated else f"there is {indefinite(noun_phrase(spec))}"
    if kind == "count":
        spec = sample_spec(rng, objs, present=rng.random() < 0.8, where=True)
        if spec is None:
            return None
        c = count(objs, spec)
        n = c if truth else pick(rng, [m for m in (c - 1, c + 1) if m >= 0])
        return f"there {'is' if n == 1 else 'are'} {exactly(n, spec)}"
    obj = pick(rng, objs)
    key = pick(rng, ATTRS) if kind == "attr" else "where"
    spec = refer(rng, obj, objs, omit=(key,))
    if spec is None:
        return None
    if key == "where":
        return f"the {noun_phrase(spec)} is {where_phrase(pick(rng, [w for w in POSITIONS if at(obj, w) == truth]))}"
    value = obj[key] if truth else pick(rng, [v for v in VOCAB[key] if v != obj[key]])
    return f"the {noun_phrase(spec)} is {indefinite(value) if key == 'shape' else value}"


def neutral(rng, objs: List[dict], kind: Optional[int] = None) -> Optional[str]:
    """A hypothesis about an existing object that the picture can neither confirm nor refute."""
    obj = pick(rng, objs)
    spec = refer(rng, obj, objs)
    if spec is None:
        return None
    subject = f"the {noun_phrase(spec)}"
    kind = _kind(rng, ("material", "feel", "weight")[: 2 + (len(objs) > 1)], kind)
    if kind == "material":
        return f"{subject} is made of {pick(rng, MATERIALS)}"
    if kind == "feel":
        return f"{subject} feels {pick(rng, FEELS)}"
    other = pick(rng, [o for o in objs if o is not obj])
    other_spec = refer(rng, other, objs)
    if other_spec is None:
        return None
    return f"{subject} is {pick(rng, ('heavier', 'lighter'))} than the {noun_phrase(other_spec)}"


def pair_statement(rng, left: List[dict], right: List[dict], truth: bool, kind: Optional[int] = None) -> Optional[str]:
    """An NLVR2-style statement about two scenes with the given truth value, or None if this draw missed it."""
    spec = sample_spec(rng, pick(rng, (left, right)), present=rng.random() < 0.8)
    if spec is None:
        return None
    cl, cr = count(left, spec), count(right, spec)
    one, many = indefinite(noun_phrase(spec)), noun_phrase(spec, True)
    x, y, cx, cy = ("left", "right", cl, cr) if rng.random() < 0.5 else ("right", "left", cr, cl)
    kind, delta = _kind(rng, range(6), kind), int(rng.integers(-1, 2))
    if kind == 0:
        s, t = f"both images contain {one}", cl > 0 and cr > 0
    elif kind == 1:
        s, t = f"neither image contains {one}", cl == 0 and cr == 0
    elif kind == 2:
        s, t = f"exactly one image contains {one}", (cl > 0) != (cr > 0)
    elif kind == 3:
        s, t = f"the {x} image contains more {many} than the {y} image", cx > cy
    elif kind == 4 and cx + delta >= 0:
        s, t = f"the {x} image contains {exactly(cx + delta, spec)}", delta == 0
    elif kind == 5 and cl + cr + delta >= 1:
        n = cl + cr + delta
        s, t = f"there {'is' if n == 1 else 'are'} {exactly(n, spec)} in total", delta == 0
    else:
        return None
    return s if t == truth else None


# ----------------------------------------------------------------------------------------------------- drawing
def _points(shape: str, x0: int, y0: int, d: int) -> List[tuple]:
    """Integer outline points of a shape in the d x d square at (x0, y0): two corners for circle/square."""
    x1, y1 = x0 + d - 1, y0 + d - 1
    if shape in ("circle", "square"):
        return [(x0, y0), (x1, y1)]
    if shape == "triangle":
        return [(x0, y1), (x1, y1), (x0 + (d - 1) // 2, y0)]
    cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (d - 1) / 2
    return [
        (
            round(cx + r * (1 if k % 2 == 0 else 0.42) * math.cos(math.pi * (k / 5 - 0.5))),
            round(cy + r * (1 if k % 2 == 0 else 0.42) * math.sin(math.pi * (k / 5 - 0.5))),
        )
        for k in range(10)
    ]


def background(rng, size: int) -> Image.Image:
    """A scene's background: grey noise around a random level."""
    base = int(rng.integers(35, 85))
    return Image.fromarray(rng.integers(base - 6, base + 7, (size, size), dtype=np.uint8), "L").convert("RGB")


def paint(draw: ImageDraw.ImageDraw, shape: str, x0: int, y0: int, d: int, rgb: tuple) -> List[tuple]:
    """Draw a filled shape in the d x d square at (x0, y0); returns its outline points."""
    pts = _points(shape, x0, y0, d)
    {"circle": draw.ellipse, "square": draw.rectangle}.get(shape, draw.polygon)(pts, fill=tuple(rgb))
    return pts


def jpeg(image: Image.Image) -> bytes:
    """A scene image as the world stores it."""
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=92, subsampling=0)
    return buf.getvalue()


def draw_scene(rng, size: int):
    """Sample a scene (1-4 objects in distinct cells, reading order) and render it: (PIL image, objects)."""
    cell = size / 3
    image = background(rng, size)
    draw = ImageDraw.Draw(image)
    objs = []
    for c in np.sort(rng.permutation(9)[: 1 + int(rng.integers(4))]):
        row, col = divmod(int(c), 3)
        size_name, colour, shape = pick(rng, VOCAB["size"]), pick(rng, VOCAB["colour"]), pick(rng, SHAPES)
        d = round(SIZES[size_name] * cell)
        x0, y0 = int(col * cell + rng.uniform(0, cell - d)), int(row * cell + rng.uniform(0, cell - d))
        jitter = rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, 3)
        rgb = tuple(int(v) for v in np.clip(np.array(COLOURS[colour]) + jitter, 0, 255))
        pts = paint(draw, shape, x0, y0, d, rgb)
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        objs.append(
            {
                "shape": shape,
                "colour": colour,
                "size": size_name,
                "position": POSITIONS[int(c)],
                "row": row,
                "col": col,
                "box": [min(xs), min(ys), max(xs) - min(xs) + 1, max(ys) - min(ys) + 1],
                "rgb": list(rgb),
            }
        )
    return image, objs


# ------------------------------------------------------------------------------------------------------- world
def generate_world(
    out_dir, seed: int = 0, num_train: int = 2000, num_val: int = 250, num_test: int = 250, image_size: int = 128
) -> dict:
    """Write the world (images and every task's JSON files, see the module docstring) to out_dir; returns a summary."""
    if seed < 0 or min(num_train, num_val, num_test) < 2 or image_size < 48:
        raise ValueError("need seed >= 0, at least 2 images per split and image_size >= 48")
    start = time.perf_counter()
    out = Path(out_dir).resolve()
    (out / "images").mkdir(parents=True, exist_ok=True)
    counts = {"train": num_train, "val": num_val, "test": num_test}
    files: Dict[str, object] = {
        "pretrain.json": [],
        "vqa_test_answers.json": {},
        "answer_list.json": list(ANSWERS),
        "refcoco+_refs.json": {},
        "dets.json": {},
    }
    scenes: Dict[str, dict] = {}
    qid = ref_id = 0
    for s, split in enumerate(SPLITS):
        retrieval, vqa, ve, refs, names = [], [], [], [], []
        for i in range(counts[split]):
            rng = np.random.default_rng([seed, s, 0, i])
            image, objs = draw_scene(rng, image_size)
            name = f"{split}_{i:05d}"
            file = f"{name}.jpg"
            (out / "images" / file).write_bytes(jpeg(image))
            names.append(name)
            scenes[name] = {"image": file, "split": split, "objects": objs}
            files["dets.json"][name] = [o["box"] for o in objs]
            caps = captions(rng, objs)
            if split == "train":
                files["pretrain.json"].append({"image": str(out / "images" / file), "caption": caps})
                retrieval += [{"image": file, "caption": c, "image_id": name} for c in caps]
            else:
                retrieval.append({"image": file, "caption": caps})
            asked = {}
            for _ in range(50):
                qa = question(rng, objs, pick(rng, QUESTION_KINDS))
                if qa is not None and qa[0] not in asked:
                    asked[qa[0]] = qa[1]
                if len(asked) == QUESTIONS_PER_IMAGE:
                    break
            for q, a in asked.items():
                item = {"question_id": qid, "question": q, "image": file, "dataset": "vqa"}
                if split == "test":
                    files["vqa_test_answers.json"][str(qid)] = [a] * 10
                else:
                    item["answer"] = [a]
                vqa.append(item)
                qid += 1
            ve += [
                {"image": name, "sentence": retry(fact, rng, objs, True), "label": "entailment"},
                {"image": name, "sentence": retry(neutral, rng, objs), "label": "neutral"},
                {"image": name, "sentence": retry(fact, rng, objs, False), "label": "contradiction"},
            ]
            for obj in objs if len(objs) > 1 else []:
                spec = refer(rng, obj, objs)
                if spec is not None:
                    refs.append({"image": file, "text": f"the {noun_phrase(spec)}", "ref_id": ref_id})
                    files["refcoco+_refs.json"][str(ref_id)] = {
                        "image_id": name,
                        "image": file,
                        "bbox": obj["box"],
                        "split": split,
                        "height": image_size,
                        "width": image_size,
                    }
                    ref_id += 1
        rng = np.random.default_rng([seed, s, 1, 0])
        nlvr = []
        for truth in rng.permutation(np.arange(len(names)) % 2 == 0):
            a, b = (names[int(k)] for k in rng.choice(len(names), 2, replace=False))
            left, right = scenes[a]["objects"], scenes[b]["objects"]
            sentence = retry(pair_statement, rng, left, right, bool(truth))
            nlvr.append({"images": [f"{a}.jpg", f"{b}.jpg"], "sentence": sentence, "label": str(bool(truth))})
        files[f"retrieval_{split}.json"] = retrieval
        files[f"vqa_{split}.json"] = vqa
        files[f"nlvr_{NLVR_VE_SPLIT[split]}.json"] = nlvr
        files[f"ve_{NLVR_VE_SPLIT[split]}.json"] = ve
        files[f"refcoco+_{split}.json"] = refs
        if split != "train":
            files[f"zeroshot_{split}.json"] = [
                {"image": scenes[n]["image"], "label": f"{o[0]['colour']} {o[0]['shape']}"}
                for n in names
                if len(o := scenes[n]["objects"]) == 1
            ]
    files["world.json"] = {
        "seed": seed,
        "image_size": image_size,
        "image_root": "images",
        "counts": counts,
        "vocabulary": {
            "shapes": SHAPES,
            "colours": COLOURS,
            "sizes": list(SIZES),
            "positions": POSITIONS,
            "answers": ANSWERS,
        },
        "scenes": scenes,
    }
    for fname, obj in files.items():
        (out / fname).write_text(json.dumps(obj))
    return {
        "out_dir": str(out),
        "image_root": str(out / "images"),
        "num_images": len(scenes),
        "files": sorted(files),
        "seconds": round(time.perf_counter() - start, 3),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-train", type=int, default=2000)
    p.add_argument("--num-val", type=int, default=250)
    p.add_argument("--num-test", type=int, default=250)
    p.add_argument("--image-size", type=int, default=128)
    a = p.parse_args(argv)
    summary = generate_world(a.out, a.seed, a.num_train, a.num_val, a.num_test, a.image_size)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
