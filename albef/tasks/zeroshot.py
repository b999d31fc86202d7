"""Zero-shot image classification with the contrastive (ITC) encoders, open_clip style: evaluation only.

    python -m finetune.zeroshot finetune/configs/zeroshot.yaml init.checkpoint=ALBEF.pth \
        data.test_file=test.json data.image_root=images/ "data.classes=[cat, dog]"

Each class name is put into every prompt template (``"a photo of a {}."``); the ITC text features of a class's
prompts are averaged and re-normalised into its classifier row, and an image's scores are its ITC image feature's
cosine similarities with the rows (no fusion encoder, no training). Data: ``[{"image": path under
data.image_root, "label": class name}]`` per split. ``data.classes`` fixes the class list and its order (a label
outside it is an error); empty, it is the sorted set of the split files' labels.

Metrics per split: ``top1`` and ``top5`` (%), ``mean_per_class`` (the mean of the per-class top-1 recalls),
``acc_<class>`` for each class with images, ``num_images`` and ``chance`` (100 / number of classes). Every rank
computes the whole split (the features of one split are a single forward over its images), and rank 0 writes
``zeroshot_<split>.json`` (metrics and each image's top-5 classes with their scores) into ``train.output_dir``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from albef.data.json_dataset import read_json_list
from albef.data.transforms import stack_images, to_device
from albef.engine import dist
from albef.engine.signals import until_stop
from albef.engine.task import RunConfig, Task
from albef.eval.retrieval import encode_images, encode_texts
from albef.tasks.retrieval import EvalImages
from albef.tokenizer import Tokenizer, pre_caption


@dataclass
class ZeroShotDataConfig:
    val_file: str = ""  # [{"image", "label"}]; "" = no such split
    test_file: str = ""
    image_root: str = ""
    image_res: int = 384
    classes: List[str] = field(default_factory=list)  # class names in order; [] = the sorted labels of the files
    templates: List[str] = field(default_factory=lambda: ["a photo of a {}."])  # each holds one "{}"
    max_words: int = 30
    max_text_len: int = 30
    num_workers: int = 4

    def __post_init__(self) -> None:
        for t in self.templates:
            if t.count("{}") != 1:
                raise ValueError(
                    f"data.templates={self.templates}: {t!r} must contain exactly one '{{}}' (where the "
                    "class name goes)"
                )
        if not self.templates:
            raise ValueError("data.templates=[]: give at least one prompt template such as 'a photo of a {}.'")
        if len(set(self.classes)) != len(self.classes):
            raise ValueError(f"data.classes={self.classes}: a class name is repeated")


@dataclass
class ZeroShotEvalConfig:
    image_batch_size: int = 64
    text_batch_size: int = 256


@dataclass
class ZeroShotConfig(RunConfig):
    data: ZeroShotDataConfig = field(default_factory=ZeroShotDataConfig)
    eval: ZeroShotEvalConfig = field(default_factory=ZeroShotEvalConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.train.evaluate_only:
            raise ValueError("train.evaluate_only=false: zero-shot classification has nothing to train; set it true")
        if not (self.data.val_file or self.data.test_file):
            raise ValueError("data.test_file='': empty, and so is data.val_file: nothing to classify")


class ZeroShotSet(EvalImages):
    """An evaluation file's images and labels (indices into ``classes``)."""

    def __init__(self, path: str, image_root: str, res: int, classes: List[str]):
        entries = read_json_list(path, ("image", "label"))
        super().__init__([e["image"] for e in entries], image_root, res)
        index = {c: i for i, c in enumerate(classes)}
        unknown = sorted({e["label"] for e in entries} - set(index))
        if unknown:
            raise ValueError(f"{path}: label(s) {unknown[:5]} are not in data.classes={classes}")
        self.labels = torch.tensor([index[e["label"]] for e in entries])


class ZeroShotTask(Task):
    name = "zeroshot"
    model_kind = "retrieval"  # the ITC encoders; pretraining and retrieval checkpoints both load
    config_cls = ZeroShotConfig
    eval_splits = ("val", "test")
    primary_metric = "top1"

    def __init__(self, cfg: ZeroShotConfig):
        super().__init__(cfg)
        d = cfg.data
        files = [getattr(d, f"{s}_file") for s in self.eval_splits]
        self.classes = list(d.classes) or sorted(
            {e["label"] for f in files for e in read_json_list(f, ("image", "label"))}
        )
        self._tokenizer = Tokenizer()

    def build_train_loader(self, tokenizer, rank, world_size, micro_batch_size, seed):
        raise ValueError("zero-shot classification has nothing to train: run it with train.evaluate_only=true")

    @torch.no_grad()
    def classifier(self, model, device: torch.device) -> torch.Tensor:
        """``(num_classes, embed_dim)``: each class's prompt features averaged over the templates, normalised."""
        d = self.cfg.data
        prompts = [pre_caption(t.format(c), d.max_words) for c in self.classes for t in d.templates]
        text = self._tokenizer(prompts, max_length=d.max_text_len)
        _, feats = encode_texts(
            model, text["input_ids"].to(device), text["attention_mask"].to(device), self.cfg.eval.text_batch_size
        )
        return F.normalize(feats.float().view(len(self.classes), len(d.templates), -1).mean(1), dim=-1)

    @torch.no_grad()
    def evaluate(self, model, split, device, dtype) -> Dict[str, float]:
        d = self.cfg.data
        ds = ZeroShotSet(getattr(d, f"{split}_file"), d.image_root, d.image_res, self.classes)
        loader = DataLoader(
            ds, batch_size=self.cfg.eval.image_batch_size, num_workers=d.num_workers, collate_fn=stack_images
        )
        _, image_feat = encode_images(model, (to_device(b, device, dtype) for b in until_stop(loader)))
        scores = (image_feat.float() @ self.classifier(model, device).t()).cpu()
        top = scores.topk(min(5, len(self.classes)), dim=1)
        hit1 = top.indices[:, 0] == ds.labels
        metrics = {
            "top1": 100.0 * hit1.float().mean().item(),
            "top5": 100.0 * (top.indices == ds.labels[:, None]).any(1).float().mean().item(),
            "num_images": float(len(ds)),
            "chance": 100.0 / len(self.classes),
        }
        per_class = {}
        for c, name in enumerate(self.classes):
            mine = ds.labels == c
            if mine.any():
                per_class[f"acc_{name}"] = 100.0 * hit1[mine].float().mean().item()
        metrics["mean_per_class"] = sum(per_class.values()) / max(1, len(per_class))
        metrics.update(per_class)
        self._write_results(split, ds, top, metrics)
        return metrics

    def _write_results(self, split: str, ds: ZeroShotSet, top, metrics: Dict[str, float]) -> None:
        if not dist.is_main():
            return
        rows = [
            {
                "image": image,
                "label": self.classes[int(label)],
                "top": [{"class": self.classes[j], "score": s} for j, s in zip(idx.tolist(), sc.tolist())],
            }
            for image, label, idx, sc in zip(ds.images, ds.labels, top.indices, top.values)
        ]
        out = Path(self.cfg.train.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"zeroshot_{split}.json").write_text(json.dumps({"metrics": metrics, "images": rows}, indent=1))
