"""Faults found in a review of the run loop (issue 18), each reproduced here first and then fixed: config checks,
safe checkpoint loads, never rewriting a complete checkpoint, resuming at an epoch's last batch. The run-level ones
use the real engine (DeepSpeed, the demo world's shards made by data_prep)."""

from __future__ import annotations

import collections
import json
import os
import sys
from pathlib import Path
from typing import Dict, List

import pytest
import torch

from albef.config import ConfigError, load_config
from albef.tasks.pretrain import PretrainConfig

sys.path.insert(0, str(Path(__file__).parent))
from runs import base_overrides, launch, losses, summary  # noqa: E402

CONFIG = "pretrain/configs/tiny_cpu.yaml"


# ------------------------------------------------------------------------------------------------ config (9)


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.betas=[0.9]", r"override 'train.betas=\[0.9\]'.*two numbers"),
        ("train.betas=[0.9, 1.5]", r"override 'train.betas=\[0.9, 1.5\]'.*in \[0, 1\)"),
        ("train.betas=[a, b]", r"override 'train.betas=\[a, b\]'.*expected a number"),
        ("train.log_every=0", r"override 'train.log_every=0'.*>= 1"),
        ("train.eval_every_epochs=0", r"override 'train.eval_every_epochs=0'.*>= 1"),
        ("train.max_nonfinite_steps=0", r"override 'train.max_nonfinite_steps=0'.*>= 1"),
        ("train.save_every=-1", r"override 'train.save_every=-1'.*>= 0"),
        ("train.itm_random_negative_steps=-5", r"override 'train.itm_random_negative_steps=-5'.*>= 0"),
        ("train.mlm_weight=-0.5", r"override 'train.mlm_weight=-0.5'.*>= 0"),
        ("train.lr=[1e-4", r"override 'train.lr=\[1e-4': not valid YAML"),
        ("train.max_steps=ten", r"override 'train.max_steps=ten'.*expected an integer"),
        ("train.no_such_key=1", r"override 'train.no_such_key=1'.*unknown key\(s\) \['no_such_key'\]"),
        # one owner per value: the per-rank batch is train.micro_batch_size (8 here), the image size the model's
        ("data.batch_size=32", r"override 'data.batch_size=32'.*train.micro_batch_size=8; leave data.batch_size unset"),
        ("data.image_res=32", r"override 'data.image_res=32'.*must equal model.vision.img_size=64"),
    ],
)
def test_bad_overrides_are_errors_that_name_the_override(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(PretrainConfig, CONFIG, ["train.max_steps=3", override])


def test_errors_in_the_yaml_file_still_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"base: {Path(CONFIG).resolve()}\ntrain: {{log_every: 0}}\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*log_every.*>= 1"):
        load_config(PretrainConfig, str(bad), ["train.max_steps=3"])
    assert load_config(PretrainConfig, CONFIG, ["train.betas=[0.8, 0.99]"]).train.betas == [0.8, 0.99]


def test_a_config_error_is_a_message_not_a_traceback(tmp_path):
    code, out = launch(["train.max_steps=2", "train.lr=[1e-4"], config=CONFIG)
    assert code == 2 and "config error: override 'train.lr=[1e-4': not valid YAML" in out
    assert "Traceback" not in out


# ------------------------------------------------------------------------------------------------ safe loads (1)


