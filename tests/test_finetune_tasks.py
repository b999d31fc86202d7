"""VQA (answer decoder), NLVR2 (two-image fusion, text-assignment pretraining) and SNLI-VE over the shared engine.

Unit tests: the checkpoint mappings (VQA decoder from the fusion layers; NLVR2 layer duplication and shared
cross-attention key/value) on the official tiny state dict, on our own pretraining export and on the base-size
key layout; answer ranking against a brute-force scorer; the VQA loss, answer weights and accuracy; the
text-assignment sampling. End-to-end (slow): the real entrypoints under DeepSpeed on a generated world
(``albef.demo.world``): SNLI-VE and NLVR2 from random weights beating the majority class, VQA fine-tuned from the
world's pretraining answering colour questions far above the question-only prior, on held-out data.

    OMP_NUM_THREADS=1 python -m pytest tests/test_finetune_tasks.py -q
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from albef.eval.vqa import load_vqa_answers, normalize_answer, vqa_accuracy, vqa_score
from albef.models import build_model
from albef.models.bert import init_bert_weights
from albef.models.convert import (
    CheckpointError,
    export_official,
    load_pretrained,
    model_kind_of,
    pretrain_to_nlvr,
    pretrain_to_vqa,
)
from albef.tasks.vqa import VQADataConfig, VQATrainSet
from albef.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]
F_TINY = 2  # fusion_layer of the tiny preset (4 text layers: 2 text + 2 fusion)
PRETRAIN_ONLY = {
    "temp",
    "image_queue",
    "text_queue",
    "queue_ptr",
    "itm_head.weight",
    "itm_head.bias",
    "vision_proj.weight",
    "vision_proj.bias",
    "text_proj.weight",
    "text_proj.bias",
    "vision_proj_m.weight",
    "vision_proj_m.bias",
    "text_proj_m.weight",
    "text_proj_m.bias",
}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors gain nothing from a second intra-op thread, and on a busy machine its spin-waits cost 10x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=["official", "ours"])
def pretrain_sd(request, parity_pretrain):
    """A pretraining state dict in the official layout: the official tiny parity weights, or our model's export with
    momentum weights that differ from the online ones (so that a mix-up of the two would show)."""
    if request.param == "official":
        return dict(parity_pretrain["state_dict"])
    model = build_model("tiny", "pretrain", seed=3)
    with torch.no_grad():
        for p in model.momentum_parameters():
            p.add_(0.01 * torch.randn_like(p))
    return export_official(model)


def _source_key_vqa(key: str) -> str:
    """Where the official VQA loader takes model key ``key`` from, in a pretraining checkpoint (written out
    independently of albef.models.convert: one rule per key family)."""
    m = re.match(r"^text_decoder(_m)?\.bert\.encoder\.layer\.(\d+)\.(.*)$", key)
    if m:
        return f"text_encoder{m[1] or ''}.bert.encoder.layer.{int(m[2]) + F_TINY}.{m[3]}"
    m = re.match(r"^text_decoder(_m)?\.(bert\.embeddings\..*|cls\..*)$", key)
    if m:
        return f"text_encoder{m[1] or ''}.{m[2]}"
    m = re.match(r"^text_encoder(_m)?\.(.*)$", key)
    if m:
        return f"text_encoder{m[1] or ''}.bert.{m[2]}"
    return key


def test_vqa_decoder_initialised_from_fusion_layers(pretrain_sd):
    model = build_model("tiny", "vqa", seed=0)
    report = load_pretrained(model, pretrain_sd)
    assert report.missing == [] and not report.momentum_from_online
    assert set(report.unexpected) == PRETRAIN_ONLY
    for key, value in model.state_dict().items():
        src = _source_key_vqa(key)
        assert torch.equal(value, pretrain_sd[src]), f"{key} != checkpoint {src}"
    # the decoder is causal, cross-attends in every layer, and its LM head is tied to its own word embeddings
    dec = model.text_decoder
    assert dec.cfg.is_decoder and dec.cfg.fusion_layer == 0 and dec.cfg.num_hidden_layers == 2
    assert dec.cls.predictions.decoder.weight is dec.bert.embeddings.word_embeddings.weight


def test_vqa_and_nlvr_key_layouts_at_base_size():
    """Base-size models (meta tensors): the mapped pretraining keys are exactly the official VQA / NLVR2 keys."""
    with torch.device("meta"):
        pretrain, vqa, nlvr = (build_model("base", k) for k in ("pretrain", "vqa", "nlvr2"))
    src = pretrain.state_dict()
    vqa_keys, mapped = set(vqa.state_dict()), set(pretrain_to_vqa(src, 6))
    assert vqa_keys <= mapped and mapped - vqa_keys == PRETRAIN_ONLY
    for m in ("", "_m"):
        assert f"text_decoder{m}.bert.encoder.layer.5.crossattention.self.key.weight" in vqa_keys
        assert f"text_decoder{m}.bert.encoder.layer.0.crossattention.output.LayerNorm.bias" in vqa_keys
        assert f"text_decoder{m}.cls.predictions.decoder.weight" in vqa_keys
        assert f"text_decoder{m}.bert.embeddings.position_ids" in vqa_keys
        assert f"text_encoder{m}.encoder.layer.11.crossattention.self.value.bias" in vqa_keys
    assert not any(k.startswith("text_decoder.bert.encoder.layer.6.") for k in vqa_keys)
    assert not any(".pooler." in k or k.startswith("text_encoder.cls.") for k in vqa_keys)

    nlvr_keys, mapped = set(nlvr.state_dict()), set(pretrain_to_nlvr(src, 6))
    heads = {f"cls_head{m}.{i}.{p}" for m in ("", "_m") for i in (0, 2) for p in ("weight", "bias")}
    assert nlvr_keys - mapped == heads
    assert mapped - nlvr_keys == PRETRAIN_ONLY | {k for k in src if ".cls." in k}  # the MLM head stays unused
    layers = nlvr.text_encoder.encoder.layer
    assert len(layers) == 18 and [layer.has_cross_attention for layer in layers] == [False] * 6 + [True] * 12
    assert nlvr.cls_head[2].out_features == 2 and build_model("tiny", "snli_ve").cls_head[2].out_features == 3


def test_model_kinds_are_the_task_names():
    """One name per task: a task that has its own model builds the kind of its own name (``albef.load(path,
    task=...)``, ``build_model(preset, task)``); the names before the rename fail with the new one in the message."""
    from albef.tasks.nlvr import NLVRPretrainTask, NLVRTask
    from albef.tasks.pretrain import PretrainTask
    from albef.tasks.retrieval import RetrievalTask
    from albef.tasks.ve import VETask
    from albef.tasks.vqa import VQATask

    for task_cls in (PretrainTask, RetrievalTask, VQATask, NLVRTask, NLVRPretrainTask, VETask):
        assert task_cls.model_kind == task_cls.name
        build_model("tiny", task_cls.name)
    for old, new in (("nlvr", "nlvr2"), ("nlvr_ta", "nlvr2_ta"), ("ve", "snli_ve")):
        with pytest.raises(ValueError, match=rf"task={old!r} is now {new!r}"):
            build_model("tiny", old)


@pytest.mark.parametrize("kind", ["nlvr2", "nlvr2_ta"])
def test_nlvr_fusion_layers_duplicated_with_shared_key_value(pretrain_sd, kind):
    model = build_model("tiny", kind, seed=0)
    report = load_pretrained(model, pretrain_sd)
    assert any("two-image" in c for c in report.converted)
    new_head = "ta_head" if kind == "nlvr2_ta" else "cls_head"
    assert report.missing and all(k.startswith(new_head + ".") for k in report.missing)
    sd = model.state_dict()
    twins = ("", "_m") if kind == "nlvr2" else ("",)
    for m in twins:
        for key, value in sd.items():
            hit = re.match(rf"^text_encoder{m}\.(encoder\.layer\.(\d+)\.(.*)|embeddings\..*)$", key)
            if hit is None:
                continue
            if hit[2] is None:
                src = f"text_encoder{m}.bert.{hit[1]}"
            else:
                j = int(hit[2])
                k = j if j < F_TINY else F_TINY + (j - F_TINY) // 2  # layers 2,3 <- 2; layers 4,5 <- 3
                src = f"text_encoder{m}.bert.encoder.layer.{k}.{hit[3]}"
            assert torch.equal(value, pretrain_sd[src]), f"{key} != checkpoint {src}"
        # key/value of layers (2,3) and (4,5) are one tensor each; queries, outputs and other pairs are not
        ptr = lambda j, name: sd[f"text_encoder{m}.encoder.layer.{j}.crossattention.{name}"].data_ptr()  # noqa: E731
        for a in (2, 4):
            for name in ("self.key.weight", "self.key.bias", "self.value.weight", "self.value.bias"):
                assert ptr(a, name) == ptr(a + 1, name), (m, a, name)
            for name in ("self.query.weight", "output.dense.weight"):
                assert ptr(a, name) != ptr(a + 1, name), (m, a, name)
        assert ptr(3, "self.key.weight") != ptr(4, "self.key.weight")


def test_ta_checkpoint_initialises_nlvr(pretrain_sd):
    ta = build_model("tiny", "nlvr2_ta", seed=0)
    load_pretrained(ta, pretrain_sd)
    ta_sd = export_official(ta)
    assert model_kind_of(ta_sd) == "nlvr2_ta" and not any("_m." in k for k in ta_sd)
    nlvr = build_model("tiny", "nlvr2", seed=1)
    report = load_pretrained(nlvr, ta_sd)
    assert report.momentum_from_online  # the TA checkpoint has no momentum model: copied from the loaded weights
    assert set(report.missing) == {f"cls_head.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")}
    assert set(report.unexpected) == {"vision_proj.weight", "vision_proj.bias", "ta_head.weight", "ta_head.bias"}
    sd = nlvr.state_dict()
    for key in sd:
        if key.startswith("text_encoder."):
            assert torch.equal(sd[key], ta_sd[key])
            assert torch.equal(sd[key.replace("text_encoder.", "text_encoder_m.")], sd[key])
    assert torch.equal(sd["cls_head.2.weight"], sd["cls_head_m.2.weight"])
    assert model_kind_of(export_official(nlvr)) == "nlvr2"
    assert model_kind_of(export_official(build_model("tiny", "snli_ve"))) == "snli_ve"


def test_vqa_load_refuses_checkpoint_without_decoder_weights(parity_pretrain):
    sd = {k: v for k, v in parity_pretrain["state_dict"].items() if not k.startswith("text_encoder.cls.")}
    with pytest.raises(CheckpointError, match=r"text_decoder\.cls\.predictions"):
        load_pretrained(build_model("tiny", "vqa"), sd)
    bad = dict(parity_pretrain["state_dict"])
    bad["surprise.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match="surprise.weight"):
        load_pretrained(build_model("tiny", "snli_ve"), bad)


# ---------------------------------------------------------------------------------------------------------------
# VQA: ranking, loss, data, accuracy

ANSWERS = ["red", "green", "blue", "top left", "top", "bottom right", "left", "circle", "yes", "no", "2", "3"]


def _vqa_inputs(seed: int = 0, n_questions: int = 3):
    tok = Tokenizer()
    torch.manual_seed(seed)
    model = build_model("tiny", "vqa", seed=seed).eval()
    init_bert_weights(model.text_decoder, std=0.3)  # spread the next-token distributions: distinct scores
    q = tok(["what colour is the circle", "where is the star", "how many squares are there"][:n_questions])
    image = torch.randn(n_questions, 3, 64, 64)
    ans = tok([a + "[SEP]" for a in ANSWERS], max_length=None)
    with torch.no_grad():
        states = model.encode_question(image, q["input_ids"], q["attention_mask"])
    return model, states, q["attention_mask"], ans["input_ids"], ans["attention_mask"]


def _brute_force_scores(model, states, states_mask, answer_ids):
    """Every candidate scored token by token, each prefix decoded on its own (no batching, no padding).
    Returns ``(first, full)``: log p(first token) and log p(whole answer); the official score is their sum."""
    first = torch.empty(states.shape[0], answer_ids.shape[0])
    full = torch.empty_like(first)
    dec = model.text_decoder
    with torch.no_grad():
        for q in range(states.shape[0]):
            for a in range(answer_ids.shape[0]):
                ids = answer_ids[a][answer_ids[a] != 0]
                logps = []
                for t in range(1, len(ids)):
                    hidden = dec.bert(
                        ids[None, :t],
                        None,
                        encoder_hidden_states=states[q : q + 1],
                        encoder_attention_mask=states_mask[q : q + 1],
                    )
                    logps.append(dec.cls(hidden[0, -1]).log_softmax(-1)[ids[t]])
                first[q, a], full[q, a] = logps[0], sum(logps)
    return first, full


def test_rank_answer_matches_brute_force_scoring():
    model, states, mask, ids, amask = _vqa_inputs()
    first, full = _brute_force_scores(model, states, mask, ids)
    brute = first + full
    best, topk_ids, scores = model.rank_answer(states, mask, ids, amask, k=128)  # k_test >= list size: all ranked
    assert topk_ids.shape == (3, len(ANSWERS)) and len(set(best.tolist())) > 1
    assert torch.allclose(scores, brute.gather(1, topk_ids), atol=1e-4)
    assert best.tolist() == brute.argmax(1).tolist()
    # k < list size: the best of the k candidates whose first token is most probable
    for k in (1, 4):
        best_k, topk_k, _ = model.rank_answer(states, mask, ids, amask, k=k)
        expected = first.topk(k, dim=1).indices
        assert torch.equal(topk_k.sort(1).values, expected.sort(1).values)
        assert best_k.tolist() == [int(row[brute[i, row].argmax()]) for i, row in enumerate(expected)]


def test_rank_answer_picks_known_answer():
    """Hand-built decoder: its LM head only ever proposes the tokens of "top left" and [SEP]; the candidate made of
    them wins at any k, although "top" and "left" share its tokens and "bottom right" comes first in the list."""
    model, states, mask, ids, amask = _vqa_inputs()
    tok = Tokenizer()
    wanted = tok(["top left[SEP]"], max_length=None)["input_ids"][0, 1:].tolist()
    with torch.no_grad():
        bias = model.text_decoder.cls.predictions.bias
        bias.fill_(-30.0)
        bias[wanted] = 30.0
        model.text_decoder.cls.predictions.transform.LayerNorm.weight.zero_()  # logits = bias alone
    candidates = ["bottom right", "top left", "red", "yes"]
    c = tok([a + "[SEP]" for a in candidates], max_length=None)
    for k in (1, 2, 4):
        best, _, _ = model.rank_answer(states, mask, c["input_ids"], c["attention_mask"], k=k)
        assert [candidates[i] for i in best.tolist()] == ["top left"] * 3, k


def test_vqa_loss_is_weighted_sum_of_answer_lm_losses():
    """The loss against a direct evaluation of the official formula on full (unmasked) logits."""
    tok = Tokenizer()
    model = build_model("tiny", "vqa", seed=0).eval()  # eval: no dropout, so both evaluations see the same net
    image = torch.randn(2, 3, 64, 64)
    q = tok(["what colour is it", "where is the big red star"])
    a = tok(["red[SEP]", "top left[SEP]", "yes[SEP]"], max_length=None)
    weights, n = torch.tensor([0.7, 0.3, 0.5]), torch.tensor([2, 1])
    for alpha in (0.0, 0.4):
        loss = model(
            image, q["input_ids"], q["attention_mask"], a["input_ids"], a["attention_mask"], weights, n, alpha=alpha
        )["loss_vqa"]
        with torch.no_grad():  # forward did the momentum update; recompute with the same weights
            expected = 0.0
            for j, b in enumerate([0, 0, 1]):
                ids, amask = a["input_ids"][j : j + 1], a["attention_mask"][j : j + 1]
                per_model = []
                for dec, enc, vit in (
                    (model.text_decoder, model.text_encoder, model.visual_encoder),
                    (model.text_decoder_m, model.text_encoder_m, model.visual_encoder_m),
                ):
                    st = enc(
                        q["input_ids"][b : b + 1],
                        q["attention_mask"][b : b + 1],
                        encoder_hidden_states=vit.forward_features(image[b : b + 1]),
                    )
                    hid = dec.bert(
                        ids, amask, encoder_hidden_states=st, encoder_attention_mask=q["attention_mask"][b : b + 1]
                    )
                    per_model.append(dec.cls(hid)[0, :-1])
                logits, logits_m = per_model
                labels = ids[0, 1:]
                keep = labels != 0
                ce = F.cross_entropy(logits[keep], labels[keep], reduction="sum")
                distill = -(F.softmax(logits_m[keep], -1) * F.log_softmax(logits[keep], -1)).sum()
                expected += weights[j] * ((1 - alpha) * ce + alpha * distill)
            expected /= 2
        assert torch.allclose(loss, expected, rtol=1e-5), (alpha, loss, expected)


def test_vqa_train_set_answer_weights(tmp_path):
    (tmp_path / "vqa.json").write_text(
        json.dumps(
            [
                {
                    "question": "What colour is it?",
                    "answer": ["red", "blue", "red", "red"],
                    "image": "a.jpg",
                    "dataset": "vqa",
                },
                {"question": "Where-is it", "answer": "top", "image": "b.jpg", "dataset": "vg"},
            ]
        )
    )
    d = VQADataConfig(train_files=[str(tmp_path / "vqa.json")], image_root="coco", vg_image_root="vg")
    items = VQATrainSet(d).items
    assert items[0] == ("coco/a.jpg", "what colour is it", ["red[SEP]", "blue[SEP]"], [0.75, 0.25])
    assert items[1] == ("vg/b.jpg", "where is it", ["top[SEP]"], [0.5])
    assert Tokenizer()(["red[SEP]"], max_length=None)["input_ids"].tolist() == [[101, 2417, 102]]
    (tmp_path / "bad.json").write_text(json.dumps([{"question": "q", "answer": [], "image": "a.jpg"}]))
    with pytest.raises(ValueError, match=r"bad.json\[0\].*answer"):
        VQATrainSet(VQADataConfig(train_files=[str(tmp_path / "bad.json")]))


def test_vqa_accuracy_official_rules(tmp_path):
    cases = {
        "Two": "2",
        "the dog.": "dog",
        "yes!": "yes",
        "dont": "don't",
        "a red, blue": "red blue",
        "3.5": "3.5",
        "1,000": "1000",
        "x-ray": "x ray",
        "none": "0",
        "hell": "hell",
        "couldnt've": "couldn't've",
        " On\tthe table ": "on table",
    }
    for raw, want in cases.items():
        assert normalize_answer(raw) == want, raw
    humans = lambda m: ["2"] * m + ["3"] * (10 - m)  # noqa: E731
    assert [round(vqa_score("two", humans(m)), 6) for m in range(6)] == [0.0, 0.3, 0.6, 0.9, 1.0, 1.0]
    assert vqa_score("A dog", ["dog"]) == 1.0
    gt = {"1": ["yes"] * 10, "2": humans(2), "3": ["red"] * 10}
    res = [{"question_id": 1, "answer": "Yes"}, {"question_id": 2, "answer": "2"}, {"question_id": 3, "answer": "blue"}]
    assert vqa_accuracy(res, gt) == pytest.approx({"acc": 100 * (1 + 0.6 + 0) / 3, "num_questions": 3})
    with pytest.raises(ValueError, match="question_id"):
        vqa_accuracy([{"question_id": 9, "answer": "x"}], gt)
    official = {"annotations": [{"question_id": 1, "answers": [{"answer": "yes", "answer_id": i} for i in range(10)]}]}
    for name, data in (
        ("a.json", official),
        ("b.json", {"1": ["yes"] * 10}),
        ("c.json", [{"question_id": 1, "answer": ["yes"] * 10}]),
    ):
        (tmp_path / name).write_text(json.dumps(data))
        assert load_vqa_answers(str(tmp_path / name)) == {"1": ["yes"] * 10}


# ---------------------------------------------------------------------------------------------------------------
# Text assignment and the classifier loss


def test_text_assignment_pairs_and_hard_negatives():
    model = build_model("tiny", "nlvr2_ta", seed=0)
    bs = 12
    cls = torch.randn(bs // 2, 64).repeat_interleave(2, 0)  # images 2i and 2i+1 are twins: the hardest negatives
    embeds = torch.cat([cls[:, None], torch.randn(bs, 16, 64)], dim=1)
    torch.manual_seed(0)
    labels, twin = Counter(), 0
    for _ in range(200):
        first, second, lab = model.sample_pairs(embeds)
        own = torch.arange(bs)
        assert torch.equal(first[lab == 0], own[lab == 0]) and torch.equal(second[lab == 1], own[lab == 1])
        shown = torch.stack([first, second], 1)
        assert (shown[lab == 2] != own[lab == 2, None]).all() and (first != second).all()
        negative = torch.where(lab == 0, second, first)  # the negative of a one-negative row
        twin += int((negative[lab < 2] == (own[lab < 2] ^ 1)).sum())
        labels.update(lab.tolist())
    total = sum(labels.values())
    assert all(abs(labels[c] / total - 1 / 3) < 0.04 for c in range(3)), labels
    assert twin / (labels[0] + labels[1]) > 0.9  # uniform sampling would give 1/11
    with pytest.raises(ValueError, match="at least 3|>= 3"):
        model.sample_pairs(embeds[:2])


def test_text_assignment_fits_a_fixed_batch():
    """The TA objective trains end to end through both images: with the pair draws fixed (same seed every step) the
    model fits a batch of 8 captions from ln 3 to near 0. (From scratch on the demo world the tiny model does not
    learn caption-image matching within a CPU budget: 300 steps stay at chance, so the e2e run below only checks
    the pipeline.)"""
    tok = Tokenizer()
    model = build_model("tiny", "nlvr2_ta", ["vision.img_size=48"], seed=0)
    images = torch.randn(8, 3, 48, 48)
    t = tok([f"a {c} {s}" for c in ("red", "blue") for s in ("circle", "square", "star", "triangle")])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(25):
        torch.manual_seed(0)
        loss = model(images, t["input_ids"], t["attention_mask"])["loss_ta"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert abs(losses[0] - 1.0986) < 0.3 and losses[-1] < 0.2, losses[::5]
    assert model.vision_proj.weight.grad is None  # frozen: it only scores the hard negatives


@pytest.mark.parametrize("kind", ["nlvr2", "snli_ve"])
def test_classifier_loss_is_momentum_distilled_cross_entropy(kind):
    tok = Tokenizer()
    model = build_model("tiny", kind, seed=0).eval()
    n_img = 2 if kind == "nlvr2" else 1
    images = [torch.randn(3, 3, 64, 64) for _ in range(n_img)]
    t = tok(["both images contain a red star", "a dog", "there is a blue square on the left"])
    targets = torch.tensor([1, 0, 1])
    out = model(images, t["input_ids"], t["attention_mask"], targets, alpha=0.4)
    with torch.no_grad():
        logits = model.logits(images, t["input_ids"], t["attention_mask"])
        logits_m = model.logits(images, t["input_ids"], t["attention_mask"], momentum=True)
        distill = -(F.softmax(logits_m, 1) * F.log_softmax(logits, 1)).sum(1).mean()
        expected = 0.6 * F.cross_entropy(logits, targets) + 0.4 * distill
    assert torch.allclose(out["loss"], expected, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# End to end: the real entrypoints under DeepSpeed (ZeRO-2, fp32, one CPU process) on a generated world. Settings
# that make a tiny model learn in a CPU budget: lr 1e-3 and momentum 0.9 (with the official 0.995 the distillation
# teacher lags hundreds of steps behind a model trained from scratch); no flip, no crop and no RandAugment (the
# world's text speaks of left/right and counts, and at 48 px RandAugment's shifts move objects across the 16 px
# grid cells, see albef.demo.world).


RES = 48


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from albef.demo.world import generate_world

    out = tmp_path_factory.mktemp("world")
    generate_world(out, seed=0, num_train=800, num_val=200, num_test=100, image_size=RES)
    return out


@pytest.fixture(scope="module")
def big_world(tmp_path_factory):
    """3000 training images: VQA's colour questions generalise to held-out images from this many (from 800 the
    margin over the prior halves on test)."""
    from albef.demo.world import generate_world

    out = tmp_path_factory.mktemp("big_world")
    generate_world(out, seed=0, num_train=3000, num_val=200, num_test=200, image_size=RES)
    return out


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def run_entrypoint(module: str, config: str, settings: dict, run_dir: Path, ranks: int = 1) -> list:
    """Run ``python -m finetune.<module>`` (under torchrun when ``ranks`` > 1) on a YAML that inherits the shipped
    ``config`` and overrides ``settings``; return the rows of ``metrics.jsonl``."""
    import socket

    import yaml

    common = {
        "base": str(REPO / "finetune" / "configs" / config),
        "model": {"base": "tiny", "vision": {"img_size": RES}, "momentum": 0.9},
        "init": {"checkpoint": None},
        "train": {
            "output_dir": str(run_dir),
            "ds_config": "ds_configs/zero2_fp32.json",
            "num_threads": 1,
            "global_batch_size": 32,
            "micro_batch_size": 32,
            "lr": 1.0e-3,
            "min_lr": 1.0e-3,
            "warmup_steps": 0,
            "log_every": 10,
            "save_every": 0,
            "eval_every_epochs": 100,
        },
        "wandb": {"mode": "disabled"},
    }
    path = run_dir.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(_merge(common, settings)))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    launcher = [sys.executable]
    if ranks > 1:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        launcher += ["-m", "torch.distributed.run", f"--nproc_per_node={ranks}", f"--master_port={port}"]
    proc = subprocess.run(
        launcher + ["-m", f"finetune.{module}", str(path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    (run_dir / "stdout.log").write_text(log)
    metrics = run_dir / "metrics.jsonl"  # absent after train.evaluate_only (eval.json instead)
    return [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []


def _last(rows: list, key: str) -> float:
    values = [r[key] for r in rows if key in r]
    assert values, f"{key} was never logged"
    return values[-1]


def _image_data(world: Path, **files) -> dict:
    return {
        "image_root": str(world / "images"),
        "image_res": RES,
        "num_workers": 1,
        "augment": {"crop_scale": [], "flip": False, "randaugment": False},
        **{k: str(world / v) for k, v in files.items()},
    }


def _against_prior(rows: list, split: str) -> dict:
    """The last evaluation's model and text-only-prior accuracies of ``split``, per type (printed for the log)."""
    last = [r for r in rows if f"{split}/prior_acc" in r][-1]
    table = {
        k[len(split) + 5 :]: (last[k], last[f"{split}/prior_{k[len(split) + 1 :]}"])
        for k in last
        if k.startswith(f"{split}/acc")
    }
    print(
        f"\n{split}: model vs text-only prior (%): "
        + ", ".join(f"{k or 'all'} {m:.1f} vs {p:.1f}" for k, (m, p) in sorted(table.items()))
    )
    return table


