"""Tests of the offline demo world (albef.demo.world) and its web-crawl site (albef.demo.photos), issue #10.

The annotation checks do not reuse the generator's logic. They parse every sentence with their own grammar (the
regular expressions below) and evaluate it on the scene graph. Row and column come from the box geometry, and the
boxes are checked against the JPEG pixels. So a wrong caption, answer, label or box fails here.

Run: ``OMP_NUM_THREADS=1 python -m pytest tests/test_demo_world.py -q``
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from albef.demo import photos, world
from albef.tokenizer import VOCAB_FILE, pre_caption

SIZE = 96
COUNTS = dict(num_train=60, num_val=20, num_test=20)
COLOURS = ("red", "green", "blue", "yellow", "purple", "white")
SHAPES = ("circle", "square", "triangle", "star")
NUM = {w: i for i, w in enumerate(("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"))}
CELLS = (("top left", "top", "top right"), ("left", "center", "right"), ("bottom left", "bottom", "bottom right"))
REGION = r"on the (?:left|right)|in the center|at the (?:top left|top right|bottom left|bottom right|top|bottom)"
NP = (
    rf"(?:(?:the|an?) )?(?:(?:small|large) )?(?:(?:{'|'.join(COLOURS)}) )?(?:{'|'.join(SHAPES)}|object)s?"
    rf"(?: (?:{REGION}))?"
)
NP_PARTS = re.compile(
    rf"(?:(?:the|an?) )?(?:(small|large) )?(?:({'|'.join(COLOURS)}) )?({'|'.join(SHAPES)}|object)s?"
    rf"(?: ({REGION}))?"
)
N = "(no|one|two|three|four|five|six|seven|eight|nine)"


# ------------------------------------------------------------------------------------------ an independent grammar
def cell(obj):
    """(row, col) of the grid cell holding the object's box centre."""
    x, y, w, h = obj["box"]
    return int((y + h / 2) // (SIZE / 3)), int((x + w / 2) // (SIZE / 3))


def in_region(obj, phrase):
    row, col = cell(obj)
    ok = {"top": row == 0, "bottom": row == 2, "left": col == 0, "right": col == 2, "center": (row, col) == (1, 1)}
    return all(ok[w] for w in phrase.split()[2:])


def selects(np_text, objs):
    """The objects a noun phrase ("the small red circles at the top") describes."""
    size, colour, shape, region = NP_PARTS.fullmatch(np_text).groups()
    return [
        o
        for o in objs
        if (size is None or o["size"] == size)
        and (colour is None or o["colour"] == colour)
        and (shape == "object" or o["shape"] == shape)
        and (region is None or in_region(o, region))
    ]


def the(np_text, objs):
    """The single object a definite description picks out (fails if it is not exactly one)."""
    found = selects(np_text, objs)
    assert len(found) == 1, (np_text, objs)
    return found[0]


def answer(question, objs):
    for pattern, fn in [
        (rf"what (colour|shape|size) is the ({NP})\?", lambda key, np_: the(np_, objs)[key]),
        (rf"where is the ({NP})\?", lambda np_: CELLS[cell(the(np_, objs))[0]][cell(the(np_, objs))[1]]),
        (rf"how many ({NP}) are there\?", lambda np_: str(len(selects(np_, objs)))),
        (rf"is there ({NP})\?", lambda np_: "yes" if selects(np_, objs) else "no"),
    ]:
        m = re.fullmatch(pattern, question)
        if m:
            return fn(*m.groups())
    raise AssertionError(f"unparsed question: {question!r}")


def ve_label(sentence, objs):
    m = re.fullmatch(rf"the ({NP}) (?:is made of \w+|feels \w+|is (?:heavier|lighter) than the ({NP}))", sentence)
    if m:  # the objects it talks about exist, but no picture shows material, feel or weight
        subject = the(m.group(1), objs)
        assert m.group(2) is None or the(m.group(2), objs) is not subject, sentence
        return "neutral"
    for pattern, fn in [
        (rf"there is ({NP})", lambda np_: len(selects(np_, objs)) > 0),
        (rf"there are no ({NP})", lambda np_: len(selects(np_, objs)) == 0),
        (rf"there (?:is|are) exactly {N} ({NP})", lambda n, np_: len(selects(np_, objs)) == NUM[n]),
        (rf"the ({NP}) is ({REGION})", lambda np_, region: in_region(the(np_, objs), region)),
        (rf"the ({NP}) is (?:an? )?(\w+)", lambda np_, v: v in the(np_, objs).values()),
    ]:
        m = re.fullmatch(pattern, sentence)
        if m:
            return "entailment" if fn(*m.groups()) else "contradiction"
    raise AssertionError(f"unparsed hypothesis: {sentence!r}")


def nlvr_truth(sentence, left, right):
    scenes = {"left": left, "right": right}
    for pattern, fn in [
        (rf"both images contain ({NP})", lambda np_: bool(selects(np_, left)) and bool(selects(np_, right))),
        (rf"neither image contains ({NP})", lambda np_: not selects(np_, left) and not selects(np_, right)),
        (rf"exactly one image contains ({NP})", lambda np_: bool(selects(np_, left)) != bool(selects(np_, right))),
        (
            rf"the (left|right) image contains more ({NP}) than the (left|right) image",
            lambda a, np_, b: a != b and len(selects(np_, scenes[a])) > len(selects(np_, scenes[b])),
        ),
        (rf"the (left|right) image contains no ({NP})", lambda a, np_: not selects(np_, scenes[a])),
        (
            rf"the (left|right) image contains exactly {N} ({NP})",
            lambda a, n, np_: len(selects(np_, scenes[a])) == NUM[n],
        ),
        (
            rf"there (?:is|are) exactly {N} ({NP}) in total",
            lambda n, np_: len(selects(np_, left)) + len(selects(np_, right)) == NUM[n],
        ),
    ]:
        m = re.fullmatch(pattern, sentence)
        if m:
            return fn(*m.groups())
    raise AssertionError(f"unparsed statement: {sentence!r}")


# --------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def out(tmp_path_factory):
    root = tmp_path_factory.mktemp("worlds")
    world.generate_world(root / "a", seed=3, image_size=SIZE, **COUNTS)
    return root


def load(path, name):
    return json.loads((path / name).read_text())


@pytest.fixture(scope="module")
def w(out):
    return load(out / "a", "world.json")["scenes"]


# ------------------------------------------------------------------------------------------------------ tests
def test_deterministic_for_a_seed(out):
    a, b, c = out / "a", out / "b", out / "c"
    world.generate_world(b, seed=3, image_size=SIZE, **COUNTS)
    world.generate_world(c, seed=4, image_size=SIZE, **COUNTS)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert len(files) == 23 + sum(COUNTS.values())
    for f in files:
        data_a, data_b = (a / f).read_bytes(), (b / f).read_bytes()
        if f.name == "pretrain.json":  # absolute paths differ by the output directory only
            data_b = data_b.replace(str(b.resolve()).encode(), str(a.resolve()).encode())
        assert data_a == data_b, f
    differ = [f for f in files if (a / f).read_bytes() != (c / f).read_bytes()]
    assert len(differ) >= 0.9 * len(files), "another seed must give another world"
    # every image has its own generator: the val/test images do not depend on the number of train images
    world.generate_world(out / "d", seed=3, image_size=SIZE, num_train=7, num_val=20, num_test=20)
    for f in files:
        if f.name.startswith(("val_", "test_")):
            assert (a / f).read_bytes() == (out / "d" / f).read_bytes(), f


def test_zero_shot_files_are_the_one_object_images_labelled_colour_and_shape(out, w):
    for split in ("val", "test"):
        entries = load(out / "a", f"zeroshot_{split}.json")
        ones = sorted(k for k, s in w.items() if s["split"] == split and len(s["objects"]) == 1)
        assert [e["image"] for e in entries] == [f"{k}.jpg" for k in ones] and len(ones) >= 2
        for e in entries:
            obj = w[e["image"][:-4]]["objects"][0]
            assert e["label"] == f"{obj['colour']} {obj['shape']}"


def test_official_formats(out, w):
    a, root = out / "a", out / "a" / "images"

    def is_img(rel):
        return (root / rel).is_file()

    pre = load(a, "pretrain.json")
    assert len(pre) == COUNTS["num_train"]
    for e in pre:
        assert set(e) == {"image", "caption"} and Path(e["image"]).is_absolute() and Path(e["image"]).is_file()
        assert len(e["caption"]) == world.CAPTIONS_PER_IMAGE and all(isinstance(c, str) for c in e["caption"])
    train = load(a, "retrieval_train.json")
    assert len(train) == COUNTS["num_train"] * world.CAPTIONS_PER_IMAGE
    assert all(
        set(e) == {"image", "caption", "image_id"}
        and isinstance(e["caption"], str)
        and is_img(e["image"])
        and e["image"] == e["image_id"] + ".jpg"
        for e in train
    )
    for split in ("val", "test"):
        ev = load(a, f"retrieval_{split}.json")
        assert len(ev) == COUNTS[f"num_{split}"]
        assert all(set(e) == {"image", "caption"} and is_img(e["image"]) and len(e["caption"]) == 5 for e in ev)
    answers = load(a, "answer_list.json")
    qids = []
    for split in ("train", "val"):
        for e in load(a, f"vqa_{split}.json"):
            assert set(e) == {"question_id", "question", "answer", "image", "dataset"} and e["dataset"] == "vqa"
            assert isinstance(e["question_id"], int) and is_img(e["image"]) and e["answer"][0] in answers
            qids.append(e["question_id"])
    test, truth = load(a, "vqa_test.json"), load(a, "vqa_test_answers.json")
    assert all(set(e) == {"question_id", "question", "image", "dataset"} and is_img(e["image"]) for e in test)
    assert sorted(truth) == sorted(str(e["question_id"]) for e in test)
    assert all(len(v) == 10 and len(set(v)) == 1 and v[0] in answers for v in truth.values())
    qids += [e["question_id"] for e in test]
    assert len(qids) == len(set(qids)) == world.QUESTIONS_PER_IMAGE * sum(COUNTS.values())
    for split, n in (("train", 60), ("dev", 20), ("test", 20)):
        nlvr = load(a, f"nlvr_{split}.json")
        assert len(nlvr) == n and sum(e["label"] == "True" for e in nlvr) == n // 2
        assert all(
            set(e) == {"images", "sentence", "label"}
            and len(e["images"]) == 2
            and e["label"] in ("True", "False")
            and all(map(is_img, e["images"]))
            for e in nlvr
        )
        ve = load(a, f"ve_{split}.json")
        assert all(set(e) == {"image", "sentence", "label"} and is_img("%s.jpg" % e["image"]) for e in ve)
        for label in ("entailment", "neutral", "contradiction"):
            assert sorted(e["image"] for e in ve if e["label"] == label) == sorted({e["image"] for e in ve})
    refs, dets = load(a, "refcoco+_refs.json"), load(a, "dets.json")
    assert sorted(dets) == sorted(w)
    for split in ("train", "val", "test"):
        for e in load(a, f"refcoco+_{split}.json"):
            assert set(e) == {"image", "text", "ref_id"} and isinstance(e["ref_id"], int) and is_img(e["image"])
            r = refs[str(e["ref_id"])]
            assert r["split"] == split and r["image"] == e["image"] and r["bbox"] in dets[r["image_id"]]
            assert (r["height"], r["width"]) == (SIZE, SIZE)
    # every text reaches the model whole: ALBEF's cleaning changes nothing and every word is a BERT vocab entry
    vocab = set(Path(VOCAB_FILE).read_text().split())
    texts = (
        [c for e in pre for c in e["caption"]]
        + [e["question"] for e in test]
        + [e["sentence"] for s in ("train", "dev", "test") for f in ("nlvr", "ve") for e in load(a, f"{f}_{s}.json")]
        + [e["text"] for e in load(a, "refcoco+_train.json")]
        + answers
    )
    for t in texts:
        assert pre_caption(t) == re.sub("[,:?]", "", t) and set(pre_caption(t).split()) <= vocab, t


def test_boxes_match_the_pixels(out, w):
    """Pixels of an object's colour fill its box, reach its four edges, and appear nowhere else."""
    refs = load(out / "a", "refcoco+_refs.json")
    palette = load(out / "a", "world.json")["vocabulary"]["colours"]
    checked = 0
    for name, scene in w.items():
        if scene["split"] == "train" and int(name[-5:]) >= 10:
            continue
        pixels = np.asarray(Image.open(out / "a" / "images" / scene["image"]), dtype=np.int32)
        assert pixels.shape == (SIZE, SIZE, 3)
        for obj in scene["objects"]:
            assert np.abs(np.subtract(obj["rgb"], palette[obj["colour"]])).max() <= world.COLOUR_JITTER
            mask = np.linalg.norm(pixels - palette[obj["colour"]], axis=2) < 60
            x, y, bw, bh = obj["box"]
            inside = mask[y : y + bh, x : x + bw]
            assert inside.mean() > 0.3, (name, obj)
            ys, xs = np.nonzero(inside)
            assert xs.min() <= 2 and ys.min() <= 2 and xs.max() >= bw - 3 and ys.max() >= bh - 3, (name, obj)
            for other in scene["objects"]:
                if other["colour"] == obj["colour"]:
                    ox, oy, ow, oh = other["box"]
                    mask[max(oy - 2, 0) : oy + oh + 2, max(ox - 2, 0) : ox + ow + 2] = False
            assert mask.sum() <= 2, (name, obj)
            row, col = cell(obj)
            assert (obj["row"], obj["col"]) == (row, col) and obj["position"] == CELLS[row][col]
            cx, cy = col * SIZE / 3, row * SIZE / 3  # the whole box lies in the object's grid cell
            assert cx <= x and x + bw <= cx + SIZE / 3 and cy <= y and y + bh <= cy + SIZE / 3
            checked += 1
    assert checked > 50
    for split in ("train", "val", "test"):  # each expression picks out exactly the object whose box is stored
        for e in load(out / "a", f"refcoco+_{split}.json"):
            r = refs[str(e["ref_id"])]
            assert len(w[r["image_id"]]["objects"]) > 1
            assert the(e["text"], w[r["image_id"]]["objects"])["box"] == r["bbox"], e


def test_vqa_answers_match_the_scene(out, w):
    a = out / "a"
    truth = load(a, "vqa_test_answers.json")
    items = (
        load(a, "vqa_train.json")
        + load(a, "vqa_val.json")
        + [dict(e, answer=truth[str(e["question_id"])]) for e in load(a, "vqa_test.json")]
    )
    kinds = set()
    for e in items:
        assert answer(e["question"], w[e["image"][:-4]]["objects"]) == e["answer"][0], e
        kinds.add(e["question"].split()[0] + e["question"].split()[1])
    assert kinds == {"whatcolour", "whatshape", "whatsize", "whereis", "howmany", "isthere"}
    yes = [e["answer"][0] for e in items if e["question"].startswith("is there")]
    assert 0.3 < yes.count("yes") / len(yes) < 0.7


def test_nlvr_and_ve_labels_match_the_scenes(out, w):
    for split in ("train", "dev", "test"):
        for e in load(out / "a", f"nlvr_{split}.json"):
            left, right = (w[p[:-4]]["objects"] for p in e["images"])
            assert str(nlvr_truth(e["sentence"], left, right)) == e["label"], e
        for e in load(out / "a", f"ve_{split}.json"):
            assert ve_label(e["sentence"], w[e["image"]]["objects"]) == e["label"], e


def test_captions_describe_the_scene(out, w):
    for e in load(out / "a", "retrieval_val.json") + load(out / "a", "retrieval_test.json"):
        objs = w[e["image"][:-4]]["objects"]
        for c in e["caption"]:
            words = [t.rstrip(",:").rstrip("s") for t in c.split()]
            assert {t for t in words if t in COLOURS} <= {o["colour"] for o in objs}, c
            assert {t for t in words if t in SHAPES} <= {o["shape"] for o in objs}, c
            assert {t for t in words if t in ("small", "large")} <= {o["size"] for o in objs}, c
        full, inventory, _, relation, _ = e["caption"]
        items = re.split(r", | and ", re.sub(r"^(a picture of|an image with) ", "", full))
        assert len(items) == len(objs), full
        assert all(selects(t, [o]) == [o] and re.search(REGION, t) for t, o in zip(items, objs)), full
        assert NUM[inventory.split()[0]] == len(objs), inventory
        m = re.fullmatch(rf"({NP}) (?:alone ({REGION})|(to the left of|to the right of|above|below) ({NP}))", relation)
        first = selects(m.group(1), objs)
        if m.group(2):
            assert first == objs and in_region(objs[0], m.group(2)), relation
        else:
            axis, sign = {"to the left of": (1, -1), "to the right of": (1, 1), "above": (0, -1), "below": (0, 1)}[
                m.group(3)
            ]
            second = selects(m.group(4), objs)
            assert any(np.sign(cell(p)[axis] - cell(q)[axis]) == sign for p in first for q in second), relation


def _obj(shape, colour, size, row, col):
    return {
        "shape": shape,
        "colour": colour,
        "size": size,
        "row": row,
        "col": col,
        "position": world.POSITIONS[3 * row + col],
    }


def test_caption_holds_decides_which_captions_describe_another_scene(out, w):
    """Every caption holds for its own scene; another scene's caption holds exactly when that scene agrees on what
    the caption names (the retrieval probe of bench/fusion_diagnostics.py counts wrong picks that are true)."""
    for e in load(out / "a", "retrieval_val.json"):
        objs = w[e["image"][:-4]]["objects"]
        assert all(world.caption_holds(k, c, objs, objs) for k, c in enumerate(e["caption"])), e["caption"]
    a = [_obj("circle", "red", "small", 0, 0), _obj("square", "blue", "large", 1, 1)]
    rng = np.random.default_rng(0)
    full, inventory, grouped, relation, sizes = world.captions(rng, a)
    moved = [_obj("circle", "red", "small", 2, 2), _obj("square", "blue", "large", 0, 2)]  # same objects, elsewhere
    recoloured = [_obj("circle", "green", "small", 0, 0), _obj("square", "blue", "large", 1, 1)]
    reshaped = [_obj("star", "red", "small", 0, 0), _obj("square", "blue", "large", 1, 1)]
    resized = [_obj("circle", "red", "large", 0, 0), _obj("square", "blue", "large", 1, 1)]
    extra = a + [_obj("star", "white", "small", 2, 0)]  # one object more
    expect = {  # scene -> does (full, inventory, grouped, relation, sizes) of scene a hold for it
        "moved": (moved, (False, True, True, False, True)),
        "recoloured": (recoloured, (False, False, False, False, True)),
        "reshaped": (reshaped, (False, False, False, False, False)),
        "resized": (resized, (False, True, True, False, False)),
        "extra": (extra, (False, False, False, True, False)),
    }
    for name, (scene, holds) in expect.items():
        got = tuple(
            world.caption_holds(k, c, a, scene) for k, c in enumerate((full, inventory, grouped, relation, sizes))
        )
        assert got == holds, (name, relation, got)
    # the relation caption names its two objects and how they lie: mirrored, it no longer holds
    pair = [_obj("circle", "red", "small", 0, 0), _obj("star", "white", "small", 0, 2)]
    said = world.captions(np.random.default_rng(1), pair)[3]
    mirrored = [_obj("circle", "red", "small", 0, 2), _obj("star", "white", "small", 0, 0)]
    assert world.caption_holds(3, said, pair, pair + [_obj("square", "blue", "large", 2, 2)])
    assert not world.caption_holds(3, said, pair, mirrored), said
    # a lone object's caption holds only for that object alone in the same place
    lone = [_obj("star", "white", "small", 0, 2)]
    said = world.captions(rng, lone)[3]
    assert world.caption_holds(3, said, lone, lone) and not world.caption_holds(3, said, lone, pair), said
    with pytest.raises(ValueError, match="not a relation caption"):
        world.caption_holds(3, "a small red circle above a small red circle", pair, pair)


def test_cli(tmp_path):
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "albef.demo.world",
            "--out",
            str(tmp_path),
            "--seed",
            "1",
            "--num-train",
            "4",
            "--num-val",
            "2",
            "--num-test",
            "2",
            "--image-size",
            "64",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["num_images"] == 8
    assert Image.open(tmp_path / "images" / "val_00001.jpg").size == (64, 64)
    with pytest.raises(ValueError):
        world.generate_world(tmp_path / "bad", seed=-1)


class _Extractor(HTMLParser):
    """A reference alt-text extractor following the rules in albef.demo.photos' docstring."""

    def __init__(self, page_url):
        super().__init__()
        self.page_url, self.pairs = page_url, []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if a.get("srcset"):  # the largest density candidate (the site's srcsets use x descriptors)
            a["src"] = max((c.split() for c in a["srcset"].split(",")), key=lambda c: float(c[1][:-1]))[0]
        if tag != "img" or a.get("src", "").startswith("data:"):
            return
        alt = " ".join((a.get("alt") or "").split())
        if not alt or alt.lower() in photos.PLACEHOLDER_ALTS or re.fullmatch(r"\S+\.(jpe?g|png|gif)", alt, re.I):
            return
        if photos.MIN_WORDS <= len(alt.split()) <= photos.MAX_WORDS:
            self.pairs.append((urllib.parse.urljoin(self.page_url, a["src"]), alt))


@pytest.mark.skipif(importlib.util.find_spec("skimage") is None, reason="pip install --no-deps scikit-image")
def test_crawl_site_serves_photos_and_pages(tmp_path):
    base, pages, stop = photos.start_crawl_site(tmp_path)
    try:
        assert base.startswith("http://127.0.0.1:")
        assert urllib.request.urlopen(f"{base}/urls.txt", timeout=10).read().decode().split() == pages
        found = {}  # url -> caption, the first usable caption of each URL
        for page in pages:
            parser = _Extractor(page)
            parser.feed(urllib.request.urlopen(page, timeout=10).read().decode())
            for url, alt in parser.pairs:
                found.setdefault(url, alt)
        expected = photos.expected_pairs(base)
        assert list(found.items()) == [(e["url"], e["caption"]) for e in expected]
        assert len(photos.dropped_tags(base)) >= 7 and len(expected) >= 15
        for url in sorted({e["url"] for e in expected if e["downloadable"]}):
            image = Image.open(urllib.request.urlopen(url, timeout=10))
            image.load()
            assert max(image.size) in photos.VARIANTS.values() and min(image.size) > 50, url
        missing = [e["url"] for e in expected if not e["downloadable"]]
        assert len(missing) == 1
        with pytest.raises(urllib.error.HTTPError, match="404"):
            urllib.request.urlopen(missing[0], timeout=10)
    finally:
        stop()
    for name, (_, _, caps) in photos.PHOTOS.items():
        assert 2 <= len(caps) <= 3 and all(c in [e["caption"] for e in expected] for c in caps), name
    assert len(photos.PHOTOS) >= 5
