#!/usr/bin/env python3
"""Submit the ALBEF sbatch scripts with resources filled in, printing the exact ``sbatch`` command first.

    python slurm/submit.py pretrain --nodes 4 --gpus-per-node 8 --time 48:00:00 pretrain/configs/4m.yaml
    python slurm/submit.py finetune --gpus-per-node 8 --time 6:00:00 retrieval finetune/configs/retrieval_coco.yaml \\
        init.checkpoint=runs/4m/final.pth
    python slurm/submit.py data_prep --workers 16 --cpus-per-task 32 -- download urls/ --output data/cc12m
    python slurm/submit.py pretrain --dry-run --nodes 2 pretrain/configs/4m.yaml    # print, submit nothing

Resources not given keep the defaults written in the script's ``#SBATCH`` lines. ``--tasks-per-node`` defaults to
``--gpus-per-node`` (one task per GPU), or 1 with ``--gpus-per-node 0`` (CPU only). The job gets
``ALBEF_REPO`` (this repository) in its environment, so it may be submitted from any directory. Only the Python
standard library is used: it runs on login nodes without the training environment.

Exit status: 0 submitted (or printed with --dry-run), 2 bad arguments, else sbatch's own status.
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = {"pretrain": "pretrain.sbatch", "finetune": "finetune.sbatch", "data_prep": "data_prep.sbatch"}
_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class UsageError(Exception):
    pass


def time_seconds(value: str) -> int:
    """SLURM's time formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S -> seconds."""
    m = _TIME.match(value.strip())
    if not m:
        raise UsageError(f"--time {value!r}: expected minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS")
    days, a, b, c = m.groups()
    a, b, c = int(a), (int(b) if b else None), (int(c) if c else None)
    if days is not None:  # D-H[:M[:S]]
        return int(days) * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
    if b is None:  # M
        return a * 60
    if c is None:  # M:S
        return a * 60 + b
    return a * 3600 + b * 60 + c  # H:M:S


def _positive(name: str, value: Optional[int], minimum: int = 1) -> None:
    if value is not None and value < minimum:
        raise UsageError(f"{name} must be at least {minimum}, got {value}")


def _add_resources(p: argparse.ArgumentParser, multi_node: bool) -> None:
    g = p.add_argument_group("resources (default: the script's #SBATCH lines)")
    if multi_node:
        g.add_argument("--nodes", type=int, help="nodes")
        g.add_argument("--gpus-per-node", type=int, help="GPUs per node (0: CPU only)")
        g.add_argument("--tasks-per-node", type=int, help="tasks per node (default: one per GPU)")
    g.add_argument("--cpus-per-task", type=int, help="CPU cores per task")
    g.add_argument("--time", help="time limit, e.g. 24:00:00 or 2-00:00:00")
    g.add_argument("--mem", help="memory per node, e.g. 200G (0: all of it)")
    g.add_argument("--partition", "-p", help="partition")
    g.add_argument("--account", "-A", help="account to charge")
    g.add_argument("--qos", help="quality of service")
    g.add_argument("--exclusive", action="store_true", help="whole nodes only")
    g.add_argument("--job-name", "-J", help="job name (the log file is <job name>-<job id>.out)")
    g.add_argument(
        "--signal-seconds",
        type=int,
        help="send SIGUSR1 this many seconds before the time limit (script default: 600, data_prep 300)",
    )
    g.add_argument("--log-dir", help="directory for the .out files (created; default: the current directory)")
    g.add_argument("--dependency", "-d", help="e.g. afterok:12345 (start after that job succeeded)")
    g.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment variable for the job (repeatable), e.g. WANDB_MODE=offline",
    )
    g.add_argument(
        "--sbatch-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="any other sbatch option, passed as is (repeatable), e.g. --sbatch-arg=--constraint=a100",
    )
    g.add_argument("--dry-run", action="store_true", help="print the sbatch command, submit nothing")


