"""Training-step benchmark: step time, pairs/s, MFU and peak memory of the ALBEF pretraining step.

    python bench/train_step.py                       # tiny and small, CPU, ~5 minutes on 2 cores
    python bench/train_step.py --presets small --steps 5 --json out.json
    python bench/train_step.py --presets base --device cuda --precisions bf16 fp16   # used by bench/gpu_check.sh
    python bench/train_step.py --presets small --precisions fp32 --worlds 1 2        # ZeRO's partitioning at 2 ranks

Every variant runs in fresh processes (2 x ``--rounds``, in alternating order, so that drift hits both sides) and
reports its fastest process's median step time over ``--steps`` steps after ``--warmup`` steps, on one fixed
synthetic batch:

* ``baseline``: the official step re-created plainly: our model in float32 with the explicit-softmax attention
  (the official op order), every text position computed, padding included (``model.text_packing=false``), the MLM
  head projecting every position onto the 30522-word vocabulary before taking the masked ones
  (``model.mlm_projection=all``, as the official ``BertForMaskedLM``), ``torch.optim.AdamW`` in its default
  implementation (a for-loop over the tensors on CPU, foreach on CUDA), no DeepSpeed. What still differs from the
  unchanged official code: no DDP wrapper and no ``concat_all_gather`` at world size 1 (the official code calls
  both, each a no-op copy at one process), our fused momentum update (``torch._foreach_*``, the same float32
  formula) instead of its Python loop over parameter pairs, and our WordPiece-free synthetic batch (captions of
  10-24 of 25 tokens, a third of the positions padding).
* ``ours-<precision>[-gc][-w<N>]``: the engine's configuration: DeepSpeed ZeRO-2 (``--stage 0`` or ``1`` for
  ``ds_configs/zero<N>_*``), fused attention, token packing (the text and fusion layers run on the real tokens
  only), fused AdamW (``albef.engine.optim``), the given precision, with or without gradient checkpointing, at
  each world size of ``--worlds``. At world size N > 1 the variant runs as N ranks (gloo on CPU) that share the
  ``--threads`` (each rank gets threads / N), each with the full batch (global batch N x batch), so that ZeRO
  partitions the gradients and optimizer state over N ranks and the queue's all-gather is real. Its step time is
  the slowest rank's, pairs/s counts all ranks' pairs, its peak memory is the largest rank's, and memory per pair
  is that rank's peak over its own batch: what a GPU of a data-parallel run needs per sample.

Per phase (median over the timed steps, seconds): ``fwd`` the forward pass without the momentum parts, ``mom`` the
momentum update and the momentum encoders' forward passes, ``queue`` the momentum features' all-gather and enqueue,
``bwd`` the backward pass (with DeepSpeed: its gradient hooks and bucket reduction, and fp16's loss scaling),
``opt`` the optimizer step (with DeepSpeed: ZeRO's partition step, gradient unscaling and the overflow check).

MFU = analytic matmul FLOPs of the step (albef.engine.flops, checked against torch's FlopCounterMode in the tests;
the text layers at the real tokens only, so the baseline's work on padding does not count) / step time / this machine's measured matmul peak in the same dtype and thread count. Peak memory is the process's
peak RSS on CPU (max GPU memory allocated on CUDA) during the warm-up and timed steps, minus the RSS before the
model was built: the model, optimizer state and DeepSpeed's buffers count, the set-up's transient copies do not (the
peak is reset after set-up, as ``torch.cuda.reset_peak_memory_stats``; on CPU through ``/proc/self/clear_refs``).
Printed: one row per variant and the ratios against the baseline, all measured in this run.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BATCH = {"tiny": 8, "small": 16, "base": 64}
PHASES = ("fwd", "mom", "queue", "bwd", "opt")


def _child(args) -> dict:
    sys.path.insert(0, str(REPO))
    import torch

    from albef.engine.flops import measured_matmul_peak, pretrain_step_flops
    from albef.models import build_model, model_config

    device = torch.device(args.device, args.rank) if args.device == "cuda" else torch.device(args.device)
    torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    official = args.variant == "baseline"
    cfg = model_config(
        args.preset,
        [
            f"attn_impl={'eager' if official else 'sdpa'}",
            f"mlm_projection={'all' if official else 'masked'}",
            f"text_packing={'false' if official else 'true'}",
            f"grad_checkpointing={'true' if args.gc else 'false'}",
        ],
    )
    bs = args.batch or BATCH[args.preset]
    if cfg.queue_size % bs:
        cfg.queue_size = bs * max(1, cfg.queue_size // bs)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    torch.manual_seed(0)
    model = build_model(cfg, "pretrain")
    g = torch.Generator().manual_seed(0)
    image = torch.randn(bs, 3, cfg.vision.img_size, cfg.vision.img_size, generator=g)
    ids = torch.randint(1000, 30000, (bs, 25), generator=g)
    ids[:, 0] = 101
    mask = torch.ones_like(ids)
    for i in range(bs):  # captions of varied length, as real batches
        mask[i, 10 + i % 15 :] = 0
        ids[i, 10 + i % 15 :] = 0

    image, ids, mask = image.to(device), ids.to(device), mask.to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    phase = collections.defaultdict(float)  # seconds of the current step per phase

    def timed(name, fn, only=None):
        def run(*a, **k):
            if only is not None and not only(k):
                return fn(*a, **k)
            sync()
            t0 = time.perf_counter()
            out = fn(*a, **k)
            sync()
            phase[name] += time.perf_counter() - t0
            return out

        return run

    momentum = lambda k: k.get("momentum", False)  # noqa: E731
    for name in ("encode_image", "encode_text", "mlm_hidden", "mlm_head"):
        setattr(model, name, timed("mom", getattr(model, name), momentum))
    model.momentum_update = timed("mom", model.momentum_update)
    model.dequeue_and_enqueue = timed("queue", model.dequeue_and_enqueue)
    if args.variant == "baseline":
        model.to(device)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-5)

        forward = timed("fwd", lambda: model(image, ids, mask, alpha=0.4))
        backward = timed("bwd", lambda loss: loss.backward())
        update = timed("opt", lambda: (opt.step(), opt.zero_grad(set_to_none=True)))

        def step():
            out = forward()
            backward(out["loss_mlm"] + out["loss_ita"] + out["loss_itm"])
            update()

    else:
        import importlib

        import deepspeed

        os.environ.update(
            RANK=str(args.rank), WORLD_SIZE=str(args.world), LOCAL_RANK=str(args.rank), MASTER_ADDR="127.0.0.1"
        )
        os.environ.setdefault("MASTER_PORT", str(29600 + os.getpid() % 1000))
        if device.type == "cpu":
            importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
        else:
            torch.cuda.set_device(device)
        if args.world > 1:
            deepspeed.init_distributed(
                dist_backend="gloo" if device.type == "cpu" else "nccl", auto_mpi_discovery=False
            )
        ds = json.loads((REPO / "ds_configs" / f"zero{args.stage}_{args.precision}.json").read_text())
        ds.update(train_batch_size=bs * args.world, train_micro_batch_size_per_gpu=bs, gradient_accumulation_steps=1)
        from albef.engine.optim import build_optimizer

        fp32_momentum = model.momentum_state_fp32() if dtype != torch.float32 else None
        engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=build_optimizer(model, 1e-5, 0.02, (0.9, 0.999), 1e-8), config=ds
        )
        if fp32_momentum:
            model.keep_momentum_fp32(fp32_momentum)
        image = image.to(dtype)

        forward = timed("fwd", lambda: engine(image, ids, mask, alpha=0.4))
        backward = timed("bwd", engine.backward)
        update = timed("opt", engine.step)

        def step():
            out = forward()
            backward(out["loss_mlm"] + out["loss_ita"] + out["loss_itm"])
            update()

    # the peak counts the training steps, not the set-up's transient copies (DeepSpeed flattening the parameters):
    # reset it here, as torch.cuda.reset_peak_memory_stats does on CUDA ("5" resets VmHWM and ru_maxrss, Linux >= 4.0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")
    for _ in range(args.warmup):
        step()
    times, phases = [], collections.defaultdict(list)
    for _ in range(args.steps):
        phase.clear()
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
        phase["fwd"] -= phase["mom"] + phase["queue"]  # the forward's own time (its momentum parts are counted apart)
        for name in PHASES:
            phases[name].append(phase[name])
    t = statistics.median(times)
    flops = pretrain_step_flops(cfg, bs, float(mask.sum()) / bs, 0.15 * float(mask[:, 1:].sum()) / bs)
    peak = measured_matmul_peak(dtype if args.variant != "baseline" else torch.float32, device)
    mem = (
        torch.cuda.max_memory_allocated() / 2**20
        if device.type == "cuda"
        else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    )
    return {
        "preset": args.preset,
        "variant": args.label,
        "batch": bs,
        "world": args.world,
        "step_s": t,
        "pairs_per_s": bs * args.world / t,
        "tflops_per_step": flops / 1e12,
        "mfu": flops / t / peak,
        "peak_tflops": peak / 1e12,
        "peak_mem_mb": mem,
        "mem_per_sample_mb": mem / bs,
        "phases_s": {name: statistics.median(v) for name, v in phases.items()},
    }


def _run_variant(args, preset, variant, prec, gc, world, label):
    """One process per rank; the ranks' results merged into one row (None, with the logs printed, on failure)."""
    threads = max(1, args.threads // world)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), DS_ACCELERATOR=args.device if args.device == "cpu" else "cuda")
    if world > 1:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            env["MASTER_PORT"] = str(s.getsockname()[1])
    cmd = [
        sys.executable,
        __file__,
        "--child",
        "--preset",
        preset,
        "--variant",
        variant,
        "--precision",
        prec,
        "--label",
        label,
        "--device",
        args.device,
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--threads",
        str(threads),
        "--batch",
        str(args.batch),
        "--stage",
        str(args.stage),
        "--world",
        str(world),
    ]
    procs = [
        subprocess.Popen(
            cmd + ["--rank", str(rank)] + ["--gc"] * gc,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=REPO,
        )
        for rank in range(world)
    ]
    outs = [p.communicate() for p in procs]
    rows = []
    for stdout, stderr in outs:
        line = next((x for x in stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            print(f"{preset} {label} failed:\n{stdout[-2000:]}\n{stderr[-2000:]}", file=sys.stderr)
            return None
        rows.append(json.loads(line[7:]))
    slowest, biggest = max(rows, key=lambda r: r["step_s"]), max(rows, key=lambda r: r["peak_mem_mb"])
    return dict(slowest, peak_mem_mb=biggest["peak_mem_mb"], mem_per_sample_mb=biggest["mem_per_sample_mb"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["tiny", "small"])
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="threads of each variant in all (shared by its ranks)")
    p.add_argument("--worlds", nargs="+", type=int, default=[1], help="world sizes of the ours-* variants")
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run every variant 2 x ROUNDS times (this machine's speed "
        "drifts between processes by up to 20%%: more rounds, steadier ratios)",
    )
    p.add_argument("--batch", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the rows here")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--preset", help=argparse.SUPPRESS)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--precision", help=argparse.SUPPRESS)
    p.add_argument("--gc", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--stage", type=int, default=2, help="the ZeRO stage of the ours-* variants (ds_configs/zero<N>_*)")
    p.add_argument("--label", help=argparse.SUPPRESS)
    p.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--world", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print("RESULT " + json.dumps(_child(args)), flush=True)
        return

    rows = []
    for preset in args.presets:
        variants = [("baseline", "fp32", False, 1, "baseline-fp32")] if args.device == "cpu" else []
        for world in args.worlds:
            w = f"-w{world}" * (world > 1)
            for prec in args.precisions:
                variants += [
                    ("ours", prec, False, world, f"ours-{prec}{w}"),
                    ("ours", prec, True, world, f"ours-{prec}-gc{w}"),
                ]
        order = (variants + variants[::-1]) * args.rounds  # alternating order; keep each variant's fastest run
        best = {}
        for variant, prec, gc, world, label in order:
            r = _run_variant(args, preset, variant, prec, gc, world, label)
            if r is not None and (label not in best or r["step_s"] < best[label]["step_s"]):
                best[label] = r
        base = best.get("baseline-fp32")
        print(
            f"\n== {preset} (batch {args.batch or BATCH[preset]} per rank, {args.device}, {args.threads} threads "
            f"per variant) =="
        )
        print(
            f"{'variant':<16}{'step s':>9}{'pairs/s':>9}{'MFU':>7}{'peak MB':>9}{'MB/pair':>9}{'speed x':>9}{'mem x':>7}"
            + "".join(f"{name:>7}" for name in PHASES)
        )
        for label, r in best.items():
            speed = r["pairs_per_s"] / base["pairs_per_s"] if base else float("nan")
            mem = r["mem_per_sample_mb"] / base["mem_per_sample_mb"] if base else float("nan")
            print(
                f"{label:<16}{r['step_s']:>9.4f}{r['pairs_per_s']:>9.2f}{r['mfu']:>7.1%}{r['peak_mem_mb']:>9.0f}"
                f"{r['mem_per_sample_mb']:>9.1f}{speed:>9.2f}{mem:>7.2f}"
                + "".join(f"{r['phases_s'][name]:>7.3f}" for name in PHASES)
            )
            r.update(speed_vs_baseline=speed, mem_vs_baseline=mem)
            rows.append(r)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
