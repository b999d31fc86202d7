"""The pretraining loader: shards (or official JSON files) -> ALBEF batches, exact epochs, exact mid-epoch resume.

    loader = build_pretrain_loader(cfg.data, Tokenizer(), rank, world_size, seed)
    loader.load_state_dict(ckpt["data"])           # optional: resume mid-epoch
    for epoch in range(start_epoch, epochs):
        loader.set_epoch(epoch)
        for batch in loader:                       # len(loader) batches, the same number on every rank
            ...
            ckpt["data"] = loader.state_dict()     # small JSON-able dict, saved with the model

Semantics (W = max(1, num_workers) workers per rank, B = batch_size, R = world_size):

* Epoch length. Non-resampled: N = the samples of all manifests; every rank yields exactly
  K = floor(N / (R * B)) batches. Resampled: N = ``samples_per_epoch`` (default: the manifests' total).
  ``len(loader) == K`` on every rank, so DDP never waits for a rank that ran dry.
* Non-resampled epoch. The shard list (all datasets together) is permuted from (seed, epoch). The first R*K*B
  sample positions of the permuted concatenation are cut into contiguous slices, one per (rank, worker): rank r
  gets positions [r*K*B, (r+1)*K*B), and worker w of it as many whole batches as it delivers to the rank. Slices
  may start and end inside a shard (a boundary shard is read by two workers, each taking its own samples), so
  every rank and worker gets exactly its count however uneven the shards are. Every sample of the first R*K*B
  positions is delivered exactly once; the last N - R*K*B (< R*B) positions, the tail of this epoch's last shard(s),
  are dropped (a different tail every epoch). Fewer shards than R*W is an error (a worker would share a shard).
* Resampled epoch. Each (rank, worker) draws shards with replacement from (seed, epoch, rank, worker), dataset d
  with probability weight_d/sum(weights) of samples (default weights: dataset sizes), within a dataset shards in
  proportion to their size, and reads them until its share of K batches is full.
* Shuffling. Each worker passes its raw samples (undecoded bytes) through a buffer of ``shuffle_buffer`` items:
  the first S fill it, then every new sample replaces a uniformly chosen one that is emitted; at the end of the
  slice the buffer is drained in random order. Its RNG is seeded from (seed, epoch, rank, worker). JSON files are
  permuted per epoch at sample level instead (no buffer).
* Order. The DataLoader takes worker batches round-robin: batch b of a rank is batch b // W of worker b % W.
* Randomness per sample (caption choice, crop, flip, RandAugment) comes from (seed, epoch, rank, worker, slot),
  where slot is the sample's position in the worker's output: it does not depend on what was read before.
* Bad samples (undecodable image, missing image or caption, non-UTF-8 text, positions lost to a truncated or
  unreadable shard) are logged with key and shard, counted by reason (``stats()``) and their slot is filled with
  the next good sample of the same worker (a repeat with its own augmentation; at the end of a slice, the last
  good one of the previous 64 outputs), so batches stay full and batch counts equal. A worker that finds no good
  sample to fill with raises, and so does one whose bad samples pass ``data.max_bad_fraction`` of its epoch.
* Resume. ``state_dict()`` = (epoch, batches yielded so far, stats, and what must not change mid-epoch).
  After ``load_state_dict`` the next batch is exactly the one that would have followed, pixels included: each
  worker replays its shuffle buffer on sample indices only (no I/O, no decode) to the resume point, then reads
  from the oldest sample still buffered there (shards before it are skipped unopened; typically a few buffer
  lengths are re-read), keeps the buffered ones, and continues; the DataLoader's worker order is rotated so the
  round-robin continues at worker k % W. So a resumed epoch delivers exactly the samples the uninterrupted epoch
  would have delivered after batch k: no sample repeated or skipped. A mid-epoch state needs the same seed, world size,
  workers, batch size, shuffle buffer and data (shard names and sizes; the paths may change); at an epoch
  boundary any of these may change. A state saved after the last batch of epoch e resumes at epoch e + 1.
* ``set_epoch(e)`` with a different epoch starts it at batch 0; with the restored state's epoch it keeps the
  restored position. Iterating a finished epoch again restarts it. Workers are started per epoch (their state is
  the epoch's plan), so ``persistent_workers`` is not used.
"""
from __future__ import annotations