@pytest.mark.slow
def test_ve_learns_on_world(world, tmp_path):
    data = _image_data(world, val_file="ve_dev.json", test_file="ve_test.json")
    data["train_files"] = [str(world / "ve_train.json")]
    rows = run_entrypoint("ve", "snli_ve.yaml", {"data": data, "train": {"max_steps": 60}}, tmp_path / "ve")
    labels = Counter(e["label"] for e in json.loads((world / "ve_dev.json").read_text()))
    majority = 100.0 * max(labels.values()) / sum(labels.values())  # 33.3: one hypothesis per label and image
    assert _last(rows, "val/acc") > majority + 12 and _last(rows, "test/acc") > majority + 12, rows[-1]
    _against_prior(rows, "val"), _against_prior(rows, "test")
    # the exported best checkpoint is complete (strict load) and reproduces its validation accuracy
    best = tmp_path / "ve" / "best.pth"
    report = load_pretrained(build_model(model_config_of(tmp_path / "ve"), "snli_ve"), str(best))
    assert report.missing == [] and report.unexpected == []
    run_entrypoint(
        "ve",
        "snli_ve.yaml",
        {"data": data, "init": {"checkpoint": str(best)}, "train": {"evaluate_only": True}},
        tmp_path / "ve_eval",
    )
    evaluated = json.loads((tmp_path / "ve_eval" / "eval.json").read_text())
    assert evaluated["val/acc"] == pytest.approx(max(r["val/acc"] for r in rows if "val/acc" in r))