def parse(argv: List[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python slurm/submit.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    sub = p.add_subparsers(dest="kind", required=True, metavar="{pretrain,finetune,data_prep}")
    pre = sub.add_parser("pretrain", help="slurm/pretrain.sbatch CONFIG [key=value ...]")
    _add_resources(pre, multi_node=True)
    pre.add_argument("config", help="pretraining YAML")
    pre.add_argument("overrides", nargs="*", help="key=value overrides")
    fin = sub.add_parser("finetune", help="slurm/finetune.sbatch TASK CONFIG [key=value ...]")
    _add_resources(fin, multi_node=True)
    fin.add_argument("task", help="fine-tuning task: a finetune/<task>.py entrypoint (retrieval, vqa, ...)")
    fin.add_argument("config", help="fine-tuning YAML")
    fin.add_argument("overrides", nargs="*", help="key=value overrides")
    dp = sub.add_parser("data_prep", help="slurm/data_prep.sbatch STEP [args ...] as a job array (args after --)")
    _add_resources(dp, multi_node=False)
    dp.add_argument("--workers", type=int, default=None, help="array tasks = data_prep workers (default: script's)")
    dp.add_argument("--parallel", type=int, default=None, help="at most this many array tasks at a time")
    dp.add_argument("step_args", nargs=argparse.REMAINDER, help="-- STEP [arguments of python -m data_prep.STEP]")
    return p.parse_args(argv)


def build(args: argparse.Namespace, cwd: Path) -> List[str]:
    """The sbatch command line for these arguments (validated; raises UsageError)."""
    script = REPO / "slurm" / SCRIPTS[args.kind]
    cmd = ["sbatch"]
    multi = args.kind in ("pretrain", "finetune")
    if multi:
        _positive("--nodes", args.nodes)
        _positive("--gpus-per-node", args.gpus_per_node, 0)
        _positive("--tasks-per-node", args.tasks_per_node)
        tasks = args.tasks_per_node
        if tasks is None and args.gpus_per_node is not None:
            tasks = args.gpus_per_node or 1
        if args.nodes is not None:
            cmd.append(f"--nodes={args.nodes}")
        if tasks is not None:
            cmd.append(f"--ntasks-per-node={tasks}")
        if args.gpus_per_node is not None:
            cmd.append(f"--gpus-per-node={args.gpus_per_node}")
        if args.gpus_per_node and tasks != args.gpus_per_node:
            print(
                f"warning: {tasks} tasks per node with {args.gpus_per_node} GPUs per node: the engine runs one "
                "process per task and uses GPU (local rank % GPUs)",
                file=sys.stderr,
            )
    else:
        _positive("--workers", args.workers)
        _positive("--parallel", args.parallel)
        if args.workers is not None:
            cmd.append(f"--array=0-{args.workers - 1}" + (f"%{args.parallel}" if args.parallel else ""))
        elif args.parallel is not None:
            raise UsageError("--parallel needs --workers")
    _positive("--cpus-per-task", args.cpus_per_task)
    if args.cpus_per_task is not None:
        cmd.append(f"--cpus-per-task={args.cpus_per_task}")
    limit = None
    if args.time is not None:
        limit = time_seconds(args.time)
        if limit <= 0:
            raise UsageError("--time must be positive")
        cmd.append(f"--time={args.time}")
    if args.signal_seconds is not None:
        _positive("--signal-seconds", args.signal_seconds)
        cmd.append(f"--signal=B:USR1@{args.signal_seconds}")
    signal_at = args.signal_seconds if args.signal_seconds is not None else (300 if args.kind == "data_prep" else 600)
    if limit is not None and signal_at >= limit:
        raise UsageError(
            f"the time-limit warning comes {signal_at} s before the limit, but --time {args.time} is only "
            f"{limit} s: the job would be asked to stop at once. Lower --signal-seconds or raise --time"
        )
    for flag, value in (
        ("--mem", args.mem),
        ("--partition", args.partition),
        ("--account", args.account),
        ("--qos", args.qos),
        ("--job-name", args.job_name),
        ("--dependency", args.dependency),
    ):
        if value is not None:
            cmd.append(f"{flag}={value}")
    if args.exclusive:
        cmd.append("--exclusive")
    if args.log_dir is not None:
        pattern = "%x-%A_%a.out" if args.kind == "data_prep" else "%x-%j.out"
        cmd.append(f"--output={Path(args.log_dir) / pattern}")
    exports = ["ALL", f"ALBEF_REPO={REPO}"]
    for item in args.env:
        name, eq, value = item.partition("=")
        if not eq or not _ENV_NAME.match(name):
            raise UsageError(f"--env {item!r}: expected NAME=VALUE")
        exports.append(item)
    bad = [e for e in exports if "," in e]
    if bad:
        raise UsageError(f"sbatch --export cannot carry commas: {bad[0]!r}")
    cmd.append("--export=" + ",".join(exports))
    cmd.extend(args.sbatch_arg)
    cmd.append(str(script))

    if multi:
        config = Path(args.config)
        if not (config if config.is_absolute() else cwd / config).is_file():
            raise UsageError(f"config file {args.config!r} not found (relative to {cwd})")
        bad = [o for o in args.overrides if "=" not in o or o.startswith("=")]
        if bad:
            raise UsageError(f"{bad[0]!r} is not a key=value override")
        if args.kind == "finetune":
            if not (REPO / "finetune" / f"{args.task}.py").is_file():
                known = sorted(p.stem for p in (REPO / "finetune").glob("*.py") if p.stem != "__init__")
                raise UsageError(f"unknown fine-tuning task {args.task!r}; choose one of: {', '.join(known)}")
            cmd.append(args.task)
        cmd.append(args.config)
        cmd.extend(args.overrides)
    else:
        step_args = args.step_args[1:] if args.step_args[:1] == ["--"] else args.step_args
        if not step_args:
            raise UsageError("data_prep needs the step and its arguments after --, e.g. -- download urls/ --output out")
        if not (REPO / "data_prep" / f"{step_args[0]}.py").is_file():
            raise UsageError(f"unknown data_prep step {step_args[0]!r} (no data_prep/{step_args[0]}.py)")
        cmd.extend(step_args)
    return cmd


def main(argv: Optional[List[str]] = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    try:
        cmd = build(args, Path.cwd())
    except UsageError as e:
        print(f"submit.py: error: {e}", file=sys.stderr)
        return 2
    print("sbatch command:", shlex.join(cmd), flush=True)
    if args.dry_run:
        return 0
    if args.log_dir is not None:
        Path(args.log_dir).mkdir(parents=True, exist_ok=True)
    try:
        out = subprocess.run([cmd[0], "--parsable", *cmd[1:]], capture_output=True, text=True)
    except FileNotFoundError:
        print("submit.py: error: sbatch not found (run this on a SLURM login node)", file=sys.stderr)
        return 127
    if out.returncode != 0:
        sys.stderr.write(out.stderr)
        print(f"submit.py: error: sbatch failed with status {out.returncode}", file=sys.stderr)
        return out.returncode
    job_id = out.stdout.strip().split(";")[0]
    print(f"submitted job {job_id}")
    print(
        f"  follow it: squeue -j {job_id}   (log: see --output, default <job name>-{job_id}.out; "
        f"arrays: <job name>-{job_id}_<task>.out)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
