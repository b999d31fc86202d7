"""Local annotation files + an image folder -> the same webdataset shards as data_prep.download.

    python -m data_prep.annotations coco.json vg.json --image-root /data/images --output data/coco_vg
    python -m data_prep.annotations captions_train2014.json --image-root /data/coco/train2014 --output data/coco
    python -m data_prep.annotations region_descriptions.json --format vg --image-root /data/vg --output data/vg

Formats (``--format auto`` tells them apart):

* ``albef``: the official ALBEF pretraining JSON, ``[{"image": path, "caption": str | [str], ...}]``;
* ``coco``: COCO captions, ``{"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]}``;
* ``vg``: Visual Genome ``region_descriptions.json``, ``[{"id": image_id, "regions": [{"phrase", ...}]}]``;
  the image is looked up as ``<id>.jpg`` under the root, ``VG_100K/`` or ``VG_100K_2/``.

Entries of the same image are merged into one sample whose captions (in file order, without repeats; whitespace
runs, newlines included, become one space) are stored one per line in ``<key>.txt``; so an epoch is one pass over
images, not over (image, caption) pairs. Relative image paths are resolved against ``--image-root``. Missing or
unreadable images get status ``missing_image``; the image options, sharding, resume, worker split, content dedup
and manifest are those of data_prep.download.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional

from data_prep import pipeline
from data_prep.download import add_run_arguments, make_job
from data_prep.images import DecodeLimits, ImageOptions, PixelBudget, SampleError, prepare_pillow, process_image
from data_prep.inputs import single_line

ANNOTATION_FORMATS = ("auto", "albef", "coco", "vg")


def detect_format(data, path: Path) -> str:
    if isinstance(data, dict) and "images" in data and "annotations" in data:
        return "coco"
    if isinstance(data, list) and data and isinstance(data[0], dict):
        if "image" in data[0]:
            return "albef"
        if "regions" in data[0]:
            return "vg"
    raise ValueError(
        f"{path}: not an ALBEF, COCO-captions or VG region-descriptions file "
        f"(expected a list of {{'image', 'caption'}}, {{'images', 'annotations'}} or {{'id', 'regions'}})"
    )


def _entries(data, fmt: str, path: Path):
    """(image name, candidate paths, captions, extra) per entry of one annotation file."""
    if fmt == "albef":
        for n, item in enumerate(data):
            if "image" not in item or "caption" not in item:
                raise ValueError(f"{path}: entry {n} has no 'image' or no 'caption' key")
            captions = item["caption"] if isinstance(item["caption"], list) else [item["caption"]]
            extra = {k: v for k, v in item.items() if k not in ("image", "caption")}
            yield item["image"], [item["image"]], [str(c) for c in captions], extra
    elif fmt == "coco":
        captions: Dict = {}
        for ann in data["annotations"]:
            captions.setdefault(ann["image_id"], []).append(str(ann["caption"]))
        for image in data["images"]:
            if image["id"] in captions:
                yield image["file_name"], [image["file_name"]], captions[image["id"]], {"image_id": image["id"]}
    else:  # vg
        for item in data:
            image_id = item["id"] if "id" in item else item["regions"][0]["image_id"]
            phrases = [str(r["phrase"]) for r in item["regions"]]
            name = f"{image_id}.jpg"
            yield name, [name, f"VG_100K/{name}", f"VG_100K_2/{name}"], phrases, {"image_id": image_id}


def load_rows(files: List[Path], fmt: str) -> List[Dict]:
    """One row per distinct image, in order of first appearance; captions merged, stripped, without repeats."""
    rows: Dict[str, Dict] = {}
    for path in files:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: cannot read annotations: {e}") from None
        file_fmt = detect_format(data, path) if fmt == "auto" else fmt
        try:
            for image, candidates, captions, extra in _entries(data, file_fmt, path):
                row = rows.setdefault(image, {"image": image, "candidates": candidates, "caption": [], "extra": extra})
                for caption in map(single_line, captions):
                    if caption and caption not in row["caption"]:
                        row["caption"].append(caption)
        except (KeyError, TypeError, IndexError) as e:
            raise ValueError(f"{path}: malformed {file_fmt} annotations ({type(e).__name__}: {e})") from None
    kept = [row for row in rows.values() if row["caption"]]
    if len(kept) < len(rows):
        print(f"data_prep.annotations: skipped {len(rows) - len(kept)} images without any caption", file=sys.stderr)
    for row in kept:
        if len(row["caption"]) == 1:
            row["caption"] = row["caption"][0]
    return kept


@dataclass
class LocalProcessor:
    image_root: str
    image: ImageOptions
    limits: DecodeLimits = DecodeLimits()

    def setup(self) -> None:
        prepare_pillow(self.image)
        self._budget = PixelBudget(self.limits.max_pixels_in_flight)

    def __call__(self, row: Dict) -> pipeline.Outcome:
        for candidate in row["candidates"]:
            path = Path(self.image_root) / candidate  # an absolute candidate stays absolute
            try:
                data = path.read_bytes()
                break
            except (FileNotFoundError, NotADirectoryError):
                continue
            except OSError as e:
                return pipeline.Outcome("missing_image", f"unreadable image ({type(e).__name__})")
        else:
            return pipeline.Outcome("missing_image", "image file not found")
        try:
            image = process_image(data, self.image, self._budget, self.limits)
        except SampleError as e:
            return pipeline.Outcome(e.status, str(e))
        return pipeline.image_outcome({"image": row["image"]}, row, image, hashlib.sha256(data).digest())


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m data_prep.annotations",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("annotations", nargs="+", help="annotation JSON files, read in this order")
    p.add_argument("--image-root", required=True, help="folder that relative image paths start from")
    p.add_argument("--format", choices=ANNOTATION_FORMATS, default="auto", help="(default %(default)s)")
    add_run_arguments(p)
    ImageOptions.add_arguments(p)
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    files = [Path(f) for f in args.annotations]
    try:
        image = ImageOptions.from_args(args)
        limits = DecodeLimits.from_args(args)
        rows = load_rows(files, args.format)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    settings = {
        "annotations": [[str(f.resolve()), f.stat().st_size] for f in files],
        "format": args.format,
        "image_root": str(Path(args.image_root).resolve()),
        "image": asdict(image),
    }
    job = make_job(
        args, "annotations", settings, lambda key_only: iter(rows), LocalProcessor(args.image_root, image, limits)
    )
    pipeline.run(job)
    return 0


if __name__ == "__main__":
    sys.exit(main())