def model_config_of(run_dir: Path):
    import yaml

    from albef.config import from_dict
    from albef.models import ModelConfig

    return from_dict(ModelConfig, yaml.safe_load((run_dir / "config.yaml").read_text())["model"])


@pytest.mark.slow
def test_vqa_from_pretraining_answers_from_the_image(big_world, quick_demo, tmp_path):
    """Fine-tuned from the quick demo's pretraining checkpoint (ALBEF is fine-tuned from a pretrained checkpoint,
    never from random weights: 400 steps on 1500 world images, 2 ranks), VQA answers colour questions from the
    image: far above the question-only prior (the most common answer of each question string in the train file,
    else of its type), on held-out images of both splits. Measured (1000 steps; the demo pretrained with seeds 42
    and 7): colour 63.3 / 50.7 and 58.6 / 53.7% against 12.5 / 11.2% (val / test); from this test's former own
    pretraining (400 steps on these 3000 images; seeds 1, 2, 42): 55.5 / 50.0, 48.4 / 42.5 and 52.3 / 53.0%. With
    600 steps the margin on test ranged from 15 to 40 points between seeds and machines, too close to the assertion.
    From random weights, 600 steps on an 800-image world reach 25.0 / 21.9% against 14.8 / 15.1%, and 150 steps 0%.
    Size gains too; shape, position, counting and yes/no questions stay near their prior (printed; README issue
    16). Since the demo's ViT starts from a supervised one (albef.demo.vit; seed 42, two threads): colour 61.7 /
    61.2%, size 73.2 / 75.9% against 42.8 / 51.1%, shape 34.5 / 39.1% against 25.4 / 24.6%; "is there" 40.9 / 42.6%
    against 52.3 / 55.0%."""
    world, world_checkpoint = big_world, quick_demo[0] / "pretrain" / "final.pth"
    data = _image_data(
        world,
        val_file="vqa_val.json",
        test_file="vqa_test.json",
        answer_list="answer_list.json",
        test_answers="vqa_test_answers.json",
    )
    data["train_files"] = [str(world / "vqa_train.json")]
    settings = {
        "data": data,
        "init": {"checkpoint": str(world_checkpoint)},
        "eval": {"batch_size": 32, "k_test": 8},
        "train": {"max_steps": 1000, "num_threads": 2},  # (one process: both cores; 1.3x the speed of one)
    }
    rows = run_entrypoint("vqa", "vqa_v2.yaml", settings, tmp_path / "vqa")
    val, test = _against_prior(rows, "val"), _against_prior(rows, "test")
    for split, table in (("val", val), ("test", test)):
        model, prior = table["what_colour"]
        assert model > prior + 20, (split, table)
        assert table[""][0] > table[""][1], (split, table)  # overall above the prior too
    truth = load_vqa_answers(str(world / "vqa_test_answers.json"))
    results = json.loads((tmp_path / "vqa" / "vqa_result_test.json").read_text())
    answer_list = set(json.loads((world / "answer_list.json").read_text()))
    assert sorted(str(r["question_id"]) for r in results) == sorted(truth)
    assert {r["answer"] for r in results} <= answer_list
    assert _last(rows, "test/acc") == pytest.approx(vqa_accuracy(results, truth)["acc"])
    # two ranks: each answers a slice of the questions; the gathered result file and accuracy are the same
    final = str(tmp_path / "vqa" / "final.pth")
    two = {
        "data": dict(data, val_file=""),
        "eval": settings["eval"],
        "init": {"checkpoint": final},
        "train": {"evaluate_only": True, "micro_batch_size": 16},
    }
    run_entrypoint("vqa", "vqa_v2.yaml", two, tmp_path / "vqa_2ranks", ranks=2)
    assert json.loads((tmp_path / "vqa_2ranks" / "vqa_result_test.json").read_text()) == results
    evaluated = json.loads((tmp_path / "vqa_2ranks" / "eval.json").read_text())
    assert evaluated["test/acc"] == pytest.approx(_last(rows, "test/acc"))


