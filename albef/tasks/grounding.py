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

``python -m albef.tasks.grounding --refer-dir refer/data/refcoco+ --out refs.json`` writes the REFER ground truth
as the JSON layout above once, so later runs need neither the pickle nor ``instances.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import torch
from PIL import Image
from torch.utils.data import DataLoader, Subset

from albef.data.json_dataset import read_json_list
from albef.data.transforms import (
    AugmentConfig,
    ImageTransform,
    read_image_header,
    stack_images,
    test_transform,
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
    random_choice_accuracy,
    upsample_map,
)
from albef.tasks.retrieval import RetrievalDataConfig, RetrievalTask, RetrievalTrainSet
from albef.tokenizer import pre_caption


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


class _RefsUnpickler(pickle.Unpickler):
    """REFER's ``refs(unc).p`` holds plain lists/dicts/strings/numbers: any class reference is refused."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a REFER refs pickle")


def refs_from_refer(refer_dir: str) -> Dict[str, Dict]:
    """The ground truth of a REFER dataset folder (``refs(unc).p`` + ``instances.json``) in the refs JSON layout."""
    folder = Path(refer_dir)
    refs_path, inst_path = folder / "refs(unc).p", folder / "instances.json"
    for p in (refs_path, inst_path):
        if not p.is_file():
            raise FileNotFoundError(f"data.refs_file={refer_dir}: a REFER folder needs {p.name}, not found at {p}")
    with open(refs_path, "rb") as f:
        refs = _RefsUnpickler(f, encoding="latin1").load()
    with open(inst_path, encoding="utf-8") as f:
        instances = json.load(f)
    images = {img["id"]: img for img in instances["images"]}
    boxes = {ann["id"]: ann["bbox"] for ann in instances["annotations"]}
    out = {}
    for r in refs:
        img = images[r["image_id"]]
        out[str(r["ref_id"])] = {
            "image_id": r["image_id"],
            "image": img["file_name"],
            "bbox": boxes[r["ann_id"]],
            "split": r["split"],
            "height": img["height"],
            "width": img["width"],
        }
    return out


def load_refs(path: str) -> Dict[str, Dict]:
    """``data.refs_file``: a refs JSON file or a REFER dataset folder -> ``{str(ref_id): entry}``."""
    if not path:
        raise ValueError("data.refs_file is empty: grounding evaluation needs the true box of every ref_id")
    if Path(path).is_dir():
        return refs_from_refer(path)
    try:
        with open(path, encoding="utf-8") as f:
            refs = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read data.refs_file {path}: {e}") from None
    if not isinstance(refs, dict):
        raise ValueError(f"data.refs_file {path}: expected a JSON object {{ref_id: entry}}, got {type(refs).__name__}")
    for ref_id, entry in refs.items():
        missing = [k for k in ("image_id", "bbox") if not isinstance(entry, dict) or k not in entry]
        if missing:
            raise ValueError(f"data.refs_file {path}: ref {ref_id}: missing field(s) {missing}")
        if len(entry["bbox"]) != 4 or entry["bbox"][2] <= 0 or entry["bbox"][3] <= 0:
            raise ValueError(
                f"data.refs_file {path}: ref {ref_id}: bbox {entry['bbox']} is not [x, y, w, h] with w, h > 0"
            )
    return refs


def load_proposals(dets_file: str, refs: Dict[str, Dict]) -> Dict[str, List[List[float]]]:
    """Proposals per ``str(image_id)``: ``dets_file`` (official ``dets.json``) or, without one, the distinct true
    boxes of every ref of the image."""
    if not dets_file:
        props: Dict[str, List[List[float]]] = {}
        for entry in refs.values():
            boxes = props.setdefault(str(entry["image_id"]), [])
            box = [float(v) for v in entry["bbox"]]
            if box not in boxes:
                boxes.append(box)
        return props
    try:
        with open(dets_file, encoding="utf-8") as f:
            dets = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read data.dets_file {dets_file}: {e}") from None
    if not isinstance(dets, dict):
        raise ValueError(
            f"data.dets_file {dets_file}: expected {{image_id: [[x, y, w, h], ...]}}, got {type(dets).__name__}"
        )
    out = {}
    for image_id, boxes in dets.items():
        if not isinstance(boxes, list) or any(not isinstance(b, (list, tuple)) or len(b) < 4 for b in boxes):
            raise ValueError(
                f"data.dets_file {dets_file}: image {image_id}: expected a list of [x, y, w, h, ...] boxes"
            )
        out[str(image_id)] = [[float(v) for v in b[:4]] for b in boxes]
    return out


@dataclass
class RefItem:
    ref_id: str
    image: str  # path
    text: str  # after pre_caption
    image_id: str
    bbox: List[float]
    split: str  # of the ground truth (val, testA, testB, ...)
    height: int
    width: int
    proposals: List[List[float]]


class GroundingEvalSet:
    """One item per referring expression of an evaluation file, joined with its truth and its image's proposals."""

    def __init__(
        self,
        path: str,
        split: str,
        image_root: str,
        res: int,
        max_words: int,
        refs: Dict[str, Dict],
        proposals: Dict[str, List[List[float]]],
        refs_name: str,
        dets_name: str,
    ):
        self.items: List[RefItem] = []
        for i, e in enumerate(read_json_list(path, ("image", "text", "ref_id"))):
            ref = refs.get(str(e["ref_id"]))
            if ref is None:
                raise ValueError(f"{path}[{i}]: ref_id {e['ref_id']} is not in data.refs_file {refs_name}")
            image_id = str(ref["image_id"])
            boxes = proposals.get(image_id)
            if not boxes:
                source = f"data.dets_file {dets_name}" if dets_name else "data.refs_file (true boxes)"
                raise ValueError(
                    f"{path}[{i}]: image_id {image_id} (ref_id {e['ref_id']}) has no proposals in {source}"
                )
            image = os.path.join(image_root, e["image"])
            if "height" in ref and "width" in ref:
                height, width = int(ref["height"]), int(ref["width"])
            else:
                try:
                    width, height, _ = read_image_header(Path(image).read_bytes())
                except OSError as err:
                    raise FileNotFoundError(f"{path}[{i}]: image {image}: {err.strerror or err}") from None
            self.items.append(
                RefItem(
                    str(e["ref_id"]),
                    image,
                    pre_caption(e["text"], max_words),
                    image_id,
                    [float(v) for v in ref["bbox"]],
                    str(ref.get("split", split)),
                    height,
                    width,
                    boxes,
                )
            )
        self.transform = test_transform(res)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        try:
            return self.transform(Path(self.items[i].image).read_bytes(), None), i
        except OSError as e:
            raise FileNotFoundError(f"evaluation image {self.items[i].image}: {e.strerror or e}") from None


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
        rank, world = dist.rank_and_world()
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
        if world > 1:
            rows = sorted(dist.gather_lists(rows), key=lambda r: r["index"])
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


