"""``python -m data_prep.filter``: real shards scored by a real model; the thresholds decide exactly which samples
stay (checked against the model's own scores), the stats count every sample once, CapFilt keeps each sample's best
caption by ITM, and a rerun skips finished shards. That a trained model removes swapped captions is asserted on
the demo's pretraining (tests/test_demo.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import albef
from albef.demo.world import generate_world
from albef.embed import embed_part
from data_prep.filter import judge
from data_prep.shards import iter_tar_samples

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shards(tmp_path_factory, demo_model_dir):
    """The world's training images with their five captions each, as data_prep shards (3 shards)."""
    root = tmp_path_factory.mktemp("filter")
    generate_world(root / "world", seed=7, num_train=24, num_val=2, num_test=2, image_size=48)
    (root / "model").symlink_to(demo_model_dir)
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "data_prep.annotations",
            str(root / "world" / "pretrain.json"),
            "--image-root",
            str(root / "world" / "images"),
            "--output",
            str(root / "shards"),
            "--shard-size",
            "10",
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
    return root


def _filter(root: Path, out: Path, *args) -> str:
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "data_prep.filter",
            str(root / "shards"),
            "--checkpoint",
            str(root / "model"),
            "--output",
            str(out),
            "--workers",
            "0",
            "--no-progress",
            *args,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    return p.stdout


def _scores(root: Path) -> dict:
    """key -> (captions, itc, itm) computed directly with the model."""
    model, preprocess, tokenizer = albef.load(root / "model", task="retrieval")
    out = {}
    for tar in sorted((root / "shards").glob("*.tar")):
        for key, m in iter_tar_samples(tar):
            lines = m["txt"].decode().splitlines()
            rows = [(f"{key}#{j}", key, m["jpg"], c) for j, c in enumerate(lines)]
            s = embed_part(rows, model, preprocess, tokenizer, "score", 64, 0, "cpu", torch.float32)
            out[key] = (lines, s["itc"], s["itm"])
    return out


def _kept(out: Path) -> dict:
    return {
        k: (m["txt"].decode().splitlines(), json.loads(m["json"]))
        for t in sorted(out.glob("*.tar"))
        for k, m in iter_tar_samples(t)
    }


def test_judge_picks_the_alt_text_or_the_best_caption_and_names_the_failing_score():
    itc, itm = np.array([0.1, 0.9, 0.5]), np.array([0.2, 0.4, 0.8])
    assert judge(itc, itm, False, -1.0, 0.0) == (0, None)
    assert judge(itc, itm, False, 0.2, 0.0) == (0, "low_itc") and judge(itc, itm, False, 0.0, 0.3) == (0, "low_itm")
    assert judge(itc, itm, True, 0.5, 0.8) == (2, None) and judge(itc, itm, True, 0.6, 0.0) == (2, "low_itc")