@pytest.mark.slow
def test_nlvr2_text_assignment_then_finetune_on_world(world, tmp_path):
    ta_data = {
        "json_files": [str(world / "pretrain.json")],
        "image_res": RES,
        "num_workers": 1,
        "augment": {"crop_scale": [], "flip": False, "randaugment": False},
    }
    ta_settings = {
        "data": ta_data,
        "train": {"max_steps": 8, "global_batch_size": 16, "micro_batch_size": 16, "log_every": 4},
    }
    ta_rows = run_entrypoint("nlvr2_ta", "nlvr2_ta.yaml", ta_settings, tmp_path / "ta")
    assert 0.0 <= _last(ta_rows, "train/acc_ta") <= 1.0 and abs(_last(ta_rows, "train/loss") - 1.0986) < 0.5
    ta_ckpt = tmp_path / "ta" / "final.pth"
    assert model_kind_of(torch.load(ta_ckpt, weights_only=True)["model"]) == "nlvr2_ta"

    data = _image_data(world, val_file="nlvr_dev.json", test_file="nlvr_test.json")
    data["train_files"] = [str(world / "nlvr_train.json")]
    settings = {"data": data, "init": {"checkpoint": str(ta_ckpt)}, "train": {"epochs": 8}}
    rows = run_entrypoint("nlvr2", "nlvr2.yaml", settings, tmp_path / "nlvr")
    log = (tmp_path / "nlvr" / "stdout.log").read_text()
    assert "momentum encoders (*_m) absent: copied from the online weights" in log  # the TA checkpoint has none
    labels = Counter(e["label"] for e in json.loads((world / "nlvr_dev.json").read_text()))
    majority = 100.0 * max(labels.values()) / sum(labels.values())  # 50: the labels are balanced
    assert _last(rows, "val/acc") > majority + 6, rows[-1]
    _against_prior(rows, "val"), _against_prior(rows, "test")