import atexit
import bisect
import collections
import hashlib
import logging
import os
import random
import signal
import weakref
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from albef.data.config import DataConfig
from albef.data.json_dataset import JsonCaptionDataset
from albef.data.samples import REASONS, BadSample, collate, derive_seed, sample_from_shard
from albef.data.shards import Missing, Shard, expand_dataset, iter_shard, shard_name
from albef.data.transforms import ImageTransform

log = logging.getLogger(__name__)

STATE_VERSION = 1
_ADD, _OUT = 0, 1
_BACKFILL_WINDOW = 64


def shuffle_events(num_raw: Optional[int], size: int, rng: random.Random) -> Iterator[Tuple[int, int]]:
    """The shuffle buffer on indices: ``(ADD, r)`` when raw sample r enters, ``(OUT, r)`` when it is emitted.

    Depends on indices only, so a resume can replay it without reading data. ``num_raw=None``: endless stream.
    """
    r = 0
    if size <= 1:
        while num_raw is None or r < num_raw:
            yield _ADD, r
            yield _OUT, r
            r += 1
        return
    buf: List[int] = []
    while num_raw is None or r < num_raw:
        if len(buf) < size:
            buf.append(r)
        else:
            j = rng.randrange(size)
            yield _OUT, buf[j]
            buf[j] = r
        yield _ADD, r
        r += 1
    while buf:
        j = rng.randrange(len(buf))
        buf[j], buf[-1] = buf[-1], buf[j]
        yield _OUT, buf.pop()


def worker_batch_counts(num_batches: int, num_workers: int) -> List[int]:
    """Batches each worker delivers when batch b comes from worker b % W."""
    return [len(range(w, num_batches, num_workers)) for w in range(num_workers)]


def ignore_stop_signals(_worker_id: int = 0) -> None:
    """DataLoader worker init: SLURM sends SIGTERM/SIGUSR1 to every process of a job; the workers must leave them to
    the main process, which checkpoints and stops them itself (else the main process dies on 'worker killed').
    Use with ``iterate_workers``, which stops such workers when the program ends."""
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


_LIVE_ITERATORS: "weakref.WeakSet" = weakref.WeakSet()


def _stop_live_workers() -> None:
    """At exit, before multiprocessing's own exit hook (atexit runs in reverse order of registration, and torch
    imports multiprocessing first). That hook terminates worker processes with SIGTERM, which ours ignore, then
    joins them: a program that ends while a loader iterator is still open (a ``break`` in a script, an exception
    that ends the run with the iterator in its traceback) would wait forever. Shut them down the way the DataLoader
    does when its iterator is deleted: a stop message to each worker, then join."""
    for iterator in list(_LIVE_ITERATORS):
        iterator._shutdown_workers()


atexit.register(_stop_live_workers)


def iterate_workers(loader: DataLoader) -> Iterator:
    """``iter(loader)`` for a DataLoader whose workers run ``ignore_stop_signals``: stopped at exit if still open."""
    iterator = iter(loader)
    if hasattr(iterator, "_shutdown_workers"):
        _LIVE_ITERATORS.add(iterator)
    return iterator


class _ShardSlice:
    """Raw samples [lo, lo + n) of the epoch's permuted shard concatenation."""

    def __init__(self, shards: Sequence[Shard], offsets: Sequence[int], lo: int, n: int):
        self.shards, self.offsets, self.lo, self.num_raw = shards, offsets, lo, n

    def items(self, start: int) -> Iterator:
        pos, end = self.lo + start, self.lo + self.num_raw
        i = bisect.bisect_right(self.offsets, pos) - 1
        while pos < end:
            for item in iter_shard(self.shards[i], pos - self.offsets[i]):
                yield item
                pos += 1
                if pos >= end:
                    return
            i += 1


class _ResampledShards:
    """An endless stream of raw samples from shards drawn with replacement."""

    num_raw = None

    def __init__(self, shards: Sequence[Shard], cum_weights: Sequence[float], seed: int):
        self.shards, self.cum_weights, self.seed = shards, cum_weights, seed

    def items(self, start: int) -> Iterator:
        rng = random.Random(self.seed)
        total = self.cum_weights[-1]
        pos = 0
        while True:
            i = min(bisect.bisect_right(self.cum_weights, rng.random() * total), len(self.shards) - 1)
            shard = self.shards[i]
            if pos + shard.num_samples > start:
                yield from iter_shard(shard, max(0, start - pos))
            pos += shard.num_samples


