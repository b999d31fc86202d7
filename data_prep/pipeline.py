"""The engine behind data_prep.download and data_prep.annotations (not a CLI): deterministic shards, resumable
multi-worker runs, content dedup and the manifest.

How a run goes (``run(Job(...))``):

1. **Scan** the input once (only the dedup column) and mark the first occurrence of every URL: later rows with the
   same URL get status ``duplicate_url`` (64-bit hashes in a numpy array, 8 bytes per row: fine for LAION parts).
2. **Plan**: shard ``i`` holds input rows ``[i*S, (i+1)*S)`` (S = ``shard_size``) and belongs to worker
   ``i % num_workers``. The plan depends only on the input, so 1 or N workers give the same shards. Settings that
   shape the output are recorded in ``data_prep.json``; a rerun with other settings is refused.
3. **Build** (phase A): the worker's unfinished shards stream to ``processes`` processes; each runs ``threads``
   threads and keeps two shards open so the slow tail of one shard overlaps the next. A built shard goes to
   ``_work/NNNNNN.tar`` + ``_work/NNNNNN_stats.json`` (atomically, through ``shards.ShardWriter``) together with
   the 64-bit content hash (sha256 prefix of the original bytes) of every sample.
4. **Commit** (phase B), under a file lock shared by all workers: shards are published in index order. Shard ``i``
   is published once shards ``0..i-1`` are; a sample whose content hash appeared in an earlier row (an earlier
   shard, or an earlier row of the same shard) becomes ``duplicate_content`` and is dropped (the shard is rewritten
   without it; otherwise the tar is just renamed). Keep-first by global row order makes dedup independent of the
   number of workers and of timing. A worker never waits for another: whoever finds a shard ready publishes it,
   and whoever publishes the last one writes ``manifest.json``.

A kill at any point leaves only ``*.tmp`` files and ``_work/`` state; rerunning the same command redoes unfinished
shards (a shard is never half-kept) and commits what is ready.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import math
import multiprocessing as mp
import os
import queue
import shutil
import signal
import sys
import tarfile
import threading
import time
import traceback
from array import array
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple, Union

import numpy as np
from tqdm import tqdm

from albef.fsutil import atomic_write, durable_replace
from data_prep import shards

CONFIG = "data_prep.json"
WORK = "_work"
MAX_OPEN_SHARDS = 2
Task = Tuple[int, List[Tuple[int, Optional[dict]]]]  # (shard index, [(row, payload or None if a duplicate row)])


@dataclass
class Outcome:
    """What a row processor returns for one input row."""

    status: str
    error: Optional[str] = None
    image: Optional[bytes] = None
    caption: Union[str, List[str]] = ""
    meta: Dict[str, Any] = field(default_factory=dict)
    content_hash: Optional[int] = None  # first 8 bytes of the sha256 of the original image bytes
    transient: bool = False  # a failure that may pass on another try (timeout, 5xx, connection, DNS)


def content_hash(sha256_digest: bytes) -> int:
    return int.from_bytes(sha256_digest[:8], "little")


def image_outcome(source: Dict[str, Any], row: Dict[str, Any], image, sha: bytes) -> Outcome:
    """The success of one row: the processed image (``data_prep.images.ProcessedImage``) and its metadata, the
    row's ``source`` first (``{"url": ...}`` or ``{"image": ...}``, as key.json lists it), then the caption, the
    sha256 digest of the original bytes, the stored and original sizes and the row's ``extra`` columns if any."""
    meta = {
        **source,
        "caption": row["caption"],
        "sha256": sha.hex(),
        "width": image.width,
        "height": image.height,
        "original_width": image.original_width,
        "original_height": image.original_height,
    }
    if row["extra"]:
        meta["extra"] = row["extra"]
    return Outcome("success", image=image.data, caption=row["caption"], meta=meta, content_hash=content_hash(sha))


