"""The ALBEF model (Li et al., "Align before Fuse", NeurIPS 2021, §3): encoders, momentum copies, queues, losses.

``ALBEFPretrain`` (paper §3.2-3.3; official ``models/model_pretrain.py``): ITC with momentum queues and
momentum-distilled (MoD) targets, ITM with hard negatives sampled from the contrastive similarities, and MLM
with MoD soft labels from the momentum model.

``ALBEFRetrieval`` (official ``models/model_retrieval.py``, also used for weakly supervised grounding): the same
encoders with a ``bert.``-less text encoder (no MLM head) and an ``idx_queue`` so that captions of the same image
are positives for ITC, in the batch and in the queue.

Attribute names are the checkpoint format of the official code (``visual_encoder``, ``text_encoder``,
``vision_proj``, ``text_proj``, ``itm_head``, ``temp``, the ``*_m`` momentum twins and the queues), so official
``ALBEF_4M.pth`` / ``ALBEF.pth`` load by name; the only conversions (0-d ``temp``, ``bert.`` prefixes,
``pos_embed`` size) live in ``albef.models.convert``.

Random draws (hard negatives, MLM masking) follow the official call sequence on the same generators, so a
forward from the same state and seed reproduces the official losses (see tests/test_parity.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from albef.engine.dist import all_gather_tensor
from albef.models.bert import BertConfig, BertForMaskedLM, BertModel, init_bert_weights, mlm_loss, soft_cross_entropy
from albef.models.momentum import MomentumModel
from albef.models.vit import VisionConfig, build_vit

PAD_ID, CLS_ID, MASK_ID = 0, 101, 103


@dataclass
class ModelConfig:
    """Architecture and MoD constants of ALBEF. Defaults are the paper's base model (ALBEF_4M/ALBEF_14M)."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    text: BertConfig = field(default_factory=BertConfig)
    embed_dim: int = 256  # width of the ITC feature space
    temp: float = 0.07  # initial contrastive temperature (learnable, clamped to [0.001, 0.5])
    # Must be divisible by the global batch size. 0 keeps no queue (the batch's momentum features are the only keys).
    # From random weights a queue of near-identical early features pushes every feature the same way and collapses
    # ITC: train.queue_start_step delays it (see albef/configs/demo.yaml).
    queue_size: int = 65536
    momentum: float = 0.995  # EMA coefficient of the momentum encoders
    mlm_probability: float = 0.15
    attn_impl: str = "sdpa"  # "sdpa" (fused) or "eager" (the official op order, bitwise)
    grad_checkpointing: bool = False  # recompute ViT blocks and BERT layers in backward
    # MLM vocabulary projection: "masked" (only the ~15% masked positions, the loss is the same) or "all" (every
    # position, then the masked ones are taken: the official op order, for the bench's official-equivalent baseline)
    mlm_projection: str = "masked"
    # Run the text and fusion layers on a batch's real tokens only, padding dropped (see albef.models.bert); false
    # computes every position, padding included, as the official code does (the bench's baseline)
    text_packing: bool = True

    def __post_init__(self) -> None:
        if self.text.encoder_width != self.vision.embed_dim:
            raise ValueError(
                f"text.encoder_width={self.text.encoder_width} must equal vision.embed_dim={self.vision.embed_dim} "
                "(cross-attention reads the image tokens)"
            )
        if self.attn_impl not in ("sdpa", "eager"):
            raise ValueError(f"model.attn_impl={self.attn_impl!r}: expected 'sdpa' or 'eager'")
        if self.mlm_projection not in ("masked", "all"):
            raise ValueError(f"model.mlm_projection={self.mlm_projection!r}: expected 'masked' or 'all'")


# ----------------------------------------------------------------------------------------------------------------
# Losses and sampling as pure functions: the model methods call them, tests feed them recorded tensors.