class _JsonSlice:
    """Entries perm[lo:lo + n] of the epoch's permutation of the JSON entries."""

    def __init__(self, perm: np.ndarray, lo: int, n: int):
        self.perm, self.lo, self.num_raw = perm, lo, n

    def items(self, start: int) -> Iterator[int]:
        for p in range(self.lo + start, self.lo + self.num_raw):
            yield int(self.perm[p])


@dataclass
class _EpochPlan:
    """Everything a worker needs for one epoch (built in the main process, inherited by the workers)."""
    epoch: int
    first_batch: int
    num_batches: int
    rank: int
    num_workers: int  # logical workers (>= 1)
    batch_size: int
    seed: int
    shuffle_buffer: int
    shards: Optional[List[Shard]]  # non-resampled: permuted; resampled: all
    offsets: Optional[List[int]]
    cum_weights: Optional[List[float]]
    json: Optional[JsonCaptionDataset]
    perm: Optional[np.ndarray]


class _EpochDataset(IterableDataset):
    """One epoch of one rank; each DataLoader worker runs one logical worker's stream."""

    def __init__(self, plan: _EpochPlan, transform: ImageTransform, tokenizer, max_words: int, max_text_len: int,
                 log_limit: int, max_bad_fraction: float = 1.0):
        self.plan, self.transform, self.tokenizer = plan, transform, tokenizer
        self.max_words, self.max_text_len, self.log_limit = max_words, max_text_len, log_limit
        self.max_bad_fraction = max_bad_fraction

    def __iter__(self) -> Iterator[Dict]:
        info = get_worker_info()
        plan = self.plan
        # No cv2.setNumThreads here: in a forked child whose parent ran OpenCV's thread pool it deadlocks
        # (pthread_cond_destroy on the parent's pool); OpenCV's ops themselves are fork-safe.
        # Rotate so that DataLoader worker 0 (asked first) is the logical worker of batch first_batch.
        w = ((info.id if info is not None else 0) + plan.first_batch) % plan.num_workers
        counts = worker_batch_counts(plan.num_batches, plan.num_workers)
        done = len(range(w, plan.first_batch, plan.num_workers))
        n_out = counts[w] * plan.batch_size
        lo = (plan.rank * plan.num_batches + sum(counts[:w])) * plan.batch_size
        if plan.json is not None:
            source, buffer_size = _JsonSlice(plan.perm, lo, n_out), 0
        elif plan.cum_weights is not None:
            seed = derive_seed(plan.seed, plan.epoch, plan.rank, w, "draw")
            source, buffer_size = _ResampledShards(plan.shards, plan.cum_weights, seed), plan.shuffle_buffer
        else:
            source, buffer_size = _ShardSlice(plan.shards, plan.offsets, lo, n_out), plan.shuffle_buffer
        yield from _WorkerStream(self, source, buffer_size, w, n_out, done * plan.batch_size).batches()


