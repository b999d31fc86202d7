"""data_prep.download as users run it (the CLI in fresh processes): SIGKILL mid-run then rerun, and a 3-worker
SLURM-array-style run, must both give exactly the shards of one uninterrupted single-worker run.

Run: .venv/bin/python -m pytest tests/test_data_prep_resume.py -q
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from PIL import Image

from data_prep import download, shards
from data_prep.loopback import LoopbackServer, Route, real_photos

REPO = Path(__file__).resolve().parents[1]
SHARD_SIZE = 4
GATED_FROM_ROW = 2 * SHARD_SIZE  # rows of shards >= 2 wait for the gate in the kill test


def build_rows_and_routes(gate: threading.Event):
    """28 rows in 7 shards: 24 distinct real-photo JPEGs, a 404, a duplicate URL and two content duplicates whose
    first occurrence sits in a shard owned by another worker (of 3) and is served slowly, so it finishes last."""
    photos = list(real_photos().values())
    images = []
    for quality in (70, 80, 90):
        for data in photos[:8]:
            im = Image.open(io.BytesIO(data)).convert("RGB")
            im.thumbnail((320, 320))
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=quality)
            images.append(buf.getvalue())
    paths = [f"/img/{i}.jpg" for i in range(24)]
    paths.insert(5, "/missing")
    paths.insert(10, "/dup/6.jpg")  # shard 2 (worker 2): same bytes as /img/6.jpg in shard 1 (worker 1)
    paths.insert(17, "/dup/1.jpg")  # shard 4 (worker 1): same bytes as /img/1.jpg in shard 0 (worker 0)
    paths.insert(22, "/img/3.jpg")  # duplicate URL
    routes = {}
    for row, path in enumerate(paths):
        if path == "/missing" or path in routes:
            continue
        body = images[int(path.rsplit("/", 1)[1].split(".")[0])]
        routes[path] = Route(
            body,
            delay=0.3 if path in ("/img/1.jpg", "/img/6.jpg") else 0.0,
            gate=gate if row >= GATED_FROM_ROW else None,
        )
    return paths, routes


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    gate = threading.Event()
    gate.set()
    paths, routes = build_rows_and_routes(gate)
    with LoopbackServer(routes) as server:
        folder = tmp_path_factory.mktemp("resume")
        url_list = folder / "urls.jsonl"
        url_list.write_text(
            "".join(
                json.dumps({"url": server.url(p), "caption": f"photo number {r}", "n": r}) + "\n"
                for r, p in enumerate(paths)
            )
        )
        yield {"server": server, "gate": gate, "list": url_list, "folder": folder, "paths": paths}


def args(url_list: Path, out: Path):
    return [
        str(url_list),
        "--output",
        str(out),
        "--allow-network",
        "127.0.0.0/8",
        "--shard-size",
        str(SHARD_SIZE),
        "--image-size",
        "96",
        "--timeout",
        "20",
        "--retries",
        "0",
        "--no-progress",
    ]


@pytest.fixture(scope="module")
def reference(served):
    """One worker, one process, in-process call, never interrupted."""
    out = served["folder"] / "reference"
    assert download.main(args(served["list"], out) + ["--processes", "1", "--threads", "4"]) == 0
    return out


def cli(url_list: Path, out: Path, *extra: str, env=None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "data_prep.download", *args(url_list, out), *extra],
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def dataset(out: Path):
    """Everything a reader sees: per shard the samples (all member bytes) and the stats without timings."""
    result = {"manifest": shards.read_manifest(out)}
    for tar in sorted(out.glob("[0-9]" * 6 + ".tar")):
        result[tar.name] = dict(shards.iter_tar_samples(tar))
        stats = json.loads((out / shards.stats_file(int(tar.name[:6]))).read_text())
        timings = ("start_time", "end_time", "duration")
        result[tar.name + ".stats"] = {k: v for k, v in stats.items() if k not in timings}
    return result


def test_reference_run_dedups_across_shards(reference):
    data = dataset(reference)
    keys = [k for name, samples in data.items() if name.endswith(".tar") for k in samples]
    assert len(keys) == len(set(keys)) == 24 == data["manifest"]["num_samples"]
    assert [s["num_samples"] for s in data["manifest"]["shards"]] == [4, 3, 3, 4, 3, 3, 4]
    assert data["manifest"]["status"] == {
        "success": 24,
        "duplicate_content": 2,
        "duplicate_url": 1,
        "failed_to_download": 1,
    }
    assert "000000010" not in data["000002.tar"] and "000000017" not in data["000004.tar"]  # the later copies go


def test_sigkill_midrun_then_rerun_gives_the_uninterrupted_shards(served, reference):
    out, server, gate = served["folder"] / "killed", served["server"], served["gate"]
    gate.clear()
    try:
        proc = cli(served["list"], out, "--processes", "2", "--threads", "2")
        deadline = time.monotonic() + 60
        while not (out / shards.shard_file(1)).exists():
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "shards 0 and 1 were never published"
            time.sleep(0.02)
        children = psutil.Process(proc.pid).children()
        assert len(children) >= 2  # the two build processes
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        gone, alive = psutil.wait_procs(children, timeout=10)
        assert not alive, "build processes outlived their killed parent"
    finally:
        gate.set()
    proc.stdout.close()

    assert sorted(shards.finished_shards(out)) == [0, 1]  # published shards are a prefix, each one complete
    for index, count in shards.finished_shards(out).items():
        assert len(list(shards.iter_tar_samples(out / shards.shard_file(index)))) == count
    assert not (out / shards.MANIFEST).exists()
    hits_before = dict(server.hits)

    rerun = cli(served["list"], out, "--processes", "2", "--threads", "2")
    output, _ = rerun.communicate(timeout=120)
    assert rerun.returncode == 0, output
    assert "built 5 shards (2 were done)" in output
    assert all(server.hits[p] == hits_before.get(p) for p in served["paths"][:GATED_FROM_ROW] if p != "/missing")
    assert dataset(out) == dataset(reference)
    assert not list(out.rglob("*.tmp"))


def test_three_array_workers_give_the_single_worker_shards(served, reference):
    out = served["folder"] / "array"
    procs = [
        cli(
            served["list"],
            out,
            "--processes",
            "1",
            "--threads",
            "2",
            env={"SLURM_ARRAY_TASK_ID": str(10 + i), "SLURM_ARRAY_TASK_MIN": "10", "SLURM_ARRAY_TASK_COUNT": "3"},
        )
        for i in range(3)
    ]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outputs
    for i, output in enumerate(outputs):
        assert f"worker {i}/3: 28 rows (1 duplicate URLs) -> 7 shards; this worker owns {len(range(i, 7, 3))}" in output
    assert sum("dataset: 7/7 shards published" in o for o in outputs) >= 1
    assert dataset(out) == dataset(reference)
