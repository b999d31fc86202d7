"""The slurm/ scripts on a real SLURM cluster: slurmctld + two slurmd "nodes" + munged on this machine (slurm/local).

Every job here goes through real sbatch/srun/scancel/scontrol and runs real training processes (tiny model, CPU,
gloo) on real webdataset shards made by data_prep. The cluster is started once per session (installing the Debian
packages with slurm/local/install.sh when they are missing) and stopped at the end. Needs root; elsewhere the tests
are skipped with the reason. Each node has one fake GPU (GRES File=/dev/null), so the scripts' --gpus-per-node path
is exercised while CUDA stays unavailable and the jobs train on CPU.
"""

from __future__ import annotations

import json
import os
import random
import shlex
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Dict, List

import pytest

REPO = Path(__file__).resolve().parents[1]
LOCAL = REPO / "slurm" / "local"
COMMANDS = ("slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue", "sinfo", "scancel", "munged")
JOB_TIMEOUT = 420  # seconds; a job on this 2-core machine takes 30-90 s, more while other tests run

# Training geometry used below: 192 samples in 8 shards of 24, 2 ranks x micro-batch 8 = global batch 16, so one
# epoch is 12 optimizer steps and each rank reads exactly 4 whole shards per epoch (2 loader workers x 2 shards).
NUM_SAMPLES, SHARD_SIZE, GLOBAL_BATCH, MICRO_BATCH = 192, 24, 16, 8
STEPS_PER_EPOCH = NUM_SAMPLES // GLOBAL_BATCH


# ---- the cluster --------------------------------------------------------------------------------------------------
def _missing_commands() -> List[str]:
    return [c for c in COMMANDS if shutil.which(c) is None and not Path("/usr/sbin", c).exists()]


def _free_port_pair() -> int:
    """A port P with P and P+1 free (slurmd ports of node1/node2), away from the jobs' rendezvous ports 20000-39999."""
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(40000, 60000)
        try:
            for p in (port, port + 1):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair found")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    def __init__(self, directory: Path, start_args: List[str]):
        self.dir = directory
        self.start_args = start_args
        self.env = dict(os.environ)
        for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "WANDB_DIR", "WANDB_MODE"):
            self.env.pop(name, None)
        self.env.update(
            SLURM_CONF=str(directory / "slurm.conf"),
            WANDB_MODE="offline",
            ALBEF_REPO=str(REPO),
            ALBEF_PYTHON=sys.executable,
            WANDB_SILENT="true",
        )

    def run(self, *cmd: str, check: bool = True, cwd=None) -> subprocess.CompletedProcess:
        out = subprocess.run(list(cmd), env=self.env, cwd=cwd, capture_output=True, text=True, timeout=120)
        if check and out.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
        return out

    def sbatch(self, *args: str, cwd: Path) -> str:
        out = self.run("sbatch", "--parsable", *args, cwd=cwd)
        return out.stdout.strip().split(";")[0]

    def queued(self, job: str) -> List[str]:
        out = self.run("squeue", "-h", "-j", job, "-o", "%T", check=False)
        return out.stdout.split()

    def records(self, job: str) -> List[Dict[str, str]]:
        """`scontrol show job -o` as dicts, one per job record (array jobs: one per task)."""
        out = self.run("scontrol", "show", "job", "-o", job)
        recs = []
        for line in out.stdout.splitlines():
            rec = {}
            for token in line.split():
                key, eq, value = token.partition("=")
                if eq:
                    rec[key] = value
            recs.append(rec)
        return recs

    def wait(self, job: str, timeout: float = JOB_TIMEOUT, logs=()) -> List[Dict[str, str]]:
        deadline = time.time() + timeout
        while self.queued(job):
            if time.time() > deadline:
                self.run("scancel", job, check=False)
                tails = "\n".join(f"---- {p}\n{_tail(p)}" for p in logs)
                raise AssertionError(f"job {job} still queued after {timeout} s:\n{tails}")
            time.sleep(0.5)
        return self.records(job)


def _tail(path: Path, lines: int = 60) -> str:
    path = Path(path)
    if not path.is_file():
        return f"(no file {path})"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