class _WorkerStream:
    """One logical worker's epoch: shuffle buffer -> decode (with bad-sample fill) -> batches."""

    def __init__(self, ds: _EpochDataset, source, buffer_size: int, worker: int, n_out: int, first_slot: int):
        plan = ds.plan
        self.ds, self.source, self.worker, self.n_out, self.first_slot = ds, source, worker, n_out, first_slot
        self.slot_seed = (plan.seed, plan.epoch, plan.rank, worker)
        self.events = shuffle_events(source.num_raw, buffer_size,
                                     random.Random(derive_seed(plan.seed, plan.epoch, plan.rank, worker, "buffer")))
        self.stats = collections.Counter({"samples": 0})
        self.logged = 0
        self.history: collections.deque = collections.deque(maxlen=_BACKFILL_WINDOW)

    # -- raw samples -------------------------------------------------------------------------------------------
    def _fast_forward(self) -> Tuple[Dict[int, object], Iterator]:
        """Replay the buffer to output ``first_slot``; re-read only the samples still buffered there."""
        in_buffer = set()
        next_raw = 0
        emitted = 0
        while emitted < self.first_slot:
            op, r = next(self.events)
            if op == _ADD:
                in_buffer.add(r)
                next_raw = r + 1
            else:
                in_buffer.discard(r)
                self.history.append(r)
                emitted += 1
        start = min(in_buffer) if in_buffer else next_raw
        raw = self.source.items(start)
        store = {}
        for r in range(start, next_raw):
            item = next(raw)
            if r in in_buffer:
                store[r] = item
        return store, raw

    def _item_at(self, r: int):
        return next(iter(self.source.items(r)))

    # -- decoding ----------------------------------------------------------------------------------------------
    def _decode(self, item, slot: int) -> Dict:
        rng = random.Random(derive_seed(*self.slot_seed, slot))
        ds = self.ds
        if ds.plan.json is not None:
            return ds.plan.json.load(item, rng)
        return sample_from_shard(item, ds.transform, rng, ds.max_words)

    def _describe(self, item) -> Tuple[str, str]:
        plan = self.ds.plan
        if plan.json is not None:
            path = plan.json.entries[item][0]
            return path, "json"
        return item.key, item.shard

    def _bad(self, item, error: BadSample) -> None:
        self.stats[error.reason] += 1
        key, shard = self._describe(item)
        bad = sum(self.stats[r] for r in REASONS)
        if bad > self.ds.max_bad_fraction * self.n_out:
            plan = self.ds.plan
            counts = ", ".join(f"{r} {self.stats[r]}" for r in REASONS if self.stats[r])
            raise RuntimeError(
                f"rank {plan.rank} worker {self.worker}, epoch {plan.epoch}: {bad} bad samples of the {self.n_out} "
                f"this worker reads this epoch ({counts}; the last: key={key} shard={shard}: {error.reason}) is more "
                f"than data.max_bad_fraction={self.ds.max_bad_fraction}: the data is damaged or gone (a shard "
                "deleted or unreadable?). Repair or re-prepare it, or raise data.max_bad_fraction.")
        if isinstance(item, Missing):  # the shard reader already logged the whole shard's loss once
            log.debug("skipping lost sample key=%s shard=%s: %s", key, shard, error.reason)
            return
        self.logged += 1
        if self.logged == self.ds.log_limit + 1:
            log.warning("rank %d worker %d: further bad samples this epoch are logged at DEBUG (all are counted "
                        "in loader.stats())", self.ds.plan.rank, self.worker)
        level = logging.WARNING if self.logged <= self.ds.log_limit else logging.DEBUG
        log.log(level, "skipping bad sample key=%s shard=%s: %s: %s", key, shard, error.reason, error.detail)

    def _backfill_item(self, last_good, first_pending: int):
        """The last good sample before ``first_pending`` within the backfill window, else None."""
        if last_good is not None:
            return last_good[0] if first_pending - last_good[1] <= _BACKFILL_WINDOW else None
        # resumed run with no good sample yet: look back over the outputs before the resume point
        for back, r in enumerate(reversed(self.history), start=1):
            if first_pending - (self.first_slot - back) > _BACKFILL_WINDOW:
                break
            item = self._item_at(r)
            try:
                self._decode(item, first_pending)
                return item
            except BadSample:
                continue
        return None

    # -- the stream --------------------------------------------------------------------------------------------
    def batches(self) -> Iterator[Dict]:
        if self.n_out <= self.first_slot:
            return
        store, raw = self._fast_forward()
        batch: List[Dict] = []
        pending: List[int] = []
        last_good = None
        slot = self.first_slot

        def emit(sample: Dict):
            batch.append(sample)
            self.stats["samples"] += 1
            if len(batch) == self.ds.plan.batch_size:
                out = collate(batch, self.ds.tokenizer, self.ds.max_text_len)
                out["_stats"] = dict(self.stats)
                out["_worker"] = self.worker
                batch.clear()
                return out
            return None

        for op, r in self.events:
            if slot >= self.n_out:
                break
            if op == _ADD:
                store[r] = next(raw)
                continue
            item = store.pop(r)
            try:
                sample = self._decode(item, slot)
            except BadSample as e:
                self._bad(item, e)
                pending.append(slot)
                slot += 1
                continue
            for p in pending:
                out = emit(self._decode(item, p))
                if out is not None:
                    yield out
            pending.clear()
            last_good = (item, slot)
            out = emit(sample)
            if out is not None:
                yield out
            slot += 1
        if pending:
            item = self._backfill_item(last_good, pending[0])
            if item is None:
                raise RuntimeError(f"rank {self.ds.plan.rank} worker {self.worker}, epoch {self.ds.plan.epoch}: "
                                   f"no readable sample to fill bad slots {pending[0]}..{pending[-1]} (every "
                                   f"sample nearby is bad; see the warnings above and loader.stats())")
            for p in pending:
                out = emit(self._decode(item, p))
                if out is not None:
                    yield out
        assert not batch and slot == self.n_out, (len(batch), slot, self.n_out)