class _Payload:
    """Unpickling this runs code: it opens (creates) a file. A weights-only load must refuse it."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.slow
def test_checkpoint_loads_cannot_run_code(world_shards, tmp_path):
    """Each .pt file of a run checkpoint replaced by a pickle that runs code: resuming and exporting refuse it, name
    the checkpoint, and the code never runs."""
    import shutil

    from albef.engine import checkpointing

    clean = tmp_path / "clean"
    code, out = launch(base_overrides(world_shards, clean, **{"train.max_steps": 1}))
    assert code == 0, out[-3000:]
    tag_dir = clean / "checkpoints" / "step000000001"
    files = sorted(p.name for p in tag_dir.glob("*.pt"))
    assert "mp_rank_00_model_states.pt" in files and any("optim_states" in f for f in files), files
    assert not any(p.suffix == ".pt" and p.name.startswith("rank") for p in tag_dir.iterdir()), "no pickled RNG state"
    for name in files:
        run = tmp_path / name
        shutil.copytree(clean, run)
        marker = tmp_path / f"ran-{name}"
        tampered = run / "checkpoints" / "step000000001" / name
        torch.save({"module": _Payload(marker)}, tampered)
        complete = tampered.parent / "COMPLETE"  # whoever can write the file can fix the size list too
        info = json.loads(complete.read_text())
        info["files"][name] = tampered.stat().st_size
        complete.write_text(json.dumps(info))
        code, out = launch(base_overrides(world_shards, run, **{"train.max_steps": 2}))
        assert code != 0 and "cannot load this checkpoint safely" in out and "step000000001" in out, out[-3000:]
        assert not marker.exists(), f"unpickling {name} ran code"
        with pytest.raises(RuntimeError, match="cannot load this checkpoint safely"):
            checkpointing.consolidate(run / "checkpoints")
        assert not marker.exists(), f"consolidating {name} ran code"


# ------------------------------------------------------------------------------------------------ complete checkpoints (2)


def _mtimes(tag_dir: Path):
    return {p.name: p.stat().st_mtime_ns for p in tag_dir.iterdir()}


@pytest.mark.slow
def test_a_complete_checkpoint_is_never_rewritten_and_a_damaged_one_is_skipped(world_shards, tmp_path):
    from albef.engine import checkpointing

    run = tmp_path / "run"
    common = {"train.max_steps": 4, "train.save_every": 2}
    code, out = launch(base_overrides(world_shards, run, **common))
    assert code == 0, out[-3000:]
    final = run / "checkpoints" / "step000000004"
    before = _mtimes(final)
    # the same job again (a requeue after it finished): nothing to train, and the final checkpoint is left alone
    code, out = launch(base_overrides(world_shards, run, **common))
    assert code == 0 and summary(run)[-1]["steps"] == 4, out[-3000:]
    assert _mtimes(final) == before, "a complete checkpoint was written into again"
    # a damaged newest checkpoint (a file cut short): the run resumes from the previous one, with a warning
    model_states = final / "mp_rank_00_model_states.pt"
    model_states.write_bytes(model_states.read_bytes()[:1000])
    code, out = launch(base_overrides(world_shards, run, **{**common, "train.max_steps": 6}))
    assert code == 0, out[-3000:]
    assert "step000000004" in out and "damaged" in out and "resumed from" in out and "step000000002" in out, out[-3000:]
    assert summary(run)[-1]["steps"] == 6 and (run / "checkpoints" / "step000000006" / "COMPLETE").is_file()
    # every complete checkpoint damaged: an error, not a silent fresh start
    for tag in checkpointing.complete_tags(run / "checkpoints"):
        (run / "checkpoints" / tag / "mp_rank_00_model_states.pt").write_bytes(b"cut")
    code, out = launch(base_overrides(world_shards, run, **{**common, "train.max_steps": 8}))
    assert code != 0 and "every complete checkpoint is damaged" in out, out[-3000:]


# ------------------------------------------------------------------------------------------------ epoch boundary (3)


@pytest.mark.slow
def test_resume_from_an_epochs_last_batch_continues_with_the_next_epoch(world_shards, tmp_path):
    """192 samples, 16 per step: 12 steps per epoch. A run stopped with its checkpoint at step 12 (the last batch
    of epoch 0) and resumed must train epochs 1 and 2 as the uninterrupted run does, not replay epoch 1."""
    common = {"train.max_steps": 26, "data.num_workers": 1}
    code, out = launch(base_overrides(world_shards, tmp_path / "straight", **common))
    assert code == 0, out[-3000:]
    straight = losses(tmp_path / "straight")
    run = tmp_path / "resumed"
    code, out = launch(base_overrides(world_shards, run, **{**common, "train.max_steps": 12}))
    assert code == 0, out[-3000:]
    code, out = launch(base_overrides(world_shards, run, **common))
    assert code == 0 and "step000000012" in out, out[-3000:]
    resumed = losses(run)
    assert sorted(resumed) == sorted(straight) == list(range(1, 27))
    for step in range(13, 27):
        assert resumed[step]["train/epoch"] == straight[step]["train/epoch"], step
        for k in ("train/loss", "train/loss_mlm", "train/loss_ita", "train/loss_itm"):
            assert resumed[step][k] == pytest.approx(straight[step][k], rel=1e-6, abs=1e-7), (step, k)
    assert summary(run)[-1]["samples"] == 26 * 16


# ------------------------------------------------------------------------------------------------ durability (7)

RECORD_IO = """
import json, os, runpy, sys
log = open(os.environ["IO_LOG"], "a", buffering=1)
fsync, replace = os.fsync, os.replace
def traced_fsync(fd):
    fsync(fd)
    log.write(json.dumps(["fsync", os.readlink(f"/proc/self/fd/{fd}")]) + "\\n")
