"""BERT text encoder and fusion encoder of ALBEF (paper §3.1; official ``models/xbert.py``).

One stack of ``num_hidden_layers`` post-LN BERT layers. Layers ``>= fusion_layer`` carry an extra
cross-attention block (query = text stream, key/value = image tokens of width ``encoder_width``), in the
order self-attention -> cross-attention -> FFN. The stack is run in one of three modes:

* ``text``        embeddings + layers ``[0, fusion_layer)``: the unimodal text encoder (ITC features);
* ``fusion``      layers ``[fusion_layer, N)`` on an already computed text state (ITM, retrieval re-ranking);
* ``multi_modal`` embeddings + all layers (the MLM branch).

Module names are the checkpoint format: ``BertModel`` has the keys of the official downstream text encoder
(``embeddings.*``, ``encoder.layer.N.*``) and ``BertForMaskedLM`` those of the pretraining one (``bert.*`` and the
MLM head ``cls.predictions.*`` with its decoder tied to the word embeddings). We write our own small BERT rather
than patch transformers' ``BertModel``: HF puts cross-attention in every layer and turns self-attention causal
when cross-attention is enabled, neither of which matches ALBEF.

Attention runs through ``F.scaled_dot_product_attention`` (``attn_impl="sdpa"``, within 5e-7 of the official
explicit softmax; on CPU without gradients the explicit form, which is faster there) or the explicit form
(``attn_impl="eager"``, bitwise the official op order; it is also the form that can keep attention maps for
Grad-CAM).

Token packing (``BertModel.packing``, set model-wide from ``model.text_packing``): when a batch has padding, the
layers run on its real tokens only, packed into one ``(tokens, width)`` matrix, so the linear maps, LayerNorms and
GELUs skip the padding; only inside attention are queries/keys/values scattered back to ``(B, L)`` for the masked
softmax. A real token's state is the same as without packing (the padding never reaches it: its attention weight
is ``exp(-10000)``); a padding position's state, which ALBEF never reads, is zero instead of a by-product.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


@dataclass
class BertConfig:
    """Hyper-parameters of the text/fusion stack; names follow ``config_bert.json`` of the official code."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    fusion_layer: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    encoder_width: int = 768
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    pad_token_id: int = 0
    initializer_range: float = 0.02
    is_decoder: bool = False  # causal self-attention (the VQA answer decoder)

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"text.hidden_size={self.hidden_size} is not divisible by "
                f"text.num_attention_heads={self.num_attention_heads}"
            )
        if not 0 <= self.fusion_layer <= self.num_hidden_layers:
            raise ValueError(
                f"text.fusion_layer={self.fusion_layer} must lie in [0, num_hidden_layers={self.num_hidden_layers}]"
            )


class BertEmbeddings(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)
        # Persistent, because official checkpoints carry it.
        self.register_buffer("position_ids", torch.arange(cfg.max_position_embeddings).expand((1, -1)))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        length = input_ids.shape[1]
        # ALBEF always uses token type 0; it must still be added (LAVIS' albef config drops it and breaks
        # official checkpoints).
        token_type = self.token_type_embeddings.weight[0]
        x = self.word_embeddings(input_ids) + token_type
        x = x + self.position_embeddings(self.position_ids[:, :length])
        return self.dropout(self.LayerNorm(x))


