"""NLVR2: text-assignment (TA) pretraining and fine-tuning of the two-image model (paper §4.3; official
``Pretrain_nlvr.py`` + ``configs/NLVR_pretrain.yaml``, ``NLVR.py`` + ``configs/NLVR.yaml``).

    python -m finetune.nlvr2_ta finetune/configs/nlvr2_ta.yaml init.checkpoint=ALBEF_4M.pth  # runs/nlvr2_ta/final.pth
    python -m finetune.nlvr2 finetune/configs/nlvr2.yaml init.checkpoint=runs/nlvr2_ta/final.pth
    python -m finetune.nlvr2 finetune/configs/nlvr2.yaml init.checkpoint=nlvr.pth train.evaluate_only=true

The model (``ALBEFNLVR``) doubles the fusion layers: for the base model 6 text layers, then 12 fusion layers that
attend image 0 and image 1 alternately, each pair sharing its cross-attention key/value. ``albef.models.convert`` maps
a pretraining checkpoint onto it (fusion layer k -> layers 2(k-6)+6 and 2(k-6)+7); a TA or fine-tuned checkpoint
loads as it is.

* **TA pretraining** (``NLVRPretrainTask``, model ``ALBEFNLVRPretrain``): image-caption data exactly as pretraining
  (the ``data:`` section of the pretraining YAML: shards or official JSON files), one epoch. Each caption is shown
  with its image and a hard negative, or two hard negatives; the 3-way ``ta_head`` says which image it describes.
* **Fine-tuning** (``NLVRTask``): official JSON ``[{"images": [left, right], "sentence", "label": "True"|"False"}]``
  under ``data.image_root``; ``cls_head`` on [CLS], cross-entropy distilled from the momentum model; accuracy (%) on
  ``val`` (the official dev file) and ``test``, the best ``val`` accuracy selects the checkpoint.

Deliberate difference from ``NLVR.py``: the official script copies the online weights into the momentum model
*before* loading the TA checkpoint (which has no momentum weights), so its momentum model starts from the BERT /
random weights; here a checkpoint without momentum weights initialises them from the loaded online weights.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import List

from albef.data import DataConfig, build_pretrain_loader
from albef.data.json_dataset import read_json_list
from albef.engine.task import RunConfig, Task
from albef.tasks.classifier import ClassifierTask
from albef.tokenizer import pre_caption


def read_nlvr(path: str, image_root: str, max_words: int) -> List[tuple]:
    """Official NLVR2 file -> ``[([left path, right path], sentence, label)]`` with True -> 1, False -> 0."""
    items = []
    for i, e in enumerate(read_json_list(path, ("images", "sentence", "label"))):
        if not (isinstance(e["images"], list) and len(e["images"]) == 2):
            raise ValueError(f"{path}[{i}]: 'images' must list two image paths, got {e['images']!r}")
        if e["label"] not in ("True", "False"):
            raise ValueError(f"{path}[{i}]: label={e['label']!r}, expected 'True' or 'False'")
        paths = [os.path.join(image_root, p) for p in e["images"]]
        items.append((paths, pre_caption(e["sentence"], max_words), int(e["label"] == "True")))
    return items


class NLVRTask(ClassifierTask):
    name = "nlvr2"
    model_kind = "nlvr2"
    reader = staticmethod(read_nlvr)
    label_names = ("false", "true")


@dataclass
class NLVRPretrainConfig(RunConfig):
    """The TA pretraining YAML: the pretraining data section, no evaluation."""

    data: DataConfig = field(default_factory=DataConfig)


class NLVRPretrainTask(Task):
    name = "nlvr2_ta"
    model_kind = "nlvr2_ta"
    config_cls = NLVRPretrainConfig

    def build_train_loader(self, tokenizer, rank, world_size, micro_batch_size, seed):
        data = dataclasses.replace(self.cfg.data, batch_size=micro_batch_size)
        return build_pretrain_loader(data, tokenizer, rank=rank, world_size=world_size, seed=seed)

    def training_step(self, model, batch, progress):
        out = model(batch["image"], batch["input_ids"], batch["attention_mask"])
        return out["loss_ta"], {"acc_ta": out["acc_ta"]}

    def check_batch_geometry(self, model_cfg, global_micro_batch) -> None:
        micro = self.cfg.train.micro_batch_size
        if micro < 3:
            raise ValueError(
                f"train.micro_batch_size={micro}: text assignment draws two hard-negative images per "
                "caption from the same micro batch, which needs at least 3 images"
            )
