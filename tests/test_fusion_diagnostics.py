"""bench/fusion_diagnostics.py, the probes behind README's issue-16 diagnosis, on a small generated world."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from albef.config import to_dict
from albef.demo import vit
from albef.demo.world import caption_holds, captions, draw_scene, generate_world
from albef.models import build_model, model_config
from albef.models.convert import init_vit_from_deit
from albef.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import fusion_diagnostics  # noqa: E402


def test_probes_of_an_untrained_model(tmp_path, capsys):
    """An untrained ViT already keeps each cell's object in its own patch token (the locality probes read its colour
    and size from it, never from the opposite cell's token); its shape is there only in part, and the same ViT
    trained on the cells' labels reads it far better (the ``supervised`` ceiling); an untrained MLM head names no
    masked colour or shape; the retrieval probe's counts add up; the chance level of the attention probe is the mean
    of 1 / objects over the expressions."""
    world = tmp_path / "world"
    generate_world(world, seed=0, num_train=600, num_val=40, num_test=2, image_size=48)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"model": to_dict(model_config("tiny", ["vision.img_size=48"]))}))
    args = ["none", "--world", str(world), "--config", str(config), "--num-train", "600", "--threads", "1"]
    args += ["--supervised-steps", "300"]
    assert fusion_diagnostics.main(args) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["checkpoint"] == "none"
    local, ceiling = row["locality"], row["supervised"]
    assert set(local) == set(ceiling) == {"colour", "shape", "size"}, row
    assert local["colour"]["own"] > 80 and local["size"]["own"] > 70, row
    assert max(v["opposite"] for v in local.values()) < 20, row
    assert ceiling["shape"] > local["shape"]["own"] + 10 and ceiling["colour"] > 90, row
    val = json.loads((world / "retrieval_val.json").read_text())
    colours = ("red", "green", "blue", "yellow", "purple", "white")
    tok = Tokenizer()  # captions are cut at 25 tokens, as in pretraining: count what the model reads
    tokens = tok([c for e in val for c in e["caption"]])["input_ids"].flatten().tolist()
    colour_words = sum(tokens.count(tok.vocab[w]) for w in colours)
    assert row["mlm"]["colour"]["words"] == colour_words
    assert row["mlm"]["colour"]["own"] < 5 and row["mlm"]["shape"]["own"] < 5, row
    # retrieval: every top-1 caption is decided against the scene graphs; a caption of the image itself is true of it
    for name in ("itc", "itm"):
        r = row["retrieval"][name]
        n_wrong = round(len(val) * (100 - r["r1"]) / 100)
        assert r["wrong"] == n_wrong and 0 <= r["wrong_true"] <= r["wrong"], row["retrieval"]
        assert r["true"] == round(r["r1"] + 100 * r["wrong_true"] / len(val), 1), row["retrieval"]
        assert all(0 <= r[k] <= r["wrong"] for k in ("count", "colours", "shapes", "sizes")), row["retrieval"]
    # minimal pairs: every object of every star-free held-out scene, each attribute once (sizes below 4 objects)
    scenes = json.loads((world / "world.json").read_text())["scenes"]
    plain = [scenes[Path(e["image"]).stem]["objects"] for e in val]
    plain = [o for o in plain if all(x["shape"] != "star" for x in o)]
    expected = {"colour": sum(map(len, plain)), "shape": sum(map(len, plain))}
    expected["size"] = sum(len(o) for o in plain if len(o) < 4)
    assert {k: v["pairs"] for k, v in row["minimal_pairs"].items()} == expected, row["minimal_pairs"]
    for v in row["minimal_pairs"].values():
        assert all(0 <= v[k] <= 100 for k in ("itc_image", "itm_image", "itc_text", "itm_text")), v
    refs = json.loads((world / "refcoco+_val.json").read_text())
    meta = json.loads((world / "refcoco+_refs.json").read_text())
    dets = json.loads((world / "dets.json").read_text())
    chance = 100 * sum(1 / len(dets[meta[str(r["ref_id"])]["image_id"]]) for r in refs) / len(refs)
    assert abs(row["attention"]["chance"] - chance) < 0.06
    assert set(row["attention"]) == {
        "chance",
        "attention_layer2",
        "gradcam_layer2",
        "attention_layer3",
        "gradcam_layer3",
    }
    # at 64 px the ViT's 4x4 patches are not the world's cells: the cell probes say so instead of misreading them
    config.write_text(yaml.safe_dump({"model": to_dict(model_config("tiny", ["vision.img_size=64"]))}))
    assert fusion_diagnostics.main(args) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    skipped = "skipped: a 4x4 patch grid, not the world's 3x3 cells"
    assert row["locality"] == row["supervised"] == row["attention"] == skipped
    assert row["mlm"]["colour"]["words"] == colour_words


def test_minimal_pairs_are_the_scene_and_one_change():
    """The minimal-pairs probe draws a scene again from its objects exactly as the world drew it (same background),
    and each change alters that object's cell only, makes the scene's full description false, and the changed
    description is the one the world writes for the changed scene."""
    tested = 0
    for seed in range(30):
        image, objs = draw_scene(np.random.default_rng(seed), 48)
        if any(o["shape"] not in fusion_diagnostics.PLAIN_SHAPES for o in objs):
            continue  # a star's box is not the square it is drawn in: the probe skips such scenes
        tested += 1
        drawn = fusion_diagnostics.render(objs, 48, np.random.default_rng(seed))
        assert np.array_equal(np.asarray(drawn), np.asarray(image))
        full, sized = captions(np.random.default_rng(seed), objs)[0], len(objs) < 4
        rng = random.Random(seed)
        for k, o in enumerate(objs):
            for key in ("colour", "shape", "size"):
                new = fusion_diagnostics.changed(o, key, 48, rng)
                assert new[key] != o[key] and all(new[a] == o[a] for a in ("colour", "shape", "size") if a != key)
                x0, y0, d, _ = new["box"]
                assert o["col"] * 16 <= x0 <= (o["col"] + 1) * 16 - d and o["row"] * 16 <= y0 <= (o["row"] + 1) * 16 - d
                scene = [new if j == k else x for j, x in enumerate(objs)]
                diff = np.argwhere(
                    (np.asarray(fusion_diagnostics.render(scene, 48, np.random.default_rng(seed))) != image).any(-1)
                )
                assert len(diff) and (diff // 16 == [o["row"], o["col"]]).all(), (key, o)
                if key == "size" and not sized:
                    continue  # four objects: the full description names no sizes
                assert not caption_holds(0, full, objs, scene), (full, key)
                assert (
                    fusion_diagnostics.redescribed(full, objs, scene) == captions(np.random.default_rng(seed), scene)[0]
                )
    assert tested >= 8


def test_world_vit_learns_the_cells_and_loads_as_init_vit(tmp_path, capsys):
    """``python -m albef.demo.vit`` trains the demo ViT on a labelled world's cells and scenes (held-out accuracy far above
    the untrained heads') and saves it so that ``init.vit`` (the official DeiT path) loads it into both ViTs."""
    world = tmp_path / "world"
    generate_world(world, seed=0, num_train=600, num_val=40, num_test=2, image_size=48)
    rows = {}
    for steps in (0, 300):
        out = tmp_path / f"vit_{steps}.pth"
        assert vit.main(["--world", str(world), "--out", str(out), "--steps", str(steps), "--threads", "1"]) == 0
        rows[steps] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["val"]
    trained, untrained = rows[300], rows[0]
    assert trained["colour"] > 95 and trained["size"] > 90 and trained["shape"] > 70 and trained["count"] > 80, rows
    assert all(trained[k] > untrained[k] + 20 for k in trained), rows
    model = build_model(model_config("demo"), "pretrain", seed=1)
    init_vit_from_deit(model, tmp_path / "vit_300.pth")
    saved = torch.load(tmp_path / "vit_300.pth")
    for encoder in (model.visual_encoder, model.visual_encoder_m):
        assert all(torch.equal(v, saved[k]) for k, v in encoder.state_dict().items())
    small = tmp_path / "world64"
    generate_world(small, seed=0, num_train=2, num_val=2, num_test=2, image_size=64)
    with pytest.raises(SystemExit):
        vit.main(["--world", str(small), "--out", str(tmp_path / "x.pth"), "--steps", "1"])
    assert "needs 48 px in 3x3 patches" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        vit.main(["--world", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.pth")])
    assert f"{tmp_path / 'nowhere' / 'world.json'} not found" in capsys.readouterr().err
    assert not (tmp_path / "x.pth").exists()
