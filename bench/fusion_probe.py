"""Does the fusion encoder learn to use the image? A small in-process probe on the demo world (issue 16).

    python bench/fusion_probe.py --losses itc,itm,mlm --negatives hard --steps 800
    python bench/fusion_probe.py --losses itc,itm,mlm --negatives random-then-hard --random-steps 300

Trains the DEMO model from random weights on the generated world (48 px, batch 64, AdamW at a constant lr) with
any subset of the pretraining losses (ITC without queue or distillation, ITM, MLM) and a choice of ITM negatives,
and every 100 steps prints the training losses and, on held-out images:

* ``itc_r1``: text retrieval R@1 from the contrastive similarities alone;
* ``itm_r1``: the same after re-ranking ITC's top 8 captions by the ITM head (the official retrieval protocol);
* ``vs_random``: how often ITM scores an image's own caption above another image's caption (50% = image-blind);
* ``vs_hard``: the same against the most ITC-similar other caption.

The measurements in README ("Does the fusion encoder use the image?") come from this script. It is a diagnostic,
not the training engine: no DeepSpeed, no momentum model, one process.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from albef.data import normalize_images  # noqa: E402
from albef.models import build_model  # noqa: E402
from albef.models.albef import hard_negative_weights, mask_tokens, sample_hard_negatives  # noqa: E402
from albef.tokenizer import Tokenizer, pre_caption  # noqa: E402


def load_world(root: Path, num_train: int, num_val: int):
    if not (root / "world.json").is_file():
        from albef.demo.world import generate_world

        generate_world(root, seed=0, num_train=num_train, num_val=num_val, num_test=2, image_size=48)
    train = json.loads((root / "pretrain.json").read_text())
    val = json.loads((root / "retrieval_val.json").read_text())

    def pixels(paths):
        return torch.from_numpy(np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths]))

    return (
        pixels([e["image"] for e in train]),
        [[pre_caption(c) for c in e["caption"]] for e in train],
        pixels([root / "images" / e["image"] for e in val]),
        [pre_caption(e["caption"][0]) for e in val],
    )


@torch.no_grad()
def held_out(model, tok, images, captions, k: int = 8) -> dict:
    model.eval()
    n = len(captions)
    image_embeds = model.encode_image(normalize_images(images))
    t = tok(captions, max_length=30)
    ids, mask = t["input_ids"], t["attention_mask"]
    text_embeds = model.encode_text(ids, mask)
    sim = model.image_feat(image_embeds) @ model.text_feat(text_embeds).t()

    def match(texts):
        return model.itm_logits(text_embeds[texts], mask[texts], image_embeds).softmax(-1)[:, 1]

    own = match(torch.arange(n))
    other = sim.clone().fill_diagonal_(-1e4)
    top = sim.topk(k, dim=1).indices
    rerank = 0
    for i in range(n):
        scores = model.itm_logits(text_embeds[top[i]], mask[top[i]], image_embeds[i : i + 1].expand(k, -1, -1))
        rerank += int(top[i][scores.softmax(-1)[:, 1].argmax()] == i)
    model.train()
    return {
        "itc_r1": 100.0 * float((sim.argmax(1) == torch.arange(n)).float().mean()),
        "itm_r1": 100.0 * rerank / n,
        "vs_random": 100.0 * float((own > match(torch.arange(n).roll(1))).float().mean()),
        "vs_hard": 100.0 * float((own > match(other.argmax(1))).float().mean()),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--losses", default="itc,itm,mlm", help="comma list of itc, itm, mlm")
    p.add_argument("--negatives", choices=("hard", "random", "random-then-hard"), default="hard")
    p.add_argument("--random-steps", type=int, default=300, help="with random-then-hard")
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--world", type=Path, default=Path("runs/fusion_probe_world"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--mlm-weight", type=float, default=1.0, help="weight of the MLM loss in the sum (at step 0)")
    p.add_argument(
        "--mlm-ramp-steps",
        type=int,
        default=0,
        help="the MLM weight rises linearly from --mlm-weight to 1 over this many steps",
    )
    p.add_argument(
        "--captions",
        choices=("all", "full"),
        default="all",
        help="train on all five captions of an image, or only its full description (the first)",
    )
    a = p.parse_args()
    losses = set(a.losses.split(","))
    if not losses or losses - {"itc", "itm", "mlm"}:
        p.error(f"--losses={a.losses!r}: a comma list of itc, itm, mlm")
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    rng = random.Random(0)
    images, captions, val_images, val_captions = load_world(a.world, 3000, 200)
    if a.captions == "full":
        captions = [c[:1] for c in captions]
    tok = Tokenizer()
    model = build_model("demo", "pretrain")
    model.train()
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=a.lr, weight_decay=0.02)
    B, history, t0 = a.batch, [], time.time()
    for step in range(1, a.steps + 1):
        idx = torch.randint(0, len(captions), (B,))
        t = tok([rng.choice(captions[i]) for i in idx.tolist()], max_length=30)
        ids, mask = t["input_ids"], t["attention_mask"]
        image_embeds = model.encode_image(normalize_images(images[idx]))
        text_embeds = model.encode_text(ids, mask)
        sim = model.image_feat(image_embeds) @ model.text_feat(text_embeds).t() / model.temp
        loss, logs = 0.0, {}
        if "itc" in losses:
            target = torch.arange(B)
            logs["itc"] = (F.cross_entropy(sim, target) + F.cross_entropy(sim.t(), target)) / 2
        if "itm" in losses:
            hard = a.negatives == "hard" or (a.negatives == "random-then-hard" and step > a.random_steps)
            with torch.no_grad():
                neg_image, neg_text = sample_hard_negatives(
                    hard_negative_weights(sim.t(), B, hard=hard), hard_negative_weights(sim, B, hard=hard)
                )
            logits = model.itm_logits(
                torch.cat([text_embeds, text_embeds, text_embeds[neg_text]]),
                torch.cat([mask, mask, mask[neg_text]]),
                torch.cat([image_embeds, image_embeds[neg_image], image_embeds]),
            )
            logs["itm"] = F.cross_entropy(logits, torch.cat([torch.ones(B), torch.zeros(2 * B)]).long())
        if "mlm" in losses:
            masked, labels = mask_tokens(ids, model.cfg.text.vocab_size, 0.15)
            chosen = labels != -100
            hidden = model.mlm_hidden(masked, mask, image_embeds)
            logs["mlm"] = F.cross_entropy(model.mlm_head(hidden[chosen]), labels[chosen])
        w = min(1.0, a.mlm_weight + (1 - a.mlm_weight) * step / a.mlm_ramp_steps) if a.mlm_ramp_steps else a.mlm_weight
        loss = sum(w * v if k == "mlm" else v for k, v in logs.items())
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append({k: float(v.detach()) for k, v in logs.items()})
        if step % 100 == 0 or step == a.steps:
            recent = history[-100:]
            train = " ".join(f"{k} {sum(h[k] for h in recent) / len(recent):.3f}" for k in sorted(recent[-1]))
            ev = held_out(model, tok, val_images, val_captions)
            print(
                f"step {step:4d} ({time.time() - t0:.0f}s) train {train} | held-out "
                + " ".join(f"{k} {v:.1f}" for k, v in ev.items()),
                flush=True,
            )


if __name__ == "__main__":
    main()