def grounding_metrics(rows: List[Dict], split: str) -> Dict[str, float]:
    """Accuracies in percent from per-expression rows (``correct``, ``centre_correct``, ``random_correct``,
    ``split``): ``acc``, ``acc_<split>`` when the rows mix ground-truth splits (or name another one), the two
    baselines and ``num_refs``."""
    if not rows:
        raise ValueError(f"grounding evaluation of {split!r}: no referring expressions")
    n = len(rows)
    metrics = {
        "acc": 100.0 * sum(r["correct"] for r in rows) / n,
        "baseline_centre": 100.0 * sum(r["centre_correct"] for r in rows) / n,
        "baseline_random": 100.0 * sum(r["random_correct"] for r in rows) / n,
        "num_refs": float(n),
    }
    splits = sorted({r["split"] for r in rows})
    if splits != [split]:
        for s in splits:
            part = [r for r in rows if r["split"] == s]
            metrics[f"acc_{s}"] = 100.0 * sum(r["correct"] for r in part) / len(part)
    return metrics


def save_grounding_overlay(path, image_path: str, cam: torch.Tensor, pred_box, gt_box, label: str) -> Path:
    """The overlay PNG of one expression: the original image with ``cam`` upsampled to its size (as scored)."""
    from albef.viz import save_overlay

    with Image.open(image_path) as im:
        image = im.convert("RGB")
    heat = upsample_map(cam, (image.height, image.width))
    return save_overlay(path, image, heat, pred_box=pred_box, true_box=gt_box, label=label)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Write a REFER dataset's ground truth as the grounding refs JSON.")
    p.add_argument("--refer-dir", required=True, help="REFER dataset folder with refs(unc).p and instances.json")
    p.add_argument("--out", required=True, help="output JSON (use as data.refs_file)")
    a = p.parse_args(argv)
    refs = refs_from_refer(a.refer_dir)
    Path(a.out).write_text(json.dumps(refs))
    print(f"{len(refs)} refs -> {a.out}")


if __name__ == "__main__":
    main()
