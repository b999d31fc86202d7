"""Does filtering noisy pairs with a model's own scores give a better model? (issue 20, CapFilt without a captioner)

    .venv/bin/python bench/capfilt.py [--noise 0.3] [--steps 400] [--clean 300] [--min-itc 0.5] [--with-clean]

On the demo world (1500 training images, 48 px): a ``--noise`` fraction of the training images get another image's
five captions (a cyclic swap among a seeded sample). Model A is pretrained on the noisy set (the demo recipe, 2
processes, ``--steps``). As BLIP's filter is fine-tuned on clean COCO, A is fine-tuned for retrieval (100 steps) on
a small clean set, the true captions of the first ``--clean`` training images, giving the filter F;
``data_prep.filter`` scores the noisy set with F and keeps the pairs with ITC >= ``--min-itc``; model B is
pretrained from scratch on what was kept, for the same number of steps.
Both are evaluated zero-shot on the 64 held-out test images (x 320 captions). ``--with-clean`` also pretrains on
the clean set, the ceiling. Prints how many swapped and true pairs the filter removed and kept, and A's and B's
held-out recall. Learning numbers, not timings; the machine's load does not change them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from albef.demo.__main__ import run, swap_captions, torchrun  # noqa: E402
from albef.demo.world import generate_world  # noqa: E402
from data_prep.shards import iter_tar_samples  # noqa: E402


def noisy_copy(pretrain_json: Path, out: Path, fraction: float, seed: int) -> int:
    entries = swap_captions(json.loads(pretrain_json.read_text()), fraction, seed)  # each image's 5 captions move
    out.write_text(json.dumps(entries))
    return sum(e["swapped"] for e in entries)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--noise", type=float, default=0.3)
    p.add_argument("--clean", type=int, default=300, help="training images whose true captions tune the filter")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--min-itc", type=float, default=0.5)
    p.add_argument("--with-clean", action="store_true")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "bench_capfilt")
    a = p.parse_args()
    out = a.out.resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    world = out / "world"
    generate_world(world, seed=0, num_train=1500, num_val=64, num_test=64, image_size=48)
    n_swapped = noisy_copy(world / "pretrain.json", out / "noisy.json", a.noise, seed=1)

    def shards(json_file: Path, name: str) -> Path:
        run(
            [
                sys.executable,
                "-m",
                "data_prep.annotations",
                json_file,
                "--image-root",
                world / "images",
                "--output",
                out / name,
                "--shard-size",
                "100",
                "--image-size",
                "48",
                "--no-progress",
            ],
            out / f"{name}.log",
            env,
        )
        return out / name

    def pretrain(data: Path, name: str) -> Path:
        run(
            torchrun(2)
            + [
                "pretrain.train",
                "pretrain/configs/demo.yaml",
                f"data.shards=[{data}]",
                f"train.output_dir={out / name}",
                f"train.max_steps={a.steps}",
                "train.num_threads=1",
                "wandb.mode=disabled",
            ],
            out / f"{name}.log",
            env,
            name,
            a.steps,
        )
        return out / name / "final.pth"

    def evaluate(ckpt: Path, name: str) -> dict:
        run(
            [
                sys.executable,
                "-m",
                "finetune.retrieval",
                "finetune/configs/demo_retrieval.yaml",
                f"data.test_file={world / 'retrieval_test.json'}",
                f"data.image_root={world / 'images'}",
                f"init.checkpoint={ckpt}",
                "train.evaluate_only=true",
                f"train.output_dir={out / name}",
                "wandb.mode=disabled",
            ],
            out / f"{name}.log",
            env,
            name,
        )
        return json.loads((out / name / "eval.json").read_text())

    noisy = shards(out / "noisy.json", "noisy_shards")
    model_a = pretrain(noisy, "pretrain_noisy")
    clean = [
        e
        for e in json.loads((world / "retrieval_train.json").read_text())
        if int(e["image_id"].split("_")[1]) < a.clean
    ]
    (out / "clean_train.json").write_text(json.dumps(clean))
    run(
        torchrun(2)
        + [
            "finetune.retrieval",
            "finetune/configs/demo_retrieval.yaml",
            f"data.train_files=[{out / 'clean_train.json'}]",
            f"data.image_root={world / 'images'}",
            f"init.checkpoint={model_a}",
            f"train.output_dir={out / 'filter_model'}",
            "train.epochs=100",
            "train.max_steps=100",
            "train.num_threads=1",
            "wandb.mode=disabled",
        ],
        out / "filter_model.log",
        env,
        "filter model",
        100,
    )
    run(
        [
            sys.executable,
            "-m",
            "data_prep.filter",
            noisy,
            "--checkpoint",
            out / "filter_model" / "final.pth",
            "--output",
            out / "filtered",
            "--min-itc",
            str(a.min_itc),
            "--workers",
            "0",
            "--no-progress",
        ],
        out / "filter.log",
        env,
    )
    kept = [
        json.loads(m["json"])["extra"]["swapped"]
        for t in sorted((out / "filtered").glob("*.tar"))
        for _, m in iter_tar_samples(t)
    ]
    model_b = pretrain(out / "filtered", "pretrain_filtered")
    results = {"noisy (A)": evaluate(model_a, "eval_noisy"), "filtered (B)": evaluate(model_b, "eval_filtered")}
    if a.with_clean:
        results["clean"] = evaluate(
            pretrain(shards(world / "pretrain.json", "clean_shards"), "pretrain_clean"), "eval_clean"
        )
    n = 1500
    print(
        f"\nnoise: {n_swapped} of {n} training images carry another image's captions; the filter (F's ITC >= "
        f"{a.min_itc}) removed {n_swapped - sum(kept)} of them ({100 * (n_swapped - sum(kept)) / n_swapped:.0f}%) and "
        f"kept {len(kept) - sum(kept)} of {n - n_swapped} true ones ({100 * (len(kept) - sum(kept)) / (n - n_swapped):.0f}%)"
    )
    print(f"zero-shot retrieval on 64 held-out images x 320 captions after {a.steps} pretraining steps each:")
    for name, m in results.items():
        print(
            f"  {name:<13} TR R@1 {m['test/txt_r1']:5.1f}  IR R@1 {m['test/img_r1']:5.1f}  "
            f"TR R@1 (ITC) {m['test/itc_txt_r1']:5.1f}  IR R@1 (ITC) {m['test/itc_img_r1']:5.1f}  r_mean {m['test/r_mean']:5.1f}"
        )
    a_, b_ = results["noisy (A)"]["test/r_mean"], results["filtered (B)"]["test/r_mean"]
    print(f"r_mean filtered / noisy = {b_ / a_:.2f}x")


if __name__ == "__main__":
    main()
