"""Downstream ALBEF models with task heads (paper §4): VQA, NLVR2 (and its text-assignment pretraining), SNLI-VE.

* ``ALBEFVQA`` (official ``models/model_vqa.py``): the 12-layer encoder reads question + image (``multi_modal``);
  a 6-layer answer decoder (causal self-attention, cross-attention to the question states, LM head) generates the
  answer. Training: answer-weighted, teacher-forced LM loss summed over tokens, distilled from the momentum
  decoder. Inference (``rank_answer``): rank the candidates of an answer list, official two-stage scheme.
* ``ALBEFNLVR`` (official ``models/model_nlvr.py``): the fusion layers are duplicated (6 text + 12 fusion layers
  for the base model); fusion layer ``f + i`` attends image ``i % 2``; the cross-attention key/value of layers
  ``(f, f+1), (f+2, f+3), ...`` are one module each (official ``share_cross_attention``). ``cls_head`` =
  Linear-ReLU-Linear(2) on [CLS], momentum-distilled cross-entropy.
* ``ALBEFNLVRPretrain`` (official ``models/model_pretrain_nlvr.py``): the same two-image encoder trained on
  captions with the text-assignment (TA) head: which of two images (one of them a hard negative, or both
  negatives) does the caption describe? 3-way ``ta_head``, plain cross-entropy, no momentum model.
* ``ALBEFVE`` (official ``models/model_ve.py``): one image, ``cls_head`` with 3 classes (entailment 2, neutral 1,
  contradiction 0), momentum-distilled cross-entropy.

Attribute names are the official checkpoint keys (``visual_encoder``, ``text_encoder``, ``text_decoder.bert``,
``text_decoder.cls``, ``cls_head.0`` / ``cls_head.2``, ``ta_head``, ``vision_proj``, the ``*_m`` twins). All four
take the pretraining ``ModelConfig`` unchanged (``model: {base: base}``); the decoder depth and the duplicated
fusion layers are derived from ``text.num_hidden_layers`` and ``text.fusion_layer``. Pretrained weights are mapped
by ``albef.models.convert`` (the only place for key renames). Build them with ``albef.models.build_model(cfg, kind)``,
kinds ``vqa``, ``nlvr2``, ``nlvr2_ta``, ``snli_ve`` (the names of their tasks).
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from albef.models.albef import ModelConfig, hard_negative_weights
from albef.models.bert import BertConfig, BertForMaskedLM, BertModel, distilled_cross_entropy, init_bert_weights
from albef.models.momentum import MomentumModel
from albef.models.vit import build_vit


def decoder_config(text: BertConfig) -> BertConfig:
    """The VQA answer decoder: as many layers as the encoder has fusion layers, all causal + cross-attending to the
    question states (official ``config_decoder.fusion_layer = 0, num_hidden_layers = 6``)."""
    return dataclasses.replace(
        text,
        num_hidden_layers=text.num_hidden_layers - text.fusion_layer,
        fusion_layer=0,
        encoder_width=text.hidden_size,
        is_decoder=True,
    )


def two_image_config(text: BertConfig) -> BertConfig:
    """NLVR2: every fusion layer appears twice (official ``num_hidden_layers = 18``), once per image."""
    fusion = text.num_hidden_layers - text.fusion_layer
    return dataclasses.replace(text, num_hidden_layers=text.fusion_layer + 2 * fusion)


def share_cross_attention_kv(bert: BertModel) -> None:
    """Layers ``f + 2i`` and ``f + 2i + 1`` use one cross-attention key and one value projection (official
    ``share_cross_attention``: layer ``f + 2i`` takes the module of layer ``f + 2i + 1``). Queries and outputs stay
    separate. The state dict keeps both keys for each shared tensor, as official checkpoints do."""
    f, n = bert.cfg.fusion_layer, bert.cfg.num_hidden_layers
    for first in range(f, n, 2):
        a, b = bert.encoder.layer[first].crossattention.self, bert.encoder.layer[first + 1].crossattention.self
        a.key, a.value = b.key, b.value


class TaskModel(MomentumModel):
    """A downstream model: its ViT, and the momentum twins of ``momentum_names`` (``MomentumModel``)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.visual_encoder = build_vit(cfg.vision)

    def _finish(self) -> None:
        """Create the momentum twins (equal to the online modules, frozen) and apply the model-wide switches."""
        self.make_momentum_twins()
        self.apply_switches()

    def encode_image(self, image: torch.Tensor, momentum: bool = False) -> torch.Tensor:
        return (self.visual_encoder_m if momentum else self.visual_encoder).forward_features(image)


