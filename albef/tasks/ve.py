"""SNLI-VE fine-tuning and evaluation (official ``VE.py``, ``configs/VE.yaml``) on the classification task shared
with NLVR2 (``albef.tasks.classifier``).

    python -m finetune.ve finetune/configs/snli_ve.yaml init.checkpoint=ALBEF_4M.pth
    python -m finetune.ve finetune/configs/snli_ve.yaml init.checkpoint=ve.pth train.evaluate_only=true

Data, as the official files: ``[{"image": flickr30k id (".jpg" is appended), "sentence", "label"}]`` with labels
entailment (2), neutral (1), contradiction (0), images under ``data.image_root``. Training: the fusion encoder's
[CLS] -> ``cls_head`` (3 classes), cross-entropy distilled from the momentum model (``ALBEFVE``). The official
config has no alpha warm-up (``warm_up: False``), hence ``train.alpha_warmup_epochs: 0``. Evaluation: accuracy (%)
on ``val`` and ``test``; the best ``val`` accuracy selects the checkpoint.
"""

from __future__ import annotations

import os
from typing import List

from albef.data.json_dataset import read_json_list
from albef.tasks.classifier import ClassifierTask
from albef.tokenizer import pre_caption


def read_ve(path: str, image_root: str, max_words: int) -> List[tuple]:
    """Official SNLI-VE file -> ``[([image path], sentence, label)]``."""
    labels = {"entailment": 2, "neutral": 1, "contradiction": 0}
    items = []
    for i, e in enumerate(read_json_list(path, ("image", "sentence", "label"))):
        if e["label"] not in labels:
            raise ValueError(f"{path}[{i}]: label={e['label']!r}, expected one of {sorted(labels)}")
        items.append(
            ([os.path.join(image_root, f"{e['image']}.jpg")], pre_caption(e["sentence"], max_words), labels[e["label"]])
        )
    return items


class VETask(ClassifierTask):
    name = "snli_ve"
    model_kind = "snli_ve"
    reader = staticmethod(read_ve)
    label_names = ("contradiction", "neutral", "entailment")  # by class index