class PretrainLoader:
    """See the module docstring. Build it with ``build_pretrain_loader``."""

    def __init__(self, cfg: DataConfig, tokenizer, rank: int, world_size: int, seed: int):
        if not cfg.shards and not cfg.json_files:
            raise ValueError("data.shards and data.json_files are both empty: give the training data")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank={rank}, world_size={world_size}: need 0 <= rank < world_size")
        self.cfg, self.tokenizer, self.rank, self.world_size, self.seed = cfg, tokenizer, rank, world_size, seed
        self.num_workers = max(1, cfg.num_workers)
        self.transform = cfg.augment.transform(cfg.image_res, draft=cfg.draft)
        self._shards: Optional[List[Shard]] = None
        self._json: Optional[JsonCaptionDataset] = None
        self._cum_weights: Optional[List[float]] = None
        if cfg.shards:
            manifests = cfg.manifests or [""] * len(cfg.shards)
            per_dataset = [expand_dataset(spec, i, manifests[i]) for i, spec in enumerate(cfg.shards)]
            for i, shards in enumerate(per_dataset):
                if not shards:
                    raise ValueError(f"data.shards[{i}]={cfg.shards[i]!r} has no samples")
            self._shards = [s for shards in per_dataset for s in shards]
            self.num_samples = sum(s.num_samples for s in self._shards)
            # names and sizes, not paths: a resumed job may read the same shards from another mount or URL
            fingerprint_items = [f"{s.dataset}\t{shard_name(s.url)}\t{s.num_samples}" for s in self._shards]
            if cfg.resampled:
                sizes = [sum(s.num_samples for s in shards) for shards in per_dataset]
                weights = cfg.weights or sizes
                cum, acc = [], 0.0
                for s in self._shards:
                    acc += weights[s.dataset] / sum(weights) * s.num_samples / sizes[s.dataset]
                    cum.append(acc)
                self._cum_weights = cum
                epoch_samples = cfg.samples_per_epoch or self.num_samples
            else:
                needed = world_size * self.num_workers
                if len(self._shards) < needed:
                    raise ValueError(
                        f"{len(self._shards)} shard(s) for {world_size} rank(s) x {self.num_workers} worker(s) = "
                        f"{needed} readers: every reader needs a shard of its own in non-resampled mode; use more "
                        f"(smaller) shards, fewer data.num_workers, or data.resampled: true")
                epoch_samples = self.num_samples
        else:
            self._json = JsonCaptionDataset(cfg.json_files, self.transform, cfg.max_words, cfg.image_root, seed)
            self.num_samples = epoch_samples = len(self._json)
            fingerprint_items = [os.path.basename(path) for path in cfg.json_files] + [str(self.num_samples)]
        self.num_batches = epoch_samples // (world_size * cfg.batch_size)
        if self.num_batches == 0:
            raise ValueError(f"{epoch_samples} samples per epoch are fewer than one global batch "
                             f"(world_size {world_size} x data.batch_size {cfg.batch_size})")
        self.fingerprint = hashlib.sha1("\n".join([f"resampled={cfg.resampled}"] + fingerprint_items)
                                        .encode()).hexdigest()[:16]
        self._epoch = 0
        self._batch = 0
        self._stats_base: collections.Counter = collections.Counter()
        self._worker_stats: Dict[int, Dict[str, int]] = {}
        log.info("data: %d samples in %s; %d batches of %d per rank per epoch (%d ranks x %d workers)",
                 self.num_samples, f"{len(self._shards)} shards" if self._shards else f"{len(cfg.json_files)} JSON "
                 "file(s)", self.num_batches, cfg.batch_size, world_size, self.num_workers)

    def __len__(self) -> int:
        return self.num_batches

    @property
    def epoch(self) -> int:
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        if epoch != self._epoch:
            self._epoch = epoch
            self._batch = 0

    def _plan(self) -> _EpochPlan:
        shards = offsets = perm = None
        if self._shards is not None and self._cum_weights is None:
            order = list(range(len(self._shards)))
            random.Random(derive_seed(self.seed, self._epoch, "shards")).shuffle(order)
            shards = [self._shards[i] for i in order]
            offsets = np.cumsum([0] + [s.num_samples for s in shards[:-1]]).tolist()
        elif self._shards is not None:
            shards = self._shards
        else:
            perm = np.random.default_rng(derive_seed(self.seed, self._epoch, "json")).permutation(len(self._json))
        return _EpochPlan(self._epoch, self._batch, self.num_batches, self.rank, self.num_workers,
                          self.cfg.batch_size, self.seed, self.cfg.shuffle_buffer, shards, offsets,
                          self._cum_weights, self._json, perm)

    def __iter__(self) -> Iterator[Dict]:
        if self._batch >= self.num_batches:
            self._batch = 0
        self._fold_stats()
        dataset = _EpochDataset(self._plan(), self.transform, self.tokenizer, self.cfg.max_words,
                                self.cfg.max_text_len, self.cfg.log_bad_samples, self.cfg.max_bad_fraction)
        if self.cfg.num_workers == 0:
            batches = iter(dataset)
        else:
            batches = iterate_workers(DataLoader(dataset, batch_size=None, num_workers=self.cfg.num_workers,
                                                 prefetch_factor=self.cfg.prefetch_factor,
                                                 pin_memory=self.cfg.pin_memory and torch.cuda.is_available(),
                                                 worker_init_fn=ignore_stop_signals))
        try:
            for batch in batches:
                self._worker_stats[batch.pop("_worker")] = batch.pop("_stats")
                self._batch += 1
                yield batch
        finally:
            del batches  # shuts the worker processes down when the caller stops early

    def _fold_stats(self) -> None:
        for stats in self._worker_stats.values():
            self._stats_base.update(stats)
        self._worker_stats = {}

    def stats(self) -> Dict[str, int]:
        """Samples delivered and bad samples skipped (by reason) since the loader started, resumes included."""
        total = collections.Counter({"samples": 0, **{r: 0 for r in REASONS}})
        total.update(self._stats_base)
        for stats in self._worker_stats.values():
            total.update(stats)
        out = dict(total)
        out["skipped"] = sum(out[r] for r in REASONS)
        return out

    def _identity(self) -> Dict:
        return {"num_batches": self.num_batches, "batch_size": self.cfg.batch_size, "world_size": self.world_size,
                "num_workers": self.num_workers, "seed": self.seed, "resampled": self.cfg.resampled,
                "shuffle_buffer": self.cfg.shuffle_buffer, "fingerprint": self.fingerprint}

    def state_dict(self) -> Dict:
        stats = self.stats()
        stats.pop("skipped")
        return {"version": STATE_VERSION, "epoch": self._epoch, "batch": self._batch, "stats": stats,
                **self._identity()}

    def load_state_dict(self, state: Dict) -> None:
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state: expected a dict with version {STATE_VERSION}, got "
                             f"{state.get('version') if isinstance(state, dict) else type(state).__name__!r}")
        for key in ("epoch", "batch"):
            if not isinstance(state.get(key), int) or state[key] < 0:
                raise ValueError(f"loader state: {key}={state.get(key)!r} must be an integer >= 0")
        epoch, batch = state["epoch"], state["batch"]
        mine = self._identity()
        changed = {k: (state.get(k), v) for k, v in mine.items() if state.get(k) != v}
        if 0 < batch < state.get("num_batches", 0):
            if changed:
                raise ValueError(
                    "loader state is mid-epoch (epoch %d, batch %d) but %s changed; resume with the same data, "
                    "seed, world size, data.num_workers, data.batch_size and data.shuffle_buffer, or from an "
                    "epoch-boundary checkpoint" % (epoch, batch, ", ".join(
                        f"{k} {old!r} -> {new!r}" for k, (old, new) in changed.items())))
        else:
            if changed:
                log.info("loader state at an epoch boundary; changed since it was saved: %s", changed)
            if batch >= state.get("num_batches", 0):  # that epoch is complete
                epoch, batch = epoch + 1, 0
        self._epoch, self._batch = epoch, batch
        self._stats_base = collections.Counter(state.get("stats") or {})
        self._worker_stats = {}


def build_pretrain_loader(cfg: DataConfig, tokenizer, rank: int, world_size: int, seed: int) -> PretrainLoader:
    """The pretraining loader for this rank (see the module docstring)."""
    return PretrainLoader(cfg, tokenizer, rank, world_size, seed)