@pytest.fixture(scope="session")
def cluster():
    if os.name != "posix" or not hasattr(os, "geteuid"):
        pytest.skip("the local SLURM cluster needs Linux")
    if os.geteuid() != 0:
        pytest.skip(
            "the local SLURM cluster needs root (slurmd launches jobs, munged runs as the munge user): "
            "run the tests as root, or try the scripts by hand with sudo slurm/local/start.sh"
        )
    if _missing_commands():
        if shutil.which("apt-get") is None:
            pytest.skip(
                f"SLURM is not installed ({', '.join(_missing_commands())} missing) and there is no apt-get "
                "to install it: install slurmctld slurmd slurm-client munge"
            )
        out = subprocess.run([str(LOCAL / "install.sh")], capture_output=True, text=True, timeout=900)
        assert out.returncode == 0, f"slurm/local/install.sh failed:\n{out.stdout}\n{out.stderr}"
    directory = Path(tempfile.mkdtemp(prefix="albef-slurm-test-", dir="/tmp"))
    directory.chmod(0o755)  # munged (the munge user) keeps its socket in here
    args = [
        "--nodes",
        "2",
        "--cpus",
        "2",
        "--gpus",
        "1",
        "--dir",
        str(directory),
        "--ctld-port",
        str(_free_port()),
        "--node-port",
        str(_free_port_pair()),
        "--requeue-delay",
        "5",
        "--kill-wait",
        "10",
    ]
    c = Cluster(directory, args)
    out = subprocess.run([str(LOCAL / "start.sh"), *args], env=c.env, capture_output=True, text=True, timeout=180)
    if out.returncode != 0:
        subprocess.run([str(LOCAL / "stop.sh"), "--dir", str(directory)], capture_output=True, timeout=120)
        raise AssertionError(f"slurm/local/start.sh failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    try:
        yield c
    finally:
        subprocess.run([str(LOCAL / "stop.sh"), "--dir", str(directory)], capture_output=True, timeout=180)
        shutil.rmtree(directory, ignore_errors=True)


# ---- data ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """The procedural demo world: NUM_SAMPLES training images (64 px) with captions in the official ALBEF JSON."""
    from albef.demo.world import generate_world

    out = tmp_path_factory.mktemp("slurm_world")
    generate_world(out, seed=0, num_train=NUM_SAMPLES, num_val=2, num_test=2, image_size=64)
    return out


def _prep_args(world: Path, out: Path) -> List[str]:
    return [
        str(world / "pretrain.json"),
        "--image-root",
        str(world / "images"),
        "--output",
        str(out),
        "--shard-size",
        str(SHARD_SIZE),
        "--image-size",
        "64",
        "--no-progress",
    ]


@pytest.fixture(scope="session")
def shards(world, tmp_path_factory):
    """Real shards from data_prep.annotations with one worker (also the reference for the array job)."""
    out = tmp_path_factory.mktemp("slurm_shards") / "single"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "data_prep.annotations",
            *_prep_args(world, out),
            "--num-workers",
            "1",
            "--worker-id",
            "0",
            "--processes",
            "1",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_samples"] == NUM_SAMPLES and len(manifest["shards"]) == NUM_SAMPLES // SHARD_SIZE
    return out


def _config(path: Path, output_dir: Path, data: Dict, **train) -> Path:
    """A pretraining YAML on top of pretrain/configs/tiny_cpu.yaml (tiny model, fp32 ZeRO-2, 2 loader workers)."""
    cfg = {
        "base": str(REPO / "pretrain" / "configs" / "tiny_cpu.yaml"),
        "data": data,
        # The jobs run in the submit directory (tmp_path), as SLURM does: repository files need absolute paths.
        "train": {
            "output_dir": str(output_dir),
            "global_batch_size": GLOBAL_BATCH,
            "ds_config": str(REPO / "ds_configs" / "zero2_fp32.json"),
            "micro_batch_size": MICRO_BATCH,
            "num_threads": 1,
            **train,
        },
        "wandb": {"mode": "offline"},
    }
    path.write_text(json.dumps(cfg, indent=1))  # JSON is YAML
    return path


def _metrics(run_dir: Path):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if "step" in r], [r["summary"] for r in rows if "summary" in r]


def _wandb_files(run_dir: Path) -> List[Path]:
    return sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))