# ----------------------------------------------------------------------------------------------------------------
# VQA


def answer_token_logits(dec: BertForMaskedLM, hidden: torch.Tensor, answer_ids: torch.Tensor):
    """LM-head logits at the positions that predict a real token, and those tokens: ``(logits (M, V), labels (M,),
    rows (M,))``. The vocabulary projection skips the padding (most of an answer batch), as the MLM head does."""
    labels = answer_ids[:, 1:]
    valid = labels != 0
    rows = valid.nonzero()[:, 0]
    return dec.cls(hidden[:, :-1][valid]).float(), labels[valid], rows


class ALBEFVQA(TaskModel):
    """``model(image, question_ids, question_mask, answer_ids, answer_mask, weights, n, alpha)`` -> ``{'loss_vqa'}``.

    ``n[b]`` answers belong to image/question ``b`` (flattened in order), each with its weight; every answer is
    ``[CLS] tokens [SEP]`` ([CLS] is the decoder's BOS, [SEP] its EOS).
    """

    momentum_names = ("visual_encoder", "text_encoder", "text_decoder")

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.text_encoder = BertModel(cfg.text)
        self.text_decoder = BertForMaskedLM(decoder_config(cfg.text))
        init_bert_weights(self.text_encoder, cfg.text.initializer_range)
        init_bert_weights(self.text_decoder, cfg.text.initializer_range)
        self._finish()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        super().set_grad_checkpointing(enable)
        self.text_decoder.set_grad_checkpointing(enable)

    def encode_question(self, image, question_ids, question_mask, momentum: bool = False) -> torch.Tensor:
        """Question states: the whole encoder (``multi_modal``) on the question, cross-attending to the image."""
        bert = self.text_encoder_m if momentum else self.text_encoder
        image_embeds = self.encode_image(image, momentum)
        return bert(question_ids, question_mask, encoder_hidden_states=image_embeds, mode="multi_modal")

    def decode(self, answer_ids, answer_mask, states, states_mask, momentum: bool = False):
        """Teacher-forced decoder pass: ``(logits (M, V), labels (M,), rows (M,))`` at the M answer positions that
        predict a real token (the next-token logits of ``answer_token_logits``), cross-attending to ``states``."""
        dec = self.text_decoder_m if momentum else self.text_decoder
        hidden = dec.bert(answer_ids, answer_mask, encoder_hidden_states=states, encoder_attention_mask=states_mask)
        return answer_token_logits(dec, hidden, answer_ids)

    def forward(self, image, question_ids, question_mask, answer_ids, answer_mask, weights, n, alpha: float = 0.0):
        states = self.encode_question(image, question_ids, question_mask)
        states, states_mask = states.repeat_interleave(n, dim=0), question_mask.repeat_interleave(n, dim=0)
        with torch.no_grad(), self._momentum_ctx():
            self.momentum_update()
            states_m = self.encode_question(image, question_ids, question_mask, momentum=True)
            logits_m, _, _ = self.decode(
                answer_ids, answer_mask, states_m.repeat_interleave(n, dim=0), states_mask, momentum=True
            )
        logits, labels, rows = self.decode(answer_ids, answer_mask, states, states_mask)
        # Official BertLMHeadModel loss with reduction='none': shifted labels, token losses summed per answer,
        # (1 - alpha) * CE + alpha * distillation from the momentum decoder's next-token distribution.
        token_loss = distilled_cross_entropy(logits, labels, F.softmax(logits_m, dim=-1), alpha, reduction="none")
        loss_answer = torch.zeros(answer_ids.shape[0], device=logits.device).index_add(0, rows, token_loss)
        return {"loss_vqa": (weights.float() * loss_answer).sum() / image.shape[0]}

    @torch.no_grad()
    def answer_log_likelihood(self, answer_ids, answer_mask, states, states_mask) -> torch.Tensor:
        """``log p(answer | question)`` of every row of ``answer_ids`` (teacher forcing, every token after [CLS])."""
        logits, labels, rows = self.decode(answer_ids, answer_mask, states, states_mask)
        token_logp = logits.gather(1, labels[:, None]).squeeze(1) - logits.logsumexp(dim=-1)
        return torch.zeros(answer_ids.shape[0], device=logits.device).index_add(0, rows, token_logp)

    @torch.no_grad()
    def rank_answer(self, states, states_mask, answer_ids, answer_mask, k: int):
        """Best candidate per question: ``(best_index (Q,), topk_ids (Q, k), scores (Q, k))``.

        Official ``rank_answer``: one decoder step from [CLS] gives every candidate's first-token probability; the
        ``k`` most probable candidates are decoded in full; score = log p(first token) + log p(whole answer) (the
        official sum counts the first token twice), and the best score wins.
        """
        q, num_answers = states.shape[0], answer_ids.shape[0]
        k = min(k, num_answers)
        start = answer_ids[:1, :1].expand(q, 1)
        hidden = self.text_decoder.bert(start, None, encoder_hidden_states=states, encoder_attention_mask=states_mask)
        first = self.text_decoder.cls(hidden[:, 0]).float().log_softmax(dim=-1)
        first_logp = first.index_select(1, answer_ids[:, 1])  # (Q, A): log p(first token) of every candidate
        topk_logp, topk_ids = first_logp.topk(k, dim=1)
        cand = topk_ids.reshape(-1)
        loglik = self.answer_log_likelihood(
            answer_ids[cand],
            answer_mask[cand],
            states.repeat_interleave(k, dim=0),
            states_mask.repeat_interleave(k, dim=0),
        )
        scores = topk_logp + loglik.view(q, k)
        best = topk_ids.gather(1, scores.argmax(dim=1, keepdim=True)).squeeze(1)
        return best, topk_ids, scores


