"""Weakly supervised visual grounding on RefCOCO+ (official ``Grounding.py``, ``configs/Grounding.yaml``).

    python -m finetune.grounding finetune/configs/grounding_refcoco+.yaml init.checkpoint=ALBEF.pth
    python -m finetune.grounding finetune/configs/grounding_refcoco+.yaml init.checkpoint=refcoco.pth \
        train.evaluate_only=true                          # evaluate a grounding checkpoint (val, testA, testB)
    python -m finetune.grounding ... eval.mode=itc eval.block_num=8   # Grad-CAM on ViT self-attention instead

Training is retrieval training (``RetrievalTask``: ITC with image-id positives through the queue, ITM with hard
negatives, both distilled from the momentum model) on (image, referring expression) pairs, with no boxes; the
image id is the image's file name, as official. The train transform defaults to the official grounding one
(``data.augment``): a plain ``Resize((res, res))`` (no crop, which could cut the referred object out), horizontal
flip and RandAugment; ``data.augment.flip=false`` for data whose expressions say "left"/"right" (the demo world).

Evaluation, per referring expression (``albef.eval.grounding``): Grad-CAM of the ITM match logit on the
cross-attention of fusion layer ``eval.block_num`` (``eval.mode=itm``, official; or of the ITC similarity on ViT
block ``eval.block_num`` with ``eval.mode=itc``), bicubic-upsampled to the original image size; every proposal box
is scored by heat mass / area**``eval.box_alpha`` (0.5) and the best one is correct when its IoU with the true box is
>= ``eval.iou_threshold`` (0.5). Metrics per evaluated file (``val``, ``test``), in percent: ``acc`` over all its
expressions and ``acc_<split>`` per split of the ground truth when the file mixes several (the official ``test``
file holds ``testA`` and ``testB``), plus two model-free baselines on the same proposals: ``baseline_centre`` (the
proposal nearest the image centre) and ``baseline_random`` (the expected accuracy of a uniformly random proposal).
The best ``val/acc`` selects the checkpoint (official ``val_d``).

Every evaluation also writes ``grounding_<split>.json`` (metrics and, per expression, the predicted and true boxes
and their IoU) and overlay PNGs of the first ``eval.num_examples`` expressions (heat map, predicted box in magenta,
true box in green) to ``<output_dir>/grounding_examples/<split>_eval<NN>/``; when a W&B run is active (rank 0) the
overlays are logged to it as ``<split>/examples``.

Data, as the official files (``data.image_root`` is prefixed to every image path):

* ``data.train_files``: ``[{"image", "text"}]`` (other keys, such as ``ref_id``, are ignored);
* ``data.val_file`` / ``data.test_file``: ``[{"image", "text", "ref_id"}]``;
* ``data.refs_file``, the ground truth: either a JSON file ``{str(ref_id): {"image_id", "bbox": [x, y, w, h],
  "split", "height", "width"}}`` (``split``, ``height`` and ``width`` optional: the evaluated file's name and the
  image file's size are used instead), or the REFER API's dataset folder (``refer/data/refcoco+``, holding
  ``refs(unc).p`` and ``instances.json``), read directly;
* ``data.dets_file``: proposals ``{str(image_id): [[x, y, w, h, ...], ...]}`` (official ``dets.json``, MAttNet
  Mask R-CNN detections). Left empty, the proposals of an image are the true boxes of all its referring
  expressions in ``refs_file`` (a perfect detector restricted to the referred objects): useful for data without
  a detector file, but not comparable with published numbers.

``python -m albef.data.grounding --refer-dir refer/data/refcoco+ --out refs.json`` writes the REFER ground truth
as the JSON layout above once, so later runs need neither the pickle nor ``instances.json``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from torch.utils.data import DataLoader, Subset

from albef.data.grounding import GroundingEvalSet, load_proposals, load_refs
from albef.data.json_dataset import read_json_list
from albef.data.transforms import (
    AugmentConfig,
    ImageTransform,
    stack_images,
    to_device,
)
from albef.engine import dist
from albef.engine.signals import until_stop
from albef.engine.task import RunConfig
from albef.eval.grounding import (
    GRADCAM_MODES,
    box_iou,
    centre_choice,
    check_block,
    gradcam,
    ground,
    grounding_metrics,
    random_choice_accuracy,
)
from albef.tasks.retrieval import RetrievalDataConfig, RetrievalTask, RetrievalTrainSet
from albef.viz import save_grounding_overlay


@dataclass
class GroundingDataConfig(RetrievalDataConfig):
    """Train ``[{"image", "text"}]``; val/test ``[{"image", "text", "ref_id"}]``; ground truth and proposals."""

    # official grounding training transform: Resize((res, res)) (no crop), flip, RandAugment; flip=false for data
    # whose expressions say "left"/"right"
    augment: AugmentConfig = field(default_factory=lambda: AugmentConfig(crop_scale=[]))
    refs_file: str = ""  # ground truth per ref_id: a JSON file or the REFER dataset folder (see module docstring)
    dets_file: str = ""  # proposals per image id (official dets.json); "" = the true boxes of the image's refs


@dataclass
class GroundingEvalConfig:
    mode: str = "itm"  # Grad-CAM target: "itm" (fusion cross-attention, official) or "itc" (ViT self-attention)
    block_num: int = 8  # itm: a fusion layer index (official 8, the 9th BERT layer); itc: a ViT block index
    batch_size: int = 32  # (image, expression) pairs per Grad-CAM forward/backward
    box_alpha: float = 0.5  # proposal score = heat mass / area**box_alpha (official 0.5)
    iou_threshold: float = 0.5  # a prediction is correct at IoU >= this
    num_examples: int = 8  # overlay PNGs written (and logged to W&B) per evaluation and split

    def __post_init__(self) -> None:
        if self.mode not in GRADCAM_MODES:
            raise ValueError(f"eval.mode={self.mode!r}: expected one of {GRADCAM_MODES}")
        if self.batch_size < 1 or self.num_examples < 0:
            raise ValueError(
                f"eval.batch_size={self.batch_size} must be >= 1, eval.num_examples={self.num_examples} >= 0"
            )
        if not 0.0 < self.iou_threshold <= 1.0:
            raise ValueError(f"eval.iou_threshold={self.iou_threshold}: expected a value in (0, 1]")


@dataclass
class GroundingConfig(RunConfig):
    data: GroundingDataConfig = field(default_factory=GroundingDataConfig)
    eval: GroundingEvalConfig = field(default_factory=GroundingEvalConfig)


# ------------------------------------------------------------------------------------------------ annotations
class GroundingTrainSet(RetrievalTrainSet):
    """Official grounding train files as retrieval pairs: caption = expression, image id = the image's file name
    (``image.split('/')[-1]``, as official). Loading and the image-id positives are ``RetrievalTrainSet``'s."""

    def __init__(self, files: List[str], image_root: str, transform: ImageTransform, max_words: int):
        self.entries, ids = [], {}
        for path in files:
            for e in read_json_list(path, ("image", "text")):
                idx = ids.setdefault(e["image"].split("/")[-1], len(ids))
                self.entries.append((os.path.join(image_root, e["image"]), e["text"], idx))
        self.transform, self.max_words = transform, max_words


