"""Retrieval: recall metrics on hand-made scores, the batched re-ranking against the official parity tensors, and a
DeepSpeed fine-tuning run that raises recall on the learnable demo world."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from albef.eval.retrieval import encode_texts, ground_truth, itm_rerank, recall_metrics
from albef.models import build_model
from albef.models.bert import SharedImages
from albef.models.convert import load_pretrained

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from wandb_records import history, records  # noqa: E402


def test_recall_on_hand_made_scores():
    # 3 images with 2 captions each (captions 0-1 -> image 0, 2-3 -> 1, 4-5 -> 2)
    img2txt, txt2img = ground_truth([2, 2, 2])
    assert img2txt == [[0, 1], [2, 3], [4, 5]] and txt2img == [0, 0, 1, 1, 2, 2]
    i2t = np.array(
        [
            [0.1, 0.9, 0.0, 0.0, 0.0, 0.0],  # image 0: its caption 1 ranks first            -> rank 0
            [0.5, 0.0, 0.1, 0.4, 0.0, 0.0],  # image 1: best own caption (3) ranks second    -> rank 1
            [0.9, 0.8, 0.7, 0.6, 0.5, 0.0],  # image 2: own captions rank 5th and 6th       -> rank 4
        ]
    )
    t2i = np.array(
        [[0.9, 0.1, 0.0], [0.2, 0.1, 0.3], [0.0, 1.0, 0.0], [0.0, 0.5, 0.5], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]
    )
    m = recall_metrics(i2t, t2i, img2txt, txt2img)
    assert m["txt_r1"] == pytest.approx(100 / 3) and m["txt_r5"] == pytest.approx(100.0) and m["txt_r10"] == 100.0
    # ranks of the text queries: 0, 1 (image 2 first), 0, tie 0.5/0.5 -> stable order puts image 1 first -> 0, 0, 2
    assert m["img_r1"] == pytest.approx(400 / 6) and m["img_r5"] == 100.0
    assert m["r_mean"] == pytest.approx((m["txt_r_mean"] + m["img_r_mean"]) / 2)
    assert m["txt_r_mean"] == pytest.approx((100 / 3 + 100 + 100) / 3)


def test_batched_rerank_reproduces_the_official_score_matrix(parity_pretrain, parity_retrieval):
    ref = parity_retrieval
    model = build_model("tiny", "retrieval", overrides=["vision.img_size=96"])
    load_pretrained(model, parity_pretrain["state_dict"])
    model.eval()
    with torch.no_grad():
        image_embeds = model.encode_image(ref["image96"])
        text_embeds, text_feat = encode_texts(model, ref["input_ids"], ref["attention_mask"], batch_size=3)
        sims = model.image_feat(image_embeds) @ text_feat.T
        for pair_batch in (1, 5, 64):  # the pairs of several queries per fusion call, any split
            i2t, t2i = itm_rerank(
                model, sims, image_embeds, text_embeds, ref["attention_mask"], k_test=4, pair_batch=pair_batch
            )
            assert torch.allclose(i2t, ref["itm_score_matrix_i2t"], atol=1e-5)
            assert torch.allclose(t2i, ref["itm_score_matrix_i2t"].T, atol=1e-5)
        assert torch.allclose(sims, ref["sims_matrix"], atol=1e-5)
        # A pair that an image query and a caption query both ask for is fused once, each batch is cut to its
        # longest caption, and the pairs come sorted by image, so an image's keys/values are projected once, and
        # again only where its pairs span two batches: the official code fuses 2 x 4 x 4 pairs at full padded
        # width, projecting an image's keys/values for every pair.
        calls, fuse = [], model.fuse
        model.fuse = lambda t, m, i, **kw: (
            calls.append((t.shape[0], t.shape[1], int(m.sum(1).max()), len(i.states))) or fuse(t, m, i, **kw)
        )
        itm_rerank(model, sims, image_embeds, text_embeds, ref["attention_mask"], k_test=4, pair_batch=5)
        del model.fuse
        n_txt, width = ref["input_ids"].shape
        assert sum(c[0] for c in calls) == 4 * n_txt  # every (caption, image) pair once, not twice
        assert all(w == longest for _, w, longest, _ in calls), calls
        assert sum(c[3] for c in calls) <= len(image_embeds) + len(calls) - 1, calls  # 4 images, 4 batches: <= 7
        # k_test below the number of candidates: only the top-k keep a score, the rest -100 (official)
        i2t, _ = itm_rerank(model, sims, image_embeds, text_embeds, ref["attention_mask"], k_test=2)
        assert ((i2t > -100).sum(1) == 2).all()
        top2 = sims.topk(2, dim=1).indices
        for i in range(4):
            assert set(torch.nonzero(i2t[i] > -100).flatten().tolist()) == set(top2[i].tolist())


def _rerank_on_rank(rank: int, port: int, tensors: dict, out: str) -> None:
    """One of two gloo ranks: re-rank with the rank's share of the queries (albef.engine.dist.rank_share)."""
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    model = build_model("tiny", "retrieval", overrides=["vision.img_size=96"])
    load_pretrained(model, tensors["state_dict"])
    with torch.no_grad():
        i2t, t2i = itm_rerank(
            model.eval(),
            tensors["sims"],
            tensors["image_embeds"],
            tensors["text_embeds"],
            tensors["mask"],
            k_test=3,
            pair_batch=5,
        )
    torch.save({"i2t": i2t, "t2i": t2i}, f"{out}.{rank}")
    torch.distributed.destroy_process_group()


