"""Bulk image and text embeddings, or ITC/ITM scores of (image, caption) pairs, from any ``albef.load`` source.

    python -m albef.embed --checkpoint ALBEF_4M.pth --input shards/ --output emb/                # webdataset shards
    python -m albef.embed --checkpoint run/ --input photos/ --output emb/ --format npy           # an image folder
    python -m albef.embed --checkpoint run/ --input coco_test.json --image-root coco/ --output s/ --mode score
    torchrun --nproc_per_node=8 -m albef.embed ...      # or srun: each rank takes every world-th part

Inputs: a shard folder with ``manifest.json`` or a brace pattern of tar files (one part per shard; the caption is
the first line of the sample's ``txt``), a folder of images (searched recursively, sorted, parts of ``--part-size``
images, no text), or an ALBEF JSON list ``[{"image", "caption": str or [str, ...]}]`` (one row per caption; parts of
``--part-size`` entries; each image is encoded once per batch).

Output, one file per part (``part-00000.parquet`` or ``.npz``), written atomically, so a rerun (after a crash or a
requeue) skips the parts already written: rows ``id`` (shard key, relative path, or ``image#caption index``),
``image``, ``caption`` (``""`` in ``.npz`` where there is none); ``--mode embed`` adds ``image_feat`` and ``text_feat`` (the normalised ITC features, float32;
absent where there is no text); ``--mode score`` adds ``itc`` (cosine similarity) and ``itm`` (match probability).
The rank that finds every part written writes ``manifest.json`` (parts, rows, mode, model). Ranks come from
torchrun or SLURM (``RANK``/``WORLD_SIZE`` or ``SLURM_PROCID``/``SLURM_NTASKS``) and never talk to each other.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from albef.data.json_dataset import read_json_list
from albef.data.samples import IMAGE_EXTENSIONS
from albef.fsutil import atomic_write, durable_replace
from albef.tokenizer import pre_caption

Record = tuple  # (id, image name, image bytes or path, caption or None)


# ------------------------------------------------------------------------------------------------------- inputs
def plan_parts(source: str, image_root: str = "", part_size: int = 10000) -> List[dict]:
    """The input split into parts: ``[{"kind": "shard"|"records", ...}]``, the same list for every rank."""
    p = Path(source)
    if p.is_file() and p.suffix == ".json":
        entries = read_json_list(str(p), ("image", "caption"))
        rows = [
            (f"{e['image']}#{j}", e["image"], os.path.join(image_root, e["image"]), c)
            for e in entries
            for j, c in enumerate(e["caption"] if isinstance(e["caption"], list) else [e["caption"]])
        ]
        return _chunks(rows, part_size, by=lambda r: r[1])
    if p.is_dir() and not (p / "manifest.json").is_file():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS)
        if not files:
            raise FileNotFoundError(f"--input {source}: no images ({', '.join(IMAGE_EXTENSIONS)}) under this folder")
        rows = [(str(f.relative_to(p)), str(f.relative_to(p)), str(f), None) for f in files]
        return _chunks(rows, part_size, by=lambda r: r[0])
    from albef.data.shards import expand_dataset

    return [{"kind": "shard", "shard": s} for s in expand_dataset(source, 0)]


def _chunks(rows: List[Record], size: int, by) -> List[dict]:
    """Parts of about ``size`` rows that never split one image's rows."""
    parts, current = [], []
    for i, row in enumerate(rows):
        if len(current) >= size and by(row) != by(rows[i - 1]):
            parts.append({"kind": "records", "rows": current})
            current = []
        current.append(row)
    return parts + ([{"kind": "records", "rows": current}] if current else [])


def part_rows(part: dict) -> List[Record]:
    """The rows of a part; a shard's images are read into memory (bytes), the others stay paths."""
    if part["kind"] == "records":
        return part["rows"]
    from albef.data.samples import parse_captions
    from albef.data.shards import Missing, iter_shard

    rows = []
    for item in iter_shard(part["shard"]):
        if isinstance(item, Missing):
            print(f"albef.embed: {item.shard}: {item.key} skipped ({item.reason}: {item.detail})", file=sys.stderr)
            continue
        image = next((item.members[e] for e in IMAGE_EXTENSIONS if e in item.members), None)
        caption = parse_captions(item.members["txt"])[0] if "txt" in item.members else None
        if image is None:
            print(f"albef.embed: {item.shard}: {item.key} has no image member, skipped", file=sys.stderr)
            continue
        rows.append((item.key, item.key, image, caption))
    return rows


