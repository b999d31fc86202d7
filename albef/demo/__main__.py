"""The offline demo, the README's main job: the whole pipeline on a generated world, on a CPU, in minutes.

    python -m albef.demo                  # (make demo) full demo, <= 15 minutes on 2 cores
    python -m albef.demo --quick          # the shortened run CI uses (~5 minutes)

Stages, each with the real command-line tools a user runs (printed as they start):

1. ``albef.demo.world``: a seeded world of shapes with captions and every task's annotations (official formats);
   ``albef.demo.vit`` trains the ViT on a labelled world of its own seed (the stand-in for DeiT; ``init.vit``).
2. A mini web crawl: real photos and HTML pages served on 127.0.0.1; ``data_prep.crawl`` extracts the image
   URL + alt-text pairs, ``data_prep.download`` fetches them into shards.
3. ``data_prep.annotations`` turns the world's pretraining JSON into shards.
4. ``pretrain.train`` pretrains the ``demo`` model (ITC + ITM + MLM, momentum distillation) with DeepSpeed ZeRO-2 on
   2 CPU processes (torchrun, gloo) over both shard sets.
5. ``finetune.retrieval`` evaluates zero-shot retrieval on held-out images, ``finetune.zeroshot`` zero-shot
   classification, ``finetune.grounding`` the official ITM Grad-CAM grounding of held-out referring expressions
   (no fine-tuning), ``data_prep.filter`` the model's noise filtering; then retrieval fine-tunes briefly.
6. ``finetune.ve`` fine-tunes SNLI-VE briefly and reports accuracy per label next to the hypothesis-only prior.
7. ``finetune.vqa`` fine-tunes VQA briefly and reports accuracy per question type next to the question-only prior.
8. A summary table: losses, recall against chance, whether the fusion encoder uses the image, time and throughput
   of every stage.

Everything lands in ``--out`` (default ``runs/demo``); rerunning reuses the world and shards and starts the runs
anew (the ViT's training included). Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]

SIZES = {  # world images and training steps; "quick" is what CI runs
    "full": dict(train=3000, val=100, test=100, image=48, pretrain_steps=800, finetune_steps=200, vqa_steps=600),
    "quick": dict(train=1500, val=64, test=64, image=48, pretrain_steps=400, finetune_steps=100, vqa_steps=300),
}


# the labelled world of the image encoder's supervised pretraining (albef.demo.vit), the stand-in for ImageNet
VIT_WORLD = dict(seed_offset=1000, images=dict(num_train=3000, num_val=200, num_test=2), steps=1500)

WIDTH = 110  # the longest console line a stage prints; its log file keeps every line whole


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class StageProgress:
    """Turns a stage's metric lines (``step N key=value ...``, ``run summary: {...}``) into one compact console line
    each: progress with ETA, the losses, throughput, MFU and memory; evaluation rows show their headline metrics."""

    EVAL_KEYS = ("r_mean", "txt_r1", "img_r1", "acc", "accuracy", "top1")

    def __init__(self, name: str, total_steps: int | None = None, clock=time.time):
        self.name, self.total, self.clock = name, total_steps, clock
        self.first = None  # (time, step) of the first training row: the rate and ETA count from there

    @staticmethod
    def parse(line: str) -> dict:
        words = line.split()
        row = {"step": int(words[1])}
        for word in words[2:]:
            key, _, value = word.partition("=")
            try:
                row[key] = float(value)
            except ValueError:
                row[key] = value
        return row

    def format(self, line: str) -> str | None:
        if line.startswith("run summary: "):
            s = json.loads(line[len("run summary: ") :])
            if s.get("evaluate_only"):
                return self._eval_line("evaluated", s)
            return (
                f"{self.name} done: {s['steps']} steps, {s['samples']} pairs in {_duration(s['train_seconds'])}"
                f", exit {s['exit_code']}"
            )
        if not line.startswith("step "):
            return None
        row = self.parse(line)
        if "train/loss" not in row:
            return self._eval_line(f"step {row['step']} eval", row)
        now, step = self.clock(), row["step"]
        if self.first is None:
            self.first = (now, step)
        done = f"step {step}" + (f"/{self.total} {100 * step / self.total:3.0f}%" if self.total else "")
        losses = {k[len("train/loss_") :]: v for k, v in row.items() if k.startswith("train/loss_")}
        losses = losses or {"loss": row["train/loss"]}
        parts = [
            f"{self.name} {done}",
            " ".join(f"{'itc' if k == 'ita' else k} {v:.3g}" for k, v in losses.items()),
            f"{row.get('perf/samples_per_s', 0):.0f} pairs/s",
        ]
        if "perf/mfu" in row:
            parts.append(f"MFU {100 * row['perf/mfu']:.0f}%")
        if "perf/max_rss_mb" in row:
            parts.append(f"RSS {row['perf/max_rss_mb']:.0f} MB")
        t0, s0 = self.first
        if self.total and step > s0 and now > t0:
            parts.append(f"ETA {_duration((self.total - step) * (now - t0) / (step - s0))}")
        return " | ".join(parts)

    def _eval_line(self, what: str, row: dict) -> str:
        splits: dict = {}  # "test/txt_r1" -> splits["test"] = ["txt_r1 21.9", ...], in EVAL_KEYS order
        for key in self.EVAL_KEYS:
            for k, v in row.items():
                split, _, name = k.rpartition("/")
                if name == key and isinstance(v, float):
                    splits.setdefault(split, []).append(f"{name} {v:.3g}")
        shown = " | ".join(f"{split} {' '.join(parts)}".strip() for split, parts in splits.items())
        return f"{self.name} {what}: " + (shown or "no metrics")


def run(cmd, log: Path, env=None, name: str | None = None, total_steps: int | None = None) -> float:
    """Run one stage's command with every line in its log file; the console gets the command, a compact line per
    metric row (``StageProgress``), the data_prep reports and errors. Returns seconds; exits with the log's tail on
    failure."""
    print("$ " + " ".join(str(c) for c in cmd), flush=True)
    print(f"  (full output: {log})", flush=True)
    progress = StageProgress(name or log.stem, total_steps)
    t0 = time.time()
    with open(log, "w") as f:
        proc = subprocess.Popen(
            [str(c) for c in cmd], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        )
        for line in proc.stdout:
            f.write(line)
            shown = progress.format(line)
            if shown is not None:
                print("  " + shown, flush=True)
            elif line.startswith("data_prep"):  # a tool's report: each " | " part on a line of its own
                for i, part in enumerate(line.rstrip().split(" | ")):
                    print(("  " if i == 0 else "      ") + part, flush=True)
            elif "error" in line.lower():
                print("  " + line.rstrip(), flush=True)
        code = proc.wait()
    if code != 0:
        print(f"stage failed (exit {code}); last lines of {log}:", file=sys.stderr)
        print("".join(open(log).readlines()[-40:]), file=sys.stderr)
        sys.exit(code or 1)
    return time.time() - t0


def swap_captions(entries: list, fraction: float, seed: int) -> list:
    """Web noise of a known size: a seeded sample of ``fraction`` of the entries pass their ``caption`` on to the next
    one of the sample (a cyclic swap); every entry gets ``"swapped"`` (kept in the shards' metadata by data_prep)."""
    import random

    chosen = sorted(random.Random(seed).sample(range(len(entries)), round(fraction * len(entries))))
    captions = [entries[i]["caption"] for i in chosen]
    for e in entries:
        e["swapped"] = False
    for i, caption in zip(chosen, captions[1:] + captions[:1]):
        entries[i].update(caption=caption, swapped=True)
    return entries


def noisy_pairs(world: Path, out: Path, fraction: float = 0.3, seed: int = 0) -> Path:
    """The held-out (val + test) images with their first caption, ``fraction`` of them swapped (``swap_captions``)."""
    rows = [
        {"image": e["image"], "caption": e["caption"][0]}
        for split in ("val", "test")
        for e in json.loads((world / f"retrieval_{split}.json").read_text())
    ]
    out.write_text(json.dumps(swap_captions(rows, fraction, seed)))
    return out


def clean_pairs(world: Path, out: Path, n: int = 128) -> Path:
    """The first ``n`` training images with their first caption: the known-good pairs that calibrate the filter's
    threshold (as a web filter is calibrated on an annotated set such as COCO's)."""
    train = json.loads((world / "pretrain.json").read_text())[:n]
    out.write_text(json.dumps([{"image": e["image"], "caption": e["caption"][0]} for e in train]))
    return out


def torchrun(nproc: int):
    if nproc == 1:
        return [sys.executable, "-m"]
    return [str(Path(sys.executable).parent / "torchrun"), "--standalone", f"--nproc_per_node={nproc}", "-m"]


def rows(path: Path):
    return [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "runs" / "demo")
    p.add_argument("--quick", action="store_true", help="the shortened CI run")
    p.add_argument("--nproc", type=int, default=2, help="training processes (CPU ranks)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    size = SIZES["quick" if a.quick else "full"]
    out = a.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        WANDB_MODE=os.environ.get("WANDB_MODE", "offline"),
        WANDB_SILENT="true",
        PYTHONUNBUFFERED="1",
    )
    threads = max(1, (os.cpu_count() or 2) // a.nproc)
    times = {}
    t_all = time.time()

    # 1. the world
    from albef.demo.photos import start_crawl_site
    from albef.demo.world import generate_world

    world = out / "world"
    t0 = time.time()
    if not (world / "world.json").is_file():
        generate_world(
            world,
            seed=a.seed,
            num_train=size["train"],
            num_val=size["val"],
            num_test=size["test"],
            image_size=size["image"],
        )
    times["world"] = time.time() - t0
    print(
        f"[1/7] world: {size['train']} train / {size['val']} val / {size['test']} test images at {size['image']} px "
        f"in {world}",
        flush=True,
    )

    # the image encoder's supervised pretraining (the official recipe starts from DeiT): a labelled world of its own
    # seed, whose images pretraining never sees
    vit_world, vit = out / "vit_world", out / "vit" / "world_vit.pth"
    t0 = time.time()
    if not (vit_world / "world.json").is_file():
        generate_world(
            vit_world, seed=a.seed + VIT_WORLD["seed_offset"], **VIT_WORLD["images"], image_size=size["image"]
        )
    run(
        [
            sys.executable,
            "-m",
            "albef.demo.vit",
            "--world",
            vit_world,
            "--out",
            vit,
            "--steps",
            VIT_WORLD["steps"],
            "--threads",
            os.cpu_count() or 2,
        ],
        out / "vit.log",
        env,
    )
    times["image encoder"] = time.time() - t0
    held_out = vit_report(out)["val"]
    print(
        f"      image encoder: the ViT trained on {VIT_WORLD['images']['num_train']} labelled images of its own world "
        f"(held-out cells: colour {held_out['colour']:.0f}%, shape {held_out['shape']:.0f}%, size "
        f"{held_out['size']:.0f}%; object count {held_out['count']:.0f}%)",
        flush=True,
    )

    # 2. crawl + download over loopback
    site, web_pairs, web_shards = out / "site", out / "web_pairs.jsonl", out / "shards_web"
    shutil.rmtree(site, ignore_errors=True)
    base_url, _pages, stop = start_crawl_site(site)
    try:
        times["crawl"] = run(
            [sys.executable, "-m", "data_prep.crawl", site, "--base-url", base_url, "--output", web_pairs],
            out / "crawl.log",
            env,
        )
        shutil.rmtree(web_shards, ignore_errors=True)  # the server's port changes every run: fetch anew
        times["download"] = run(
            [
                sys.executable,
                "-m",
                "data_prep.download",
                web_pairs,
                "--output",
                web_shards,
                "--allow-network",
                "127.0.0.0/8",
                "--image-size",
                size["image"],
                "--resize-mode",
                "center_crop",
                "--no-progress",
            ],
            out / "download.log",
            env,
        )
    finally:
        stop()
    print(
        f"[2/7] web crawl: {sum(1 for _ in open(web_pairs))} pairs extracted, "
        f"{json.loads((web_shards / 'manifest.json').read_text())['num_samples']} images in shards",
        flush=True,
    )

    # 3. world annotations -> shards
    shards = out / "shards_world"
    times["shards"] = run(
        [
            sys.executable,
            "-m",
            "data_prep.annotations",
            world / "pretrain.json",
            "--image-root",
            world / "images",
            "--output",
            shards,
            "--shard-size",
            "100",
            "--image-size",
            size["image"],
            "--no-progress",
        ],
        out / "shards.log",
        env,
    )
    print(f"[3/7] shards: {json.loads((shards / 'manifest.json').read_text())['num_samples']} samples", flush=True)

    # 4. pretraining
    pre = out / "pretrain"
    shutil.rmtree(pre, ignore_errors=True)
    times["pretrain"] = run(
        torchrun(a.nproc)
        + [
            "pretrain.train",
            "pretrain/configs/demo.yaml",
            f"data.shards=[{shards},{web_shards}]",
            f"train.output_dir={pre}",
            f"train.max_steps={size['pretrain_steps']}",
            f"train.num_threads={threads}",
            f"init.vit={vit}",
        ],
        out / "pretrain.log",
        env,
        "pretrain",
        size["pretrain_steps"],
    )
    print(f"[4/7] pretraining done: {pre / 'final.pth'}", flush=True)

    # 5. retrieval: zero-shot, then fine-tuned
    data = [
        f"data.train_files=[{world / 'retrieval_train.json'}]",
        f"data.val_file={world / 'retrieval_val.json'}",
        f"data.test_file={world / 'retrieval_test.json'}",
        f"data.image_root={world / 'images'}",
    ]
    ft = out / "retrieval"
    shutil.rmtree(ft, ignore_errors=True)

    def evaluate(task: str, config: str, run_dir: str, stage: str, *settings) -> float:
        """``finetune.<task>`` evaluating the pretrained weights without training (``train.evaluate_only``) on the
        world's files (``settings``); its run lands in ``out/<run_dir>``. Returns the stage's seconds."""
        shutil.rmtree(out / run_dir, ignore_errors=True)
        command = [sys.executable, "-m", f"finetune.{task}", f"finetune/configs/{config}", *settings]
        command += [f"init.checkpoint={pre / 'final.pth'}", "train.evaluate_only=true"]
        command += [f"train.output_dir={out / run_dir}", f"train.num_threads={os.cpu_count() or 2}"]
        return run(command, out / f"{run_dir}.log", env, stage)

    times["zero-shot eval"] = evaluate("retrieval", "demo_retrieval.yaml", "zeroshot", "zero-shot", *data)
    times["zero-shot classes"] = evaluate(
        "zeroshot",
        "demo_zeroshot.yaml",
        "zeroshot_classes",
        "zero-shot classes",
        f"data.val_file={world / 'zeroshot_val.json'}",
        f"data.test_file={world / 'zeroshot_test.json'}",
        f"data.image_root={world / 'images'}",
    )
    times["grounding"] = evaluate(
        "grounding",
        "demo_grounding.yaml",
        "grounding",
        "grounding",
        f"data.train_files=[{world / 'refcoco+_train.json'}]",
        f"data.val_file={world / 'refcoco+_val.json'}",
        f"data.test_file={world / 'refcoco+_test.json'}",
        f"data.refs_file={world / 'refcoco+_refs.json'}",
        f"data.dets_file={world / 'dets.json'}",
        f"data.image_root={world / 'images'}",
    )
    # the model filters web noise: held-out pairs, 30% with another image's caption, scored by ITC against a threshold
    # that keeps 95% of known-good training pairs
    noisy, filtered, clean = out / "noisy_shards", out / "noisy_filtered", out / "clean_shards"
    for folder in (noisy, filtered, clean):
        shutil.rmtree(folder, ignore_errors=True)
    t0 = time.time()
    for pairs, shards in (
        (noisy_pairs(world, out / "noisy_pairs.json"), noisy),
        (clean_pairs(world, out / "clean_pairs.json"), clean),
    ):
        run(
            [
                sys.executable,
                "-m",
                "data_prep.annotations",
                pairs,
                "--image-root",
                world / "images",
                "--output",
                shards,
                "--shard-size",
                "50",
                "--image-size",
                size["image"],
                "--no-progress",
            ],
            out / f"{shards.name}.log",
            env,
        )
    run(
        [
            sys.executable,
            "-m",
            "data_prep.filter",
            noisy,
            "--checkpoint",
            pre / "final.pth",
            "--output",
            filtered,
            "--calibrate",
            clean,
            "--keep-clean",
            "0.95",
            "--workers",
            "0",
            "--no-progress",
        ],
        out / "filter.log",
        env,
    )
    times["filter"] = time.time() - t0
    times["retrieval fine-tune"] = run(
        torchrun(a.nproc)
        + [
            "finetune.retrieval",
            "finetune/configs/demo_retrieval.yaml",
            *data,
            f"init.checkpoint={pre / 'final.pth'}",
            f"train.output_dir={ft}",
            "train.epochs=100",
            f"train.max_steps={size['finetune_steps']}",
            f"train.num_threads={threads}",
        ],
        out / "retrieval.log",
        env,
        "fine-tune",
        size["finetune_steps"],
    )
    print("[5/7] retrieval evaluated", flush=True)

    def from_pretraining(task: str, config: str, steps: int, **data) -> float:
        """A short fine-tuning of ``finetune.<task>`` from the pretrained weights on the world's files (``data.*``,
        a file or a list of files in the world); its run lands in ``out/<task>``. Returns the stage's seconds."""
        run_dir = out / task
        shutil.rmtree(run_dir, ignore_errors=True)
        settings = [
            f"data.{k}=[{','.join(str(world / f) for f in v)}]" if isinstance(v, list) else f"data.{k}={world / v}"
            for k, v in data.items()
        ]
        settings += [f"data.image_root={world / 'images'}", f"init.checkpoint={pre / 'final.pth'}"]
        settings += [f"train.output_dir={run_dir}", f"train.max_steps={steps}", f"train.num_threads={threads}"]
        command = torchrun(a.nproc) + [f"finetune.{task}", f"finetune/configs/{config}"] + settings
        return run(command, out / f"{task}.log", env, task, steps)

    # 6. SNLI-VE from the pretrained weights: accuracy per label against the hypothesis-only prior
    times["ve fine-tune"] = from_pretraining(
        "ve", "demo_ve.yaml", size["finetune_steps"], train_files=["ve_train.json"], test_file="ve_test.json"
    )
    print("[6/7] SNLI-VE evaluated", flush=True)

    # 7. VQA from the pretrained weights: accuracy per question type against the question-only prior
    times["vqa fine-tune"] = from_pretraining(
        "vqa",
        "demo_vqa.yaml",
        size["vqa_steps"],
        train_files=["vqa_train.json"],
        test_file="vqa_test.json",
        test_answers="vqa_test_answers.json",
        answer_list="answer_list.json",
    )
    print("[7/7] VQA evaluated", flush=True)

    summarize(out, world, times, time.time() - t_all)


def vit_report(out: Path) -> dict:
    """The image encoder stage's report: the last JSON line of ``python -m albef.demo.vit`` in its log."""
    return json.loads([x for x in (out / "vit.log").read_text().splitlines() if x.startswith("{")][-1])


def summarize(out: Path, world: Path, times, total: float) -> None:
    pre_rows = [r for r in rows(out / "pretrain" / "metrics.jsonl") if "train/loss" in r]
    pre_sum = [r["summary"] for r in rows(out / "pretrain" / "metrics.jsonl") if "summary" in r][-1]
    zero = json.loads((out / "zeroshot" / "eval.json").read_text())
    ft_rows = [r for r in rows(out / "retrieval" / "metrics.jsonl") if "test/r_mean" in r]
    ft = ft_rows[-1] if ft_rows else {}
    test = json.loads((world / "retrieval_test.json").read_text())
    n_img, n_cap = len(test), sum(len(e["caption"]) for e in test)
    per = n_cap // n_img
    # chance: a random ranking puts one of an image's `per` captions in its top K / a caption's image in its top K
    chance_tr = {k: 100.0 * (1 - math.comb(n_cap - per, k) / math.comb(n_cap, k)) for k in (1, 5, 10)}
    chance_ir = {k: 100.0 * k / n_img for k in (1, 5, 10)}

    def first_last(key):
        return pre_rows[0][key], sum(r[key] for r in pre_rows[-5:]) / len(pre_rows[-5:])

    speeds = [r["perf/samples_per_s"] for r in pre_rows[len(pre_rows) // 2 :]]
    lines = [
        "",
        "=" * 78,
        "ALBEF offline demo: summary",
        "=" * 78,
        f"pretraining: {pre_sum['steps']} steps, {pre_sum['samples']} image-text pairs, "
        f"{pre_sum['train_seconds']:.0f} s, {sum(speeds) / max(1, len(speeds)):.1f} pairs/s",
    ]
    mfu = [r["perf/mfu"] for r in pre_rows[len(pre_rows) // 2 :] if "perf/mfu" in r]
    rss = max((r["perf/max_rss_mb"] for r in pre_rows if "perf/max_rss_mb" in r), default=None)
    if mfu or rss:
        lines.append(
            "  "
            + ", ".join(
                ([f"MFU {100 * sum(mfu) / len(mfu):.1f}%"] if mfu else [])
                + ([f"peak RSS {rss:.0f} MB (rank 0)"] if rss else [])
            )
        )
    # the warm-ups change what ITC and ITM are measured against mid-run: show each loss where its warm-up ends too.
    # ITC's keys on a rank are its own batch's momentum features, then the queue as well.
    cfg = yaml.safe_load((out / "pretrain" / "config.yaml").read_text())
    train = cfg["train"]
    batch, queued = train["micro_batch_size"], train["micro_batch_size"] + cfg["model"]["queue_size"]
    phases = {
        "train/loss_ita": (
            train["queue_start_step"],
            f"{batch} keys, ln {math.log(batch):.2f}",
            f"{queued} keys with the queue, ln {math.log(queued):.2f}",
        ),
        "train/loss_itm": (train["itm_random_negative_steps"], "random negatives", "hard negatives; prior 0.637"),
    }
    for key in ("train/loss_mlm", "train/loss_ita", "train/loss_itm"):
        start, end = first_last(key)
        step, before, after = phases.get(key, (0, "", ""))
        warm = [r[key] for r in pre_rows if r["step"] <= step][-5:]
        if 0 < step < pre_rows[-1]["step"] and warm:
            lines.append(f"  {key[6:]:<9} {start:7.3f} -> {sum(warm) / len(warm):7.3f} at step {step} ({before})")
            lines.append(f"  {'':<17} -> {end:7.3f} at the end ({after})")
        else:
            lines.append(f"  {key[6:]:<9} {start:7.3f} -> {end:7.3f}")
    vit = vit_report(out)["val"]
    lines.append(
        f"  the ViT started from a supervised one (its labelled world, held-out cells: colour {vit['colour']:.0f}%, "
        f"shape {vit['shape']:.0f}%, size {vit['size']:.0f}%)"
    )
    lines.append(f"retrieval on {n_img} held-out images x {n_cap} captions (R@1 / R@5 / R@10, %):")
    lines.append(f"  {'':<22}{'text retrieval':>24}{'image retrieval':>24}")
    lines.append(
        f"  {'chance':<22}{chance_tr[1]:>10.1f}{chance_tr[5]:>7.1f}{chance_tr[10]:>7.1f}"
        f"{chance_ir[1]:>10.1f}{chance_ir[5]:>7.1f}{chance_ir[10]:>7.1f}"
    )
    for name, m, prefix in (("zero-shot (pretrained)", zero, "test/"), ("fine-tuned", ft, "test/")):
        if m:
            lines.append(
                f"  {name:<22}"
                + "".join(
                    f"{m[prefix + k]:>{10 if k.endswith('r1') else 7}.1f}"
                    for k in ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10")
                )
            )
    lines.append("does the fusion encoder use the image? ITC: similarities alone; ITM: ITC's top k re-ranked by ITM;")
    lines.append("  matched-vs-random: ITM prefers an image's own caption to another image's (50% = image-blind)")
    for name, m, prefix in (("zero-shot (pretrained)", zero, "test/"), ("fine-tuned", ft, "test/")):
        if m and prefix + "itm_match_acc" in m:
            lines.append(
                f"  {name:<22} R@1 TR {m[prefix + 'itc_txt_r1']:.1f} (ITC) -> {m[prefix + 'txt_r1']:.1f} (ITM), "
                f"IR {m[prefix + 'itc_img_r1']:.1f} -> {m[prefix + 'img_r1']:.1f}; matched-vs-random "
                f"{m[prefix + 'itm_match_acc']:.0f}%"
            )
    classes = json.loads((out / "zeroshot_classes" / "eval.json").read_text())
    lines.append(
        "zero-shot classification of the held-out one-object images into 24 'colour shape' classes from prompts"
    )
    lines.append(
        "  (ITC features only; top-1 / top-5 %): "
        + "; ".join(
            f"{split} {classes[split + '/top1']:.1f} / {classes[split + '/top5']:.1f} ({classes[split + '/num_images']:.0f} images)"
            for split in ("val", "test")
        )
        + f"; chance {classes['test/chance']:.1f} / {5 * classes['test/chance']:.1f}"
    )
    grounding = json.loads((out / "grounding" / "eval.json").read_text())
    lines.append(
        "grounding of held-out referring expressions by the official ITM Grad-CAM (fusion layer 2), not fine-tuned"
    )
    lines.append("  (% of expressions whose best-scored box is the object; model / centre box / random box):")
    lines.append(
        "  "
        + "; ".join(
            f"{split} {grounding[split + '/acc']:.1f} / {grounding[split + '/baseline_centre']:.1f} / "
            f"{grounding[split + '/baseline_random']:.1f} ({grounding[split + '/num_refs']:.0f})"
            for split in ("val", "test")
        )
    )
    noisy = json.loads((out / "noisy_pairs.json").read_text())
    from data_prep.shards import iter_tar_samples

    kept = [
        json.loads(m["json"])["extra"]["swapped"]
        for t in sorted((out / "noisy_filtered").glob("*.tar"))
        for _, m in iter_tar_samples(t)
    ]
    n_swapped = sum(e["swapped"] for e in noisy)
    calibration = json.loads((out / "noisy_filtered" / "manifest.json").read_text())["filter"]["calibration"]
    filt = {
        "swapped": n_swapped,
        "true": len(noisy) - n_swapped,
        "swapped_removed": n_swapped - sum(kept),
        "true_kept": len(kept) - sum(kept),
        "min_itc": calibration["threshold"],
    }
    lines.append(
        f"data_prep.filter on {len(noisy)} held-out pairs, {n_swapped} of them with another image's caption, at the "
        f"--min-itc {calibration['threshold']:.3f}"
    )
    lines.append(
        f"  that keeps {calibration['kept']} of {calibration['samples']} known-good training pairs (--calibrate, "
        f"--keep-clean {calibration['keep_clean']}):"
    )
    lines.append(
        f"  removed {filt['swapped_removed']} of {n_swapped} swapped pairs "
        f"({100 * filt['swapped_removed'] / max(1, n_swapped):.0f}%), kept {filt['true_kept']} of {filt['true']} "
        f"true ones ({100 * filt['true_kept'] / max(1, filt['true']):.0f}%)"
    )
    against = {}  # the fine-tuning stages' last test row: accuracy per label / question type and the text-only prior
    for stage, title in (
        (
            "ve",
            "SNLI-VE after {step} steps, held-out test accuracy % (model / hypothesis-only prior of the train file):",
        ),
        ("vqa", "VQA after {step} steps, held-out test accuracy % (model / question-only prior of the train file):"),
    ):
        found = (
            [r for r in rows(out / stage / "metrics.jsonl") if "test/prior_acc" in r] if (out / stage).is_dir() else []
        )
        if not found:
            continue
        v = against[stage] = found[-1]
        kinds = sorted(k[len("test/acc_") :] for k in v if k.startswith("test/acc_"))
        lines.append(title.format(step=v["step"]))
        parts = [f"all {v['test/acc']:.1f} / {v['test/prior_acc']:.1f}"]
        parts += [f"{k.replace('_', ' ')} {v['test/acc_' + k]:.1f} / {v['test/prior_acc_' + k]:.1f}" for k in kinds]
        line = " "
        for part in parts:
            if len(line) + len(part) + 2 > 78 and line.strip():
                lines.append(line.rstrip(";"))
                line = " "
            line += f" {part};"
        lines.append(line.rstrip(";"))
    lines.append("time per stage (s): " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()) + f"; total {total:.0f}")
    lines.append(f"outputs: {out}")
    text = "\n".join(lines)
    print(text, flush=True)
    (out / "summary.txt").write_text(text + "\n")
    (out / "summary.json").write_text(
        json.dumps(
            {
                "pretrain": pre_sum,
                "zero_shot": zero,
                "fine_tuned": ft,
                "zero_shot_classes": classes,
                "image_encoder": vit,
                "grounding": grounding,
                "filter": filt,
                "ve": against.get("ve", {}),
                "vqa": against.get("vqa", {}),
                "chance": {"txt": chance_tr, "img": chance_ir},
                "seconds": times,
                "total_seconds": total,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