def traced_replace(src, dst, **kw):
    replace(src, dst, **kw)
    log.write(json.dumps(["replace", os.path.abspath(src), os.path.abspath(dst)]) + "\\n")
os.fsync, os.replace = traced_fsync, traced_replace
sys.argv = sys.argv[1:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


def _io_events(log: Path):
    return [tuple(json.loads(x)) for x in log.read_text().splitlines()]


def _flushed_before(events, path: Path, index: int) -> bool:
    """``path``'s data was fsynced before event ``index``: itself, or the temporary file renamed onto it."""
    names = {str(path)} | {e[1] for e in events[:index] if e[0] == "replace" and e[2] == str(path)}
    return any(e[0] == "fsync" and e[1] in names for e in events[:index])


@pytest.mark.slow
def test_checkpoints_and_shards_are_flushed_before_they_are_marked_complete(demo_world, world_shards, tmp_path):
    """A node crash must not leave a truncated file under a complete name: every checkpoint file is fsynced before
    COMPLETE appears and the directory after; every shard before its rename and the directory after."""
    import subprocess

    from runs import PY, REPO, run_env

    log = tmp_path / "io.jsonl"
    run = tmp_path / "run"
    cmd = [PY, "-c", RECORD_IO, "pretrain.train", CONFIG, *base_overrides(world_shards, run, **{"train.max_steps": 2})]
    p = subprocess.run(cmd, cwd=REPO, env=run_env(IO_LOG=str(log)), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    events = _io_events(log)
    tag = run / "checkpoints" / "step000000002"
    done = next(i for i, e in enumerate(events) if e[0] == "replace" and e[2] == str(tag / "COMPLETE"))
    for f in tag.iterdir():
        if f.name != "COMPLETE":
            assert _flushed_before(events, f, done), f"{f.name} was not fsynced before COMPLETE"
    assert ("fsync", str(tag)) in events[done:], "the checkpoint directory was not fsynced after COMPLETE"

    log.unlink()
    out = tmp_path / "shards"
    cmd = [
        PY,
        "-c",
        RECORD_IO,
        "data_prep.annotations",
        str(demo_world / "pretrain.json"),
        "--image-root",
        str(demo_world / "images"),
        "--output",
        str(out),
        "--shard-size",
        "48",
        "--image-size",
        "64",
        "--no-progress",
        "--processes",
        "1",
    ]
    p = subprocess.run(cmd, cwd=REPO, env=run_env(IO_LOG=str(log)), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    events = _io_events(log)
    published = [
        (i, Path(e[1]), Path(e[2]))
        for i, e in enumerate(events)
        if e[0] == "replace" and e[2].endswith(".tar") and Path(e[2]).parent == out
    ]
    assert len(published) == 4  # 192 samples in shards of 48
    for i, src, dst in published:
        assert _flushed_before(events, src, i), f"{dst.name} renamed before its data was fsynced"
        assert ("fsync", str(out)) in events[i + 1 :], f"{dst.name}: directory not fsynced after the rename"
    manifest = max(i for i, e in enumerate(events) if e[0] == "replace" and e[2] == str(out / "manifest.json"))
    assert ("fsync", str(out)) in events[manifest + 1 :]


# ------------------------------------------------------------------------------------------------ non-finite steps (4)

NONFINITE_SCRIPT = """
import json, sys, torch
from albef.engine.cli import main
from albef.tasks.pretrain import PretrainTask
BAD_LOSS, BAD_GRAD = int(sys.argv[1]), int(sys.argv[2])
REPORT = open(sys.argv[3], "w", buffering=1)

class NanGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()
    @staticmethod
    def backward(ctx, g):
        return g * float("nan")

def state(model):
    sd = model.module.state_dict() if hasattr(model, "module") else model.state_dict()
    return {k: v.detach().clone() for k, v in sd.items()}

def same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)

class Faulty(PretrainTask):
    calls, saved = 0, {}
    def training_step(self, model, batch, progress):
        Faulty.calls += 1
        c = Faulty.calls
        now = state(model)
        if c in Faulty.saved:
            when, before = Faulty.saved.pop(c)
            REPORT.write(json.dumps({"after": when, "call": c, "unchanged": same(before, now)}) + "\\n")
        if c == BAD_LOSS:  # the state before the bad micro-step, compared with the state after it
            Faulty.saved[c + 1] = (c, now)
        if c == BAD_GRAD - 1:  # the state before the bad gradients' optimizer step (two micro-steps)
            Faulty.saved[c + 2] = (c, now)
        loss, logs = super().training_step(model, batch, progress)
        if c == BAD_LOSS:
            loss = loss * float("nan")
        if c == BAD_GRAD:
            loss = NanGrad.apply(loss)
        return loss, logs

main(Faulty, sys.argv[4:])
"""


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 2])
def test_a_skipped_step_changes_no_state(world_shards, tmp_path, stage):
    """A non-finite loss (micro-step 3) and a finite loss with non-finite gradients (micro-step 7, the second of its
    optimizer step's two micro-batches 6 and 7) are skipped: weights, momentum encoders, queues and queue pointer are
    exactly as before them, and both are counted."""
    import subprocess

    from runs import PY, REPO, run_env

    report = tmp_path / "report.jsonl"
    cmd = [
        PY,
        "-c",
        NONFINITE_SCRIPT,
        "3",
        "7",
        str(report),
        CONFIG,
        *base_overrides(
            world_shards,
            tmp_path / "run",
            **{"train.max_steps": 5, "train.ds_config": f"ds_configs/zero{stage}_fp32.json"},
        ),
    ]
    p = subprocess.run(cmd, cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    rows = [json.loads(x) for x in report.read_text().splitlines()]
    assert {(r["after"], r["call"]) for r in rows} == {(3, 4), (6, 8)}, rows
    assert all(r["unchanged"] for r in rows), rows
    s = summary(tmp_path / "run")[-1]
    assert s["nonfinite_skipped"] == 2 and s["steps"] == 5, s
    assert all(torch.isfinite(torch.tensor(r["train/loss"])) for r in losses(tmp_path / "run").values())


# ------------------------------------------------------------------------------------------------ failed saves (6)

DISK_FULL_SCRIPT = """
import errno, os, sys, torch
from albef.engine.cli import main
from albef.tasks.pretrain import PretrainTask
save = torch.save
def full_disk(obj, f, *a, **kw):
    if os.environ.get("RANK") == "1" and "step000000004" in str(f):
        raise OSError(errno.ENOSPC, "No space left on device", str(f))
    return save(obj, f, *a, **kw)
torch.save = full_disk
main(PretrainTask, sys.argv[1:])
"""


@pytest.mark.slow
def test_a_save_that_fails_on_one_rank_stops_every_rank_with_the_reason(world_shards, tmp_path):
    """Rank 1's disk is full at the step-4 checkpoint: both ranks exit promptly naming rank 1's error (no barrier
    waits forever), the step-2 checkpoint stays the newest complete one, and a rerun resumes from it."""
    import subprocess
    import time

    from runs import PY, REPO, run_env

    run = tmp_path / "run"
    common = {"train.max_steps": 6, "train.save_every": 2, "train.collective_timeout_s": 120}
    cmd = [
        str(Path(PY).parent / "torchrun"),
        "--standalone",
        "--nproc_per_node=2",
        "--no-python",
        PY,
        "-c",
        DISK_FULL_SCRIPT,
        CONFIG,
        *base_overrides(world_shards, run, **common),
    ]
    t0 = time.time()
    p = subprocess.run(cmd, cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=600)
    out = p.stdout + p.stderr
    assert p.returncode != 0 and time.time() - t0 < 300, out[-3000:]
    assert out.count("checkpoint step000000004 failed on rank 1: OSError") >= 2, out[-4000:]  # said by both ranks
    assert "No space left on device" in out
    ckpt = run / "checkpoints"
    assert (ckpt / "step000000002" / "COMPLETE").is_file() and not (ckpt / "step000000004" / "COMPLETE").exists()
    code, out = launch(base_overrides(world_shards, run, **common), nproc=2)
    assert code == 0 and "step000000002" in out, out[-3000:]
    assert summary(run)[-1]["steps"] == 6


# ------------------------------------------------------------------------------------------------ signals (8)

SLOW_EVAL_SCRIPT = """
import os, signal, sys, time
from albef.engine.cli import main
from albef.engine.signals import until_stop
from albef.tasks.pretrain import PretrainTask
MODE, MARKER = os.environ["EVAL_MODE"], os.environ["EVAL_MARKER"]

class SlowEval(PretrainTask):
    eval_splits, primary_metric = ("val",), "score"
    def evaluate(self, model, split, device, dtype):
        open(MARKER, "w").close()
        n = 0
        for _ in until_stop(range(240 if MODE == "slow" else 2)):
            time.sleep(0.25)
            n += 1
        if MODE == "signal-after":  # the evaluation is over; the export comes next
            os.kill(os.getpid(), signal.SIGUSR1)
        return {"score": float(n)}

main(SlowEval, sys.argv[1:])
"""


@pytest.mark.slow
def test_a_signal_during_evaluation_or_export_checkpoints_and_exits_75(world_shards, tmp_path):
    import signal
    import subprocess
    import time

    from runs import PY, REPO, run_env

    def start(run, mode, **kw):
        marker = tmp_path / f"{run.name}-{mode}.started"
        cmd = [PY, "-c", SLOW_EVAL_SCRIPT, CONFIG, *base_overrides(world_shards, run, **{"train.max_steps": 4, **kw})]
        env = run_env(EVAL_MODE=mode, EVAL_MARKER=str(marker))
        return subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
        ), marker

    def signal_when_started(proc, marker):
        end = time.time() + 300
        while not marker.exists():
            assert proc.poll() is None and time.time() < end, proc.stdout.read()[-3000:]
            time.sleep(0.1)
        t0 = time.time()
        os.killpg(proc.pid, signal.SIGUSR1)
        out, _ = proc.communicate(timeout=120)
        return out, time.time() - t0

    # a requeue during the final evaluation (a minute long): checkpoint at step 4, exit 75 within seconds
    run = tmp_path / "eval"
    out, took = signal_when_started(*start(run, "slow"))
    assert "exiting with 75" in out and took < 20, (took, out[-3000:])
    assert summary(run)[-1]["exit_code"] == 75 and (run / "checkpoints" / "step000000004" / "COMPLETE").is_file()
    proc, _ = start(run, "quick", **{"train.export_final": "true"})
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0 and (run / "final.pth").is_file(), out[-3000:]
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["val/score"] for r in rows if "val/score" in r] == [2.0]  # evaluated once, whole, after the requeue

    # ... during evaluate_only: exit 75, nothing to keep
    only = tmp_path / "only"
    out, took = signal_when_started(*start(only, "slow", **{"train.evaluate_only": "true"}))
    assert "exiting with 75" in out and took < 20, (took, out[-3000:])
    assert '"exit_code": 75' in out

    # ... before the export: the final checkpoint is kept, final.pth is left to the rerun
    export = tmp_path / "export"
    proc, _ = start(export, "signal-after", **{"train.export_final": "true"})
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 75 and not (export / "final.pth").exists(), out[-3000:]
    assert (export / "checkpoints" / "step000000004" / "COMPLETE").is_file()
    proc, _ = start(export, "quick", **{"train.export_final": "true"})
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0 and (export / "final.pth").is_file(), out[-3000:]