# ----------------------------------------------------------------------------------------------------------------
# Classification heads over the fusion encoder: NLVR2 (two images) and SNLI-VE (one image)


class FusionClassifier(TaskModel):
    """Images -> ViT; text cross-attends to them (one image, or a list: layer ``f + i`` reads image ``i % n``);
    ``cls_head`` on [CLS]; momentum-distilled cross-entropy.

    ``model(images, input_ids, attention_mask, targets, alpha)`` -> ``{'loss', 'logits'}``, ``images`` a list of
    ``num_images`` tensors (B, 3, H, W).
    """

    momentum_names = ("visual_encoder", "text_encoder", "cls_head")
    num_classes: int = 2
    num_images: int = 1

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        text = two_image_config(cfg.text) if self.num_images == 2 else cfg.text
        self.text_encoder = BertModel(text)
        init_bert_weights(self.text_encoder, cfg.text.initializer_range)
        if self.num_images == 2:
            share_cross_attention_kv(self.text_encoder)
        width = cfg.text.hidden_size
        self.cls_head = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, self.num_classes))
        self._finish()

    def logits(self, images: Sequence[torch.Tensor], input_ids, attention_mask, momentum: bool = False):
        if len(images) != self.num_images:
            raise ValueError(f"{type(self).__name__} takes {self.num_images} image batch(es), got {len(images)}")
        embeds = self.encode_image(torch.cat(list(images)), momentum)  # one ViT call for all images
        states = list(embeds.split(images[0].shape[0])) if self.num_images > 1 else embeds
        bert, head = (self.text_encoder_m, self.cls_head_m) if momentum else (self.text_encoder, self.cls_head)
        hidden = bert(input_ids, attention_mask, encoder_hidden_states=states, mode="multi_modal")
        return head(hidden[:, 0, :])

    def forward(self, images, input_ids, attention_mask, targets, alpha: float = 0.0) -> Dict[str, torch.Tensor]:
        logits = self.logits(images, input_ids, attention_mask)
        with torch.no_grad(), self._momentum_ctx():
            self.momentum_update()
            logits_m = self.logits(images, input_ids, attention_mask, momentum=True).float()
        loss = distilled_cross_entropy(logits.float(), targets, F.softmax(logits_m, dim=1), alpha)
        return {"loss": loss, "logits": logits.detach()}


