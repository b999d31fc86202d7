"""Filter a shard set by an ALBEF model's own ITC/ITM scores (BLIP's CapFilt filter step, without a captioner).

    python -m data_prep.filter data/web --checkpoint ALBEF_4M.pth --output data/web_filtered --min-itm 0.5
    python -m data_prep.filter data/web --checkpoint coco.pth --output data/web_capfilt --capfilt --min-itm 0.3
    python -m data_prep.filter data/web --checkpoint ALBEF_4M.pth --output data/web_cal --calibrate data/coco_val

Every caption line of every sample is scored: ``itc`` (cosine similarity of the normalised ITC features) and ``itm``
(the ITM head's match probability), with ``albef.embed``'s scoring. A sample is judged by its alt text (its first
caption line) or, with ``--capfilt``, by its best line by ITM, which then becomes its only caption (the other
lines of a sample are its "other captions": a second crawl's alt text, an annotation's other captions). It is kept
when that caption's ``itc >= --min-itc`` and ``itm >= --min-itm``; otherwise it is dropped as ``low_itc`` (checked
first) or ``low_itm``. A sample without image or caption is dropped as ``unreadable``.

A cosine or a match probability means different things for different models (a longer-trained model scores true
pairs higher), so a threshold can be calibrated instead of given: ``--calibrate CLEAN --calibrate-on itc`` scores a
shard folder of known-good pairs (an annotated set such as COCO's, judged the same way) and sets ``--min-itc`` to the
highest value that keeps at least ``--keep-clean`` (default 0.95) of them. The threshold, the reference and its
size go into the manifest and the log.

Output: shards with the input's indices (a kept sample keeps its key, image and metadata, plus
``"albef_filter": {"itc", "itm", "caption"}`` in its ``.json``), each with ``NNNNNN_stats.json`` (input samples,
kept, dropped by reason, captions replaced by CapFilt, 20-bin histograms of the judged captions' ITC in [-1, 1] and
ITM in [0, 1]) and a ``manifest.json`` naming the thresholds and the checkpoint. Shards already written are
skipped on a rerun; ranks from torchrun/SLURM take every world-th shard, and the rank that finds every shard
written writes the manifest.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from data_prep.shards import ShardWriter, finished_shards, iter_tar_samples, merge_stats, read_manifest, write_manifest

BINS = 20


def judge(itc: np.ndarray, itm: np.ndarray, capfilt: bool, min_itc: float, min_itm: float):
    """(index of the judged caption, drop reason or None) for one sample's caption scores."""
    best = int(np.argmax(itm)) if capfilt else 0
    if itc[best] < min_itc:
        return best, "low_itc"
    if itm[best] < min_itm:
        return best, "low_itm"
    return best, None


def score_shard(path: Path, scorer):
    """(samples as (key, image extension, members, caption lines, the lines' ITC, their ITM), number of samples
    without image or caption) of one shard; every line is scored in one call of ``scorer``."""
    from albef.data.samples import IMAGE_EXTENSIONS  # (albef.data imports torch: only once a model is in use)

    samples, rows, unreadable = [], [], 0
    for key, members in iter_tar_samples(path):
        ext = next((e for e in IMAGE_EXTENSIONS if e in members), None)
        lines = [x.strip() for x in members.get("txt", b"").decode("utf-8", "replace").splitlines() if x.strip()]
        if ext is None or not lines:
            unreadable += 1
            continue
        samples.append((key, ext, members, lines, len(rows)))
        rows += [(f"{key}#{j}", key, members[ext], line) for j, line in enumerate(lines)]
    scores = scorer(rows) if rows else {"itc": np.zeros(0), "itm": np.zeros(0)}
    return [
        (key, ext, members, lines, scores["itc"][start : start + len(lines)], scores["itm"][start : start + len(lines)])
        for key, ext, members, lines, start in samples
    ], unreadable


def calibrate(reference: Path, scorer, capfilt: bool, score: str, keep: float) -> Dict:
    """The highest ``score`` threshold that keeps at least ``keep`` of the reference set's samples, each judged as
    the filter judges (its alt text, or its best line by ITM with ``capfilt``)."""
    judged = []
    for shard in read_manifest(reference)["shards"]:
        samples, _ = score_shard(reference / shard["name"], scorer)
        for *_, itc, itm in samples:
            best, _ = judge(itc, itm, capfilt, -1.0, 0.0)
            judged.append(float((itc if score == "itc" else itm)[best]))
    if not judged:
        raise ValueError(f"--calibrate {reference}: no readable sample (image and caption) to calibrate on")
    judged.sort()
    threshold = judged[int(np.floor((1.0 - keep) * len(judged) + 1e-9))]  # (1e-9: 1 - 0.9 is 0.0999...)
    kept = sum(x >= threshold for x in judged)
    return {
        "reference": str(reference.resolve()),
        "score": score,
        "keep_clean": keep,
        "samples": len(judged),
        "threshold": threshold,
        "kept": kept,
    }


