"""Zero-shot classification (``finetune.zeroshot``): the classifier is the template-averaged prompt features, the
metrics follow the scores, the entrypoint runs from a checkpoint, and bad configs name their field. That a
pretrained model classifies far above chance is asserted on the demo's own pretraining (tests/test_demo.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from albef.config import ConfigError, load_config
from albef.demo.world import generate_world
from albef.models import build_model
from albef.models.convert import save_official
from albef.tasks.zeroshot import ZeroShotConfig, ZeroShotTask
from albef.tokenizer import Tokenizer, pre_caption

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "finetune/configs/demo_zeroshot.yaml"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    w = tmp_path_factory.mktemp("zs_world")
    generate_world(w, seed=3, num_train=2, num_val=30, num_test=30, image_size=48)
    return w


def _config(world: Path, out: Path, *extra: str) -> ZeroShotConfig:
    return load_config(
        ZeroShotConfig,
        CONFIG,
        [
            f"data.test_file={world / 'zeroshot_test.json'}",
            f"data.image_root={world / 'images'}",
            f"train.output_dir={out}",
            "data.num_workers=0",
            *extra,
        ],
    )


def test_scores_are_image_features_against_template_averaged_prompts(world, tmp_path):
    cfg = _config(world, tmp_path, "data.templates=['a {}', 'one shape: a {}']")
    task = ZeroShotTask(cfg)
    torch.manual_seed(0)
    model = build_model(cfg.model, "retrieval").eval()
    metrics = task.evaluate(model, "test", torch.device("cpu"), torch.float32)

    # by hand: every prompt encoded alone, averaged per class, normalised; each image encoded alone
    tok = Tokenizer()
    with torch.no_grad():
        rows = []
        for c in task.classes:
            t = tok([pre_caption(f"a {c}"), pre_caption(f"one shape: a {c}")], max_length=30)
            rows.append(model.text_feat(model.encode_text(t["input_ids"], t["attention_mask"])).mean(0))
        classifier = F.normalize(torch.stack(rows), dim=-1)
    result = json.loads((tmp_path / "zeroshot_test.json").read_text())
    entries = json.loads((world / "zeroshot_test.json").read_text())
    assert len(result["images"]) == len(entries) == metrics["num_images"] > 3
    from albef.data.transforms import normalize_images, test_transform

    transform = test_transform(48)
    hits = 0
    for row, entry in zip(result["images"], entries):
        pixels = torch.from_numpy(transform((world / "images" / entry["image"]).read_bytes(), None))[None]
        with torch.no_grad():
            scores = (model.image_feat(model.encode_image(normalize_images(pixels))) @ classifier.t())[0]
        top = scores.topk(5)
        assert row["label"] == entry["label"] and [r["class"] for r in row["top"]] == [
            task.classes[i] for i in top.indices
        ]
        assert [r["score"] for r in row["top"]] == pytest.approx(top.values.tolist(), abs=1e-5)
        hits += task.classes[int(top.indices[0])] == entry["label"]
    assert metrics["top1"] == pytest.approx(100 * hits / len(entries))
    assert metrics["chance"] == pytest.approx(100 / 24) and len(task.classes) == 24  # the YAML's class list
    per_class = {k[4:]: v for k, v in metrics.items() if k.startswith("acc_")}
    assert set(per_class) == {e["label"] for e in entries}
    assert metrics["mean_per_class"] == pytest.approx(sum(per_class.values()) / len(per_class))
    assert metrics["top5"] >= metrics["top1"] and result["metrics"] == metrics


def test_classes_default_to_the_sorted_labels_and_unknown_labels_are_errors(world, tmp_path):
    task = ZeroShotTask(_config(world, tmp_path, "data.classes=[]"))
    assert task.classes == sorted({e["label"] for e in json.loads((world / "zeroshot_test.json").read_text())})
    task = ZeroShotTask(_config(world, tmp_path, "data.classes=[red circle, blue star]"))
    with pytest.raises(ValueError, match=r"zeroshot_test.json: label\(s\) .* are not in data.classes"):
        task.evaluate(build_model(task.cfg.model, "retrieval"), "test", torch.device("cpu"), torch.float32)


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.templates=['a photo']", r"data.templates.*'a photo' must contain exactly one '\{\}'"),
        ("data.templates=[]", r"data.templates=\[\]: give at least one prompt template"),
        ("data.classes=[cat, cat]", r"data.classes=.*a class name is repeated"),
        ("train.evaluate_only=false", r"override 'train.evaluate_only=false'.*nothing to train"),
    ],
)
def test_bad_configs_name_the_field(world, tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        _config(world, tmp_path, override)


def test_entrypoint_evaluates_a_checkpoint_on_both_splits(world, tmp_path):
    cfg = _config(world, tmp_path)
    torch.manual_seed(0)
    ckpt = tmp_path / "model.pth"
    save_official(build_model(cfg.model, "pretrain"), ckpt)  # a pretraining checkpoint loads into the ITC encoders
    out = tmp_path / "run"
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "finetune.zeroshot",
            str(CONFIG),
            f"data.val_file={world / 'zeroshot_val.json'}",
            f"data.test_file={world / 'zeroshot_test.json'}",
            f"data.image_root={world / 'images'}",
            f"init.checkpoint={ckpt}",
            f"train.output_dir={out}",
            "data.num_workers=0",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    evaluated = json.loads((out / "eval.json").read_text())
    assert {"val/top1", "val/top5", "test/top1", "test/top5", "test/mean_per_class"} <= set(evaluated)
    assert (out / "zeroshot_val.json").is_file() and (out / "zeroshot_test.json").is_file()