def _wait_for_step(run_dir: Path, step: int, cluster: Cluster, job: str, log: Path, timeout: float = JOB_TIMEOUT):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (run_dir / "metrics.jsonl").is_file():
            steps, _ = _metrics(run_dir)
            if any(r["step"] >= step for r in steps):
                return
        if not cluster.queued(job):
            raise AssertionError(f"job {job} ended before step {step}:\n{_tail(log)}")
        time.sleep(0.3)
    raise AssertionError(f"job {job} did not reach step {step} in {timeout} s:\n{_tail(log)}")


def _check_resumed_run(run_dir: Path, total_steps: int, world: int):
    """Final state of a run that was interrupted once: planned steps and samples, one W&B run across both parts."""
    steps, summaries = _metrics(run_dir)
    final = summaries[-1]
    assert final["exit_code"] == 0 and final["steps"] == final["total_steps"] == total_steps
    assert final["samples"] == total_steps * GLOBAL_BATCH  # the plan, nothing lost
    # Per rank, the loader's own count of delivered samples (restored from the checkpoint, then continued).
    tag = (run_dir / "checkpoints" / "latest_complete").read_text().strip()
    for rank in range(world):
        state = json.loads((run_dir / "checkpoints" / tag / f"rank{rank:05d}_state.json").read_text())
        assert state["loader"]["stats"]["samples"] == total_steps * GLOBAL_BATCH // world
    # One W&B run: the requeued part resumed the id stored in the checkpoint (offline, each part writes its own
    # offline-run-<time>-<id> folder; `wandb sync` merges them into that run).
    ids = {s["wandb_id"] for s in summaries}
    assert len(ids) == 1, ids
    (wid,) = ids
    files = _wandb_files(run_dir)
    assert len(files) == 2 and all(f.parent.name.endswith("-" + wid) for f in files), files
    return steps, summaries, files


# ---- tests --------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_local_cluster_is_up_and_start_is_idempotent(cluster):
    nodes = cluster.run("sinfo", "-h", "-N", "-o", "%N %T %G").stdout.split("\n")
    assert sorted(n for n in nodes if n) == ["node1 idle gpu:1", "node2 idle gpu:1"]
    again = subprocess.run(
        [str(LOCAL / "start.sh"), *cluster.start_args], env=cluster.env, capture_output=True, text=True, timeout=60
    )
    assert again.returncode == 0 and "already running" in again.stdout
    other = [a if a != "2" else "1" for a in cluster.start_args]  # --nodes 1 (and --cpus 1): another shape
    refused = subprocess.run(
        [str(LOCAL / "start.sh"), *other], env=cluster.env, capture_output=True, text=True, timeout=60
    )
    assert refused.returncode == 6 and "different shape" in refused.stderr
    assert cluster.run("scontrol", "ping").stdout.count("UP") == 1


