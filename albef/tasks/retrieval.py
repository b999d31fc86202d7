"""Image-text retrieval fine-tuning and evaluation (COCO, Flickr30K; official ``Retrieval.py``).

    python -m finetune.retrieval finetune/configs/retrieval_coco.yaml init.checkpoint=ALBEF_4M.pth
    python -m finetune.retrieval finetune/configs/retrieval_flickr.yaml init.checkpoint=mscoco.pth \
        train.evaluate_only=true        # zero-shot Flickr, as the paper (COCO-fine-tuned model)

Training: ITC whose positives are all captions of the same image (``idx``), in the batch and in the momentum
queue (``idx_queue``), distilled from the momentum model, plus ITM with hard negatives that never share the image.
Evaluation: ITC top-``k_test`` re-ranked by the ITM logit (``albef.eval.retrieval``), TR/IR R@1/5/10 and their
mean; the best ``val`` ``r_mean`` selects the checkpoint. Each evaluation also writes a result JSON with the top
retrieved items of every query and, when W&B is on, two tables (``{split}/text_retrieval``,
``{split}/image_retrieval``) of the first queries with thumbnails, ranked results and scores.

Data, as the official files: train ``[{"image": rel_path, "caption": str, "image_id": any}]`` (one entry per
caption), val/test ``[{"image": rel_path, "caption": [str, ...]}]``, with ``data.image_root`` prefixed.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List

import torch
from PIL import Image
from torch.utils.data import DataLoader

from albef.data.finetune import MapLoader
from albef.data.json_dataset import read_json_list
from albef.data.samples import BadSample, make_sample
from albef.data.transforms import AugmentConfig, stack_images, test_transform, to_device
from albef.engine import dist
from albef.engine.signals import until_stop
from albef.engine.task import ITC_ITM_WARMUPS, RunConfig, Task
from albef.eval.retrieval import (
    encode_images,
    encode_texts,
    ground_truth,
    itm_match_accuracy,
    itm_rerank,
    recall_metrics,
)
from albef.tokenizer import Tokenizer, pre_caption


@dataclass
class RetrievalDataConfig:
    train_files: List[str] = field(default_factory=list)  # [{"image", "caption", "image_id"}]
    val_file: str = ""  # [{"image", "caption": [...]}]; "" = no validation (best = last)
    test_file: str = ""
    image_root: str = ""
    image_res: int = 384
    max_words: int = 30
    max_text_len: int = 30
    num_workers: int = 4
    augment: AugmentConfig = field(default_factory=AugmentConfig)  # official fine-tuning: crop 0.5-1, flip, RandAugment


@dataclass
class RetrievalEvalConfig:
    k_test: int = 256  # candidates re-ranked by ITM per query (official: COCO 256, Flickr 128)
    image_batch_size: int = 64
    text_batch_size: int = 256
    pair_batch_size: int = 256  # (query, candidate) pairs per fusion forward in re-ranking (bench/retrieval_eval.py)
    top_n_results: int = 5  # retrieved items per query written to the result JSON
    wandb_queries: int = 16  # queries per direction shown in the W&B tables with thumbnails (0: no tables)
    thumbnail_px: int = 96  # longest side of the thumbnails in the W&B tables


@dataclass
class RetrievalConfig(RunConfig):
    data: RetrievalDataConfig = field(default_factory=RetrievalDataConfig)
    eval: RetrievalEvalConfig = field(default_factory=RetrievalEvalConfig)


class RetrievalTrainSet:
    """Official retrieval train files; ``image_id`` values become contiguous indices in order of appearance."""

    def __init__(self, files: List[str], image_root: str, transform, max_words: int):
        self.entries, ids = [], {}
        for path in files:
            for e in read_json_list(path, ("image", "caption", "image_id")):
                idx = ids.setdefault(str(e["image_id"]), len(ids))
                self.entries.append((os.path.join(image_root, e["image"]), e["caption"], idx))
        self.transform, self.max_words = transform, max_words

    def __len__(self) -> int:
        return len(self.entries)

    def load(self, index: int, rng) -> Dict:
        path, caption, idx = self.entries[index]
        try:
            data = Path(path).read_bytes()
        except OSError as e:
            raise BadSample("missing_image", f"{path}: {e.strerror or e}") from None
        sample = make_sample(data, [caption], path, self.transform, rng, self.max_words)
        sample["idx"] = idx
        return sample


class EvalImages:
    """The images of an evaluation file (paths under ``image_root``), decoded with the test transform in order."""

    def __init__(self, images: List[str], image_root: str, res: int):
        self.images = [os.path.join(image_root, image) for image in images]
        self.transform = test_transform(res)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        try:
            return self.transform(Path(self.images[i]).read_bytes(), None)
        except OSError as e:
            raise FileNotFoundError(f"evaluation image {self.images[i]}: {e.strerror or e}") from None


class RetrievalEvalSet(EvalImages):
    """Official val/test file: images with their caption lists; captions numbered in file order."""

    def __init__(self, path: str, image_root: str, res: int, max_words: int):
        entries = read_json_list(path, ("image", "caption"))
        super().__init__([e["image"] for e in entries], image_root, res)
        caps = [e["caption"] if isinstance(e["caption"], list) else [e["caption"]] for e in entries]
        self.texts = [pre_caption(c, max_words) for cs in caps for c in cs]
        self.img2txt, self.txt2img = ground_truth([len(cs) for cs in caps])


class RetrievalTask(Task):
    name = "retrieval"
    model_kind = "retrieval"
    train_warmups = ITC_ITM_WARMUPS
    config_cls = RetrievalConfig
    eval_splits = ("val", "test")
    primary_metric = "r_mean"

    def __init__(self, cfg: RetrievalConfig):
        super().__init__(cfg)
        self._eval_cache: Dict[str, tuple] = {}
        self._tokenizer = Tokenizer()

    def build_train_set(self) -> RetrievalTrainSet:
        """The training pairs (grounding overrides this to read referring expressions)."""
        d = self.cfg.data
        return RetrievalTrainSet(d.train_files, d.image_root, d.augment.transform(d.image_res), d.max_words)

    def build_train_loader(self, tokenizer, rank, world_size, micro_batch_size, seed):
        d = self.cfg.data
        self.train_files()
        dataset = self.build_train_set()

        def collate(samples):
            text = tokenizer([s["caption"] for s in samples], max_length=d.max_text_len)
            return {
                "image": stack_images([s["image"] for s in samples]),
                **text,
                "idx": torch.tensor([s["idx"] for s in samples]),
                "key": [s["key"] for s in samples],
            }

        return MapLoader(dataset, collate, micro_batch_size, rank, world_size, seed, d.num_workers)

    def training_step(self, model, batch, progress):
        out = model(
            batch["image"],
            batch["input_ids"],
            batch["attention_mask"],
            idx=batch["idx"],
            alpha=progress.alpha,
            hard_negatives=progress.hard_negatives,
            use_queue=progress.use_queue,
            momentum=progress.momentum,
        )
        return out["loss_ita"] + out["loss_itm"], {k: v.detach() for k, v in out.items()}

    def _eval_data(self, split: str):
        if split not in self._eval_cache:
            d = self.cfg.data
            ds = RetrievalEvalSet(getattr(d, f"{split}_file"), d.image_root, d.image_res, d.max_words)
            text = self._tokenizer(ds.texts, max_length=d.max_text_len, padding="max_length")
            self._eval_cache[split] = (ds, text)
        return self._eval_cache[split]

    @torch.no_grad()
    def evaluate(self, model, split, device, dtype) -> Dict[str, float]:
        ds, text = self._eval_data(split)
        e = self.cfg.eval
        ids, mask = text["input_ids"].to(device), text["attention_mask"].to(device)
        loader = DataLoader(
            ds, batch_size=e.image_batch_size, num_workers=self.cfg.data.num_workers, collate_fn=stack_images
        )
        image_embeds, image_feat = encode_images(model, (to_device(b, device, dtype) for b in until_stop(loader)))
        text_embeds, text_feat = encode_texts(model, ids, mask, e.text_batch_size)
        sims = image_feat.float() @ text_feat.float().t()
        score_i2t, score_t2i = itm_rerank(model, sims, image_embeds, text_embeds, mask, e.k_test, e.pair_batch_size)
        metrics = recall_metrics(score_i2t.cpu().numpy(), score_t2i.cpu().numpy(), ds.img2txt, ds.txt2img)
        # the contrastive similarities alone: ITM re-ranking should beat them (the fusion encoder uses the image)
        itc = recall_metrics(sims.cpu().numpy(), sims.t().cpu().numpy(), ds.img2txt, ds.txt2img)
        metrics.update({f"itc_{k}": itc[k] for k in ("txt_r1", "img_r1", "r_mean")})
        metrics["itm_match_acc"] = itm_match_accuracy(
            model, image_embeds, text_embeds, mask, ds.img2txt, e.pair_batch_size
        )
        self._write_results(split, ds, score_i2t, score_t2i, metrics)
        return metrics

    def _write_results(self, split, ds, score_i2t, score_t2i, metrics) -> None:
        if not dist.is_main():
            return
        n = self.cfg.eval.top_n_results
        i2t = score_i2t.topk(min(n, score_i2t.shape[1]), dim=1)
        t2i = score_t2i.topk(min(n, score_t2i.shape[1]), dim=1)
        result = {
            "metrics": metrics,
            "text_retrieval": [
                {
                    "image": ds.images[i],
                    "gt": ds.img2txt[i],
                    "top": [
                        {"caption": ds.texts[j], "index": j, "score": s} for j, s in zip(idx.tolist(), sc.tolist())
                    ],
                }
                for i, (idx, sc) in enumerate(zip(i2t.indices, i2t.values))
            ],
            "image_retrieval": [
                {
                    "caption": ds.texts[t],
                    "gt": ds.txt2img[t],
                    "top": [{"image": ds.images[j], "index": j, "score": s} for j, s in zip(idx.tolist(), sc.tolist())],
                }
                for t, (idx, sc) in enumerate(zip(t2i.indices, t2i.values))
            ],
        }
        out = Path(self.cfg.train.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"retrieval_{split}.json").write_text(json.dumps(result, indent=1))
        wandb = self.wandb_module()
        if wandb is not None and self.cfg.eval.wandb_queries > 0:
            self.media.update(self._wandb_tables(wandb, split, ds, result))  # logged in the evaluation's metrics row

    def _wandb_tables(self, wandb, split: str, ds: "RetrievalEvalSet", result: Dict) -> Dict:
        """The first ``eval.wandb_queries`` queries of each direction as W&B tables: thumbnails of the query or
        retrieved images, the ranked captions with their scores, and whether rank 1 is correct."""
        n, px = self.cfg.eval.wandb_queries, self.cfg.eval.thumbnail_px
        thumbs: Dict[str, object] = {}

        def thumb(path: str):
            if path not in thumbs:
                with Image.open(path) as im:
                    im = im.convert("RGB")
                    im.thumbnail((px, px))
                    thumbs[path] = wandb.Image(im, caption=os.path.basename(path))
            return thumbs[path]

        k = self.cfg.eval.top_n_results
        tr = wandb.Table(columns=["image", "ground truth captions", "retrieved captions (score)", "r1_correct"])
        for q in result["text_retrieval"][:n]:
            top = q["top"]
            tr.add_data(
                thumb(q["image"]),
                "\n".join(ds.texts[j] for j in q["gt"]),
                "\n".join(f"{t['score']:.3f}  {t['caption']}" for t in top),
                bool(top) and top[0]["index"] in q["gt"],
            )
        ir = wandb.Table(
            columns=["caption", "ground truth image"] + [f"rank {r + 1}" for r in range(k)] + ["scores", "r1_correct"]
        )
        for q in result["image_retrieval"][:n]:
            top = q["top"] + [None] * (k - len(q["top"]))
            ir.add_data(
                q["caption"],
                thumb(ds.images[q["gt"]]),
                *[thumb(t["image"]) if t else None for t in top],
                " ".join(f"{t['score']:.3f}" for t in q["top"]),
                bool(q["top"]) and q["top"][0]["index"] == q["gt"],
            )
        return {f"{split}/text_retrieval": tr, f"{split}/image_retrieval": ir}