class _Images(torch.utils.data.Dataset):
    """One row's image per index (decoded in the loader's workers), for the unique images of a part."""

    def __init__(self, images: Sequence, preprocess):
        self.images, self.preprocess = images, preprocess

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        try:
            return self.preprocess(self.images[i])
        except OSError as e:
            raise FileNotFoundError(f"image {self.images[i]}: {e.strerror or e}") from None


# ------------------------------------------------------------------------------------------------------- compute
@torch.no_grad()
def embed_part(
    rows: List[Record],
    model,
    preprocess,
    tokenizer,
    mode: str,
    batch_size: int,
    workers: int,
    device,
    dtype,
    progress=None,
) -> Dict[str, object]:
    """The output columns of one part's rows."""
    names, first = [], {}
    for r in rows:
        if r[1] not in first:
            first[r[1]] = len(names)
            names.append(r)
    loader = DataLoader(_Images([r[2] for r in names], preprocess), batch_size=batch_size, num_workers=workers)
    image_embeds, image_feat = [], []
    for batch in loader:
        e = model.encode_image(batch.to(device=device, dtype=dtype))
        image_feat.append(model.image_feat(e).float().cpu())
        if mode == "score":
            image_embeds.append(e)
        if progress is not None:
            progress.update(len(batch))
    image_feat = torch.cat(image_feat) if image_feat else torch.zeros(0, model.cfg.embed_dim)
    index = torch.tensor([first[r[1]] for r in rows], dtype=torch.long)
    out: Dict[str, object] = {
        "id": [r[0] for r in rows],
        "image": [r[1] for r in rows],
        "caption": [r[3] for r in rows],
    }
    texted = [i for i, r in enumerate(rows) if r[3] is not None]
    text_feat = torch.full((len(rows), model.cfg.embed_dim), float("nan"))
    itc, itm = torch.full((len(rows),), float("nan")), torch.full((len(rows),), float("nan"))
    all_embeds = torch.cat(image_embeds) if image_embeds else None
    for s in range(0, len(texted), batch_size):
        sel = texted[s : s + batch_size]
        text = tokenizer([pre_caption(rows[i][3]) for i in sel], max_length=30)
        ids, mask = text["input_ids"].to(device), text["attention_mask"].to(device)
        t = model.encode_text(ids, mask)
        feat = model.text_feat(t).float().cpu()
        text_feat[sel] = feat
        if mode == "score":
            img = index[sel]
            itc[sel] = (feat * image_feat[img]).sum(-1)
            logits = model.itm_logits(t, mask, all_embeds[img.to(all_embeds.device)])
            itm[sel] = F.softmax(logits.float(), dim=-1)[:, 1].cpu()
    if mode == "embed":
        out["image_feat"] = image_feat[index].numpy()
        out["text_feat"] = text_feat.numpy()
    else:
        out["itc"], out["itm"] = itc.numpy(), itm.numpy()
    return out