class Packing(NamedTuple):
    """Where the real tokens of a ``(batch, length)`` text batch sit: ``index`` are their flat positions, ``first``
    the packed row of each caption's first token ([CLS])."""

    index: torch.Tensor
    first: torch.Tensor
    batch: int
    length: int

    #: Pack only when at least this fraction of the positions is padding: below it, the scatter and gather around
    #: each attention cost more than the skipped rows save (retrieval re-ranking, whose batches are cut to their
    #: longest caption, ran 13% slower with packing at TINY; bench/retrieval_eval.py).
    MIN_PADDING = 0.1

    @classmethod
    def of(cls, mask: torch.Tensor) -> Optional["Packing"]:
        """The packing of a (B, L) 0/1 mask, or None when packing does not pay (little or no padding)."""
        counts = mask.sum(1)
        if float(counts.sum()) > (1.0 - cls.MIN_PADDING) * mask.numel():
            return None
        return cls(mask.reshape(-1).nonzero().squeeze(1), counts.cumsum(0) - counts, mask.shape[0], mask.shape[1])

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, ...) -> (tokens, ...)."""
        return x.reshape(self.batch * self.length, *x.shape[2:]).index_select(0, self.index)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """(tokens, ...) -> (B, L, ...), zero at the padding."""
        out = x.new_zeros(self.batch * self.length, *x.shape[1:]).index_copy_(0, self.index, x)  # in place: no clone
        return out.view(self.batch, self.length, *x.shape[1:])


@dataclass
class SharedImages:
    """Image tokens shared by several texts: text b reads ``states[index[b]]`` (U, N, W), every image token
    attended (no image mask). Cross-attention projects each image's keys and values once, instead of once per
    (text, image) pair, and attends with all the query tokens of one image's consecutive texts in one matmul:
    retrieval re-ranking pairs every image with its many candidate captions. Consecutive texts of the same image
    form one group (give the texts sorted by image for few, large groups); any order gives the same states."""

    states: torch.Tensor
    index: torch.Tensor


class BertSelfAttention(nn.Module):
    def __init__(self, cfg: BertConfig, kv_width: int):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(kv_width, cfg.hidden_size)
        self.value = nn.Linear(kv_width, cfg.hidden_size)
        self.dropout_p = cfg.attention_probs_dropout_prob
        self.attn_impl = "sdpa"  # set model-wide by ALBEFBase.set_attn_impl (model.attn_impl)
        # Grad-CAM (grounding): keep the attention probabilities and their gradient. Needs the explicit softmax,
        # so the eager path runs whenever this is set.
        self.save_attention = False
        self.attention_map: Optional[torch.Tensor] = None
        self.attn_gradients: Optional[torch.Tensor] = None

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def _save_gradients(self, grad: torch.Tensor) -> None:
        self.attn_gradients = grad

    def forward(
        self, hidden: torch.Tensor, kv: torch.Tensor, mask: Optional[torch.Tensor], packing: Optional[Packing] = None
    ) -> torch.Tensor:
        """Queries from ``hidden``, keys and values from ``kv``: each (B, L, D), or packed (tokens, D) under
        ``packing`` (2-d). ``kv`` is the text (self-attention) or the image tokens (B, N, W) (cross-attention);
        ``hidden`` may be the [CLS] rows only (B, 1, D) of a packed text (``BertLayer``'s ``cls_only``)."""
        q = self.query(hidden)
        if isinstance(kv, SharedImages):
            return self._shared_images(q, kv, mask, packing)
        k, v = self.key(kv), self.value(kv)
        if hidden.dim() == 2:
            q = packing.unpack(q)
        if k.dim() == 2:
            k, v = packing.unpack(k), packing.unpack(v)
        q, k, v = self._heads(q), self._heads(k), self._heads(v)
        p = self.dropout_p if self.training else 0.0
        if self.attn_impl == "sdpa" and not self.save_attention and (torch.is_grad_enabled() or q.is_cuda):
            ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        else:
            # Official op order: divide after the matmul, add the mask, softmax, dropout, @v. Also the CPU form
            # without gradients (evaluation, the momentum encoders): at ALBEF's text lengths (~20 queries) torch's
            # CPU flash kernel is slower there, e.g. self-attention 7.8 vs 4.5 ms and cross-attention to 197 image
            # tokens 25.9 vs 27.0 ms at BASE, 7.5 vs 4.3 and 13.5 vs 11.2 ms at SMALL (2 threads); with gradients
            # the fused kernel is faster (forward + backward 25 vs 34 ms, 144 vs 183 ms at BASE).
            scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim)
            if mask is not None:
                scores = scores + mask
            probs = scores.softmax(dim=-1)
            if self.save_attention:
                self.attention_map = probs
                if probs.requires_grad:
                    probs.register_hook(self._save_gradients)
            ctx = torch.matmul(F.dropout(probs, p, self.training), v)
        b, h, n, d = ctx.shape
        ctx = ctx.transpose(1, 2).reshape(b, n, h * d)
        return packing.pack(ctx) if hidden.dim() == 2 else ctx

    def _shared_images(
        self, q: torch.Tensor, kv: SharedImages, mask: Optional[torch.Tensor], packing: Optional[Packing]
    ) -> torch.Tensor:
        """Cross-attention of ``q`` ((B, L, D), or packed (tokens, D)) to shared images, group by group: a query
        token attends to its image's tokens only, so the query tokens of a group of texts that read the same image
        are one (tokens, D) matrix against that image's keys (no per-text copies of keys and values, no padding)."""
        if mask is not None:
            raise ValueError("SharedImages attends to every image token: an image attention mask is not supported")
        if self.save_attention:
            raise ValueError("SharedImages does not keep attention maps (Grad-CAM): pass the image tokens per text")
        k, v = self._heads(self.key(kv.states)), self._heads(self.value(kv.states))  # (U, H, N, d)
        images, rows = torch.unique_consecutive(kv.index, return_counts=True)
        first_row = (rows.cumsum(0) - rows).tolist()
        flat = q.reshape(-1, q.shape[-1])  # (tokens, D): packed, or B*L rows
        if q.dim() == 2:  # packed: the texts' tokens are consecutive, in text order
            starts = packing.first[first_row].tolist()
        else:
            starts = [r * q.shape[1] for r in first_row]
        ends = starts[1:] + [flat.shape[0]]
        out = torch.empty_like(flat)
        h, d, p = self.num_heads, self.head_dim, self.dropout_p if self.training else 0.0
        for image, start, end in zip(images.tolist(), starts, ends):
            qg = flat[start:end].view(end - start, h, d).transpose(0, 1)  # (H, n, d)
            scores = torch.matmul(qg, k[image].transpose(-1, -2)) / math.sqrt(d)
            ctx = torch.matmul(F.dropout(scores.softmax(dim=-1), p, self.training), v[image])
            out[start:end] = ctx.transpose(0, 1).reshape(end - start, h * d)
        return out.view(q.shape)