def test_shared_images_and_precomputed_text_attention_equal_per_pair_fusion():
    """The two re-ranking shortcuts change no score: ``SharedImages`` (keys/values per image, one attention call per
    run of texts reading the same image, in any order) and ``text_attended`` (the first fusion layer's
    self-attention computed once per caption), with and without token packing."""
    torch.manual_seed(0)
    model = build_model("tiny", "retrieval", overrides=["vision.img_size=32"], seed=0).eval()
    with torch.no_grad():
        images = model.encode_image(torch.randn(3, 3, 32, 32))  # (3, N, W)
        ids = torch.randint(1000, 5000, (7, 9))
        mask = torch.ones_like(ids)
        for row, n in enumerate((9, 3, 5, 9, 2, 7, 4)):
            mask[row, n:] = 0
        texts = model.encode_text(ids, mask)
        index = torch.tensor([2, 0, 0, 1, 2, 2, 0])  # unsorted, repeated
        for packing in (False, True):
            model.bert.packing = packing
            per_pair = model.itm_logits(texts, mask, images[index])
            shared = model.itm_logits(texts, mask, SharedImages(images, index))
            attended = model.bert.fusion_text_states(texts, mask)
            both = model.itm_logits(attended, mask, SharedImages(images, index), text_attended=True)
            assert torch.allclose(shared, per_pair, atol=1e-5) and torch.allclose(both, per_pair, atol=1e-5)
            full = model.fuse(texts, mask, images[index])
            assert torch.allclose(model.fuse(attended, mask, images[index], text_attended=True), full, atol=1e-5)


def test_rerank_over_two_ranks_equals_one_process(parity_pretrain, parity_retrieval, tmp_path):
    """Each of two ranks fuses the pairs of its share of the image and caption queries; the merged score matrices
    (every rank holds them whole) equal the single-process ones."""
    import socket

    ref = parity_retrieval
    model = build_model("tiny", "retrieval", overrides=["vision.img_size=96"])
    load_pretrained(model, parity_pretrain["state_dict"])
    model.eval()
    torch.set_num_threads(1)
    with torch.no_grad():
        image_embeds = model.encode_image(ref["image96"])
        text_embeds, text_feat = encode_texts(model, ref["input_ids"], ref["attention_mask"], batch_size=3)
        sims = model.image_feat(image_embeds) @ text_feat.T
        i2t, t2i = itm_rerank(model, sims, image_embeds, text_embeds, ref["attention_mask"], k_test=3, pair_batch=5)
    tensors = {
        "state_dict": parity_pretrain["state_dict"],
        "sims": sims,
        "image_embeds": image_embeds,
        "text_embeds": text_embeds,
        "mask": ref["attention_mask"],
    }
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    torch.multiprocessing.spawn(_rerank_on_rank, args=(port, tensors, str(tmp_path / "scores")), nprocs=2)
    for rank in range(2):
        got = torch.load(tmp_path / f"scores.{rank}", weights_only=True)
        assert torch.allclose(got["i2t"], i2t, atol=1e-5) and torch.allclose(got["t2i"], t2i, atol=1e-5), rank
        assert ((got["i2t"] > -100).sum(1) == 3).all()