def _collate(batch):
    return stack_images([b[0] for b in batch]), [b[1] for b in batch]


# ------------------------------------------------------------------------------------------------------- task
class GroundingTask(RetrievalTask):
    name = "grounding"
    config_cls = GroundingConfig
    primary_metric = "acc"

    def __init__(self, cfg: GroundingConfig):
        super().__init__(cfg)
        try:
            check_block(cfg.model, cfg.eval.mode, cfg.eval.block_num)
        except ValueError as e:
            raise ValueError(f"eval.block_num / eval.mode: {e}") from None
        if self.eval_splits and not cfg.data.refs_file:
            raise ValueError("data.refs_file is empty: evaluating data.val_file/test_file needs the true boxes")
        self._refs: Optional[Dict] = None
        self._proposals: Optional[Dict] = None
        self._eval_round: Dict[str, int] = {}

    def build_train_set(self) -> GroundingTrainSet:
        d = self.cfg.data
        return GroundingTrainSet(d.train_files, d.image_root, d.augment.transform(d.image_res), d.max_words)

    def _eval_data(self, split: str) -> GroundingEvalSet:
        if split not in self._eval_cache:
            d = self.cfg.data
            if self._refs is None:
                self._refs = load_refs(d.refs_file)
                self._proposals = load_proposals(d.dets_file, self._refs)
            self._eval_cache[split] = GroundingEvalSet(
                getattr(d, f"{split}_file"),
                split,
                d.image_root,
                d.image_res,
                d.max_words,
                self._refs,
                self._proposals,
                d.refs_file,
                d.dets_file,
            )
        return self._eval_cache[split]

    def evaluate(self, model, split, device, dtype) -> Dict[str, float]:
        ds, e = self._eval_data(split), self.cfg.eval
        rank = dist.rank_and_world()[0]
        mine = dist.rank_share(len(ds))
        loader = DataLoader(
            Subset(ds, mine), batch_size=e.batch_size, num_workers=self.cfg.data.num_workers, collate_fn=_collate
        )
        max_len = self.cfg.model.text.max_position_embeddings  # official: no length limit at evaluation
        rows, examples = [], []
        for images, indices in until_stop(loader):
            text = self._tokenizer([ds.items[i].text for i in indices], max_length=max_len)
            cams = gradcam(
                model,
                to_device(images, device, dtype),
                text["input_ids"].to(device),
                text["attention_mask"].to(device),
                e.mode,
                e.block_num,
            )
            for cam, i in zip(cams, indices):
                item = ds.items[i]
                thr = e.iou_threshold
                res = ground(cam, item.height, item.width, item.proposals, item.bbox, e.box_alpha, thr)
                centre = item.proposals[centre_choice(item.proposals, item.width, item.height)]
                rows.append(
                    {
                        "index": i,
                        "ref_id": item.ref_id,
                        "split": item.split,
                        "text": item.text,
                        "image": item.image,
                        "pred_box": res["pred_box"],
                        "gt_box": item.bbox,
                        "iou": res["iou"],
                        "correct": res["correct"],
                        "centre_correct": box_iou(centre, item.bbox) >= thr,
                        "random_correct": random_choice_accuracy(item.proposals, item.bbox, thr),
                    }
                )
                if rank == 0 and len(examples) < e.num_examples:
                    examples.append((rows[-1], cam.detach().float().cpu()))
        rows = sorted(dist.gather_lists(rows), key=lambda r: r["index"])  # every rank's share, in file order
        metrics = grounding_metrics(rows, split)
        if rank == 0:
            self._write_outputs(split, rows, metrics, examples)
        return metrics

    def _write_outputs(self, split: str, rows: List[Dict], metrics: Dict[str, float], examples) -> None:
        out = Path(self.cfg.train.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"grounding_{split}.json").write_text(json.dumps({"metrics": metrics, "results": rows}, indent=1))
        if not examples:
            return
        n = self._eval_round[split] = self._eval_round.get(split, 0) + 1
        folder = out / "grounding_examples" / f"{split}_eval{n:02d}"
        paths, captions = [], []
        for k, (row, cam) in enumerate(examples):
            path = folder / f"{k:02d}_ref{row['ref_id']}.png"
            caption = f"{row['text']} | IoU {row['iou']:.2f} {'ok' if row['correct'] else 'miss'}"
            save_grounding_overlay(path, row["image"], cam, row["pred_box"], row["gt_box"], caption)
            paths.append(path)
            captions.append(caption)
        wandb = self.wandb_module()
        if wandb is not None:  # logged in the evaluation's metrics row
            self.media[f"{split}/examples"] = [wandb.Image(str(p), caption=c) for p, c in zip(paths, captions)]