def _key_hash(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


@dataclass
class Job:
    out_dir: Path
    step: str  # "download" or "annotations": names the CLI in messages and the manifest
    settings: Dict[str, Any]  # everything that shapes the output; must match when resuming
    rows: Callable[[bool], Iterator[dict]]  # rows(key_only) in input order; key_only may return light rows
    processor: Any  # picklable; .setup() once per process, then __call__(row) -> Outcome from many threads
    dedup_key: Optional[Callable[[dict], Optional[str]]] = None  # rows with an equal key: all but the first dropped
    shard_size: int = 10_000
    num_workers: int = 1
    worker_id: int = 0
    processes: int = 1
    threads: int = 64
    progress: bool = True


def worker_split(num_workers: Optional[int], worker_id: Optional[int]) -> Tuple[int, int]:
    """(num_workers, worker_id) from the arguments, else from a SLURM job array, else (1, 0)."""
    env = os.environ
    if num_workers is None:
        num_workers = int(env.get("SLURM_ARRAY_TASK_COUNT", 1))
    if worker_id is None:
        if "SLURM_ARRAY_TASK_ID" in env:
            first, step = int(env.get("SLURM_ARRAY_TASK_MIN", 0)), int(env.get("SLURM_ARRAY_TASK_STEP", 1))
            worker_id = (int(env["SLURM_ARRAY_TASK_ID"]) - first) // step
        else:
            worker_id = 0
    if num_workers < 1 or not 0 <= worker_id < num_workers:
        raise ValueError(f"worker id {worker_id} is not in 0..{num_workers - 1} (--worker-id/--num-workers)")
    return num_workers, worker_id


@contextmanager
def file_lock(path: Path, block: bool = True) -> Iterator[bool]:
    """An exclusive flock (released by the kernel if the process dies); yields whether it was acquired."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if block else fcntl.LOCK_NB))
            locked = True
        except BlockingIOError:
            locked = False
        except OSError as e:  # a filesystem without flock (e.g. Lustre without -o flock)
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            print(f"warning: {path.parent} does not support file locks; run one worker at a time", file=sys.stderr)
            locked = True
        yield locked
    finally:
        os.close(fd)


class HashIndex:
    """A set of 64-bit hashes in sorted numpy arrays (8 bytes each instead of ~70 for a Python set)."""

    def __init__(self):
        self._base = np.empty(0, np.uint64)
        self._recent: List[np.ndarray] = []

    def add(self, values) -> None:
        values = np.unique(np.asarray(values, dtype=np.uint64))
        if values.size:
            self._recent.append(values)
        if sum(a.size for a in self._recent) > max(1 << 16, self._base.size // 4):
            self._base = np.unique(np.concatenate([self._base, *self._recent]))
            self._recent = []

    def contains(self, values) -> np.ndarray:
        values = np.asarray(values, dtype=np.uint64)
        found = np.zeros(values.shape, bool)
        for arr in (self._base, *self._recent):
            if arr.size:
                pos = np.minimum(np.searchsorted(arr, values), arr.size - 1)
                found |= arr[pos] == values
        return found


def _kept_path(work: Path, index: int) -> Path:
    return work / f"{index:06d}.kept.npy"


def _is_built(folder: Path, index: int) -> bool:
    return (folder / shards.shard_file(index)).is_file() and (folder / shards.stats_file(index)).is_file()


class Committer:
    """Phase B: publish built shards in index order with keep-first content dedup (see the module docstring)."""

    def __init__(self, out_dir: Path, num_shards: int, step: str):
        self.out, self.work, self.num_shards, self.step = out_dir, out_dir / WORK, num_shards, step
        self.frontier = 0  # shards [0, frontier) are published and their hashes are in self.index
        self.index = HashIndex()

    def advance(self, block: bool) -> bool:
        """Publish what is ready; True once every shard is published (the manifest is then written)."""
        with file_lock(self.work / "commit.lock", block) as locked:
            if not locked:
                return False
            while self.frontier < self.num_shards:
                i = self.frontier
                if _is_built(self.out, i):
                    self.index.add(self._published_hashes(i))
                elif _is_built(self.work, i):
                    self._commit(i)
                else:
                    break
                self.frontier += 1
            if self.frontier < self.num_shards:
                return False
            status = _status_totals(self.out)
            shards.write_manifest(self.out, {"created_by": f"data_prep.{self.step}", "status": status})
            return True

    def _published_hashes(self, i: int) -> np.ndarray:
        path = _kept_path(self.work, i)
        if path.is_file():
            return np.load(path)
        return np.array(
            [
                content_hash(bytes.fromhex(json.loads(m["json"])["sha256"]))  # _work/ was deleted
                for _, m in shards.iter_tar_samples(self.out / shards.shard_file(i))
            ],
            np.uint64,
        )

    def _commit(self, i: int) -> None:
        stats_path, tar_path = self.work / shards.stats_file(i), self.work / shards.shard_file(i)
        stats = json.loads(stats_path.read_text())
        written = stats.pop("samples")  # [key, row, content hash], in the order the tar holds them
        samples = sorted(written, key=lambda s: s[1])
        earlier = self.index.contains([s[2] for s in samples])
        drop, kept, seen = set(), [], set()
        for (key, _, h), dup in zip(samples, earlier):
            if dup or h in seen:
                drop.add(key)
            else:
                seen.add(h)
                kept.append(h)
        if drop:
            stats["status"]["success"] -= len(drop)
            stats["status"]["duplicate_content"] = stats["status"].get("duplicate_content", 0) + len(drop)
        _save_kept(self.work, i, kept)
        if drop or written != samples:
            # Threads finish rows out of order: the published tar holds its samples in row order, so that the same
            # input gives the same shards (and a training run that reads them, the same batches).
            _write_shard(self.out, i, [tar_path], [key for key, _, _ in samples if key not in drop], stats)
            tar_path.unlink()
        else:
            shards.publish(self.out, i, tar_path, len(samples), stats)
        stats_path.unlink()
        self.index.add(kept)


def _write_shard(out: Path, i: int, sources: List[Path], keys: List[str], stats: Dict[str, Any]) -> None:
    """Publish shard ``i`` holding the samples ``keys``, in that order, read by random access from ``sources`` (the
    first tar that has a key wins)."""
    with contextlib.ExitStack() as stack:
        index: Dict[str, Tuple[tarfile.TarFile, tarfile.TarInfo]] = {}
        for path in sources:
            if path.is_file():
                tar = stack.enter_context(tarfile.open(path))
                for info in tar.getmembers():
                    index.setdefault(info.name, (tar, info))

        def read(key: str, ext: str) -> bytes:
            if f"{key}.{ext}" not in index:
                raise RuntimeError(
                    f"sample {key} of shard {i} is in none of {[str(p) for p in sources]}; the "
                    "dataset was changed by something else"
                )
            tar, info = index[f"{key}.{ext}"]
            return tar.extractfile(info).read()

        with shards.ShardWriter(out, i) as writer:
            for key in keys:
                writer.write(key, read(key, "jpg"), read(key, "txt").decode("utf-8"), json.loads(read(key, "json")))
            writer.commit(stats)


def _save_kept(work: Path, i: int, hashes) -> None:
    """The content hashes of published shard ``i``'s samples, in row order (what later dedup compares with)."""
    tmp = work / f"{i:06d}.kept.tmp.npy"
    np.save(tmp, np.array(hashes, np.uint64))
    durable_replace(tmp, _kept_path(work, i))


class _Shard:
    def __init__(self, index: int, rows: List[Tuple[int, Optional[dict]]]):
        self.index, self.rows, self.pending = index, rows, len(rows)
        self.writer: Optional[shards.ShardWriter] = None
        self.status, self.errors = Counter(), Counter()
        self.samples: List[list] = []
        self.transient: List[list] = []  # [row, status, error] of the failures --retry-failed may redo
        self.start = time.time()


class ShardBuilder:
    """Phase A in one process: run shard tasks through the row processor with a thread pool, into ``_work/``."""

    def __init__(self, work_dir: Path, processor, threads: int, key_width: int, report: Callable[[tuple], None]):
        self.work, self.processor, self.threads, self.key_width = work_dir, processor, threads, key_width
        self.report = report
        self._done = self._ok = 0
        self._last_report = time.monotonic()

    def run(self, tasks: Iterable[Task]) -> None:
        self.processor.setup()
        results: "queue.SimpleQueue" = queue.SimpleQueue()
        rows = ((shard, row, payload) for shard in (_Shard(i, r) for i, r in tasks) for row, payload in shard.rows)
        active: Dict[int, _Shard] = {}
        held, in_flight = None, 0
        pool = ThreadPoolExecutor(self.threads, thread_name_prefix="data_prep")
        try:
            while True:
                while in_flight < 2 * self.threads:
                    held = held or next(rows, None)
                    if held is None:
                        break
                    shard, row, payload = held
                    if shard.writer is None:
                        if len(active) >= MAX_OPEN_SHARDS:
                            break
                        shard.writer = shards.ShardWriter(self.work, shard.index)
                        active[shard.index] = shard
                    held = None
                    if payload is None:
                        self._record(shard, row, Outcome("duplicate_url"), active)
                    else:
                        pool.submit(self._process, results, shard, row, payload)
                        in_flight += 1
                if in_flight == 0 and held is None:
                    break
                try:
                    shard, row, outcome = results.get(timeout=0.5)
                except queue.Empty:
                    self._flush_progress()
                    continue
                in_flight -= 1
                self._record(shard, row, outcome, active)
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
            for shard in active.values():
                shard.writer.abort()
        self._flush_progress(force=True)

    def _process(self, results: "queue.SimpleQueue", shard: _Shard, row: int, payload: dict) -> None:
        try:
            outcome = self.processor(payload)
        except Exception as e:  # a bug must cost one sample, never the run
            outcome = Outcome("error", f"internal error ({type(e).__name__}: {e})")
        results.put((shard, row, outcome))

    def _record(self, shard: _Shard, row: int, outcome: Outcome, active: Dict[int, _Shard]) -> None:
        shard.status[outcome.status] += 1
        if outcome.error:
            shard.errors[outcome.error] += 1
        if outcome.transient:
            shard.transient.append([row, outcome.status, outcome.error])
        if outcome.status == "success":
            key = f"{row:0{self.key_width}d}"
            meta = {**outcome.meta, "key": key, "row": row, "status": "success"}
            shard.writer.write(key, outcome.image, outcome.caption, meta)
            shard.samples.append([key, row, outcome.content_hash])
        shard.pending -= 1
        self._done += 1
        self._ok += outcome.status == "success"
        if shard.pending == 0:
            end = time.time()
            shard.writer.commit(
                {
                    "count": len(shard.rows),
                    "status": dict(shard.status),
                    "errors": dict(shard.errors),
                    "start_time": shard.start,
                    "end_time": end,
                    "duration": end - shard.start,
                    "samples": shard.samples,
                    "transient": sorted(shard.transient),
                }
            )
            del active[shard.index]
            self._flush_progress(force=True)
            self.report(("built", shard.index))
        else:
            self._flush_progress()

    def _flush_progress(self, force: bool = False) -> None:
        now = time.monotonic()
        if self._done and (force or now - self._last_report > 0.2):
            self.report(("rows", self._done, self._ok))
            self._done = self._ok = 0
            self._last_report = now


def _die_with_parent(parent_pid: int) -> None:
    """Children must not outlive a killed parent (they would race a rerun for the same _work files)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:
        os._exit(1)


def _child_main(parent_pid: int, tasks: "mp.Queue", events: "mp.Queue", builder_args: tuple) -> None:
    _die_with_parent(parent_pid)
    try:
        ShardBuilder(*builder_args, report=events.put).run(iter(tasks.get, None))
    except BaseException:
        events.put(("error", traceback.format_exc()))
        raise SystemExit(1)


def _build_in_processes(job: Job, tasks: Iterator[Task], builder_args: tuple, on_event: Callable[[tuple], None]):
    ctx = mp.get_context("spawn")  # no fork: the parent has threads (feeder, tqdm)
    task_q, events = ctx.Queue(maxsize=job.processes), ctx.Queue()
    procs = [
        ctx.Process(target=_child_main, args=(os.getpid(), task_q, events, builder_args), daemon=True)
        for _ in range(job.processes)
    ]
    for p in procs:
        p.start()
    stop, feed_error = threading.Event(), []

    def put(item) -> bool:
        while not stop.is_set():
            try:
                task_q.put(item, timeout=0.5)
                return True
            except queue.Full:
                pass
        return False

    def feed() -> None:
        try:
            for task in tasks:
                if not put(task):
                    return
            for _ in procs:
                put(None)
        except BaseException as e:
            feed_error.append(e)

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    failure = None
    try:
        while failure is None:
            try:
                event = events.get(timeout=0.5)
            except queue.Empty:
                if feed_error:
                    raise feed_error[0]
                codes = [p.exitcode for p in procs]
                if any(c not in (None, 0) for c in codes):
                    failure = f"a build process exited with code {[c for c in codes if c][0]}"
                elif all(c == 0 for c in codes):
                    break
                continue
            if event[0] == "error":
                failure = event[1]
            else:
                on_event(event)
        while True:  # children flush their queue before exiting: nothing is lost
            try:
                event = events.get_nowait()
            except queue.Empty:
                break
            if event[0] != "error":
                on_event(event)
    finally:
        stop.set()
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join()
    if failure:
        raise RuntimeError(f"building shards failed; rerun the same command to resume:\n{failure}")


def _build(
    job: Job, folder: Path, key_width: int, tasks: Iterator[Task], num_tasks: int, on_event: Callable[[tuple], None]
) -> None:
    """Phase A: build the shard tasks into ``folder``, in ``job.processes`` processes when there is more than one
    shard to build, else in this process."""
    builder_args = (folder, job.processor, job.threads, key_width)
    if job.processes > 1 and num_tasks > 1:
        _build_in_processes(job, tasks, builder_args, on_event)
    else:
        ShardBuilder(*builder_args, report=on_event).run(tasks)


def _scan(job: Job) -> Tuple[int, Optional[np.ndarray]]:
    """Number of input rows, and the mask of rows kept by the dedup key (None: no dedup)."""
    bar = tqdm(desc="scan input", unit=" rows", disable=not job.progress, mininterval=0.5)
    hashes, valid, n = array("Q"), array("b"), 0  # compact: 9 bytes per row
    for row in job.rows(True):
        n += 1
        bar.update()
        if job.dedup_key is not None:
            key = job.dedup_key(row)
            valid.append(key is not None)
            hashes.append(_key_hash(key) if key is not None else 0)
    bar.close()
    if job.dedup_key is None:
        return n, None
    hashes, valid = np.frombuffer(hashes, np.uint64), np.frombuffer(valid, np.int8).astype(bool)
    candidates = np.flatnonzero(valid)
    _, first = np.unique(hashes[candidates], return_index=True)  # index of the first occurrence of each hash
    keep = ~valid
    keep[candidates[first]] = True
    return n, keep


def _tasks(job: Job, keep: Optional[np.ndarray], todo: List[int], only: Optional[set] = None) -> Iterator[Task]:
    """The rows of the shards in ``todo`` (sorted), read again from the input, one shard at a time; with ``only``,
    just those rows."""
    wanted, last = set(todo), max(todo)
    current, rows = None, []
    for r, row in enumerate(job.rows(False)):
        shard = r // job.shard_size
        if shard > last:
            break
        if shard != current and rows:
            yield current, rows
            rows = []
        current = shard
        if shard in wanted and (only is None or r in only):
            rows.append((r, row if keep is None or keep[r] else None))
    if rows:
        yield current, rows


def _check_config(out_dir: Path, config: Dict[str, Any]) -> None:
    path = out_dir / CONFIG
    config = json.loads(json.dumps(config))
    if path.is_file():
        old = json.loads(path.read_text())
        diff = [
            f"{k}: {old.get(k)!r} -> {config.get(k)!r}"
            for k in sorted(set(old) | set(config))
            if old.get(k) != config.get(k)
        ]
        if diff:
            raise SystemExit(
                f"{out_dir} was prepared with other settings ({'; '.join(diff)}); "
                f"use a new output folder, or the same input and settings to resume"
            )
        return
    atomic_write(path, json.dumps(config, indent=1, sort_keys=True))


def _status_totals(out: Path) -> Dict[str, int]:
    """Rows per status over the dataset's shard stats."""
    return {k[len("status.") :]: v for k, v in shards.merge_stats(out).items() if k.startswith("status.")}


def _plan(job: Job, out: Path) -> Tuple[int, Optional[np.ndarray], int, int]:
    """Scan the input and check it against the folder's settings: (rows, dedup mask, shards, key width)."""
    num_rows, keep = _scan(job)
    num_shards = math.ceil(num_rows / job.shard_size)
    key_width = max(9, len(str(max(num_rows - 1, 0))))
    _check_config(
        out,
        {
            "format": 1,
            "step": job.step,
            "num_rows": num_rows,
            "shard_size": job.shard_size,
            "key_width": key_width,
            **job.settings,
        },
    )
    return num_rows, keep, num_shards, key_width


def _fmt_status(status: Dict[str, int]) -> str:
    return " ".join(f"{k}={v}" for k, v in sorted(status.items(), key=lambda kv: (-kv[1], kv[0])))


def run(job: Job) -> Dict[str, Any]:
    """Do this worker's share of the job; returns a summary dict (also printed as one line)."""
    start = time.monotonic()
    out, name = Path(job.out_dir), f"data_prep.{job.step}"
    work = out / WORK
    work.mkdir(parents=True, exist_ok=True)
    with file_lock(work / f"worker-{job.worker_id}-of-{job.num_workers}.lock", block=False) as locked:
        if not locked:
            raise SystemExit(f"another process already runs worker {job.worker_id} of {job.num_workers} on {out}")
        num_rows, keep, num_shards, key_width = _plan(job, out)
        owned = range(job.worker_id, num_shards, job.num_workers)
        todo = [i for i in owned if not _is_built(out, i) and not _is_built(work, i)]
        todo_rows = sum(min(job.shard_size, num_rows - i * job.shard_size) for i in todo)
        duplicates = "" if keep is None else f" ({int((~keep).sum())} duplicate URLs)"
        print(
            f"{name}: worker {job.worker_id}/{job.num_workers}: {num_rows} rows{duplicates} -> "
            f"{num_shards} shards; this worker owns {len(owned)}, {len(todo)} to build",
            file=sys.stderr,
        )

        committer = Committer(out, num_shards, job.step)
        bar = tqdm(total=todo_rows, desc="build shards", unit=" rows", disable=not job.progress, smoothing=0.05)
        counts = Counter()

        def on_event(event: tuple) -> None:
            if event[0] == "rows":
                counts["rows"] += event[1]
                counts["ok"] += event[2]
                bar.update(event[1])
                bar.set_postfix(ok=f"{counts['ok'] / max(counts['rows'], 1):.0%}", refresh=False)
            elif event[0] == "built":
                counts["built"] += 1
                committer.advance(block=False)

        if todo:
            _build(job, work, key_width, _tasks(job, keep, todo), len(todo), on_event)
        bar.close()
        complete = committer.advance(block=True)

    elapsed = time.monotonic() - start
    status = _status_totals(out)
    summary = {
        "worker": job.worker_id,
        "num_workers": job.num_workers,
        "rows": num_rows,
        "shards": num_shards,
        "built": counts["built"],
        "rows_processed": counts["rows"],
        "ok": counts["ok"],
        "seconds": elapsed,
        "published": committer.frontier,
        "complete": complete,
        "num_samples": sum(shards.finished_shards(out).values()),
        "status": status,
    }
    rate = counts["ok"] / elapsed if elapsed > 0 else 0.0
    if complete:
        state = f"manifest {out / shards.MANIFEST}"
    else:
        state = (
            f"manifest pending: shard {committer.frontier} is not built yet "
            f"(worker {committer.frontier % job.num_workers}'s; the last worker to finish writes it)"
        )
    print(
        f"{name}: worker {job.worker_id}/{job.num_workers} built {counts['built']} shards "
        f"({len(owned) - len(todo)} were done): {counts['ok']}/{counts['rows']} rows ok, {rate:.1f} samples/s, "
        f"{elapsed:.1f}s | dataset: {committer.frontier}/{num_shards} shards published, "
        f"{summary['num_samples']} samples, {state} | status: {_fmt_status(status)}"
    )
    return summary


# ---- --retry-failed ------------------------------------------------------------------------------------------------
RETRY = "retry"  # _work/retry/: the retried rows' shards and the plan of the rewrite


def _published_samples(out: Path, work: Path, i: int) -> List[Tuple[int, int]]:
    """(row, content hash) of every sample of published shard ``i``, in row order."""
    with tarfile.open(out / shards.shard_file(i)) as tar:
        rows = sorted({int(name.partition(".")[0]) for name in tar.getnames()})
    path = _kept_path(work, i)
    if path.is_file():
        hashes = np.load(path)
        if len(hashes) == len(rows):
            return list(zip(rows, (int(h) for h in hashes)))
    metas = (json.loads(m["json"]) for _, m in shards.iter_tar_samples(out / shards.shard_file(i)))
    return sorted((m["row"], content_hash(bytes.fromhex(m["sha256"]))) for m in metas)


def _retry_plan(
    out: Path, work: Path, retry: Path, todo: Dict[int, Dict[int, list]], num_shards: int, key_width: int
) -> Dict[str, Any]:
    """The final stats, sample keys and content hashes of every shard the retry changes, with keep-first content
    dedup redone over the whole dataset: a retried row that now succeeds wins over a later row with the same bytes
    (which becomes ``duplicate_content``, in whatever shard it is), exactly as if it had succeeded the first time."""
    retried = {i: json.loads((retry / shards.stats_file(i)).read_text()) for i in todo}
    entries = [(row, h, i, False) for i in range(num_shards) for row, h in _published_samples(out, work, i)]
    entries += [(row, int(h), i, True) for i, st in retried.items() for _, row, h in st["samples"]]
    entries.sort()
    seen, final = set(), {i: [] for i in range(num_shards)}
    dropped_new, dropped_old = Counter(), Counter()
    for row, h, i, new in entries:
        if h in seen:
            (dropped_new if new else dropped_old)[i] += 1
            continue
        seen.add(h)
        final[i].append((row, h))
    plan = {}
    for i in sorted(set(todo) | set(dropped_old)):
        stats = json.loads((out / shards.stats_file(i)).read_text())
        for name in ("shard", "num_samples"):
            stats.pop(name, None)
        status, errors = Counter(stats.get("status", {})), Counter(stats.get("errors", {}))
        for status_name, error in todo.get(i, {}).values():
            status[status_name] -= 1
            if error:
                errors[error] -= 1
        if i in retried:
            status.update(retried[i]["status"])
            errors.update(retried[i]["errors"])
            stats["transient"] = retried[i]["transient"]
        moved = dropped_new[i] + dropped_old[i]
        status["success"] -= moved
        status["duplicate_content"] += moved
        stats["status"] = {k: v for k, v in sorted(status.items()) if v}
        stats["errors"] = {k: v for k, v in sorted(errors.items()) if v}
        stats["retried_time"] = time.time()
        plan[str(i)] = {
            "stats": stats,
            "keys": [f"{row:0{key_width}d}" for row, _ in final[i]],
            "hashes": [h for _, h in final[i]],
        }
    return plan


def _apply_retry_plan(out: Path, work: Path, retry: Path, plan: Dict[str, Any]) -> None:
    """Rewrite each planned shard from its published tar and the retried rows' tar. Idempotent: a kill at any point
    and a rerun give the same dataset (the plan, and the retried tars, stay until every shard is rewritten)."""
    for name in sorted(plan, key=int):
        i, entry = int(name), plan[name]
        sources = [out / shards.shard_file(i), retry / shards.shard_file(i)]
        with tarfile.open(sources[0]) as tar:
            published = sorted({n.partition(".")[0] for n in tar.getnames()})
        if published == entry["keys"]:  # the same samples: only the counts change, the tar stays as it is
            shards.atomic_write_json(
                out / shards.stats_file(i),
                {**entry["stats"], "shard": shards.shard_file(i), "num_samples": len(published)},
            )
            continue
        _write_shard(out, i, sources, entry["keys"], entry["stats"])
        _save_kept(work, i, entry["hashes"])


def retry_failed(job: Job) -> Dict[str, Any]:
    """Fetch again the rows of a finished dataset whose failure was transient, and rewrite only the shards that
    change (they gain samples, or lose one to a retried row with the same bytes). Returns before/after counts."""
    out, name = Path(job.out_dir), f"data_prep.{job.step} --retry-failed"
    work, start = out / WORK, time.monotonic()
    retry = work / RETRY
    if job.num_workers != 1:
        raise SystemExit(
            f"{name} runs as a single worker (it may rewrite any shard): drop --num-workers/"
            "--worker-id and run it outside a job array"
        )
    if not (out / shards.MANIFEST).is_file():
        raise SystemExit(
            f"{out} has no {shards.MANIFEST}: finish the run first (the same command without "
            "--retry-failed), then retry its failed rows"
        )
    work.mkdir(exist_ok=True)
    with file_lock(work / "worker-0-of-1.lock", block=False) as locked, file_lock(work / "commit.lock") as _:
        if not locked:
            raise SystemExit(f"another process already runs on {out}")
        _, _, num_shards, key_width = _plan(job, out)
        before = _status_totals(out)
        samples_before = shards.read_manifest(out)["num_samples"]
        plan_path = retry / "plan.json"
        retried_rows = 0
        if not plan_path.is_file():
            todo: Dict[int, Dict[int, list]] = {}
            for i in range(num_shards):
                for row, status_name, error in json.loads((out / shards.stats_file(i)).read_text()).get(
                    "transient", []
                ):
                    todo.setdefault(i, {})[row] = [status_name, error]
            retried_rows = sum(len(rows) for rows in todo.values())
            if not todo:
                print(
                    f"{name}: no transient failures in {out} (timeouts, 5xx, connection and DNS errors are "
                    f"recorded per row); nothing to do | status: {_fmt_status(before)}"
                )
                return {
                    "retried": 0,
                    "status_before": before,
                    "status_after": before,
                    "rewritten": 0,
                    "num_samples_before": samples_before,
                    "num_samples": samples_before,
                }
            retry.mkdir(parents=True, exist_ok=True)
            build = [i for i in sorted(todo) if not _is_built(retry, i)]
            print(
                f"{name}: {retried_rows} rows with transient failures in {len(todo)} shards; fetching them again",
                file=sys.stderr,
            )
            if build:
                bar = tqdm(
                    total=sum(len(todo[i]) for i in build), desc="retry rows", unit=" rows", disable=not job.progress
                )

                def on_event(event: tuple) -> None:
                    if event[0] == "rows":
                        bar.update(event[1])

                rows = {row for i in build for row in todo[i]}
                _build(job, retry, key_width, _tasks(job, None, build, rows), len(build), on_event)
                bar.close()
            atomic_write(plan_path, json.dumps(_retry_plan(out, work, retry, todo, num_shards, key_width)))
        plan = json.loads(plan_path.read_text())
        _apply_retry_plan(out, work, retry, plan)
        after = _status_totals(out)
        manifest = shards.write_manifest(out, {"created_by": f"data_prep.{job.step}", "status": after})
        shutil.rmtree(retry)
    gained = {
        k: after.get(k, 0) - before.get(k, 0)
        for k in sorted(set(before) | set(after))
        if after.get(k, 0) != before.get(k, 0)
    }
    print(
        f"{name}: {retried_rows or 'the planned'} rows retried, {len(plan)} shards rewritten in "
        f"{time.monotonic() - start:.1f}s | samples {samples_before} -> {manifest['num_samples']} | change: "
        f"{' '.join(f'{k}={v:+d}' for k, v in gained.items()) or 'none'} | status: {_fmt_status(after)}"
    )
    return {
        "retried": retried_rows,
        "status_before": before,
        "status_after": after,
        "rewritten": len(plan),
        "num_samples_before": samples_before,
        "num_samples": manifest["num_samples"],
    }
