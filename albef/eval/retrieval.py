"""Image-text retrieval evaluation as the official ``Retrieval.py`` (ITC top-k, ITM re-ranking), batched.

1. Every image and every caption is encoded once (ViT; text layers), giving ITC features and the token states.
2. ``sims = image_feat @ text_feat.T``.
3. For every image the ``k_test`` most similar captions, and for every caption the ``k_test`` most similar images,
   are re-scored with the fusion encoder; the score is the raw ITM "match" logit (no ITC term, as official).
   Everything outside the top-k keeps -100.
4. Queries are split across ranks; the two score matrices are summed over ranks.

The official code re-ranks one query at a time (a batch of k pairs per fusion call, every caption padded to the
longest of the set). Here the (caption, image) pairs of all queries are fused together in batches of ``pair_batch``
pairs, a pair asked for by both an image query and a caption query once, sorted by image and then caption length:
each batch is cut to its longest caption (and packed when it holds padding), projects each of its few images'
cross-attention keys and values once, and attends with all the caption tokens of one image in one matmul
(``SharedImages``; bench/retrieval_eval.py measures it against the official loops).

``recall_metrics`` implements the official ``itm_eval``: text retrieval ranks, for each image, the best-ranked of
its ground-truth captions; image retrieval ranks each caption's one image.
"""

from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np
import torch

from albef.engine import dist
from albef.engine.signals import until_stop
from albef.models.bert import SharedImages


@torch.no_grad()
def encode_texts(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, batch_size: int = 256):
    embeds, feats = [], []
    for i in range(0, input_ids.shape[0], batch_size):
        ids, mask = input_ids[i : i + batch_size], attention_mask[i : i + batch_size]
        e = model.encode_text(ids, mask)
        embeds.append(e)
        feats.append(model.text_feat(e))
    return torch.cat(embeds), torch.cat(feats)


@torch.no_grad()
def encode_images(model, images) -> tuple:
    """``images``: an iterable of image batches (already on the model's device/dtype)."""
    embeds, feats = [], []
    for batch in images:
        e = model.encode_image(batch)
        embeds.append(e)
        feats.append(model.image_feat(e))
    return torch.cat(embeds), torch.cat(feats)


@torch.no_grad()
def itm_rerank(
    model, sims: torch.Tensor, image_embeds, text_embeds, text_mask, k_test: int, pair_batch: int = 256
) -> tuple:
    """Score matrices (i2t: N_img x N_txt, t2i: N_txt x N_img) as the official evaluation, batched across queries.

    The (caption, image) pairs of this rank's image queries and caption queries are gathered first, and a pair that
    both sides ask for is fused once. The pairs go through the fusion encoder sorted by image and, within an image,
    by caption length: each batch is cut to its longest caption (the padding the official code carries to every
    fusion call, masked keys, so the scores are the same) and projects each of its images' cross-attention keys and
    values once, attending with all the caption tokens of an image at once (``SharedImages``; the official code
    projects them again for every pair)."""
    n_img, n_txt = sims.shape
    k_i2t, k_t2i = min(k_test, n_txt), min(k_test, n_img)
    score_i2t = torch.full((n_img, n_txt), -100.0, device=sims.device)
    score_t2i = torch.full((n_txt, n_img), -100.0, device=sims.device)
    filled_i2t = torch.zeros_like(score_i2t)
    filled_t2i = torch.zeros_like(score_t2i)

    images, texts = dist.rank_share(n_img), dist.rank_share(n_txt)
    q_img = torch.arange(images.start, images.stop, images.step, device=sims.device)
    q_txt = torch.arange(texts.start, texts.stop, texts.step, device=sims.device)
    cand_txt = sims[q_img].topk(k_i2t, dim=1).indices if len(q_img) else q_img.new_zeros(0, k_i2t)  # (Qi, k)
    cand_img = sims.t()[q_txt].topk(k_t2i, dim=1).indices if len(q_txt) else q_txt.new_zeros(0, k_t2i)
    pair_t = torch.cat([cand_txt.reshape(-1), q_txt.repeat_interleave(k_t2i)])
    pair_i = torch.cat([q_img.repeat_interleave(k_i2t), cand_img.reshape(-1)])
    unique, where = torch.unique(pair_t * n_img + pair_i, return_inverse=True)  # pair -> its unique index
    u_t, u_i = unique // n_img, unique % n_img
    lengths = _lengths(text_mask)
    order = torch.argsort(u_i * (int(lengths.max()) + 1) + lengths[u_t], stable=True)  # by image, then length
    # The first fusion layer's self-attention reads the caption alone: once per caption, not once per pair.
    attended = torch.cat(
        [model.bert.fusion_text_states(text_embeds[j : j + 256], text_mask[j : j + 256]) for j in range(0, n_txt, 256)]
    )
    logits = torch.empty(len(unique), device=sims.device)
    for start in until_stop(range(0, len(order), pair_batch)):  # a stop request ends it on every rank
        sel = order[start : start + pair_batch]
        t, i = u_t[sel], u_i[sel]
        width = int(lengths[t].max())
        images, which = torch.unique(i, return_inverse=True)
        shared = SharedImages(image_embeds[images], which)
        logits[sel] = model.itm_logits(attended[t, :width], text_mask[t, :width], shared, True)[:, 1].float()
    n_i2t = len(q_img) * k_i2t
    if n_i2t:
        score_i2t[q_img.unsqueeze(1), cand_txt] = logits[where[:n_i2t]].view(len(q_img), k_i2t)
        filled_i2t[q_img.unsqueeze(1), cand_txt] = 1.0
    if len(q_txt):
        score_t2i[q_txt.unsqueeze(1), cand_img] = logits[where[n_i2t:]].view(len(q_txt), k_t2i)
        filled_t2i[q_txt.unsqueeze(1), cand_img] = 1.0

    if dist.rank_and_world()[1] > 1:
        # Each rank filled its own query rows: sum the filled entries, then put -100 back everywhere else.
        merged = []
        for score, filled in ((score_i2t, filled_i2t), (score_t2i, filled_t2i)):
            score, filled = dist.sum_tensor_over_ranks(score * filled), dist.sum_tensor_over_ranks(filled)
            merged.append(torch.where(filled > 0, score, torch.full_like(score, -100.0)))
        score_i2t, score_t2i = merged
    return score_i2t, score_t2i


