"""``python -m albef.embed``: bulk ITC embeddings and ITC/ITM pair scores from an ALBEF JSON, an image folder or real
shards; the numbers equal the model's own computation, a rerun skips finished parts, and ranks split the parts
between them with the same union as one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import albef
from albef.demo.world import generate_world
from albef.embed import read_part
from albef.tokenizer import pre_caption

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, demo_model_dir):
    root = tmp_path_factory.mktemp("embed")
    generate_world(root / "world", seed=5, num_train=12, num_val=2, num_test=7, image_size=48)
    (root / "model").symlink_to(demo_model_dir)
    return root


def _embed(setup, out: Path, *args, env=None):
    cmd = [
        sys.executable,
        "-m",
        "albef.embed",
        "--checkpoint",
        str(setup / "model"),
        "--output",
        str(out),
        "--workers",
        "0",
        "--no-progress",
        *args,
    ]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=dict(os.environ, **(env or {})))
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    return p.stdout


def _rows(out: Path) -> dict:
    parts = [read_part(out / name) for name in json.loads((out / "manifest.json").read_text())["parts"]]
    return {
        k: (
            np.concatenate([p[k] for p in parts])
            if isinstance(parts[0][k], np.ndarray)
            else [x for p in parts for x in p[k]]
        )
        for k in parts[0]
    }


def test_pair_scores_equal_the_models_own_and_reruns_skip_finished_parts(setup, tmp_path):
    test = json.loads((setup / "world" / "retrieval_test.json").read_text())
    args = [
        "--input",
        str(setup / "world" / "retrieval_test.json"),
        "--image-root",
        str(setup / "world" / "images"),
        "--mode",
        "score",
        "--part-size",
        "7",
    ]
    out = tmp_path / "scores"
    _embed(setup, out, *args)
    rows = _rows(out)
    assert rows["id"] == [f"{e['image']}#{j}" for e in test for j in range(len(e["caption"]))]
    # 7 images x 5 captions; a part closes at the first image boundary from 7 rows on: 10, 10, 10, 5 rows
    assert [len(read_part(out / f"part-{i:05d}.parquet")["id"]) for i in range(4)] == [10, 10, 10, 5]
    assert len(json.loads((out / "manifest.json").read_text())["parts"]) == 4
    for name in json.loads((out / "manifest.json").read_text())["parts"]:
        images = read_part(out / name)["image"]
        assert all(images.count(i) == 5 for i in set(images))  # a part never splits an image's captions

    model, preprocess, tokenizer = albef.load(setup / "model", task="retrieval")
    with torch.no_grad():
        for k in (0, 6, 17, 34):
            entry = test[k // 5]
            image = preprocess(setup / "world" / "images" / entry["image"])[None]
            text = tokenizer([pre_caption(entry["caption"][k % 5])], max_length=30)
            image_embeds, text_embeds = model.encode_image(image), model.encode_text(**text)
            itc = float(model.image_feat(image_embeds) @ model.text_feat(text_embeds).t())
            itm = float(F.softmax(model.itm_logits(text_embeds, text["attention_mask"], image_embeds), -1)[0, 1])
            assert rows["itc"][k] == pytest.approx(itc, abs=1e-5) and rows["itm"][k] == pytest.approx(itm, abs=1e-5)

    # a crash left one part unwritten: the rerun computes that part only, with the same numbers
    before = (out / "part-00002.parquet").read_bytes()
    (out / "part-00002.parquet").unlink()
    (out / "manifest.json").unlink()
    stdout = _embed(setup, out, *args)
    assert "1 part(s) written, 3 already there" in stdout
    assert _rows(out)["itm"].tolist() == rows["itm"].tolist() and (out / "part-00002.parquet").read_bytes() == before


def test_two_ranks_write_the_union_one_process_writes(setup, tmp_path):
    args = ["--input", str(setup / "world" / "images"), "--part-size", "4", "--format", "npy"]
    _embed(setup, tmp_path / "one", *args)
    first = _embed(setup, tmp_path / "two", *args, env={"RANK": "1", "WORLD_SIZE": "2"})
    assert "manifest.json" not in first and not (tmp_path / "two" / "manifest.json").exists()
    second = _embed(setup, tmp_path / "two", *args, env={"RANK": "0", "WORLD_SIZE": "2"})
    assert "all 6 part(s) present" in second  # 21 images in parts of 4
    one, two = _rows(tmp_path / "one"), _rows(tmp_path / "two")
    files = sorted(str(p.relative_to(setup / "world" / "images")) for p in (setup / "world" / "images").iterdir())
    assert one["id"] == two["id"] == files and one["caption"] == [""] * len(files)  # no text in a folder
    np.testing.assert_array_equal(one["image_feat"], two["image_feat"])
    assert np.allclose(np.linalg.norm(one["image_feat"], axis=1), 1.0, atol=1e-5) and np.isnan(one["text_feat"]).all()


def test_shards_give_one_row_per_sample_with_its_first_caption(setup, tmp_path):
    shards = tmp_path / "shards"
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "data_prep.annotations",
            str(setup / "world" / "pretrain.json"),
            "--image-root",
            str(setup / "world" / "images"),
            "--output",
            str(shards),
            "--shard-size",
            "5",
            "--image-size",
            "48",
            "--no-progress",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    _embed(setup, tmp_path / "emb", "--input", str(shards))
    rows = _rows(tmp_path / "emb")
    pretrain = json.loads((setup / "world" / "pretrain.json").read_text())
    assert len(rows["id"]) == len(pretrain) == json.loads((shards / "manifest.json").read_text())["num_samples"]
    assert sorted(rows["caption"]) == sorted(e["caption"][0] for e in pretrain)  # as written, before pre_caption
    assert rows["image_feat"].shape == rows["text_feat"].shape == (12, 32)
    assert np.allclose(np.linalg.norm(rows["text_feat"], axis=1), 1.0, atol=1e-5)
