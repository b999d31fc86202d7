"""bench/fusion_diagnostics.py, the probes behind README's issue-16 diagnosis, on a small generated world."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

from albef.config import to_dict
from albef.demo.world import generate_world
from albef.models import model_config
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