@pytest.mark.parametrize(
    "schema, config",
    [
        ("retrieval:RetrievalConfig", "retrieval_coco.yaml"),
        ("zeroshot:ZeroShotConfig", "zeroshot.yaml"),
        ("vqa:VQAConfig", "vqa_v2.yaml"),
        ("classifier:ClassifierConfig", "snli_ve.yaml"),
        ("classifier:ClassifierConfig", "nlvr2.yaml"),
        ("grounding:GroundingConfig", "grounding_refcoco+.yaml"),
        ("nlvr:NLVRPretrainConfig", "nlvr2_ta.yaml"),
    ],
)
def test_every_task_checks_the_image_size_against_the_model(schema, config):
    """``data.image_res`` must equal ``model.vision.img_size`` in every task's schema (checked once, in RunConfig)."""
    import importlib

    from albef.config import ConfigError, load_config

    module, name = schema.split(":")
    cls = getattr(importlib.import_module(f"albef.tasks.{module}"), name)
    size = load_config(cls, REPO / "finetune" / "configs" / config, []).model.vision.img_size
    with pytest.raises(ConfigError, match=rf"override 'data.image_res=224'.*must equal model.vision.img_size={size}"):
        load_config(cls, REPO / "finetune" / "configs" / config, ["data.image_res=224"])