# ------------------------------------------------------------------------------------------------ elastic resume

DUMP_STATE_SCRIPT = """
import json, os, sys, torch
from albef.engine.cli import main
from albef.tasks.pretrain import PretrainTask

class Dumping(PretrainTask):
    dumped = False
    def training_step(self, model, batch, progress):
        if not Dumping.dumped:  # the state the resumed run starts from: weights, momentum encoders, queues, Adam
            Dumping.dumped = True
            opt = model.optimizer
            inner = getattr(opt, "optimizer", opt)
            moments = [v["exp_avg"].clone() for v in inner.state.values() if "exp_avg" in v]
            if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
                torch.save({"module": {k: v.detach().float().clone() for k, v in model.module.state_dict().items()},
                            "adam_steps": [int(v["step"]) for v in inner.state.values() if "step" in v],
                            "exp_avg_norm": float(sum(m.float().norm() ** 2 for m in moments) ** 0.5)}, sys.argv[1])
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        with open(f"{sys.argv[1]}.keys{rank}", "a") as f:  # the samples of each optimizer step, per rank
            f.write(json.dumps({"step": progress.step + 1, "keys": batch["key"]}) + "\\n")
        return super().training_step(model, batch, progress)

main(Dumping, sys.argv[2:])
"""


def _same_start(start: dict, expected: dict) -> None:
    """The resumed run's first state is the checkpoint's: bitwise, or (bf16 training) the bf16 copy of the float32
    master weights."""
    for k, v in expected.items():
        assert torch.equal(start[k], v) or torch.equal(start[k], v.bfloat16().float()), k