class ALBEFNLVR(FusionClassifier):
    num_classes, num_images = 2, 2


class ALBEFVE(FusionClassifier):
    num_classes, num_images = 3, 1


TA_LABELS = ("caption describes image 0", "caption describes image 1", "caption describes neither")


class ALBEFNLVRPretrain(TaskModel):
    """Text-assignment pretraining of the two-image encoder (official ``Pretrain_nlvr.py``).

    ``model(image, input_ids, attention_mask)`` -> ``{'loss_ta', 'acc_ta'}``. Caption ``b`` belongs to image ``b``.
    With probability 2/3 it is shown with its image and one hard negative in random order (label 0: its image is
    first, 1: second); otherwise with two hard negatives (label 2). Negatives are drawn from
    ``softmax(image_feat @ image_feat.T / temp)`` without the diagonal, ``temp`` = ``model.temp`` (0.07);
    ``vision_proj`` (from the pretrained checkpoint) only serves this sampling and is frozen.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.vision_proj = nn.Linear(cfg.vision.embed_dim, cfg.embed_dim)
        self.vision_proj.requires_grad_(False)
        self.text_encoder = BertModel(two_image_config(cfg.text))
        init_bert_weights(self.text_encoder, cfg.text.initializer_range)
        share_cross_attention_kv(self.text_encoder)
        self.ta_head = nn.Linear(cfg.text.hidden_size, len(TA_LABELS))
        self._finish()

    @torch.no_grad()
    def sample_pairs(self, image_embeds: torch.Tensor):
        """``(first, second, labels)``: image indices shown first and second for every caption, and the TA label."""
        bs = image_embeds.shape[0]
        if bs < 3:
            raise ValueError(
                f"text assignment draws two negatives per caption: the micro batch must hold >= 3 images, got {bs}"
            )
        feat = F.normalize(self.vision_proj(image_embeds[:, 0, :]).float(), dim=-1)
        weights = hard_negative_weights(feat @ feat.t() / self.cfg.temp, bs)
        negatives = torch.multinomial(weights, 2)  # two distinct negatives per row (the first serves the 1-neg case)
        device = image_embeds.device
        own = torch.arange(bs, device=device)
        u, flip = torch.rand(bs).to(device), torch.rand(bs).to(device)
        both_negative, own_second = u < 1 / 3, flip < 0.5
        first = torch.where(both_negative, negatives[:, 0], torch.where(own_second, negatives[:, 0], own))
        second = torch.where(both_negative, negatives[:, 1], torch.where(own_second, own, negatives[:, 0]))
        labels = torch.where(both_negative, 2, own_second.long())
        return first, second, labels

    def forward(self, image, input_ids, attention_mask, alpha: float = 0.0) -> Dict[str, torch.Tensor]:
        image_embeds = self.encode_image(image)
        first, second, labels = self.sample_pairs(image_embeds)
        hidden = self.text_encoder(
            input_ids,
            attention_mask,
            encoder_hidden_states=[image_embeds[first], image_embeds[second]],
            mode="multi_modal",
        )
        logits = self.ta_head(hidden[:, 0, :]).float()
        return {
            "loss_ta": F.cross_entropy(logits, labels),
            "acc_ta": (logits.argmax(1) == labels).float().mean().detach(),
        }


TASK_MODEL_CLASSES: Dict[str, type] = {
    "vqa": ALBEFVQA,
    "nlvr2": ALBEFNLVR,
    "nlvr2_ta": ALBEFNLVRPretrain,
    "snli_ve": ALBEFVE,
}
__all__: List[str] = [
    "ALBEFVQA",
    "ALBEFNLVR",
    "ALBEFNLVRPretrain",
    "ALBEFVE",
    "TASK_MODEL_CLASSES",
    "decoder_config",
    "two_image_config",
    "share_cross_attention_kv",
    "answer_token_logits",
]