def itc_targets(
    sim_m: torch.Tensor, alpha: float, idx: Optional[torch.Tensor] = None, idx_all: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """MoD targets ``alpha * softmax(sim_m) + (1 - alpha) * positives``.

    Without ``idx`` the positive of row i is column i (pretraining). With ``idx`` (retrieval) every column whose
    image id equals the row's is a positive, in the batch and in the queue, and the row is normalised to sum 1.
    """
    if idx is None:
        hard = torch.zeros_like(sim_m)
        hard.fill_diagonal_(1)
    else:
        pos = torch.eq(idx.view(-1, 1), idx_all).float()
        hard = pos / pos.sum(1, keepdim=True)
    return alpha * F.softmax(sim_m, dim=1) + (1 - alpha) * hard


def hard_negative_weights(
    sim: torch.Tensor, bs: int, idx: Optional[torch.Tensor] = None, hard: bool = True
) -> torch.Tensor:
    """Sampling weights over the local batch: softmax of the similarities with the positives zeroed.

    Pretraining zeroes the diagonal; retrieval adds 1e-4 inside the softmax (as the official code does) and zeroes
    every pair of the same image. A row with no negative left (a batch of one image) falls back to uniform
    weights over the other rows, instead of crashing ``torch.multinomial``. ``hard=False``: uniform weights over
    the negatives (random negatives, for ``train.itm_random_negative_steps``; the official recipe is always hard).
    """
    if not hard:
        sim = torch.zeros_like(sim)
    if idx is None:
        w = F.softmax(sim[:, :bs], dim=1)
        same = torch.eye(bs, dtype=torch.bool, device=sim.device)
    else:
        w = F.softmax(sim[:, :bs] + 1e-4, dim=1)
        same = torch.eq(idx.view(-1, 1), idx.view(1, -1))
    w = w.masked_fill(same, 0)
    other = (~torch.eye(bs, dtype=torch.bool, device=sim.device)).float()
    return torch.where(w.sum(1, keepdim=True) > 0, w, other)


def sample_hard_negatives(weights_t2i: torch.Tensor, weights_i2t: torch.Tensor):
    """One negative image per text, then one negative text per image, drawn row by row.

    Row-by-row ``multinomial`` calls reproduce the official random sequence exactly; the indices stay on the
    device (no ``.item()`` host sync per row).
    """
    bs = weights_t2i.shape[0]
    neg_image = torch.cat([torch.multinomial(weights_t2i[b], 1) for b in range(bs)])
    neg_text = torch.cat([torch.multinomial(weights_i2t[b], 1) for b in range(bs)])
    return neg_image, neg_text


def mask_tokens(input_ids: torch.Tensor, vocab_size: int, probability: float):
    """BERT masking as in ALBEF: ``probability`` of the tokens (never [PAD]/[CLS]) become targets; of those 80%
    -> [MASK], half of the rest -> a random id, the remainder unchanged. Returns ``(masked_ids, labels)`` with
    labels -100 off target.

    Every draw uses the CPU generator, in the official order, whatever the device of ``input_ids``: the official
    code does the same, so runs are reproducible across devices for one seed.
    """
    device = input_ids.device
    ids = input_ids.detach().cpu().clone()
    labels = ids.clone()
    masked = torch.bernoulli(torch.full(ids.shape, probability)).bool()
    masked[ids == PAD_ID] = False
    masked[ids == CLS_ID] = False
    labels[~masked] = -100
    replaced = torch.bernoulli(torch.full(ids.shape, 0.8)).bool() & masked
    ids[replaced] = MASK_ID
    randomized = torch.bernoulli(torch.full(ids.shape, 0.5)).bool() & masked & ~replaced
    random_words = torch.randint(vocab_size, ids.shape, dtype=torch.long)
    ids[randomized] = random_words[randomized]
    return ids.to(device), labels.to(device)


# ----------------------------------------------------------------------------------------------------------------


class ALBEFBase(MomentumModel):
    """Encoders, projections, ITM head, temperature, momentum twins and feature queues (the EMA is
    ``MomentumModel``'s; the queues are this class's)."""

    momentum_names = ("visual_encoder", "vision_proj", "text_encoder", "text_proj")
    text_encoder_cls: type = BertModel
    has_idx_queue: bool = False

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.visual_encoder = build_vit(cfg.vision)
        self.text_encoder = self.text_encoder_cls(cfg.text)
        init_bert_weights(self.text_encoder, cfg.text.initializer_range)
        width, text_width = cfg.vision.embed_dim, cfg.text.hidden_size
        self.vision_proj = nn.Linear(width, cfg.embed_dim)
        self.text_proj = nn.Linear(text_width, cfg.embed_dim)
        self.itm_head = nn.Linear(text_width, 2)
        # Shape [1], not 0-d as in official checkpoints: DeepSpeed cannot broadcast 0-d parameters.
        # albef.models.convert converts at load/export time.
        self.temp = nn.Parameter(torch.full((1,), cfg.temp))

        self.make_momentum_twins()

        self.register_buffer("image_queue", F.normalize(torch.randn(cfg.embed_dim, cfg.queue_size), dim=0))
        self.register_buffer("text_queue", F.normalize(torch.randn(cfg.embed_dim, cfg.queue_size), dim=0))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        if self.has_idx_queue:
            self.register_buffer("idx_queue", torch.full((1, cfg.queue_size), -100, dtype=torch.long))

        self.apply_switches()

    # --- structure -------------------------------------------------------------------------------------------
    @property
    def bert(self) -> BertModel:
        return self.text_encoder

    @property
    def bert_m(self) -> BertModel:
        return self.text_encoder_m

    # --- queues ---------------------------------------------------------------------------------
    @torch.no_grad()
    def dequeue_and_enqueue(self, image_feat_m, text_feat_m, idx=None) -> None:
        """Write the (all-gathered) momentum features into the queues at ``queue_ptr`` and advance it.

        Every rank gathers the same global batch, so the queues stay identical across ranks without a broadcast.
        ``queue_size: 0`` keeps no queue: the batch's momentum features are the only keys (see ModelConfig).
        """
        if self.cfg.queue_size == 0:
            return
        image_feats, text_feats = all_gather_tensor(image_feat_m), all_gather_tensor(text_feat_m)
        bs = image_feats.shape[0]
        ptr = int(self.queue_ptr)
        if self.cfg.queue_size % bs:
            raise ValueError(
                f"model.queue_size={self.cfg.queue_size} is not divisible by the global batch size {bs}: "
                "the queue pointer would run past the end"
            )
        self.image_queue[:, ptr : ptr + bs] = image_feats.T
        self.text_queue[:, ptr : ptr + bs] = text_feats.T
        if self.has_idx_queue and idx is not None:
            self.idx_queue[:, ptr : ptr + bs] = all_gather_tensor(idx.view(-1)).view(1, -1)
        self.queue_ptr[0] = (ptr + bs) % self.cfg.queue_size

    # --- encoders (the public API: callers never pass `mode`) -----------------------------------------------
    def encode_image(self, image: torch.Tensor, momentum: bool = False) -> torch.Tensor:
        vit = self.visual_encoder_m if momentum else self.visual_encoder
        return vit.forward_features(image)

    def encode_text(self, input_ids, attention_mask, momentum: bool = False, cls_only: bool = False) -> torch.Tensor:
        """Text-encoder states (B, L, D); ``cls_only``: the [CLS] state (B, 1, D) only, enough for ``text_feat``."""
        bert = self.bert_m if momentum else self.bert
        return bert(input_ids, attention_mask, mode="text", cls_only=cls_only)

    def image_feat(self, image_embeds: torch.Tensor, momentum: bool = False) -> torch.Tensor:
        proj = self.vision_proj_m if momentum else self.vision_proj
        return F.normalize(proj(image_embeds[:, 0, :]), dim=-1)

    def text_feat(self, text_embeds: torch.Tensor, momentum: bool = False) -> torch.Tensor:
        proj = self.text_proj_m if momentum else self.text_proj
        return F.normalize(proj(text_embeds[:, 0, :]), dim=-1)

    def fuse(
        self, text_embeds, attention_mask, image_embeds, image_mask=None, cls_only: bool = False, text_attended=False
    ) -> torch.Tensor:
        """Fusion layers: text states cross-attend to the image tokens. ``cls_only``: the [CLS] state (B, 1, D)
        only, the last layer computed at [CLS] only; ``text_attended``: ``text_embeds`` come from
        ``bert.fusion_text_states`` (see ``BertModel.forward``)."""
        return self.bert(
            encoder_embeds=text_embeds,
            attention_mask=attention_mask,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_mask,
            mode="fusion",
            cls_only=cls_only,
            text_attended=text_attended,
        )

    def itm_logits(self, text_embeds, attention_mask, image_embeds, text_attended: bool = False) -> torch.Tensor:
        """ITM logits (column 1 = match) of the pairs (text b, image b)."""
        fused = self.fuse(text_embeds, attention_mask, image_embeds, cls_only=True, text_attended=text_attended)
        return self.itm_head(fused[:, 0, :])

    # --- the shared ITC / ITM computation -------------------------------------------------------------------
    def _itc_itm(
        self, image, input_ids, attention_mask, alpha, idx=None, hard_negatives=True, use_queue=True, momentum=None
    ):
        """Features, ITC with MoD, enqueue, ITM with hard negatives. Returns (losses, details, tensors).
        ``use_queue=False``: the batch's momentum features are the only keys and nothing is enqueued (as with
        ``queue_size: 0``); ``momentum``: this step's EMA coefficient (None: ``cfg.momentum``)."""
        queued = self.cfg.queue_size if use_queue else 0
        image_embeds = self.encode_image(image)
        image_feat = self.image_feat(image_embeds)
        text_embeds = self.encode_text(input_ids, attention_mask)
        text_feat = self.text_feat(text_embeds)

        idx_all = None
        if idx is not None:
            idx = idx.view(-1)
            idx_all = torch.cat([idx.view(1, -1), self.idx_queue[:, :queued]], dim=1)  # cat copies: no clone
        # Similarities and losses are computed in float32 whatever the training precision (no-ops in fp32).
        temp = self.temp.float()
        with torch.no_grad():
            with self._momentum_ctx():
                self.momentum_update(momentum)
                image_embeds_m = self.encode_image(image, momentum=True)
                image_feat_m = self.image_feat(image_embeds_m, momentum=True).float()
                text_embeds_m = self.encode_text(input_ids, attention_mask, momentum=True, cls_only=True)
                text_feat_m = self.text_feat(text_embeds_m, momentum=True).float()
            # the keys: a new tensor (cat copies), so the enqueue below cannot change what backward reads
            image_feat_all = torch.cat([image_feat_m.t(), self.image_queue[:, :queued].float()], dim=1)
            text_feat_all = torch.cat([text_feat_m.t(), self.text_queue[:, :queued].float()], dim=1)
            sim_i2t_m = image_feat_m @ text_feat_all / temp
            sim_t2i_m = text_feat_m @ image_feat_all / temp
            sim_i2t_targets = itc_targets(sim_i2t_m, alpha, idx, idx_all)
            sim_t2i_targets = itc_targets(sim_t2i_m, alpha, idx, idx_all)

        sim_i2t = image_feat.float() @ text_feat_all / temp
        sim_t2i = text_feat.float() @ image_feat_all / temp
        loss_ita = (soft_cross_entropy(sim_i2t, sim_i2t_targets) + soft_cross_entropy(sim_t2i, sim_t2i_targets)) / 2

        if use_queue:
            self.dequeue_and_enqueue(image_feat_m, text_feat_m, idx)

        bs = image.shape[0]
        fused_pos = self.fuse(text_embeds, attention_mask, image_embeds, cls_only=True)
        with torch.no_grad():
            weights_i2t = hard_negative_weights(sim_i2t, bs, idx, hard_negatives)
            weights_t2i = hard_negative_weights(sim_t2i, bs, idx, hard_negatives)
            neg_image, neg_text = sample_hard_negatives(weights_t2i, weights_i2t)
        text_embeds_all = torch.cat([text_embeds, text_embeds[neg_text]], dim=0)
        text_mask_all = torch.cat([attention_mask, attention_mask[neg_text]], dim=0)
        image_embeds_all = torch.cat([image_embeds[neg_image], image_embeds], dim=0)
        fused_neg = self.fuse(text_embeds_all, text_mask_all, image_embeds_all, cls_only=True)
        itm_logits = self.itm_head(torch.cat([fused_pos[:, 0, :], fused_neg[:, 0, :]], dim=0)).float()
        itm_labels = torch.cat([torch.ones(bs, dtype=torch.long), torch.zeros(2 * bs, dtype=torch.long)]).to(
            image.device
        )
        loss_itm = F.cross_entropy(itm_logits, itm_labels)

        details = dict(
            image_feat=image_feat,
            text_feat=text_feat,
            image_feat_m=image_feat_m,
            text_feat_m=text_feat_m,
            sim_i2t=sim_i2t,
            sim_t2i=sim_t2i,
            sim_i2t_m=sim_i2t_m,
            sim_t2i_m=sim_t2i_m,
            sim_i2t_targets=sim_i2t_targets,
            sim_t2i_targets=sim_t2i_targets,
            itm_weights_i2t=weights_i2t,
            itm_weights_t2i=weights_t2i,
            itm_neg_image_idx=neg_image,
            itm_neg_text_idx=neg_text,
            itm_logits=itm_logits,
        )
        return {"loss_ita": loss_ita, "loss_itm": loss_itm}, details, (image_embeds, image_embeds_m)


class ALBEFPretrain(ALBEFBase):
    """Pretraining model: ITC + ITM + MLM, all with momentum distillation.

    ``model(image, input_ids, attention_mask, alpha)`` returns ``{'loss_mlm', 'loss_ita', 'loss_itm'}``; the
    training objective is their sum. ``alpha`` is the distillation weight (ramped 0 -> 0.4 over the first epoch
    by the caller).
    """

    text_encoder_cls = BertForMaskedLM

    @property
    def bert(self) -> BertModel:
        return self.text_encoder.bert

    @property
    def bert_m(self) -> BertModel:
        return self.text_encoder_m.bert

    def mlm_hidden(self, input_ids, attention_mask, image_embeds, momentum: bool = False) -> torch.Tensor:
        bert = self.bert_m if momentum else self.bert
        return bert(input_ids, attention_mask, encoder_hidden_states=image_embeds, mode="multi_modal")

    def mlm_head(self, hidden: torch.Tensor, momentum: bool = False) -> torch.Tensor:
        return (self.text_encoder_m if momentum else self.text_encoder).cls(hidden)

    def forward(
        self,
        image,
        input_ids,
        attention_mask,
        alpha: float = 0.0,
        return_details: bool = False,
        hard_negatives: bool = True,
        use_queue: bool = True,
        momentum: Optional[float] = None,
    ):
        with torch.no_grad():
            self.temp.clamp_(0.001, 0.5)
        losses, details, (image_embeds, image_embeds_m) = self._itc_itm(
            image, input_ids, attention_mask, alpha, None, hard_negatives, use_queue, momentum
        )

        # MLM: a separate full multi-modal pass on the masked text, distilled from the momentum model. The
        # vocabulary projection runs only at the masked positions (about 15% of the tokens): the official code
        # projects every position and then ignores the rest, which costs most of the MLM head's time and memory.
        mlm_ids, mlm_labels = mask_tokens(input_ids, self.cfg.text.vocab_size, self.cfg.mlm_probability)
        target = mlm_labels != -100
        labels = mlm_labels[target]
        every = self.cfg.mlm_projection == "all"
        with torch.no_grad(), self._momentum_ctx():
            hidden_m = self.mlm_hidden(mlm_ids, attention_mask, image_embeds_m, momentum=True)
            logits_m = (
                self.mlm_head(hidden_m, momentum=True)[target]
                if every
                else self.mlm_head(hidden_m[target], momentum=True)
            ).float()
        hidden = self.mlm_hidden(mlm_ids, attention_mask, image_embeds)
        logits = (self.mlm_head(hidden)[target] if every else self.mlm_head(hidden[target])).float()
        if labels.numel() == 0:  # no token was drawn: nothing to predict, keep the graph connected
            losses["loss_mlm"] = hidden.sum() * 0.0
        else:
            losses["loss_mlm"] = mlm_loss(logits, labels, F.softmax(logits_m, dim=-1), alpha)
        out = {"loss_mlm": losses["loss_mlm"], "loss_ita": losses["loss_ita"], "loss_itm": losses["loss_itm"]}
        if return_details:
            details.update(mlm_input_ids=mlm_ids, mlm_labels=mlm_labels, mlm_logits=logits, mlm_logits_m=logits_m)
            out["details"] = details
        return out


class ALBEFRetrieval(ALBEFBase):
    """Retrieval / grounding model: ITC (positives by image id, through the queue too) + ITM.

    ``model(image, input_ids, attention_mask, idx, alpha)`` returns ``{'loss_ita', 'loss_itm'}``.
    """

    text_encoder_cls = BertModel
    has_idx_queue = True

    def forward(
        self,
        image,
        input_ids,
        attention_mask,
        idx,
        alpha: float = 0.0,
        return_details: bool = False,
        hard_negatives: bool = True,
        use_queue: bool = True,
        momentum: Optional[float] = None,
    ):
        with torch.no_grad():
            self.temp.clamp_(0.001, 0.5)
        losses, details, _ = self._itc_itm(
            image, input_ids, attention_mask, alpha, idx, hard_negatives, use_queue, momentum
        )
        if return_details:
            losses["details"] = details
        return losses


MODEL_CLASSES: Dict[str, type] = {"pretrain": ALBEFPretrain, "retrieval": ALBEFRetrieval}