def _lengths(mask: torch.Tensor) -> torch.Tensor:
    """Tokens up to each caption's last unmasked one (padding is at the end; a mask with holes keeps them)."""
    positions = torch.arange(1, mask.shape[1] + 1, device=mask.device)
    return (positions * (mask > 0)).amax(dim=1).clamp(min=1)


@torch.no_grad()
def itm_match_accuracy(
    model, image_embeds, text_embeds, text_mask, img2txt: Sequence[Sequence[int]], batch_size: int = 128
) -> float:
    """Does the fusion encoder look at the image? For every image, the ITM match probability of its own first
    caption against that of the next image's first caption (a random negative, not a hard one): the percentage of
    images where its own caption wins. 50 = image-blind (a text-only ITM head scores both captions alike)."""
    n = len(img2txt)
    if n < 2:
        return float("nan")
    own = torch.tensor([t[0] for t in img2txt], device=text_embeds.device)
    other = own.roll(-1)
    wins = 0
    for lo in range(0, n, batch_size):
        rows = torch.arange(lo, min(n, lo + batch_size), device=own.device)
        images = image_embeds[rows].repeat(2, 1, 1)
        texts = torch.cat([own[rows], other[rows]])
        p = model.itm_logits(text_embeds[texts], text_mask[texts], images).float().softmax(-1)[:, 1]
        wins += int((p[: len(rows)] > p[len(rows) :]).sum())
    return 100.0 * wins / n


def recall_metrics(
    score_i2t: np.ndarray, score_t2i: np.ndarray, img2txt: Sequence[Sequence[int]], txt2img: Sequence[int]
) -> Dict[str, float]:
    """Official ``itm_eval``: R@1/5/10 for text retrieval (TR) and image retrieval (IR), their means, r_mean.

    Ranks come from a stable descending sort: tied candidates keep index order (the official ``np.argsort(-score)``
    uses an unstable sort, which gives the same ranks whenever scores are distinct).
    """
    score_i2t, score_t2i = np.asarray(score_i2t), np.asarray(score_t2i)
    tr_ranks = np.zeros(score_i2t.shape[0])
    for i, row in enumerate(score_i2t):
        order = np.argsort(-row, kind="stable")
        tr_ranks[i] = min(np.where(order == t)[0][0] for t in img2txt[i])
    ir_ranks = np.zeros(score_t2i.shape[0])
    for t, row in enumerate(score_t2i):
        order = np.argsort(-row, kind="stable")
        ir_ranks[t] = np.where(order == txt2img[t])[0][0]
    out = {}
    for name, ranks in (("txt", tr_ranks), ("img", ir_ranks)):
        for k in (1, 5, 10):
            out[f"{name}_r{k}"] = 100.0 * float(np.mean(ranks < k))
        out[f"{name}_r_mean"] = (out[f"{name}_r1"] + out[f"{name}_r5"] + out[f"{name}_r10"]) / 3
    out["r_mean"] = (out["txt_r_mean"] + out["img_r_mean"]) / 2
    return out


def ground_truth(captions_per_image: List[int]) -> tuple:
    """img2txt / txt2img index maps for images with consecutive caption blocks (the official test-file order)."""
    img2txt, txt2img, t = [], [], 0
    for i, n in enumerate(captions_per_image):
        img2txt.append(list(range(t, t + n)))
        txt2img += [i] * n
        t += n
    return img2txt, txt2img
