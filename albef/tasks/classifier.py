"""Image(s) + sentence -> class: the task that SNLI-VE (``albef.tasks.ve``) and NLVR2 (``albef.tasks.nlvr``) share.

It owns the data loading (a file reader per task gives ``(image paths, sentence, class index)`` items), the training
step (the model's distilled cross-entropy), and evaluation: accuracy on ``val`` / ``test`` over the ranks' shares,
with the text-only prior of the train files (per sentence) and per gold label beside it. ``read_image`` is shared
with VQA. The train augmentation is ``data.augment`` (``albef.data.transforms.AugmentConfig``, official by default;
turn flip/crop off for data whose text speaks of left/right or counts, e.g. the demo world).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from albef.data.finetune import MapLoader
from albef.data.samples import BadSample
from albef.data.transforms import (
    AugmentConfig,
    ImageDecodeError,
    ImageTransform,
    stack_images,
    test_transform,
    to_device,
)
from albef.engine import dist
from albef.engine.signals import until_stop
from albef.engine.task import RunConfig, Task
from albef.eval.priors import TextPrior, compare_with_prior
from albef.tokenizer import Tokenizer


@dataclass
class ClassifierDataConfig:
    train_files: List[str] = field(default_factory=list)
    val_file: str = ""  # "" = no validation split (best = last)
    test_file: str = ""
    image_root: str = ""
    image_res: int = 384
    max_words: int = 30  # pre_caption word limit (the official code sets no token limit)
    num_workers: int = 4
    augment: AugmentConfig = field(default_factory=AugmentConfig)  # official fine-tuning: crop 0.5-1, flip, RandAugment


@dataclass
class ClassifierEvalConfig:
    batch_size: int = 64  # per rank


@dataclass
class ClassifierConfig(RunConfig):
    data: ClassifierDataConfig = field(default_factory=ClassifierDataConfig)
    eval: ClassifierEvalConfig = field(default_factory=ClassifierEvalConfig)


def read_image(path: str, transform: ImageTransform, rng) -> np.ndarray:
    """Decoded and transformed image; ``BadSample`` (missing / undecodable) naming the file."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise BadSample("missing_image", f"{path}: {e.strerror or e}") from None
    try:
        return transform(data, rng)
    except ImageDecodeError as e:
        raise BadSample("decode_error", f"{path}: {e}") from None


# ----------------------------------------------------------------------------------------------------------------


class ClassifierDataset(Dataset):
    """Entries ``(image paths, sentence, label)``; ``load(i, rng)`` for training, ``[i]`` for evaluation."""

    def __init__(self, items: List[tuple], transform: ImageTransform):
        self.items, self.transform = items, transform

    def __len__(self) -> int:
        return len(self.items)

    def load(self, index: int, rng) -> Dict:
        paths, sentence, label = self.items[index]
        return {"images": [read_image(p, self.transform, rng) for p in paths], "sentence": sentence, "label": label}

    def __getitem__(self, index: int) -> Dict:
        return self.load(index, None)  # the test transform draws nothing


class ClassifierTask(Task):
    """One or more images + a sentence -> a class, accuracy per split (NLVR2, SNLI-VE)."""

    config_cls = ClassifierConfig
    eval_splits = ("val", "test")
    primary_metric = "acc"
    # set by each task: (path, image_root, max_words) -> [(image paths, sentence, class index)], and the class
    # names by index (accuracy per gold label in evaluation)
    reader = None
    label_names: tuple = ()

    def __init__(self, cfg: ClassifierConfig):
        super().__init__(cfg)
        self._eval_sets: Dict[str, ClassifierDataset] = {}
        self._text_prior: Optional[TextPrior] = None
        self._tokenizer = Tokenizer()

    def _items(self, path: str) -> List[tuple]:
        return self.reader(path, self.cfg.data.image_root, self.cfg.data.max_words)

    def collate(self, tokenizer):
        def collate(samples: List[Dict]) -> Dict:
            pixels = stack_images([img for s in samples for img in s["images"]])  # (B * n, H, W, 3)
            text = tokenizer([s["sentence"] for s in samples], max_length=None)
            return {
                "images": pixels.view(len(samples), -1, *pixels.shape[1:]),
                **text,
                "label": torch.tensor([s["label"] for s in samples]),
            }

        return collate

    def build_train_loader(self, tokenizer, rank, world_size, micro_batch_size, seed):
        d = self.cfg.data
        items = [item for path in self.train_files() for item in self._items(path)]
        dataset = ClassifierDataset(items, d.augment.transform(d.image_res))
        return MapLoader(dataset, self.collate(tokenizer), micro_batch_size, rank, world_size, seed, d.num_workers)

    def training_step(self, model, batch, progress):
        out = model(
            list(batch["images"].unbind(1)),
            batch["input_ids"],
            batch["attention_mask"],
            batch["label"],
            alpha=progress.alpha,
        )
        acc = (out["logits"].argmax(1) == batch["label"]).float().mean()
        return out["loss"], {"acc": acc}

    def check_batch_geometry(self, model_cfg, global_micro_batch) -> None:
        """No queues in these models: any batch size works."""

    @torch.no_grad()
    def evaluate(self, model, split, device, dtype) -> Dict[str, float]:
        if split not in self._eval_sets:
            d = self.cfg.data
            self._eval_sets[split] = ClassifierDataset(
                self._items(getattr(d, f"{split}_file")), test_transform(d.image_res)
            )
        ds = self._eval_sets[split]
        subset = torch.utils.data.Subset(ds, dist.rank_share(len(ds)))
        loader = DataLoader(
            subset,
            batch_size=self.cfg.eval.batch_size,
            num_workers=self.cfg.data.num_workers,
            collate_fn=self.collate(self._tokenizer),
        )
        correct, predictions = 0, []
        for batch in until_stop(loader):
            images = list(to_device(batch["images"], device, dtype).unbind(1))
            logits = model.logits(images, batch["input_ids"].to(device), batch["attention_mask"].to(device))
            predicted = logits.argmax(1).cpu()
            correct += int((predicted == batch["label"]).sum())
            predictions += predicted.tolist()
        correct, total = dist.sum_over_ranks([correct, len(subset)], device)
        metrics = {"acc": 100.0 * correct / total}
        if self.cfg.data.train_files:  # the text-only prior (per sentence), overall and per gold label
            pairs = sorted(dist.gather_lists(list(zip(subset.indices, predictions))))
            items = [ds.items[i] for i, _ in pairs]
            labels = [label for _, _, label in items]
            metrics.update(
                compare_with_prior(
                    labels,
                    [sentence for _, sentence, _ in items],
                    [self.label_names[y] for y in labels],
                    [p for _, p in pairs],
                    self._prior(),
                )
            )
        return metrics

    def _prior(self) -> TextPrior:
        """Most frequent label of each train sentence (hypothesis, statement), else of the whole train set."""
        if self._text_prior is None:
            items = [item for path in self.cfg.data.train_files for item in self._items(path)]
            self._text_prior = TextPrior((sentence, "", {label: 1.0}) for _, sentence, label in items)
        return self._text_prior