def filter_shard(
    path: Path, out_dir: Path, index: int, scorer, capfilt: bool, min_itc: float, min_itm: float, bar=None
) -> Dict:
    """Score and filter one input shard into output shard ``index``; returns its stats."""
    samples, unreadable = score_shard(path, scorer)
    dropped = {"low_itc": 0, "low_itm": 0, "unreadable": unreadable}
    judged_itc, judged_itm, replaced = [], [], 0
    with ShardWriter(out_dir, index) as writer:
        for key, ext, members, lines, itc, itm in samples:
            best, reason = judge(itc, itm, capfilt, min_itc, min_itm)
            judged_itc.append(float(itc[best]))
            judged_itm.append(float(itm[best]))
            if bar is not None:
                bar.update(1)
            if reason is not None:
                dropped[reason] += 1
                continue
            meta = json.loads(members["json"]) if "json" in members else {}
            meta["albef_filter"] = {
                "itc": round(float(itc[best]), 6),
                "itm": round(float(itm[best]), 6),
                "caption": best,
            }
            replaced += capfilt and best != 0
            writer.write(key, members[ext], [lines[best]] if capfilt else lines, meta, ext)
        stats = {
            "input_samples": len(samples) + unreadable,
            "kept": writer.num_samples,
            "dropped": dropped,
            "capfilt_replaced": int(replaced),
            "hist": {
                "itc": np.histogram(judged_itc, BINS, (-1.0, 1.0))[0].tolist(),
                "itm": np.histogram(judged_itm, BINS, (0.0, 1.0))[0].tolist(),
            },
        }
        writer.commit(stats)
    return stats


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m data_prep.filter", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("input", type=Path, help="a shard folder with manifest.json (data_prep's output)")
    p.add_argument("--output", required=True, type=Path)
    p.add_argument("--min-itc", type=float, help="lowest ITC cosine similarity kept (default -1: no limit)")
    p.add_argument("--min-itm", type=float, help="lowest ITM match probability kept (default 0: no limit)")
    p.add_argument("--capfilt", action="store_true", help="judge (and keep) each sample's best caption line by ITM")
    p.add_argument("--calibrate", type=Path, help="a shard folder of known-good pairs that sets one threshold")
    p.add_argument("--calibrate-on", choices=("itc", "itm"), default="itc", help="the score --calibrate sets")
    p.add_argument("--keep-clean", type=float, default=0.95, help="share of --calibrate's samples kept (0 to 1]")
    from albef.embed import add_model_arguments, embed_part, load_model  # (torch: this tool runs a model)

    add_model_arguments(p)
    a = p.parse_args(argv)
    try:
        shards = read_manifest(a.input)["shards"]
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"error: {a.input}: {e}", file=sys.stderr)
        return 2
    if a.output.resolve() == a.input.resolve():
        print(f"error: --output {a.output} is the input folder: write the filtered set elsewhere", file=sys.stderr)
        return 2
    if a.calibrate is not None:
        given = getattr(a, f"min_{a.calibrate_on}")
        if given is not None:
            print(
                f"error: --min-{a.calibrate_on} {given} and --calibrate {a.calibrate} both set the {a.calibrate_on} "
                "threshold: give one",
                file=sys.stderr,
            )
            return 2
        if not 0.0 < a.keep_clean <= 1.0:
            print(f"error: --keep-clean {a.keep_clean} is not in (0, 1]", file=sys.stderr)
            return 2
        try:
            read_manifest(a.calibrate)
        except (FileNotFoundError, ValueError, KeyError) as e:
            print(f"error: --calibrate {a.calibrate}: {e}", file=sys.stderr)
            return 2
    a.min_itc = -1.0 if a.min_itc is None else a.min_itc
    a.min_itm = 0.0 if a.min_itm is None else a.min_itm
    from tqdm import tqdm

    from albef.engine.dist import detect

    env = detect()
    done = finished_shards(a.output) if a.output.is_dir() else {}
    mine = [i for i in range(len(shards)) if i % env.world_size == env.rank and i not in done]
    model, preprocess, tokenizer, device, dtype = load_model(a)

    def scorer(rows):
        return embed_part(rows, model, preprocess, tokenizer, "score", a.batch_size, a.workers, device, dtype)

    t0 = time.time()
    calibration = None
    if a.calibrate is not None:
        try:
            calibration = calibrate(a.calibrate, scorer, a.capfilt, a.calibrate_on, a.keep_clean)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        setattr(a, f"min_{a.calibrate_on}", calibration["threshold"])
        if env.rank == 0:
            print(
                f"data_prep.filter: --min-{a.calibrate_on} {calibration['threshold']:.4f} keeps "
                f"{calibration['kept']} of the {calibration['samples']} known-good samples of {a.calibrate} "
                f"(--keep-clean {a.keep_clean})",
                flush=True,
            )
    bar = tqdm(
        total=sum(shards[i]["num_samples"] for i in mine),
        unit="sample",
        desc="filter",
        file=sys.stderr,
        disable=a.no_progress or env.rank != 0,
        dynamic_ncols=True,
    )
    for i in mine:
        filter_shard(a.input / shards[i]["name"], a.output, i, scorer, a.capfilt, a.min_itc, a.min_itm, bar)
    bar.close()
    if len(finished_shards(a.output)) == len(shards):
        settings = {
            "checkpoint": str(a.checkpoint),
            "input": str(a.input.resolve()),
            "min_itc": a.min_itc,
            "min_itm": a.min_itm,
            "capfilt": a.capfilt,
            "calibration": calibration,
        }
        manifest = write_manifest(a.output, {"filter": settings})
        total = merge_stats(a.output)
        dropped = ", ".join(f"{k[8:]} {v}" for k, v in sorted(total.items()) if k.startswith("dropped.") and v)
        print(
            f"data_prep.filter: kept {manifest['num_samples']} of {total.get('input_samples', 0)} samples "
            f"({dropped or 'none dropped'}; {total.get('capfilt_replaced', 0)} captions replaced) in "
            f"{time.time() - t0:.1f}s -> {a.output}",
            flush=True,
        )
    else:
        print(
            f"data_prep.filter rank {env.rank}: {len(mine)} shard(s) written; waiting for the other ranks' shards "
            "before the manifest",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