def _keys_by_step(dump: Path) -> Dict[int, List[str]]:
    steps: Dict[int, List[str]] = collections.defaultdict(list)
    for path in sorted(dump.parent.glob(dump.name + ".keys*")):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            steps[row["step"]] += row["keys"]
    return steps


@pytest.mark.slow
@pytest.mark.parametrize("ds_config", ["zero2_fp32", "zero1_bf16"])
def test_a_run_resumes_on_another_number_of_ranks(world_shards, tmp_path, ds_config):
    """An epoch is 12 steps of 16 samples. Interrupted after step 6 on 2 ranks, continued on 1 rank to step 9, and
    finished on 2 ranks again: each resumed run starts from exactly the checkpoint's weights, momentum encoders and
    queues, with Adam's moments and step count carried over (DeepSpeed's universal checkpoint); the losses and the
    step count continue; and the three runs together train on exactly the samples of the uninterrupted epoch, each
    once (the loader re-splits the rest of the epoch over the new ranks)."""
    import shutil
    import subprocess

    from albef.engine import checkpointing

    from runs import PY, REPO, run_env

    def dumping(run, dump, nproc, max_steps):
        overrides = base_overrides(world_shards, run, **{**common, "train.max_steps": max_steps})
        cmd = [PY, "-c", DUMP_STATE_SCRIPT, str(dump), CONFIG, *overrides]
        if nproc > 1:
            cmd = [str(Path(PY).parent / "torchrun"), "--standalone", f"--nproc_per_node={nproc}", "--no-python", *cmd]
        p = subprocess.run(cmd, cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=600)
        return p.returncode, p.stdout + p.stderr

    common = {"train.save_every": 3, "train.keep_last": 0, "train.ds_config": f"ds_configs/{ds_config}.json"}
    straight = tmp_path / "straight"
    code, out = dumping(straight, tmp_path / "straight.pt", 2, 12)
    assert code == 0, out[-3000:]
    epoch = _keys_by_step(tmp_path / "straight.pt")
    assert sorted(epoch) == list(range(1, 13)) and len({k for v in epoch.values() for k in v}) == 192

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copytree(straight / "checkpoints" / "step000000006", run / "checkpoints" / "step000000006")
    lines = (straight / "metrics.jsonl").read_text().splitlines()  # the interrupted run's log up to its checkpoint
    (run / "metrics.jsonl").write_text("".join(x + "\n" for x in lines if json.loads(x).get("step", 99) <= 6))
    expected = checkpointing.consolidate(run / "checkpoints", "step000000006")
    code, out = dumping(run, tmp_path / "one.pt", 1, 9)
    assert code == 0 and "written by 2 ranks, now 1" in out, out[-3000:]
    assert "the 96 sample(s) of the epoch not yet delivered are re-split over them, 12 batch(es) per rank" in out
    tag = run / "checkpoints" / "step000000006"
    assert (tag / "universal").is_dir() and checkpointing.damage(tag) is None  # the checkpoint itself untouched
    start = torch.load(tmp_path / "one.pt", weights_only=True)
    _same_start(start["module"], expected)
    assert set(start["adam_steps"]) == {6} and start["exp_avg_norm"] > 0
    rows = losses(run)
    assert sorted(rows) == list(range(1, 10)) and rows[9]["train/samples"] == 9 * 16 and rows[9]["train/epoch"] == 0
    # the losses continue: steps 7-9 (other batches than the uninterrupted run's, so not the same numbers) are near
    # the uninterrupted run's and well below the untrained start, where a restart would be
    mlm = [rows[s]["train/loss_mlm"] for s in (7, 8, 9)]
    reference = [losses(straight)[s]["train/loss_mlm"] for s in (7, 8, 9)]
    assert abs(sum(mlm) - sum(reference)) / 3 < 0.2 and sum(mlm) / 3 < rows[1]["train/loss_mlm"] - 0.3, (mlm, reference)

    # ... and back on 2 ranks from step 9, a second change in the same epoch
    expected = checkpointing.consolidate(run / "checkpoints", "step000000009")
    code, out = dumping(run, tmp_path / "two.pt", 2, 12)
    assert code == 0 and "written by 1 ranks, now 2" in out, out[-3000:]
    assert "the 48 sample(s) of the epoch not yet delivered are re-split over them, 3 batch(es) per rank" in out
    _same_start(torch.load(tmp_path / "two.pt", weights_only=True)["module"], expected)
    rows = losses(run)
    assert sorted(rows) == list(range(1, 13)) and summary(run)[-1]["steps"] == 12

    one, two = _keys_by_step(tmp_path / "one.pt"), _keys_by_step(tmp_path / "two.pt")
    assert sorted(one) == [7, 8, 9] and sorted(two) == [10, 11, 12]
    interrupted = (
        [k for s in range(1, 7) for k in epoch[s]] + [k for s in one for k in one[s]] + [k for s in two for k in two[s]]
    )
    assert sorted(interrupted) == sorted(k for v in epoch.values() for k in v)  # the same samples, each once


