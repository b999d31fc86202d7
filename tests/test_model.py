"""Model behaviour beyond parity: gradient checkpointing, learning, checkpoint interop, encoder init, config."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from albef.config import ConfigError
from albef.models import build_model, model_config
from albef.models.convert import (
    CheckpointError,
    export_official,
    init_text_from_hf,
    init_vit_from_deit,
    load_pretrained,
    read_state_dict,
    save_official,
)
from albef.tokenizer import Tokenizer

CAPTIONS = [
    "a red square on the left",
    "two blue circles in the middle",
    "a green triangle above a circle",
    "a yellow star at the bottom",
    "three small purple dots",
    "a big orange rectangle",
    "a black line across the image",
    "a white cross on gray",
]


def batch(n=8, res=64, seed=0):
    """n distinct images (a colour per image plus noise) and their captions."""
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(n, 3, 1, 1, generator=g).expand(n, 3, res, res) + 0.3 * torch.randn(n, 3, res, res, generator=g)
    text = Tokenizer()(CAPTIONS[:n], max_length=25)
    return img.contiguous(), text["input_ids"], text["attention_mask"]


@pytest.mark.parametrize("task", ["pretrain", "retrieval"])
def test_grad_checkpointing_same_loss_and_gradients(task):
    """Dropout on: checkpointing must replay the same dropout masks in the recomputation."""
    img, ids, mask = batch(4)
    base = build_model("tiny", task, seed=0)
    results = []
    for enable in (False, True):
        model = copy.deepcopy(base)
        model.set_grad_checkpointing(enable)
        model.train()
        torch.manual_seed(7)
        kwargs = {"idx": torch.tensor([0, 1, 1, 2])} if task == "retrieval" else {}
        out = model(img, ids, mask, alpha=0.4, **kwargs)
        loss = sum(out.values())
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads))
    (l0, g0), (l1, g1) = results
    assert torch.allclose(l0, l1, atol=1e-6, rtol=0), (l0, l1)
    assert g0.keys() == g1.keys() and len(g0) > 50
    for k in g0:
        assert torch.allclose(g0[k], g1[k], atol=1e-6, rtol=0), k
    # the flag reached both encoders
    assert base.visual_encoder.grad_checkpointing is False and model.visual_encoder.grad_checkpointing is True
    assert model.bert.encoder.grad_checkpointing is True


def _packing_step(task, packing, gc):
    """One forward/backward of a tiny ``task`` model, dropout off (packing changes which draws the masks use)."""
    img, _, _ = batch(4)
    text = Tokenizer()(["a red square", "three small purple dots on the left", "a star", "a big orange one"])
    ids, mask = text["input_ids"], text["attention_mask"]
    assert not mask.all()
    model = build_model(
        "tiny",
        task,
        seed=0,
        overrides=[
            f"text_packing={packing}",
            f"grad_checkpointing={gc}",
            "text.hidden_dropout_prob=0",
            "text.attention_probs_dropout_prob=0",
        ],
    )
    model.train()
    torch.manual_seed(7)
    if task == "vqa":  # two answers per question, answers of different lengths
        answers = Tokenizer()(["red", "a big blue one", "two", "no", "yes", "green", "three", "left"], max_length=8)
        out = model(
            img,
            ids,
            mask,
            answers["input_ids"],
            answers["attention_mask"],
            torch.full((8,), 0.5),
            torch.full((4,), 2),
            alpha=0.4,
        )
    elif task == "nlvr2":
        out = model([img, img.flip(0)], ids, mask, torch.tensor([0, 1, 1, 0]), alpha=0.4)
    elif task == "snli_ve":
        out = model([img], ids, mask, torch.tensor([0, 1, 2, 0]), alpha=0.4)
    else:
        kwargs = {"idx": torch.tensor([0, 1, 1, 2])} if task == "retrieval" else {}
        out = model(img, ids, mask, alpha=0.4, **kwargs)
    loss = sum(v for k, v in out.items() if k.startswith("loss"))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_token_packing_only_where_it_pays():
    """Packing drops the padding rows of a batch with at least Packing.MIN_PADDING (10%) padding; below that it would
    only add its scatter/gather (e.g. retrieval re-ranking's batches, cut to their longest caption)."""
    from albef.models.bert import Packing

    mask = torch.ones(4, 10, dtype=torch.long)
    assert Packing.of(mask) is None
    mask[0, 7:] = 0  # 3 of 40 positions padding
    assert Packing.of(mask) is None
    mask[1, 8:] = 0  # 5 of 40
    packing = Packing.of(mask)
    assert packing is not None and packing.index.tolist() == [i for i in range(40) if i not in (7, 8, 9, 18, 19)]
    x = torch.randn(4, 10, 3)
    assert torch.equal(packing.pack(x), x.reshape(40, 3)[packing.index])
    assert torch.equal(packing.unpack(packing.pack(x)), x * mask[..., None])


@pytest.mark.parametrize("task", ["pretrain", "retrieval", "vqa", "nlvr2", "snli_ve"])
def test_token_packing_gives_the_same_losses_and_gradients(task):
    """``model.text_packing`` runs the BERT layers on the real tokens only: the same step as computing the padding
    too, for every model kind (a VQA decoder is never packed), with and without gradient checkpointing."""
    l0, g0 = _packing_step(task, False, False)
    for gc in (False, True):
        l1, g1 = _packing_step(task, True, gc)
        assert torch.allclose(l0, l1, atol=1e-5, rtol=1e-5), (gc, l0, l1)
        assert g0.keys() == g1.keys() and len(g0) > 30
        for k in g0:
            assert torch.allclose(g0[k], g1[k], atol=1e-5, rtol=1e-4), (gc, k, (g0[k] - g1[k]).abs().max())


@pytest.mark.parametrize("packing", [False, True])
def test_cls_only_last_layer_gives_the_same_itm_logits_and_gradients(packing):
    """ITM logits and the momentum ITC text features read [CLS] only, so their last layer is computed at [CLS] only:
    the same values and gradients as computing every row and taking [CLS]."""
    model = build_model("tiny", "retrieval", seed=0, overrides=[f"text_packing={packing}"]).train()
    for m in model.modules():
        if hasattr(m, "dropout_p"):
            m.dropout_p = 0.0
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    img, _, _ = batch(4)
    text = Tokenizer()(["a red square", "three small purple dots on the left", "a star", "a big orange one"])
    ids, mask = text["input_ids"], text["attention_mask"]
    results = []
    for cls_only in (False, True):
        model.zero_grad()
        text_embeds = model.encode_text(ids, mask)
        fused = model.fuse(text_embeds, mask, model.encode_image(img), cls_only=cls_only)
        assert fused.shape[1] == (1 if cls_only else ids.shape[1])
        logits = model.itm_head(fused[:, 0])
        feat = model.text_feat(model.encode_text(ids, mask, cls_only=cls_only))
        (logits[:, 1].sum() + feat.sum()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((logits.detach(), feat.detach(), grads))
    (l0, f0, g0), (l1, f1, g1) = results
    torch.testing.assert_close(l1, l0, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(f1, f0, atol=1e-6, rtol=1e-5)
    assert g0.keys() == g1.keys() and len(g0) > 30
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], atol=1e-6, rtol=1e-4, msg=k)
    torch.testing.assert_close(model.itm_logits(text_embeds, mask, model.encode_image(img)), l0, atol=1e-6, rtol=1e-5)


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    img, ids, mask = batch(8)
    # A fast-following momentum model and a one-batch queue, so that 300 steps suffice on a CPU. With one batch
    # in the queue every pair has one stale copy of itself among the negatives: ITC's floor is ln 2. ITM learns
    # this batch's hard negatives between steps 150 and 300: at 200 its last-10 mean was 0.41-0.62 over the
    # dropout/negative draws of 4 seeds (2 above 0.55), at 300 0.08-0.25 over 6.
    model = build_model("tiny", "pretrain", seed=0, overrides=["momentum=0.5", "queue_size=8"])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
    history = []
    for _ in range(300):
        out = model(img, ids, mask, alpha=0.0)
        opt.zero_grad()
        sum(out.values()).backward()
        opt.step()
        history.append({k: v.item() for k, v in out.items()})
    start = history[0]
    end = {k: sum(h[k] for h in history[-10:]) / 10 for k in start}
    assert end["loss_mlm"] < 0.5 * start["loss_mlm"], (start, end)
    assert end["loss_ita"] < 0.3 * start["loss_ita"], (start, end)
    # below 0.6365 = the loss of always predicting the 1:2 prior: ITM tells matched from hard negatives
    assert end["loss_itm"] < 0.55 and end["loss_itm"] < 0.6 * start["loss_itm"], (start, end)


def test_missing_core_weight_is_refused_by_name(parity_pretrain, tmp_path):
    sd = dict(parity_pretrain["state_dict"])
    del sd["text_encoder.bert.encoder.layer.3.crossattention.self.key.weight"]
    path = tmp_path / "broken.pth"
    torch.save({"model": sd}, path)
    model = build_model("tiny", "pretrain")
    with pytest.raises(CheckpointError, match=r"layer\.3\.crossattention\.self\.key\.weight") as e:
        load_pretrained(model, path)
    assert str(path) in str(e.value)


def test_unexpected_and_mismatched_keys_are_refused(parity_pretrain):
    sd = dict(parity_pretrain["state_dict"])
    sd["some_new_head.weight"] = torch.zeros(2)
    with pytest.raises(CheckpointError, match="some_new_head.weight"):
        load_pretrained(build_model("tiny", "pretrain"), sd)
    sd = dict(parity_pretrain["state_dict"])
    with pytest.raises(CheckpointError, match=r"image_queue: checkpoint \(32, 64\) vs model \(32, 128\)"):
        load_pretrained(build_model("tiny", "pretrain", overrides=["queue_size=128"]), sd)


def test_checkpoint_wrappers_round_trip(parity_pretrain, tmp_path):
    ref = parity_pretrain["state_dict"]
    model = build_model("tiny", "pretrain")
    load_pretrained(model, ref)
    path = tmp_path / "ours.pth"
    save_official(model, path, epoch=3)
    raw = torch.load(path, weights_only=True)
    assert raw["epoch"] == 3 and raw["model"]["temp"].shape == torch.Size([])
    for variant in [raw, raw["model"], {"module": {f"module.{k}": v for k, v in raw["model"].items()}}]:
        other = build_model("tiny", "pretrain")
        load_pretrained(other, variant)
        for k, v in export_official(other).items():
            assert torch.equal(v, ref[k]), k
    with pytest.raises(CheckpointError, match="does not exist"):
        read_state_dict(tmp_path / "nope.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pth"):
        read_state_dict(tmp_path / "junk.pth")


def test_downstream_checkpoint_loads_back_into_pretraining_layout(parity_pretrain):
    """A bert.-stripped (fine-tuned) checkpoint has no MLM head: loading it for pretraining must say so."""
    retrieval = build_model("tiny", "retrieval")
    load_pretrained(retrieval, parity_pretrain["state_dict"])
    sd = export_official(retrieval)
    pre = build_model("tiny", "pretrain")
    with pytest.raises(CheckpointError, match=r"text_encoder\.cls\.predictions"):
        load_pretrained(pre, sd)
    report = load_pretrained(pre, sd, allow_missing=("text_encoder.cls.", "text_encoder_m.cls."), allow_unexpected=True)
    assert "idx_queue" in report.unexpected
    assert torch.equal(
        pre.text_encoder.bert.encoder.layer[0].attention.self.query.weight,
        retrieval.text_encoder.encoder.layer[0].attention.self.query.weight,
    )


def test_momentum_twins_copied_when_checkpoint_has_none(parity_pretrain):
    sd = {k: v for k, v in parity_pretrain["state_dict"].items() if "_m." not in k}
    torch.manual_seed(3)
    model = build_model("tiny", "retrieval")
    report = load_pretrained(model, sd)
    assert report.momentum_from_online
    for a, b in model.model_pairs:
        for p, p_m in zip(a.parameters(), b.parameters()):
            assert torch.equal(p, p_m)


def test_vit_init_from_deit_checkpoint_file(tmp_path):
    """A DeiT-style file ({'model': ...} with a classifier head, 224 px grid) initialises the 256 px encoder."""
    from albef.models.vit import VisionConfig, build_vit

    deit = build_vit(VisionConfig(img_size=224, embed_dim=64, depth=2, num_heads=2))
    sd = {k: v.clone() for k, v in deit.state_dict().items()}
    sd["head.weight"], sd["head.bias"] = torch.randn(1000, 64), torch.randn(1000)
    torch.save({"model": sd}, tmp_path / "deit.pth")
    model = build_model("tiny", "pretrain", overrides=["vision.img_size=256"])
    dropped = init_vit_from_deit(model, tmp_path / "deit.pth")
    assert sorted(dropped) == ["head.bias", "head.weight"]
    assert model.visual_encoder.pos_embed.shape == (1, 257, 64)
    assert torch.equal(model.visual_encoder.pos_embed[:, 0], sd["pos_embed"][:, 0])  # CLS row kept
    assert torch.equal(model.visual_encoder.blocks[1].attn.qkv.weight, sd["blocks.1.attn.qkv.weight"])
    assert torch.equal(model.visual_encoder_m.blocks[1].attn.qkv.weight, sd["blocks.1.attn.qkv.weight"])
    del sd["norm.weight"]
    torch.save(sd, tmp_path / "broken.pth")
    with pytest.raises(CheckpointError, match="norm.weight"):
        init_vit_from_deit(model, tmp_path / "broken.pth")


MINILM = [
    "text.hidden_size=384",
    "text.num_hidden_layers=6",
    "text.fusion_layer=3",
    "text.num_attention_heads=12",
    "text.intermediate_size=1536",
    "text.encoder_width=384",
    "vision.embed_dim=384",
    "vision.num_heads=6",
    "vision.depth=1",
    "vision.img_size=32",
]


@pytest.mark.parametrize("task", ["pretrain", "retrieval"])
def test_text_encoder_from_local_hf_bert(minilm_dir, task):
    from safetensors.torch import load_file

    model = build_model("tiny", task, overrides=MINILM)
    report = init_text_from_hf(model, str(minilm_dir))
    hf = load_file(str(minilm_dir / "model.safetensors"))
    hf = {k.removeprefix("bert."): v for k, v in hf.items()}
    bert = model.bert
    assert torch.equal(bert.embeddings.word_embeddings.weight, hf["embeddings.word_embeddings.weight"])
    assert torch.equal(
        bert.encoder.layer[5].attention.self.query.weight, hf["encoder.layer.5.attention.self.query.weight"]
    )
    assert torch.equal(bert.encoder.layer[4].output.LayerNorm.bias, hf["encoder.layer.4.output.LayerNorm.bias"])
    assert torch.equal(
        model.bert_m.encoder.layer[5].attention.self.query.weight, hf["encoder.layer.5.attention.self.query.weight"]
    )
    # cross-attention (BERT has none) and, for MiniLM, the MLM head stay at their fresh init, and are reported
    assert any("crossattention" in k for k in report.missing)
    assert not any("crossattention" in k and "layer.2." in k for k in report.missing)
    if task == "pretrain":
        assert any(k.startswith("text_encoder.cls.") for k in report.missing)
    # the tokenizer from the same directory tokenises like ours
    ours, theirs = Tokenizer(), Tokenizer.from_pretrained(str(minilm_dir))
    assert torch.equal(ours(CAPTIONS)["input_ids"], theirs(CAPTIONS)["input_ids"])
    # and the model runs
    img = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        text = ours(CAPTIONS[:2])
        assert model.itm_logits(
            model.encode_text(text["input_ids"], text["attention_mask"]),
            text["attention_mask"],
            model.encode_image(img),
        ).shape == (2, 2)


def test_text_encoder_architecture_mismatch_is_named(minilm_dir):
    model = build_model("tiny", "pretrain")
    with pytest.raises(CheckpointError, match=r"hidden_size: 384 \(checkpoint\) vs 64"):
        init_text_from_hf(model, str(minilm_dir))


def test_config_presets_overrides_and_errors(tmp_path):
    base = model_config("base")
    assert (base.vision.embed_dim, base.text.num_hidden_layers, base.text.fusion_layer, base.queue_size) == (
        768,
        12,
        6,
        65536,
    )
    small = model_config("small", ["text.fusion_layer=2", "temp=1e-1"])
    assert small.text.fusion_layer == 2 and small.temp == 0.1 and small.vision.embed_dim == 384
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['fusion_layers'\]"):
        model_config("tiny", ["text.fusion_layers=2"])
    with pytest.raises(ConfigError, match="queue_size: expected an integer"):
        model_config("tiny", ["queue_size=big"])
    with pytest.raises(ConfigError, match="encoder_width"):
        model_config("tiny", ["vision.embed_dim=128", "vision.num_heads=2"])
    child = tmp_path / "child.yaml"
    child.write_text("base: tiny\nembed_dim: 16\nvision: {depth: 1}\n")
    cfg = model_config(str(child))
    assert cfg.embed_dim == 16 and cfg.vision.depth == 1 and cfg.vision.embed_dim == 64
    (tmp_path / "bad.yaml").write_text("base: tiny\nvision: {dept: 1}\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*dept"):
        model_config(str(tmp_path / "bad.yaml"))


def test_base_model_size():
    """The paper's model: ~209.9M online parameters (ALBEF_REFERENCE A.3), momentum twins not trainable."""
    with torch.device("meta"):
        model = build_model("base", "pretrain")
    online = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert 209.0e6 < online < 211.0e6, online
    assert model.visual_encoder.pos_embed.shape == (1, 257, 768)


@pytest.mark.parametrize("task", ["pretrain", "retrieval"])
def test_queue_size_zero_uses_the_batch_as_the_only_keys(task):
    """``queue_size: 0`` (the from-scratch recipe): ITC's keys are the batch's momentum features, nothing is enqueued,
    and the loss is the soft cross-entropy over those B keys (checked against the formula from the returned details)."""
    torch.manual_seed(0)
    model = build_model("tiny", task, seed=0, overrides=["queue_size=0"])
    assert model.image_queue.shape == (32, 0) and model.text_queue.shape == (32, 0)
    b = 4
    image = torch.randn(b, 3, 64, 64)
    ids = torch.randint(1000, 2000, (b, 9))
    ids[:, 0] = 101
    mask = torch.ones_like(ids)
    kwargs = {"idx": torch.tensor([0, 1, 1, 2])} if task == "retrieval" else {}
    for _ in range(2):  # a second step: still no queue
        out = model(image, ids, mask, alpha=0.4, return_details=True, **kwargs)
        d = out["details"]
        assert d["sim_i2t"].shape == (b, b) and d["sim_t2i"].shape == (b, b)
        assert torch.isfinite(out["loss_ita"]) and int(model.queue_ptr) == 0
        sim_i2t_m = d["image_feat_m"] @ d["text_feat_m"].t() / model.temp
        torch.testing.assert_close(d["sim_i2t_m"], sim_i2t_m, rtol=1e-5, atol=1e-5)
        expected = (
            -(F.log_softmax(d["sim_i2t"], 1) * d["sim_i2t_targets"]).sum(1).mean()
            - (F.log_softmax(d["sim_t2i"], 1) * d["sim_t2i_targets"]).sum(1).mean()
        ) / 2
        torch.testing.assert_close(out["loss_ita"], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("task", ["pretrain", "retrieval"])
def test_queue_warmup_and_momentum_override(task):
    """``train.queue_start_step``: before it (``use_queue=False``) a model with the official queue computes exactly
    what a ``queue_size: 0`` model with the same weights computes, and leaves its queue untouched; afterwards it reads
    and writes the queue. ``train.momentum_warmup_steps``: the step's EMA coefficient replaces ``model.momentum``."""
    b = 4
    image = torch.randn(b, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    ids = torch.randint(1000, 2000, (b, 9), generator=torch.Generator().manual_seed(2))
    ids[:, 0] = 101
    mask = torch.ones_like(ids)
    kwargs = {"idx": torch.tensor([0, 1, 1, 2])} if task == "retrieval" else {}
    queued = build_model("tiny", task, seed=0, overrides=["queue_size=64"])
    bare = build_model("tiny", task, seed=0, overrides=["queue_size=0"])
    bare.load_state_dict({k: v for k, v in queued.state_dict().items() if "queue" not in k}, strict=False)
    before = {k: v.clone() for k, v in queued.state_dict().items() if "queue" in k}
    for step in range(2):
        torch.manual_seed(step)
        out = queued(image, ids, mask, alpha=0.4, use_queue=False, momentum=0.3, **kwargs)
        torch.manual_seed(step)
        ref = bare(image, ids, mask, alpha=0.4, momentum=0.3, **kwargs)
        for k in ref:
            torch.testing.assert_close(out[k], ref[k], rtol=0, atol=0)
    assert all(torch.equal(v, queued.state_dict()[k]) for k, v in before.items())
    for a, b_ in zip(queued.momentum_parameters(), bare.momentum_parameters()):
        assert torch.equal(a, b_)
    out = queued(image, ids, mask, alpha=0.4, return_details=True, **kwargs)
    assert out["details"]["sim_i2t"].shape == (b, b + 64) and int(queued.queue_ptr) == b
    # the EMA with an explicit coefficient
    online = [p.detach().clone() + 1.0 for p in queued.visual_encoder.parameters()]
    for p, v in zip(queued.visual_encoder.parameters(), online):
        p.data.copy_(v)
    mom = [p.detach().clone() for p in queued.visual_encoder_m.parameters()]
    queued.momentum_update(0.25)
    for p_m, m, v in zip(queued.visual_encoder_m.parameters(), mom, online):
        torch.testing.assert_close(p_m, 0.25 * m + 0.75 * v)


def test_momentum_and_queue_warmups_follow_the_step():
    from albef.config import load_config
    from albef.engine.schedule import momentum_at
    from albef.engine.task import TrainConfig
    from albef.tasks.vqa import VQAConfig, VQATask

    assert momentum_at(0, 0.995, 0.5, 300) == 0.5 and momentum_at(150, 0.995, 0.5, 300) == pytest.approx(0.7475)
    assert momentum_at(300, 0.995, 0.5, 300) == momentum_at(10**6, 0.995, 0.5, 300) == 0.995
    assert momentum_at(0, 0.995, 0.5, 0) == 0.995  # the official recipe: no ramp
    with pytest.raises(ValueError, match=r"train.momentum_start=1.0"):
        TrainConfig(momentum_start=1.0)
    for key in ("queue_start_step", "momentum_warmup_steps", "itm_random_negative_steps"):
        cfg = load_config(
            VQAConfig, str(Path(__file__).resolve().parents[1] / "finetune/configs/vqa_v2.yaml"), [f"train.{key}=10"]
        )
        with pytest.raises(ValueError, match=rf"train.{key}=10: the vqa task does not use it"):
            VQATask(cfg)


def test_random_itm_negatives_are_uniform_over_the_other_rows():
    """``train.itm_random_negative_steps``: the negatives ignore the similarities (and never pick the positive or,
    for retrieval, another caption of the same image)."""
    from albef.models.albef import hard_negative_weights

    sim = torch.tensor([[5.0, 1.0, 0.0, -2.0], [0.0, 3.0, 9.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 8.0, 2.0]])
    w = hard_negative_weights(sim, 4, hard=False)  # (unnormalised, as the official code: multinomial normalises)
    off = ~torch.eye(4, dtype=torch.bool)
    assert (w.diagonal() == 0).all() and torch.allclose(w[off], torch.full((12,), w[0, 1].item())) and w[0, 1] > 0
    hard = hard_negative_weights(sim, 4)
    assert hard[1, 2] > 0.9  # the default: by similarity
    idx = torch.tensor([0, 0, 1, 2])
    w = hard_negative_weights(sim, 4, idx, hard=False)
    assert w[0, 1] == 0 and w[1, 0] == 0 and w[0, 2] == w[0, 3] > 0 and w[3, 0] == w[3, 1] == w[3, 2] > 0
