"""Parity with the official ALBEF implementation (shared/parity, tiny configuration).

Our models load the official state dicts by name and must reproduce every recorded output within 1e-5, with
both attention implementations, with and without token packing; the full pretraining and retrieval forwards
replay the official random draws (hard negatives, MLM masking) from the same seeds and so reproduce the
RNG-dependent losses too. Per-token text states are compared at the real tokens; without packing the padding
positions must match too, with packing they are zero (ALBEF never reads them).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from albef.models import build_model
from albef.models.bert import mlm_loss
from albef.models.convert import export_official, load_pretrained

TOL = dict(atol=1e-5, rtol=1e-5)
VARIANTS = [("sdpa", True), ("sdpa", False), ("eager", True), ("eager", False)]  # (attn_impl, text_packing)


def close(actual, expected, name, **tol):
    tol = tol or TOL
    actual = actual.detach()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual.double() - expected.double()).abs().max().item() if actual.numel() else 0.0
    assert torch.allclose(actual.double(), expected.double(), **tol), f"{name}: max abs error {err:.3e}"


def close_tokens(actual, expected, mask, packing, name):
    """Per-token states (B, L, ...): equal at the real tokens; at the padding, zero under packing, else equal."""
    real = mask.bool()
    close(actual[real], expected[real], name)
    if packing:
        assert not actual.detach()[~real].any(), f"{name}: a padding position is not zero"
    else:
        close(actual, expected, name)


def pretrain_model(ref, impl, packing=True):
    model = build_model("tiny", "pretrain", overrides=[f"attn_impl={impl}", f"text_packing={packing}"])
    report = load_pretrained(model, ref["state_dict"])
    assert report.missing == [] and report.unexpected == [] and not report.momentum_from_online
    model.train()
    for m in model.modules():  # the recorded values use dropout 0 in train mode
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if hasattr(m, "dropout_p"):
            m.dropout_p = 0.0
    return model


@pytest.mark.parametrize("impl, packing", VARIANTS)
def test_features_fusion_and_itm(parity_pretrain, impl, packing):
    ref = parity_pretrain
    model = pretrain_model(ref, impl, packing)
    ids, mask = ref["input_ids"], ref["attention_mask"]
    with torch.no_grad():
        image_embeds = model.encode_image(ref["image"])
        text_embeds = model.encode_text(ids, mask)
        fused = model.fuse(text_embeds, mask, image_embeds)
        close(image_embeds, ref["image_embeds"], "image_embeds")
        close(model.image_feat(image_embeds), ref["image_feat"], "image_feat")
        close_tokens(text_embeds, ref["text_embeds"], mask, packing, "text_embeds")
        close(model.text_feat(text_embeds), ref["text_feat"], "text_feat")
        close_tokens(fused, ref["fusion_embeds"], mask, packing, "fusion_embeds")
        close(model.itm_head(fused[:, 0]), ref["itm_logits_pos"], "itm_logits_pos")
        multimodal = model.mlm_hidden(ids, mask, image_embeds)
        close_tokens(multimodal, ref["multimodal_embeds"], mask, packing, "multimodal_embeds")
    assert not mask.all(), "the parity batch must have padding, or packing is not tested"


@pytest.mark.parametrize("impl, packing", VARIANTS)
def test_fixed_mask_mlm(parity_pretrain, impl, packing):
    ref = parity_pretrain
    model = pretrain_model(ref, impl, packing)
    ids, mask, labels = ref["mlm_input_ids"], ref["attention_mask"], ref["mlm_labels"]
    with torch.no_grad():
        logits = model.mlm_head(model.mlm_hidden(ids, mask, model.encode_image(ref["image"])))
        image_m = model.encode_image(ref["image"], momentum=True)
        logits_m = model.mlm_head(model.mlm_hidden(ids, mask, image_m, momentum=True), momentum=True)
    real = mask.bool()  # the head maps a zero padding state to its constant, not to the official by-product
    close(logits[real], ref["mlm_logits"][real], "mlm_logits")
    close(logits_m[real], ref["mlm_logits_m"][real], "mlm_logits_m")
    if not packing:
        close(logits, ref["mlm_logits"], "mlm_logits")
        close(logits_m, ref["mlm_logits_m"], "mlm_logits_m")
    soft = F.softmax(logits_m, dim=-1)
    close(mlm_loss(logits, labels, soft, 0.0), ref["mlm_loss_alpha0"], "mlm_loss_alpha0")
    close(mlm_loss(logits, labels, soft, 0.4), ref["mlm_loss_alpha04"], "mlm_loss_alpha04")
    close(mlm_loss(logits, labels), ref["mlm_loss_hard_only"], "mlm_loss_hard_only")


@pytest.mark.parametrize("impl, packing", VARIANTS)
def test_full_pretraining_step(parity_pretrain, impl, packing):
    ref = parity_pretrain
    model = pretrain_model(ref, impl, packing)
    torch.manual_seed(ref["forward_seed"])
    out = model(ref["image"], ref["input_ids"], ref["attention_mask"], alpha=ref["forward_alpha"], return_details=True)
    d = out["details"]

    # Deterministic part: momentum features, similarities, MoD targets, ITC loss, sampling weights.
    close(d["image_feat_m"], ref["image_feat_m_fwd"], "image_feat_m_fwd")
    close(d["text_feat_m"], ref["text_feat_m_fwd"], "text_feat_m_fwd")
    for k in ["sim_i2t", "sim_t2i", "sim_i2t_m", "sim_t2i_m", "sim_i2t_targets", "sim_t2i_targets"]:
        close(d[k], ref[k], k)
    close(d["itm_weights_t2i"], ref["itm_weights_t2i"], "itm_weights_t2i")
    close(d["itm_weights_i2t"], ref["itm_weights_i2t"], "itm_weights_i2t")
    close(out["loss_ita"], ref["loss_ita"], "loss_ita")

    # Replayed random draws: the same negatives and masks as the official run, hence the same losses.
    assert torch.equal(d["itm_neg_image_idx"], ref["itm_neg_image_idx"])
    assert torch.equal(d["itm_neg_text_idx"], ref["itm_neg_text_idx"])
    close(d["itm_logits"], ref["itm_logits_all_fwd"], "itm_logits_all_fwd")
    assert torch.equal(d["mlm_input_ids"], ref["mlm_input_ids_fwd"])
    assert torch.equal(d["mlm_labels"], ref["mlm_labels_fwd"])
    close(d["mlm_logits"], ref["mlm_logits_fwd_masked"], "mlm_logits_fwd_masked")
    close(d["mlm_logits_m"], ref["mlm_logits_m_fwd_masked"], "mlm_logits_m_fwd_masked")
    close(out["loss_itm"], ref["loss_itm"], "loss_itm")
    close(out["loss_mlm"], ref["loss_mlm"], "loss_mlm")

    # State after the step: every momentum tensor, the queues and the pointer; everything else untouched.
    after = export_official(model)
    for k, v in ref["state_dict_after_step_keys_changed"].items():
        if k in ("image_queue", "text_queue"):
            close(after[k], v, k)  # momentum features: matmul results
        elif v.is_floating_point():
            close(after[k], v, k, atol=1e-7, rtol=0)  # the EMA is elementwise: equal to float32 rounding
        else:
            assert torch.equal(after[k], v), k
    close(after["image_queue"], ref["image_queue_after"], "image_queue_after")
    assert int(after["queue_ptr"]) == int(ref["queue_ptr_after"]) == 4
    for k in ref["state_dict_after_step_unchanged_keys"]:
        assert torch.equal(after[k], ref["state_dict"][k]), f"{k} changed"

    # A second seed: same ITC loss, other (recorded) ITM and MLM losses.
    model = pretrain_model(ref, impl, packing)
    torch.manual_seed(ref["forward_seed2"])
    out2 = model(ref["image"], ref["input_ids"], ref["attention_mask"], alpha=ref["forward_alpha"])
    close(out2["loss_ita"], ref["loss_ita_seed2"], "loss_ita_seed2")
    close(out2["loss_itm"], ref["loss_itm_seed2"], "loss_itm_seed2")
    close(out2["loss_mlm"], ref["loss_mlm_seed2"], "loss_mlm_seed2")


def test_mlm_projection_of_every_position_gives_the_same_step(parity_pretrain):
    """``mlm_projection: all`` (the official op order, the bench's baseline) projects every position onto the
    vocabulary and then takes the masked ones: the same logits and losses as projecting only the masked ones."""
    ref = parity_pretrain
    model = pretrain_model(ref, "eager")
    model.cfg.mlm_projection = "all"
    torch.manual_seed(ref["forward_seed"])
    out = model(ref["image"], ref["input_ids"], ref["attention_mask"], alpha=ref["forward_alpha"], return_details=True)
    close(out["details"]["mlm_logits"], ref["mlm_logits_fwd_masked"], "mlm_logits_fwd_masked")
    close(out["details"]["mlm_logits_m"], ref["mlm_logits_m_fwd_masked"], "mlm_logits_m_fwd_masked")
    for k in ("loss_ita", "loss_itm", "loss_mlm"):
        close(out[k], ref[k], k)


def test_momentum_update_is_the_official_float32_formula(parity_pretrain):
    """m*0.995 + p*0.005 in float32, not a lerp: 5% of the elements differ by one ulp between the two."""
    ref = parity_pretrain
    model = pretrain_model(ref, "sdpa")
    model.momentum_update()
    after = export_official(model)
    changed = ref["state_dict_after_step_keys_changed"]
    for k, v in changed.items():
        if k.startswith(("visual_encoder_m", "vision_proj_m", "text_encoder_m", "text_proj_m")):
            assert torch.equal(after[k], v), f"{k}: momentum update is not bitwise the official one"


def test_export_is_the_official_layout(parity_pretrain):
    ref = parity_pretrain["state_dict"]
    model = build_model("tiny", "pretrain")
    load_pretrained(model, ref)
    out = export_official(model)
    assert list(sorted(out)) == list(sorted(ref))
    for k, v in ref.items():
        assert out[k].shape == v.shape and out[k].dtype == v.dtype, k
        assert torch.equal(out[k], v), k
    # the tied MLM decoder stays one tensor, as in the official checkpoint
    assert (
        out["text_encoder.cls.predictions.decoder.weight"].data_ptr()
        == out["text_encoder.bert.embeddings.word_embeddings.weight"].data_ptr()
    )


# ----------------------------------------------------------------------------------------------- retrieval


def retrieval_model(pre, impl="sdpa", packing=True):
    overrides = ["vision.img_size=96", f"attn_impl={impl}", f"text_packing={packing}"]
    model = build_model("tiny", "retrieval", overrides=overrides)
    report = load_pretrained(model, {"model": pre["state_dict"]})
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if hasattr(m, "dropout_p"):
            m.dropout_p = 0.0
    return model, report


def test_retrieval_loading(parity_pretrain, parity_retrieval):
    ref = parity_retrieval
    model, report = retrieval_model(parity_pretrain)
    assert report.missing == ref["missing_keys"] == ["idx_queue"]
    assert sorted(report.unexpected) == sorted(ref["unexpected_keys"]) and len(report.unexpected) == 14
    sd = export_official(model)
    assert sorted(sd) == sorted(ref["retrieval_model_state_keys"])
    close(sd["visual_encoder.pos_embed"], ref["pos_embed_interpolated_96px"], "pos_embed_interpolated_96px")
    for k, v in ref["state_dict_loaded"].items():
        if v.is_floating_point():
            close(sd[k], v, k)
        else:
            assert torch.equal(sd[k], v), k


@pytest.mark.parametrize("impl, packing", VARIANTS)
def test_retrieval_features_and_scores(parity_pretrain, parity_retrieval, impl, packing):
    ref = parity_retrieval
    model, _ = retrieval_model(parity_pretrain, impl, packing)
    ids, mask = ref["input_ids"], ref["attention_mask"]
    with torch.no_grad():
        image_embeds = model.encode_image(ref["image96"])
        image_feat = model.image_feat(image_embeds)
        text_embeds = model.encode_text(ids, mask)
        text_feat = model.text_feat(text_embeds)
        close(image_embeds, ref["image_embeds96"], "image_embeds96")
        close(image_feat, ref["image_feat96"], "image_feat96")
        close_tokens(text_embeds, ref["text_embeds"], mask, packing, "text_embeds")
        close(text_feat, ref["text_feat"], "text_feat")
        fused = model.fuse(text_embeds, mask, image_embeds)
        close_tokens(fused, ref["fusion_embeds96"], mask, packing, "fusion_embeds96")
        close(model.itm_head(fused[:, 0]), ref["itm_logits_pos96"], "itm_logits_pos96")
        close(image_feat @ text_feat.T, ref["sims_matrix"], "sims_matrix")
        n = ids.shape[0]
        scores = torch.empty(n, n)
        for i in range(n):  # image i against every text j
            img = image_embeds[i : i + 1].expand(n, -1, -1)
            scores[i] = model.itm_logits(text_embeds, mask, img)[:, 1]
        close(scores, ref["itm_score_matrix_i2t"], "itm_score_matrix_i2t")


def test_retrieval_training_forward(parity_pretrain, parity_retrieval):
    ref = parity_retrieval
    for seed, key in [(ref["fwd_seed"], "fwd_loss_itm"), (ref["fwd_seed2"], "fwd_loss_itm_seed2")]:
        model, _ = retrieval_model(parity_pretrain)
        torch.manual_seed(seed)
        out = model(ref["image96"], ref["input_ids"], ref["attention_mask"], idx=ref["fwd_idx"], alpha=ref["fwd_alpha"])
        close(out["loss_ita"], ref["fwd_loss_ita"], "fwd_loss_ita")
        close(out["loss_itm"], ref[key], key)
        assert torch.equal(model.idx_queue, ref["fwd_idx_queue_after"])