@pytest.mark.slow
def test_pretrain_two_nodes_gloo(cluster, shards, tmp_path):
    """2 nodes x 1 task through the submit helper: completes with checkpoint, log and W&B run; ranks read disjoint
    data. Which shard each rank opened is recorded by reading the shards through a `pipe:` command."""
    run_dir = tmp_path / "run"
    reads = tmp_path / "reads.log"
    # The loader runs this command once per shard it opens (in its worker processes, which inherit the rank
    # variables): it notes SLURM's task id, the engine's RANK/WORLD_SIZE and the shard, then streams the shard.
    witness = (
        f'pipe:sh -c \'echo "$SLURM_PROCID $RANK $WORLD_SIZE $0" >> {reads}; exec cat "$0"\' '
        f"{shards}/{{000000..{NUM_SAMPLES // SHARD_SIZE - 1:06d}}}.tar"
    )
    cfg = _config(
        tmp_path / "cfg.yaml",
        run_dir,
        {"shards": [witness], "manifests": [str(shards / "manifest.json")]},
        max_steps=STEPS_PER_EPOCH,
        save_every=4,
        log_every=4,
    )
    submit = subprocess.run(
        [
            sys.executable,
            str(REPO / "slurm" / "submit.py"),
            "pretrain",
            "--nodes",
            "2",
            "--gpus-per-node",
            "1",
            "--cpus-per-task",
            "1",
            "--time",
            "20",
            "--log-dir",
            str(tmp_path),
            "--job-name",
            "two-nodes",
            str(cfg),
        ],
        env=cluster.env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert submit.returncode == 0, submit.stderr
    assert "sbatch command: sbatch --nodes=2 --ntasks-per-node=1 --gpus-per-node=1 --cpus-per-task=1" in submit.stdout
    job = submit.stdout.split("submitted job ")[1].split()[0]
    log = tmp_path / f"two-nodes-{job}.out"
    (rec,) = cluster.wait(job, logs=[log])
    text = log.read_text()
    assert rec["JobState"] == "COMPLETED" and rec["ExitCode"] == "0:0" and rec["Restarts"] == "0", _tail(log)

    # The log: both ranks, the rendezvous the engine derives (first node, port from the job id), a clean finish.
    assert "nodes: node[1-2] (2), tasks: 2" in text and "gpus per node: 1" in text
    assert f"rendezvous: node1:{20000 + int(job) % 20000}" in text
    assert "\n0: " in text and "\n1: " in text
    assert "finished: the run completed" in text

    steps, summaries = _metrics(run_dir)
    assert [r["step"] for r in steps] == [4, 8, 12]
    assert [r["train/samples"] for r in steps] == [4 * GLOBAL_BATCH, 8 * GLOBAL_BATCH, 12 * GLOBAL_BATCH]
    (summary,) = summaries
    assert summary["exit_code"] == 0 and summary["steps"] == STEPS_PER_EPOCH
    assert summary["samples"] == STEPS_PER_EPOCH * GLOBAL_BATCH

    # The checkpoint was written by two ranks.
    ckpt = run_dir / "checkpoints"
    tag = (ckpt / "latest_complete").read_text().strip()
    assert tag == f"step{STEPS_PER_EPOCH:09d}"
    assert json.loads((ckpt / tag / "COMPLETE").read_text())["world_size"] == 2
    assert (run_dir / "final.pth").is_file()
    assert sorted(p.name for p in (ckpt / tag).glob("rank*_state.*")) == [
        "rank00000_state.json",
        "rank00001_state.json",
    ]

    # The W&B offline run.
    from wandb_records import history, run_id

    (wfile,) = _wandb_files(run_dir)
    assert run_id(wfile) == summary["wandb_id"]
    assert sorted(r["_step"] for r in history(wfile) if "train/loss" in r) == [4, 8, 12]

    # Both ranks saw different data: each read 4 whole shards, none read by both, all 8 read.
    by_rank = defaultdict(list)
    for line in reads.read_text().splitlines():
        procid, rank, world, shard = line.split()
        assert procid == rank and world == "2", line
        by_rank[int(rank)].append(Path(shard).name)
    assert sorted(by_rank) == [0, 1]
    assert len(by_rank[0]) == len(set(by_rank[0])) == 4 and len(by_rank[1]) == len(set(by_rank[1])) == 4
    assert not set(by_rank[0]) & set(by_rank[1])
    assert sorted(by_rank[0] + by_rank[1]) == [f"{i:06d}.tar" for i in range(NUM_SAMPLES // SHARD_SIZE)]


def _submit_pretrain(cluster: Cluster, tmp_path: Path, cfg: Path, name: str, nodes: int) -> str:
    return cluster.sbatch(
        f"--nodes={nodes}",
        "--ntasks-per-node=1",
        "--gpus-per-node=1",
        "--cpus-per-task=1",
        "--time=20",
        f"--job-name={name}",
        f"--output={tmp_path}/%x-%j.out",
        str(REPO / "slurm" / "pretrain.sbatch"),
        str(cfg),
        cwd=tmp_path,
    )


@pytest.mark.slow
def test_usr1_checkpoints_requeues_and_resumes(cluster, shards, tmp_path):
    """SIGUSR1 to the batch shell (what --signal=B:USR1@N does before the time limit): the tasks checkpoint and exit
    75, the script requeues the job, the requeued job resumes and completes. Nothing is lost or repeated."""
    total = STEPS_PER_EPOCH + 4  # the resumed part crosses into the second epoch
    run_dir = tmp_path / "run"
    # save_every=0: the only checkpoint before the end is the one the signal asks for.
    cfg = _config(
        tmp_path / "cfg.yaml",
        run_dir,
        {"shards": [str(shards)]},
        max_steps=total,
        save_every=0,
        log_every=1,
        export_final=False,
    )
    job = _submit_pretrain(cluster, tmp_path, cfg, "usr1", nodes=2)
    log = tmp_path / f"usr1-{job}.out"
    _wait_for_step(run_dir, 3, cluster, job, log)
    cluster.run("scancel", "--signal=USR1", "--batch", job)
    (rec,) = cluster.wait(job, logs=[log])
    text = log.read_text()
    assert rec["JobState"] == "COMPLETED" and rec["ExitCode"] == "0:0" and rec["Restarts"] == "1", _tail(log)

    assert (
        "batch script received SIGUSR1" in text
        and f"forwarded SIGUSR1 to the tasks (scancel --signal=USR1 {job})" in text
    )
    assert "job step ended with exit code 75" in text and f"requeueing job {job} (restart 1)" in text
    assert f"job {job} 'usr1' restart 1 ====" in text  # the same log file continues (--open-mode=append)

    steps, summaries, files = _check_resumed_run(run_dir, total, world=2)
    assert len(summaries) == 2, summaries
    stopped = summaries[0]["steps"]
    assert summaries[0]["exit_code"] == 75 and 3 <= stopped < total
    assert f"resumed from {run_dir / 'checkpoints' / f'step{stopped:09d}'} at step {stopped}" in text
    from wandb_records import history, run_id

    assert {run_id(f) for f in files} == {summaries[0]["wandb_id"]}
    logged = sorted(row["_step"] for f in files for row in history(f) if "train/loss" in row)
    assert logged == list(range(1, total + 1))
    # One metrics row per step, each exactly once, with the running sample count of the plan.
    assert [r["step"] for r in steps] == list(range(1, total + 1))
    assert [r["train/samples"] for r in steps] == [s * GLOBAL_BATCH for s in range(1, total + 1)]


@pytest.mark.slow
def test_scontrol_requeue_resumes_from_last_checkpoint(cluster, shards, tmp_path):
    """`scontrol requeue` (also what PreemptMode=REQUEUE does): SLURM sends SIGTERM to every process and requeues the
    job itself; the script must not requeue it a second time. The run resumes from its newest complete checkpoint,
    so at most the steps after that checkpoint are computed twice; the final state is the plan, one W&B run.
    One node and one task: what is tested is SLURM's requeue, the same at any size (and faster to start)."""
    total = STEPS_PER_EPOCH + 4  # the resumed part crosses into the second epoch
    run_dir = tmp_path / "run"
    cfg = _config(
        tmp_path / "cfg.yaml",
        run_dir,
        {"shards": [str(shards)]},
        max_steps=total,
        save_every=2,
        log_every=1,
        export_final=False,
    )
    job = _submit_pretrain(cluster, tmp_path, cfg, "requeue", nodes=1)
    log = tmp_path / f"requeue-{job}.out"
    _wait_for_step(run_dir, 3, cluster, job, log)
    cluster.run("scontrol", "requeue", job)
    (rec,) = cluster.wait(job, logs=[log])
    text = log.read_text()
    assert rec["JobState"] == "COMPLETED" and rec["ExitCode"] == "0:0" and rec["Restarts"] == "1", _tail(log)
    assert f"requeueing job {job}" not in text  # SLURM requeued it; a second requeue would restart it again
    assert f"job {job} 'requeue' restart 1 ====" in text

    steps, _, _ = _check_resumed_run(run_dir, total, world=1)
    assert "resumed from " in text, _tail(log)
    resumed = int(text.split("resumed from ")[1].split(" at step ")[1].split()[0])
    assert resumed >= 2  # the periodic checkpoint of step 2 at least (the signal's own one, if it got saved)
    # Rows: 1..X before the interruption, then resumed+1..total; only resumed+1..X appear twice. When the SIGTERM
    # checkpoint of step X was saved, resumed == X and no step repeats.
    seen = [r["step"] for r in steps]
    restart = next((i for i in range(1, len(seen)) if seen[i] <= seen[i - 1]), resumed)
    assert seen[:restart] == list(range(1, seen[restart - 1] + 1))
    assert seen[restart - 1] >= resumed
    assert seen[restart:] == list(range(resumed + 1, total + 1))
    assert [r["train/samples"] for r in steps[restart:]] == [s * GLOBAL_BATCH for s in range(resumed + 1, total + 1)]


@pytest.mark.slow
def test_data_prep_array_matches_single_worker(cluster, world, shards, tmp_path):
    """`sbatch --array=0-1 slurm/data_prep.sbatch annotations ...`: two array tasks split the shards and together
    produce the same samples, shard by shard, as the single-worker run."""
    out = tmp_path / "array"
    job = cluster.sbatch(
        "--array=0-1",
        "--cpus-per-task=1",
        "--time=10",
        str(REPO / "slurm" / "data_prep.sbatch"),
        "annotations",
        *_prep_args(world, out),
        cwd=tmp_path,
    )
    logs = [tmp_path / f"albef-data-prep-{job}_{i}.out" for i in (0, 1)]  # the script's %x-%A_%a.out
    recs = cluster.wait(job, logs=logs)
    assert sorted(r["ArrayTaskId"] for r in recs) == ["0", "1"]
    assert all(r["JobState"] == "COMPLETED" and r["ExitCode"] == "0:0" for r in recs), [_tail(p) for p in logs]
    for i, path in enumerate(logs):
        text = path.read_text()
        assert f"worker {i}/2 built 4 shards" in text and "finished: data_prep.annotations worker done" in text

    def samples(directory: Path) -> Dict[str, Dict[str, Dict[str, bytes]]]:
        result = {}
        for tar_path in sorted(directory.glob("*.tar")):
            per_key: Dict[str, Dict[str, bytes]] = defaultdict(dict)
            with tarfile.open(tar_path) as tar:
                for member in tar:
                    key, _, ext = member.name.partition(".")
                    per_key[key][ext] = tar.extractfile(member).read()
            result[tar_path.name] = dict(per_key)
        return result

    assert (
        json.loads((out / "manifest.json").read_text())["shards"]
        == json.loads((shards / "manifest.json").read_text())["shards"]
    )
    mine, reference = samples(out), samples(shards)
    assert len(mine) == NUM_SAMPLES // SHARD_SIZE and sum(len(s) for s in mine.values()) == NUM_SAMPLES
    assert mine == reference


@pytest.mark.slow
def test_data_prep_array_task_requeued_on_usr1(cluster, world, tmp_path):
    """The time-limit signal reaches one array task of data_prep.download (images from a real HTTP server on this
    machine, served slowly): that task alone is stopped, requeued and redoes its unfinished shards; every image
    ends up in the dataset exactly once."""
    from data_prep.loopback import LoopbackServer, Route

    images = sorted((world / "images").glob("*.jpg"))[:80]
    assert len(images) == 80
    # 0.4 s per image, one thread: a task takes 16 s, so it is still downloading when the batch shell forwards the
    # signal (ALBEF_SIGNAL_GRACE, 5 s after the step's start, slurm/common.sh).
    server = LoopbackServer({f"/{i}.jpg": Route(p.read_bytes(), delay=0.4) for i, p in enumerate(images)}).start()
    try:
        urls = tmp_path / "urls.jsonl"
        urls.write_text(
            "".join(
                json.dumps({"url": server.url(f"/{i}.jpg"), "caption": f"picture number {i}"}) + "\n"
                for i in range(len(images))
            )
        )
        out = tmp_path / "out"
        job = cluster.sbatch(
            "--array=0-1",
            "--cpus-per-task=1",
            "--time=10",
            str(REPO / "slurm" / "data_prep.sbatch"),
            "download",
            str(urls),
            "--output",
            str(out),
            "--shard-size",
            "10",
            "--threads",
            "1",
            "--image-size",
            "64",
            "--allow-network",
            "127.0.0.0/8",
            "--no-progress",
            cwd=tmp_path,
        )
        logs = [tmp_path / f"albef-data-prep-{job}_{i}.out" for i in (0, 1)]
        deadline = time.time() + JOB_TIMEOUT
        while "this worker owns 4" not in (logs[0].read_text() if logs[0].is_file() else ""):
            assert time.time() < deadline and cluster.queued(f"{job}_0"), _tail(logs[0])
            time.sleep(0.2)
        cluster.run("scancel", "--signal=USR1", "--batch", f"{job}_0")  # what --signal=B:USR1@300 does
        recs = {r["ArrayTaskId"]: r for r in cluster.wait(job, logs=logs)}
    finally:
        server.stop()
    assert all(r["JobState"] == "COMPLETED" and r["ExitCode"] == "0:0" for r in recs.values()), [_tail(p) for p in logs]
    assert (recs["0"]["Restarts"], recs["1"]["Restarts"]) == ("1", "0")  # only the signalled task was requeued
    first = logs[0].read_text()
    assert f"forwarded SIGTERM to the tasks (scancel --signal=TERM {job}_0)" in first
    assert f"requeueing job {job}_0 (restart 1)" in first and "finished shards are kept" in first
    assert f"requeueing job {job}_1" not in logs[1].read_text()

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_samples"] == len(images) and manifest["status"] == {"success": len(images)}
    captions = []
    for tar_path in sorted(out.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            captions += [tar.extractfile(m).read().decode() for m in tar if m.name.endswith(".txt")]
    assert sorted(captions) == sorted(f"picture number {i}" for i in range(len(images)))


@pytest.mark.slow
def test_a_signal_at_a_steps_start_reaches_the_tasks(cluster, tmp_path):
    """A time limit shorter than the --signal lead (sbatch --time=10 with B:USR1@600) signals the batch shell as the
    job starts. Forwarded at once, the signal found no task yet (lost until the resend a minute later) or a task
    before its `trap "" USR1` (killed: exit 138). It must reach the program as a request to stop (exit 75 here)."""
    script = tmp_path / "early.sh"
    program = (
        "import signal, sys, time; signal.signal(signal.SIGUSR1, lambda *a: sys.exit(75)); "
        "print('handler installed', flush=True); time.sleep(40); sys.exit(3)"
    )
    script.write_text(f"""#!/bin/bash
set -euo pipefail
source {REPO / "slurm" / "common.sh"}
albef_setup early-signal
kill -USR1 $$  # what --signal=B:USR1@N does when N exceeds the time limit
albef_run_step same "$ALBEF_PY" -c {shlex.quote(program)}
echo "step exit code: $ALBEF_STEP_RC"
""")
    job = cluster.sbatch(
        "--nodes=1",
        "--ntasks=1",
        "--gpus-per-node=0",
        "--cpus-per-task=1",
        "--time=20",
        "--export=ALL,ALBEF_SIGNAL_GRACE=3",
        f"--output={tmp_path}/early-%j.out",
        str(script),
        cwd=tmp_path,
    )
    log = tmp_path / f"early-{job}.out"
    (rec,) = cluster.wait(job, logs=[log])
    text = log.read_text()
    assert rec["JobState"] == "COMPLETED", (rec["JobState"], text)
    assert "handler installed" in text and "step exit code: 75" in text, text
    assert f"forwarded SIGUSR1 to the tasks (scancel --signal=USR1 {job})" in text, text


@pytest.mark.slow
def test_script_errors_fail_fast_with_readable_messages(cluster, tmp_path):
    """Errors the batch script can see fail the job at once (exit 2, nothing launched) with the reason in the .out;
    a config the engine rejects fails with the engine's message."""
    bad_key = tmp_path / "bad_key.yaml"
    bad_key.write_text(f"base: {REPO / 'pretrain' / 'configs' / 'tiny_cpu.yaml'}\ntrain: {{learning_rate: 1.0}}\n")
    pretrain, finetune, data_prep = (
        str(REPO / "slurm" / s) for s in ("pretrain.sbatch", "finetune.sbatch", "data_prep.sbatch")
    )
    cases = {
        "missing-config": (
            [pretrain, "does/not/exist.yaml", "train.max_steps=5"],
            "error: config file 'does/not/exist.yaml' not found",
        ),
        "bad-override": ([pretrain, str(bad_key), "train.max_steps"], "'train.max_steps' is not a key=value override"),
        "no-args": ([pretrain], "usage: sbatch [sbatch options] slurm/pretrain.sbatch CONFIG.yaml"),
        "unknown-task": ([finetune, "no_such_task", str(bad_key)], "unknown fine-tuning task 'no_such_task'"),
        "unknown-step": (
            ["--array=0", data_prep, "no_such_step", "--output", "x"],
            "unknown data_prep step 'no_such_step'",
        ),
        "bad-key": ([pretrain, str(bad_key)], "config error:"),
    }
    jobs = {}
    for name, (args, _) in cases.items():
        jobs[name] = cluster.sbatch(
            "--nodes=1",
            "--ntasks-per-node=1",
            "--gpus-per-node=0",
            "--cpus-per-task=1",
            "--time=10",
            f"--job-name={name}",
            f"--output={tmp_path}/%x-%j.out",
            *args,
            cwd=tmp_path,
        )
    for name, job in jobs.items():
        log = tmp_path / f"{name}-{job}.out"  # (the one-task array's %j is its array id)
        (rec,) = cluster.wait(job, logs=[log])
        text = log.read_text()
        assert rec["JobState"] == "FAILED" and rec["ExitCode"] == "2:0", (name, rec["JobState"], rec["ExitCode"], text)
        assert cases[name][1] in text, (name, text)
        if name == "bad-key":
            assert "learning_rate" in text and "failed: configuration error" in text
        else:  # refused before anything was launched
            assert "command: srun" not in text, (name, text)
            start = time.strptime(rec["StartTime"], "%Y-%m-%dT%H:%M:%S")
            end = time.strptime(rec["EndTime"], "%Y-%m-%dT%H:%M:%S")
            assert time.mktime(end) - time.mktime(start) <= 5, (name, rec["StartTime"], rec["EndTime"])


def test_submit_helper_prints_the_sbatch_command(tmp_path):
    """slurm/submit.py --dry-run: the command it would submit, and its refusals (no cluster needed)."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: tiny\n")

    def submit(*args):
        return subprocess.run(
            [sys.executable, str(REPO / "slurm" / "submit.py"), *args],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )

    out = submit(
        "pretrain",
        "--dry-run",
        "--nodes",
        "4",
        "--gpus-per-node",
        "8",
        "--cpus-per-task",
        "12",
        "--time",
        "2-00:00:00",
        "--partition",
        "gpu",
        "--env",
        "WANDB_MODE=offline",
        str(cfg),
        "train.lr=2e-4",
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == (
        f"sbatch command: sbatch --nodes=4 --ntasks-per-node=8 --gpus-per-node=8 --cpus-per-task=12 "
        f"--time=2-00:00:00 --partition=gpu --export=ALL,ALBEF_REPO={REPO},WANDB_MODE=offline "
        f"{REPO}/slurm/pretrain.sbatch {cfg} train.lr=2e-4"
    )
    out = submit(
        "data_prep",
        "--dry-run",
        "--workers",
        "16",
        "--parallel",
        "4",
        "--log-dir",
        "logs",
        "--",
        "download",
        "urls/",
        "--output",
        "data/cc3m",
    )
    assert out.returncode == 0, out.stderr
    assert "sbatch --array=0-15%4 --output=logs/%x-%A_%a.out" in out.stdout
    assert out.stdout.strip().endswith("slurm/data_prep.sbatch download urls/ --output data/cc3m")
    out = submit("finetune", "--dry-run", "--gpus-per-node", "0", "retrieval", str(cfg))
    assert out.returncode == 0 and "--ntasks-per-node=1 --gpus-per-node=0" in out.stdout

    refusals = {
        ("pretrain", "--dry-run", "missing.yaml"): "config file 'missing.yaml' not found",
        ("pretrain", "--dry-run", "--time", "5", str(cfg)): "the time-limit warning comes 600 s before the limit",
        ("pretrain", "--dry-run", "--time", "1:2:3:4", str(cfg)): "--time '1:2:3:4': expected",
        ("pretrain", "--dry-run", str(cfg), "lr"): "'lr' is not a key=value override",
        ("finetune", "--dry-run", "nope", str(cfg)): "unknown fine-tuning task 'nope'; choose one of:",
        ("data_prep", "--dry-run", "--", "nope"): "unknown data_prep step 'nope'",
        ("pretrain", "--dry-run", "--env", "A=1,2", str(cfg)): "cannot carry commas",
    }
    for args, message in refusals.items():
        out = submit(*args)
        assert out.returncode == 2 and message in out.stderr, (args, out.stderr)