def write_part(columns: Dict[str, object], path: Path, fmt: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        arrays = {
            k: (
                pa.array(list(v), type=pa.list_(pa.float32(), v.shape[1]))
                if isinstance(v, np.ndarray) and v.ndim == 2
                else pa.array(v.tolist() if isinstance(v, np.ndarray) else v)
            )
            for k, v in columns.items()
        }
        pq.write_table(pa.table(arrays), tmp)
    else:  # text columns as unicode arrays (no pickled objects; a row without caption has "")
        with open(tmp, "wb") as f:
            np.savez(
                f,
                **{
                    k: v if isinstance(v, np.ndarray) else np.array(["" if x is None else x for x in v], dtype=str)
                    for k, v in columns.items()
                },
            )
    durable_replace(tmp, path)


def read_part(path: Path) -> Dict[str, object]:
    """A part file back as columns (numpy arrays; lists of strings for id/image/caption)."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        return {
            k: (
                np.stack(table[k].to_numpy(zero_copy_only=False))
                if k.endswith("_feat")
                else table[k].to_numpy(zero_copy_only=False)
                if k in ("itc", "itm")
                else table[k].to_pylist()
            )
            for k in table.column_names
        }
    with np.load(path) as z:
        return {k: (z[k].tolist() if z[k].dtype.kind == "U" else z[k]) for k in z.files}


# ------------------------------------------------------------------------------------------------------- main
def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """The options of a command that runs a model over data (this one and data_prep.filter)."""
    p.add_argument("--checkpoint", required=True, help="anything albef.load takes (file, run dir, folder, hub id)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2, help="image decoding processes per rank")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--no-progress", action="store_true")


def load_model(a: argparse.Namespace):
    """(model, preprocess, tokenizer, device, dtype) from ``add_model_arguments``' options; refuses bad values."""
    if a.batch_size < 1 or a.workers < 0:
        raise SystemExit(f"error: --batch-size={a.batch_size} must be >= 1 and --workers={a.workers} >= 0")
    from albef.pretrained import load

    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, a.dtype)
    model, preprocess, tokenizer = load(a.checkpoint, task="retrieval", device=device, dtype=dtype)
    return model, preprocess, tokenizer, device, dtype


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m albef.embed", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--input", required=True, help="shard folder / tar brace pattern, image folder, or ALBEF JSON")
    p.add_argument("--output", required=True, type=Path)
    p.add_argument("--image-root", default="", help="prefix of the JSON's image paths")
    p.add_argument("--mode", choices=("embed", "score"), default="embed")
    p.add_argument("--format", choices=("parquet", "npy"), default="parquet")
    p.add_argument("--part-size", type=int, default=10000, help="rows per part (JSON, image folder)")
    add_model_arguments(p)
    a = p.parse_args(argv)
    if a.part_size < 1:
        p.error("--part-size must be >= 1")
    from albef.engine.dist import detect

    env = detect()
    parts = plan_parts(a.input, a.image_root, a.part_size)
    suffix = ".parquet" if a.format == "parquet" else ".npz"
    out = a.output
    out.mkdir(parents=True, exist_ok=True)
    mine = [i for i in range(len(parts)) if i % env.world_size == env.rank]
    todo = [i for i in mine if not (out / f"part-{i:05d}{suffix}").is_file()]
    model, preprocess, tokenizer, device, dtype = load_model(a)
    total = sum(
        len({r[1] for r in parts[i]["rows"]}) if parts[i]["kind"] == "records" else parts[i]["shard"].num_samples
        for i in todo
    )  # images to encode: the bar's unit
    from tqdm import tqdm

    bar = tqdm(
        total=total,
        unit="img",
        desc=f"albef.embed rank {env.rank}",
        disable=a.no_progress or env.rank != 0,
        file=sys.stderr,
        dynamic_ncols=True,
    )
    t0, rows_done = time.time(), 0
    for i in todo:
        rows = part_rows(parts[i])
        columns = embed_part(rows, model, preprocess, tokenizer, a.mode, a.batch_size, a.workers, device, dtype, bar)
        write_part(columns, out / f"part-{i:05d}{suffix}", a.format)
        rows_done += len(rows)
    bar.close()
    print(
        f"albef.embed rank {env.rank}/{env.world_size}: {len(todo)} part(s) written, {len(mine) - len(todo)} already "
        f"there, {rows_done} rows in {time.time() - t0:.1f}s",
        flush=True,
    )
    files = [out / f"part-{i:05d}{suffix}" for i in range(len(parts))]
    if all(f.is_file() for f in files):
        manifest = {
            "mode": a.mode,
            "format": a.format,
            "checkpoint": str(a.checkpoint),
            "input": a.input,
            "embed_dim": model.cfg.embed_dim,
            "parts": [f.name for f in files],
        }
        atomic_write(out / "manifest.json", json.dumps(manifest, indent=1))
        print(f"albef.embed: all {len(files)} part(s) present; wrote {out / 'manifest.json'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