LOSS_SCALE_SCRIPT = """
import json, os, torch, deepspeed
from deepspeed.runtime.fp16.loss_scaler import CreateLossScaler
from albef.engine.checkpointing import loss_scale_state, restore_loss_scale

os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
deepspeed.init_distributed(dist_backend="gloo")  # the scaler logs its overflows on rank 0
args = {"init_scale": 2.0**16, "scale_window": 4, "delayed_shift": 2, "consecutive_hysteresis": False, "min_scale": 1.0}
scaler = lambda: CreateLossScaler(torch.float16, 0, True, dict(args))
run = scaler()
for overflow in [True, True, False, False, True, False, False, False]:
    run.update_scale(overflow)
saved = json.loads(json.dumps(loss_scale_state(run)))  # through the checkpoint's client state
assert saved["cur_scale"] < 2.0**16 and saved["cur_iter"] == 8, saved
fresh = scaler()
assert loss_scale_state(fresh) != saved  # what a universal load leaves: the initial scale
restore_loss_scale(fresh, saved)
assert loss_scale_state(fresh) == loss_scale_state(run)
for overflow in [False, False, False, False, True, False]:
    run.update_scale(overflow)
    fresh.update_scale(overflow)
    assert loss_scale_state(fresh) == loss_scale_state(run)
static = CreateLossScaler(torch.float32, 0, False, None)
restore_loss_scale(static, loss_scale_state(static))
assert loss_scale_state(static) == {"cur_scale": 1.0}
print("OK", saved)
"""


def test_fp16_loss_scale_survives_a_change_of_world_size():
    """DeepSpeed's universal load (another world size) skips the loss scaler; the checkpoint carries its state and
    ``checkpointing.load`` puts it back. fp16 engines need a GPU, so this checks the carried state on DeepSpeed's own
    DynamicLossScaler: saved mid-run (after overflows and clean steps), restored into a fresh one, it continues
    identically; a static scaler keeps its scale."""
    import socket
    import subprocess

    from runs import PY, REPO, run_env

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    p = subprocess.run(
        [PY, "-c", LOSS_SCALE_SCRIPT],
        cwd=REPO,
        env=run_env(MASTER_PORT=str(port)),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0 and "OK" in p.stdout, (p.stdout + p.stderr)[-3000:]