def _run(args, out, wandb_mode="disabled"):
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE=wandb_mode, WANDB_SILENT="true")
    p = subprocess.run(
        [sys.executable, "-m", "finetune.retrieval", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    return p.stdout


@pytest.mark.slow
def test_finetuning_under_deepspeed_raises_recall(tmp_path):
    """Fine-tuning under DeepSpeed from random weights on the learnable demo world (48 px: one object cell per ViT
    patch) raises held-out recall far above the untrained model; per-epoch evaluation, best-checkpoint export, the
    result JSON and the W&B tables. The from-scratch recipe is the demo's (albef/configs/demo.yaml: the official
    queue and momentum after warm-ups, here of 200 steps; wider text init), constant lr 3e-4, no RandAugment."""
    from albef.demo.world import generate_world

    w = tmp_path / "world"
    generate_world(w, seed=0, num_train=1500, num_val=32, num_test=64, image_size=48)
    common = [
        "finetune/configs/demo_retrieval.yaml",
        "model=demo",
        f"data.train_files=[{w / 'retrieval_train.json'}]",
        f"data.val_file={w / 'retrieval_val.json'}",
        f"data.test_file={w / 'retrieval_test.json'}",
        f"data.image_root={w / 'images'}",
        "data.image_res=48",
        "data.augment.randaugment=false",
        "data.num_workers=1",
        "train.global_batch_size=32",
        "train.micro_batch_size=32",
        "train.num_threads=2",
        "wandb.mode=disabled",
        "eval.k_test=8",
        "train.seed=1",
    ]
    _run(common + [f"train.output_dir={tmp_path / 'before'}", "train.evaluate_only=true"], tmp_path)
    before = json.loads((tmp_path / "before" / "eval.json").read_text())
    assert {"val/r_mean", "test/r_mean", "test/txt_r1", "test/img_r10"} <= set(before)
    # R@1 of the ITC similarities alone beside the ITM re-ranked numbers, and the image-use check of the ITM head
    assert {"test/itc_txt_r1", "test/itc_img_r1", "test/itc_r_mean", "test/itm_match_acc"} <= set(before)
    assert 0.0 <= before["test/itm_match_acc"] <= 100.0
    _run(
        common
        + [
            f"train.output_dir={tmp_path / 'after'}",
            "train.epochs=2",
            "train.max_steps=300",
            "train.lr=3e-4",
            "train.min_lr=3e-4",
            "train.warmup_steps=50",
            "train.alpha=0",
            "train.queue_start_step=200",
            "train.momentum_warmup_steps=200",
            "train.log_every=50",
            "wandb.mode=offline",
            "eval.wandb_queries=6",
        ],
        tmp_path,
        wandb_mode="offline",
    )
    rows = [json.loads(x) for x in (tmp_path / "after" / "metrics.jsonl").read_text().splitlines()]
    ita = {r["step"]: r["train/loss_ita"] for r in rows if "train/loss_ita" in r}
    assert max(ita) == 300
    evals = [r for r in rows if "test/r_mean" in r]
    assert [r["step"] for r in evals] == [
        234,
        300,
    ]  # 7500 captions // 32 = 234 full batches per epoch, then the last step
    after = evals[-1]
    chance_r1 = 100 / 64
    print(
        f"\nretrieval on 64 held-out images: TR R@1 {before['test/txt_r1']:.1f} -> {after['test/txt_r1']:.1f}, "
        f"IR R@1 {before['test/img_r1']:.1f} -> {after['test/img_r1']:.1f}, r_mean {before['test/r_mean']:.1f} -> "
        f"{after['test/r_mean']:.1f} (chance R@1 {chance_r1:.1f}); ITC loss {ita[50]:.2f} -> {ita[200]:.2f} over the "
        f"batch (32 keys), {ita[300]:.2f} with the queue (65568 keys, ln 11.09)"
    )
    assert ita[200] < ita[50] - 0.5 and ita[300] < 11.09 - 2
    assert after["test/r_mean"] > before["test/r_mean"] + 15
    assert after["test/txt_r1"] > 5 * chance_r1 and after["test/img_r1"] > 3 * chance_r1
    res = json.loads((tmp_path / "after" / "retrieval_test.json").read_text())
    assert len(res["text_retrieval"]) == 64 and len(res["image_retrieval"]) == 64 * 5
    assert all(len(q["top"]) == 5 for q in res["text_retrieval"])
    assert (tmp_path / "after" / "best.pth").is_file() and (tmp_path / "after" / "final.pth").is_file()
    # the W&B run holds, in each evaluation's metrics row, tables of the first 6 queries with thumbnails; W&B stores
    # a logged table as a run artifact (table JSON + images), staged in the run folder until `wandb sync`
    (wandb_file,) = (tmp_path / "after" / "wandb").glob("offline-run-*/run-*.wandb")
    logged = [r for r in history(wandb_file) if "test/text_retrieval/_type" in r]
    assert [r["_step"] for r in logged] == [234, 300] and all("test/r_mean" in r for r in logged)
    for direction, ncols in (("text_retrieval", 4), ("image_retrieval", 2 + 5 + 2)):
        assert logged[-1][f"test/{direction}/_type"] == "table-file"
        assert (logged[-1][f"test/{direction}/nrows"], logged[-1][f"test/{direction}/ncols"]) == (6, ncols)
    arts = {
        r.artifact.name: {e.path: Path(e.local_path) for e in r.artifact.manifest.contents}
        for r in records(wandb_file)
        if r.WhichOneof("record_type") == "artifact"
    }
    (files,) = [f for name, f in arts.items() if "-testtext_retrieval" in name][-1:]
    assert all(p.is_relative_to(tmp_path / "after") for p in files.values())
    table = json.loads(next(p for k, p in files.items() if k.endswith(".table.json")).read_text())
    assert [row[3] for row in table["data"]] == [q["top"][0]["index"] in q["gt"] for q in res["text_retrieval"][:6]]
    assert [row[0]["path"] in files for row in table["data"]] == [True] * 6  # the thumbnails are in the artifact
    thumbs = [p for k, p in files.items() if k.endswith(".png")]
    assert len(thumbs) == 6 and all(Image.open(p).size == (48, 48) for p in thumbs)  # 48 px images: no shrink


def test_itm_match_accuracy_compares_own_and_next_caption():
    import torch

    from albef.eval.retrieval import itm_match_accuracy
    from albef.models import build_model

    model = build_model("tiny", "retrieval", seed=0).eval()
    torch.manual_seed(1)
    images = model.encode_image(torch.randn(5, 3, model.cfg.vision.img_size, model.cfg.vision.img_size))
    ids = torch.randint(1000, 2000, (10, 7))
    mask = torch.ones_like(ids)
    texts = model.encode_text(ids, mask)
    img2txt = [[2 * i, 2 * i + 1] for i in range(5)]  # two captions per image; the first one is used
    with torch.no_grad():
        got = itm_match_accuracy(model, images, texts, mask, img2txt, batch_size=2)
        wins = 0
        for i in range(5):
            own, other = img2txt[i][0], img2txt[(i + 1) % 5][0]
            p = [
                model.itm_logits(texts[t : t + 1], mask[t : t + 1], images[i : i + 1]).softmax(-1)[0, 1]
                for t in (own, other)
            ]
            wins += int(p[0] > p[1])
    assert got == pytest.approx(100.0 * wins / 5)