class BertResidualOutput(nn.Module):
    """``LayerNorm(dropout(dense(x)) + residual)``: official ``BertSelfOutput`` and ``BertOutput``."""

    def __init__(self, in_width: int, cfg: BertConfig):
        super().__init__()
        self.dense = nn.Linear(in_width, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class BertAttention(nn.Module):
    def __init__(self, cfg: BertConfig, kv_width: int):
        super().__init__()
        self.self = BertSelfAttention(cfg, kv_width)
        self.output = BertResidualOutput(cfg.hidden_size, cfg)

    def forward(self, hidden, kv, mask, packing=None):
        return self.output(self.self(hidden, kv, mask, packing), hidden)


class BertIntermediate(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x):
        return F.gelu(self.dense(x))


class BertLayer(nn.Module):
    def __init__(self, cfg: BertConfig, layer_num: int):
        super().__init__()
        self.attention = BertAttention(cfg, cfg.hidden_size)
        self.has_cross_attention = layer_num >= cfg.fusion_layer
        if self.has_cross_attention:
            self.crossattention = BertAttention(cfg, cfg.encoder_width)
        self.intermediate = BertIntermediate(cfg)
        self.output = BertResidualOutput(cfg.intermediate_size, cfg)

    def forward(self, hidden, mask, image_embeds=None, image_mask=None, packing=None, cls_only=False, attended=False):
        """``cls_only``: compute the output at [CLS] only, (B, 1, D) (its keys and values still read every token).
        ``attended``: ``hidden`` is already this layer's self-attention output (``BertModel.fusion_text_states``)."""
        query = hidden
        if cls_only:
            query = hidden[:, :1] if packing is None else hidden[packing.first].unsqueeze(1)
        hidden = query if attended else self.attention(query, hidden, mask, packing)
        if self.has_cross_attention:
            if image_embeds is None:
                raise ValueError("a fusion layer needs image_embeds (encoder_hidden_states)")
            hidden = self.crossattention(hidden, image_embeds, image_mask, packing)
        return self.output(self.intermediate(hidden), hidden)


def extended_mask(mask: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """(B, L) 0/1 key mask -> additive (B, 1, 1, L) mask, ``(1 - m) * -10000`` as in the official code."""
    if mask is None:
        return None
    return (1.0 - mask[:, None, None, :].to(dtype)) * -10000.0


ImageStates = Union[torch.Tensor, Sequence[torch.Tensor], SharedImages]


class BertEncoder(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.cfg = cfg
        self.layer = nn.ModuleList([BertLayer(cfg, i) for i in range(cfg.num_hidden_layers)])
        self.grad_checkpointing = False  # set model-wide by ALBEFBase.set_grad_checkpointing

    def layer_range(self, mode: str) -> range:
        n, f = self.cfg.num_hidden_layers, self.cfg.fusion_layer
        ranges = {"text": range(0, f), "fusion": range(f, n), "multi_modal": range(0, n)}
        if mode not in ranges:
            raise ValueError(f"mode={mode!r}: expected one of {sorted(ranges)}")
        return ranges[mode]

    def forward(
        self,
        hidden,
        mask,
        image_embeds: Optional[ImageStates] = None,
        image_mask=None,
        mode="multi_modal",
        packing: Optional[Packing] = None,
        cls_only: bool = False,
        attended: bool = False,
    ):
        """``hidden`` is (B, L, D), or (tokens, D) under ``packing`` (see ``BertModel.forward``). ``attended``: it is
        the first layer's self-attention output already."""
        first, last = self.layer_range(mode)[0], self.layer_range(mode)[-1]
        for i in self.layer_range(mode):
            img, img_mask = image_embeds, image_mask
            if isinstance(image_embeds, (list, tuple)):
                # Several images (NLVR2): fusion layer i reads image (i - fusion_layer) % n_images.
                j = (i - self.cfg.fusion_layer) % len(image_embeds)
                img = image_embeds[j]
                img_mask = image_mask[j] if isinstance(image_mask, (list, tuple)) else image_mask
            layer = self.layer[i]
            cls, att = cls_only and i == last, attended and i == first
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                hidden = checkpoint(layer, hidden, mask, img, img_mask, packing, cls, att, use_reentrant=False)
            else:
                hidden = layer(hidden, mask, img, img_mask, packing, cls, att)
        return hidden


class BertModel(nn.Module):
    """The text + fusion stack. Keys: ``embeddings.*``, ``encoder.layer.N.*`` (no pooler, as in ALBEF)."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = BertEmbeddings(cfg)
        self.encoder = BertEncoder(cfg)
        self.packing = False  # set model-wide from model.text_packing (see the module docstring)

    def forward(
        self,
        input_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        *,
        encoder_embeds: Optional[torch.Tensor] = None,
        encoder_hidden_states: Optional[ImageStates] = None,
        encoder_attention_mask=None,
        mode: str = "multi_modal",
        cls_only: bool = False,
        text_attended: bool = False,
    ) -> torch.Tensor:
        """Return the last hidden state ``(B, L, hidden)``; with ``cls_only`` only its [CLS] row, ``(B, 1, hidden)``,
        and the last layer computes its queries, feed-forward and outputs at [CLS] only (ITC features, ITM logits:
        the other rows of the last layer are never read). Not with saved attention maps in the last layer.

        ``mode='fusion'`` takes ``encoder_embeds`` (a text state from ``mode='text'``) instead of ``input_ids``.
        ``encoder_attention_mask`` is a (B, N_img) 0/1 mask or None for "attend to every image token" (ALBEF
        always uses all-ones image masks; None lets SDPA pick its fastest kernel). ``text_attended`` (fusion mode):
        ``encoder_embeds`` come from ``fusion_text_states``, the first fusion layer's self-attention already applied.
        """
        if text_attended and mode != "fusion":
            raise ValueError(f"text_attended needs mode='fusion', not {mode!r}")
        if mode == "fusion":
            if encoder_embeds is None:
                raise ValueError("mode='fusion' needs encoder_embeds (the output of mode='text')")
            hidden = encoder_embeds
        else:
            if input_ids is None:
                raise ValueError(f"mode={mode!r} needs input_ids")
            hidden = self.embeddings(input_ids)
        if attention_mask is None:
            attention_mask = torch.ones(hidden.shape[:2], device=hidden.device)
        mask = extended_mask(attention_mask, hidden.dtype)
        if self.cfg.is_decoder:  # position i attends to keys <= i (and never to padding)
            length = hidden.shape[1]
            causal = torch.ones(length, length, device=hidden.device).tril()
            mask = (1.0 - causal[None, None] * attention_mask[:, None, None, :].to(hidden.dtype)) * -10000.0
            mask = mask.to(hidden.dtype)
        if isinstance(encoder_attention_mask, (list, tuple)):
            img_mask = [extended_mask(m, hidden.dtype) for m in encoder_attention_mask]
        else:
            img_mask = extended_mask(encoder_attention_mask, hidden.dtype)
        if cls_only:
            last = self.encoder.layer[self.encoder.layer_range(mode)[-1]]
            if any(m.save_attention for m in last.modules() if isinstance(m, BertSelfAttention)):
                out = self.encoder(hidden, mask, encoder_hidden_states, img_mask, mode, attended=text_attended)
                return out[:, :1]  # Grad-CAM's maps
        packing = Packing.of(attention_mask) if self.packing and not self.cfg.is_decoder else None
        args = (mask, encoder_hidden_states, img_mask, mode, packing, cls_only, text_attended)
        if packing is None:
            return self.encoder(hidden, *args)
        out = self.encoder(packing.pack(hidden), *args)
        return out if cls_only else packing.unpack(out)

    def fusion_text_states(self, text_embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The first fusion layer's self-attention applied to text states (B, L, D) from ``mode='text'``: it reads
        the text alone, so retrieval re-ranking computes it once per caption instead of once per (caption, image)
        pair, then fuses with ``text_attended=True``. Zero at the padding when packed."""
        layer = self.encoder.layer[self.cfg.fusion_layer]
        mask = extended_mask(attention_mask, text_embeds.dtype)
        packing = Packing.of(attention_mask) if self.packing else None
        if packing is None:
            return layer.attention(text_embeds, text_embeds, mask)
        packed = packing.pack(text_embeds)
        return packing.unpack(layer.attention(packed, packed, mask, packing))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.encoder.grad_checkpointing = enable


class BertPredictionHeadTransform(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x):
        return self.LayerNorm(F.gelu(self.dense(x)))


class BertLMPredictionHead(nn.Module):
    def __init__(self, cfg: BertConfig, word_embeddings: nn.Embedding):
        super().__init__()
        self.transform = BertPredictionHeadTransform(cfg)
        self.decoder = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.decoder.weight = word_embeddings.weight  # tied, as in BERT and ALBEF
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        self.decoder.bias = self.bias  # the checkpoint holds both keys for one tensor

    def forward(self, x):
        return self.decoder(self.transform(x))


class BertOnlyMLMHead(nn.Module):
    def __init__(self, cfg: BertConfig, word_embeddings: nn.Embedding):
        super().__init__()
        self.predictions = BertLMPredictionHead(cfg, word_embeddings)

    def forward(self, x):
        return self.predictions(x)


class BertForMaskedLM(nn.Module):
    """Pretraining text encoder: ``bert`` (the stack) + ``cls`` (MLM head with the tied decoder)."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.cfg = cfg
        self.bert = BertModel(cfg)
        self.cls = BertOnlyMLMHead(cfg, self.bert.embeddings.word_embeddings)

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self.bert(*args, **kwargs)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.bert.set_grad_checkpointing(enable)


def init_bert_weights(module: nn.Module, std: float = 0.02) -> None:
    """BERT's initialisation: normal(0, std) for Linear/Embedding weights, zero biases, unit LayerNorms."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=std)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
        if isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    if isinstance(module, BertForMaskedLM):
        nn.init.zeros_(module.cls.predictions.bias)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy against soft targets over the last dim, ``-sum_k targets_k * log_softmax(logits)_k`` per row;
    ``reduction``: ``"mean"`` over the rows or ``"none"``. ITC's and ITM's targets, and the distillation term of
    every momentum-distilled loss (``distilled_cross_entropy``)."""
    loss = -torch.sum(F.log_softmax(logits, dim=-1) * targets, dim=-1)
    return loss.mean() if reduction == "mean" else loss


def distilled_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    soft_targets: Optional[torch.Tensor],
    alpha: float,
    reduction: str = "mean",
) -> torch.Tensor:
    """Momentum distillation, the one loss of MLM, the VQA answer tokens and the NLVR2/SNLI-VE classes:
    ``(1 - alpha) * CE(logits, labels) + alpha * soft_cross_entropy(logits, soft_targets)``, rows (N, C) labelled
    -100 left out of both means (``reduction="mean"``) or every row's loss (``"none"``). Without soft targets: CE."""
    loss = F.cross_entropy(logits, labels, ignore_index=-100, reduction=reduction)
    if soft_targets is None:
        return loss
    distill = soft_cross_entropy(logits, soft_targets, reduction="none")
    if reduction == "mean":
        distill = distill[labels != -100].mean()
    return (1 - alpha) * loss + alpha * distill


def mlm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    soft_labels: Optional[torch.Tensor] = None,
    alpha: float = 0.0,
) -> torch.Tensor:
    """ALBEF's MLM loss with momentum distillation (official ``xbert.py`` after the dim=-1 fix, commit b726f8e).

    ``(1 - alpha) * CE(logits, labels) + alpha * mean(-sum_v soft_v * log_softmax(logits)_v)``, both means over
    positions with ``label != -100``. ``logits`` may be (B, L, V) with (B, L) labels, or already gathered (M, V)
    with (M,) labels.
    """
    vocab = logits.shape[-1]
    soft = None if soft_labels is None else soft_labels.reshape(-1, vocab)
    return distilled_cross_entropy(logits.reshape(-1, vocab), labels.reshape(-1), soft, alpha)