def test_thresholds_keep_exactly_the_samples_whose_scores_pass(shards, tmp_path):
    scores = _scores(shards)
    itm_alt = sorted(float(s[2][0]) for s in scores.values())
    min_itm = (itm_alt[len(itm_alt) // 2 - 1] + itm_alt[len(itm_alt) // 2]) / 2  # half the samples pass
    out = tmp_path / "f"
    stdout = _filter(shards, out, "--min-itm", str(min_itm))
    kept = _kept(out)
    expected = {k for k, s in scores.items() if s[2][0] >= min_itm}
    assert set(kept) == expected and len(expected) == 12
    for k, (lines, meta) in kept.items():
        assert lines == scores[k][0]  # every caption stays without --capfilt
        assert meta["albef_filter"]["caption"] == 0 and meta["albef_filter"]["itm"] == pytest.approx(
            scores[k][2][0], abs=1e-5
        )
        assert meta["albef_filter"]["itc"] == pytest.approx(scores[k][1][0], abs=1e-5)
    stats = [json.loads((out / f"{i:06d}_stats.json").read_text()) for i in range(3)]
    assert [s["input_samples"] for s in stats] == [10, 10, 4] and sum(s["kept"] for s in stats) == 12
    assert sum(s["dropped"]["low_itm"] for s in stats) == 12 and all(s["dropped"]["low_itc"] == 0 for s in stats)
    assert all(sum(s["hist"]["itm"]) == sum(s["hist"]["itc"]) == s["input_samples"] for s in stats)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_samples"] == 12 and manifest["filter"]["min_itm"] == pytest.approx(min_itm)
    assert "kept 12 of 24 samples (low_itm 12; 0 captions replaced)" in stdout

    # a rerun after a lost shard rebuilds only that shard, with the same samples (the others are not rewritten)
    before = {k: (m["txt"], m["json"], m["jpg"]) for k, m in iter_tar_samples(out / "000001.tar")}
    others = (out / "000000.tar").stat().st_mtime_ns
    (out / "000001.tar").unlink()
    _filter(shards, out, "--min-itm", str(min_itm))
    assert {k: (m["txt"], m["json"], m["jpg"]) for k, m in iter_tar_samples(out / "000001.tar")} == before
    assert set(_kept(out)) == expected and (out / "000000.tar").stat().st_mtime_ns == others


def test_capfilt_keeps_each_samples_best_caption_by_itm(shards, tmp_path):
    scores = _scores(shards)
    out = tmp_path / "c"
    _filter(shards, out, "--capfilt")
    kept = _kept(out)
    assert set(kept) == set(scores)  # no thresholds: everything stays, with its best caption only
    replaced = 0
    for k, (lines, meta) in kept.items():
        best = int(np.argmax(scores[k][2]))
        assert lines == [scores[k][0][best]] and meta["albef_filter"]["caption"] == best
        replaced += best != 0
    stats = [json.loads((out / f"{i:06d}_stats.json").read_text()) for i in range(3)]
    assert sum(s["capfilt_replaced"] for s in stats) == replaced > 0


def test_a_calibrated_threshold_keeps_the_asked_share_of_the_known_good_set(shards, tmp_path):
    """``--calibrate`` sets the threshold to the highest value that keeps ``--keep-clean`` of a reference set judged as
    the filter judges; here the reference is the input itself, so exactly that share of it stays."""
    scores = _scores(shards)
    out = tmp_path / "cal"
    stdout = _filter(shards, out, "--calibrate", str(shards / "shards"), "--keep-clean", "0.75")
    itc = sorted(float(s[1][0]) for s in scores.values())
    threshold = itc[6]  # 24 samples: the 7th lowest alt-text ITC keeps 18 = 75% of them (1e-5: batch rounding)
    manifest = json.loads((out / "manifest.json").read_text())
    cal = manifest["filter"]["calibration"]
    assert cal["threshold"] == pytest.approx(threshold, abs=1e-5) and manifest["filter"]["min_itc"] == cal["threshold"]
    assert (cal["samples"], cal["kept"], cal["score"], cal["keep_clean"]) == (24, 18, "itc", 0.75)
    assert (
        set(_kept(out)) == {k for k, s in scores.items() if s[1][0] >= cal["threshold"] - 1e-5}
        and manifest["num_samples"] == 18
    )
    assert f"--min-itc {cal['threshold']:.4f} keeps 18 of the 24 known-good samples" in stdout
    # with --capfilt each reference sample is judged by its best line by ITM, and the ITM threshold can be the one set
    out = tmp_path / "cal_itm"
    _filter(
        shards, out, "--capfilt", "--calibrate", str(shards / "shards"), "--calibrate-on", "itm", "--keep-clean", "0.5"
    )
    best_itm = {k: float(max(s[2])) for k, s in scores.items()}
    cal = json.loads((out / "manifest.json").read_text())["filter"]["calibration"]
    assert cal["threshold"] == pytest.approx(sorted(best_itm.values())[12], abs=1e-5) and cal["kept"] == 12
    assert set(_kept(out)) == {k for k, v in best_itm.items() if v >= cal["threshold"] - 1e-5}


def test_bad_input_is_a_clear_error(shards, tmp_path):
    p = subprocess.run(
        [sys.executable, "-m", "data_prep.filter", str(tmp_path), "--checkpoint", "x", "--output", str(tmp_path / "o")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 2 and "manifest.json not found" in p.stderr
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "data_prep.filter",
            str(shards / "shards"),
            "--checkpoint",
            "x",
            "--output",
            str(shards / "shards"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 2 and "is the input folder" in p.stderr
    base = [sys.executable, "-m", "data_prep.filter", str(shards / "shards"), "--checkpoint", str(shards / "model")]
    base += ["--output", str(tmp_path / "o")]
    for args, message in (
        (["--calibrate", str(shards / "shards"), "--min-itc", "0.3"], "--min-itc 0.3 and --calibrate"),
        (["--calibrate", str(shards / "shards"), "--keep-clean", "0"], "--keep-clean 0.0 is not in (0, 1]"),
        (["--calibrate", str(tmp_path)], f"--calibrate {tmp_path}: "),
    ):
        p = subprocess.run(base + args, cwd=REPO, capture_output=True, text=True, timeout=120)
        assert p.returncode == 2 and message in p.stderr, (args, p.stderr[-2000:])
    assert not (tmp_path / "o").exists()  # refused before anything was written
