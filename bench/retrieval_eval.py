"""Retrieval evaluation time: our batched ITM re-ranking vs the official per-query loops, same model and data.

    python bench/retrieval_eval.py                      # TINY, 64 images x 320 captions, k_test 16 (PERFORMANCE.md)
    python bench/retrieval_eval.py --preset small --images 100 --k-test 32

Both sides start from images already in memory and tokenised captions (padded to 30, as the official evaluation),
encode every image and caption, compute the ITC similarities, re-rank the top-k of every image and every caption
with the ITM head, and produce the two score matrices; the official side runs one fusion forward per query
(``Retrieval.py`` ``evaluation()``) in the official op order (explicit softmax, every padding position computed),
ours batches the (query, candidate) pairs of many queries (``albef.eval.retrieval.itm_rerank``) with the model's
defaults (fused attention, token packing); both models have the same weights. The score matrices are checked to agree before timing. Each side runs in
fresh processes, alternating, and the median is reported with the ratio (goal: ours <= 0.33x).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


OFFICIAL = ["attn_impl=eager", "text_packing=false"]  # the official op order: explicit softmax, padding computed


def _setup(args, side):
    sys.path.insert(0, str(REPO))
    import torch

    from albef.models import build_model

    torch.set_num_threads(args.threads)
    model = build_model(args.preset, "retrieval", seed=0, overrides=OFFICIAL if side == "official" else []).eval()
    res = model.cfg.vision.img_size
    g = torch.Generator().manual_seed(1)
    images = torch.randn(args.images, 3, res, res, generator=g)
    n_txt = args.images * 5
    ids = torch.randint(1000, 30000, (n_txt, 30), generator=g)
    ids[:, 0] = 101
    mask = torch.ones_like(ids)
    for i in range(n_txt):
        ids[i, 8 + i % 20 :] = 0
        mask[i, 8 + i % 20 :] = 0
    return model, images, ids, mask


def _official(model, images, ids, mask, k):
    """The official loops: one fusion call per query."""
    import torch

    with torch.no_grad():
        text_embeds = torch.cat(
            [model.encode_text(ids[i : i + 256], mask[i : i + 256]) for i in range(0, len(ids), 256)]
        )
        text_feat = model.text_feat(text_embeds)
        image_embeds = torch.cat([model.encode_image(images[i : i + 64]) for i in range(0, len(images), 64)])
        image_feat = model.image_feat(image_embeds)
        sims = image_feat @ text_feat.t()
        s_i2t = torch.full(sims.shape, -100.0)
        for i, row in enumerate(sims):
            topk = row.topk(k).indices
            out = model.fuse(text_embeds[topk], mask[topk], image_embeds[i].repeat(k, 1, 1))
            s_i2t[i, topk] = model.itm_head(out[:, 0, :])[:, 1]
        s_t2i = torch.full(sims.t().shape, -100.0)
        for t, row in enumerate(sims.t()):
            topk = row.topk(k).indices
            out = model.fuse(text_embeds[t].repeat(k, 1, 1), mask[t].repeat(k, 1), image_embeds[topk])
            s_t2i[t, topk] = model.itm_head(out[:, 0, :])[:, 1]
    return s_i2t, s_t2i


def _ours(model, images, ids, mask, k):
    import torch

    from albef.eval.retrieval import encode_images, encode_texts, itm_rerank

    with torch.no_grad():
        text_embeds, text_feat = encode_texts(model, ids, mask)
        image_embeds, image_feat = encode_images(model, (images[i : i + 64] for i in range(0, len(images), 64)))
        return itm_rerank(model, image_feat @ text_feat.t(), image_embeds, text_embeds, mask, k)


def child(args) -> None:
    model, images, ids, mask = _setup(args, args.side)
    fn = _ours if args.side == "ours" else _official
    fn(model, images, ids, mask, args.k_test)  # warm-up
    t0 = time.perf_counter()
    fn(model, images, ids, mask, args.k_test)
    print("RESULT " + json.dumps({"side": args.side, "seconds": time.perf_counter() - t0}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--k-test", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--side", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.side:
        return child(args)

    import torch

    a, b = _official(*_setup(args, "official"), args.k_test), _ours(*_setup(args, "ours"), args.k_test)
    for x, y, name in zip(a, b, ("i2t", "t2i")):
        assert torch.allclose(x, y, atol=1e-4), f"score matrices differ ({name}): {(x - y).abs().max():.2e}"
    times = {"official": [], "ours": []}
    for _ in range(args.repeats):
        for side in ("official", "ours"):
            cmd = [
                sys.executable,
                __file__,
                "--side",
                side,
                "--preset",
                args.preset,
                "--images",
                str(args.images),
                "--k-test",
                str(args.k_test),
                "--threads",
                str(args.threads),
            ]
            out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
            line = next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))
            times[side].append(json.loads(line[7:])["seconds"])
    off, ours = statistics.median(times["official"]), statistics.median(times["ours"])
    print(
        f"retrieval evaluation, {args.preset}, {args.images} images x {args.images * 5} captions, k_test {args.k_test}, "
        f"{args.threads} threads"
    )
    print(
        f"  official per-query loops: {off:.3f} s   ours (batched): {ours:.3f} s   ratio ours/official = {ours / off:.2f}x"
    )


if __name__ == "__main__":
    main()
