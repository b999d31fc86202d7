"""Grounding annotations (official RefCOCO+ layout): the ground-truth refs (a JSON file, or the REFER API's folder
read directly), the proposals, and the evaluation set of referring expressions. See ``albef.tasks.grounding`` for
the layouts.

    python -m albef.data.grounding --refer-dir refer/data/refcoco+ --out refs.json

writes the REFER ground truth as the JSON layout once, so later runs need neither the pickle nor ``instances.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List

from albef.data.json_dataset import read_json_list
from albef.data.transforms import read_image_header, test_transform
from albef.fsutil import read_json
from albef.tokenizer import pre_caption


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
    refs = read_json(path, "data.refs_file")
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
    dets = read_json(dets_file, "data.dets_file")
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