def test_text_priors_follow_the_train_file():
    from albef.eval.priors import TextPrior, compare_with_prior, question_type

    assert question_type("What colour is the small star?") == "what colour"
    assert question_type("How many red circles are there?") == "how many"
    train = [
        ("is there a red star", "yes"),
        ("is there a red star", "yes"),
        ("is there a red star", "no"),
        ("is there a blue star", "no"),
        ("is there a blue star", "no"),
        ("what colour is the star", "red"),
        ("what colour is the star", "blue"),
        ("what colour is the circle", "green"),
        ("what colour is the circle", "green"),
    ]
    prior = TextPrior((q, question_type(q), {a: 1.0}) for q, a in train)
    assert prior.predict("is there a red star", "is there") == "yes"  # its own question's majority
    assert prior.predict("what colour is the star", "what colour") == "red"  # a tie: the first in the file
    assert prior.predict("is there a green square", "is there") == "no"  # unseen: its type's majority (3 no : 2 yes)
    assert prior.source("is there a green square", "is there") == "type"
    assert prior.predict("where is the star", "where is") == "no"  # unseen type: the overall majority (3 of 10)
    # weighted answers (VQA's answer counts) are summed, not counted
    assert TextPrior([("q", "t", {"a": 0.3, "b": 0.7}), ("q", "t", {"a": 0.3})]).predict("q") == "b"
    questions = ["is there a red star", "what colour is the circle", "what colour is the star", "is there a cat"]
    truth = ["no", "green", "blue", "no"]
    m = compare_with_prior(
        truth, questions, [question_type(q) for q in questions], ["no", "green", "blue", "yes"], prior
    )
    assert m["acc"] == 75.0 and m["acc_is_there"] == 50.0 and m["acc_what_colour"] == 100.0
    assert m["prior_acc"] == 50.0 and m["prior_acc_what_colour"] == 50.0 and m["prior_acc_is_there"] == 50.0
