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
  would have delivered after batch k: no sample repeated or skipped. A state saved after the last batch of epoch e
  resumes at epoch e + 1.
* Resume on another setup (world size, workers, batch size or shuffle buffer changed mid-epoch): the epoch gets a
  new *phase*. ``epoch_remainder`` replays every old (rank, worker)'s buffer on indices to the saved batch and keeps
  what it had not emitted (the buffered samples, then the unread rest of its slice), in (rank, worker) order; that
  sequence of positions (``Positions``: runs, so it stays small) is cut over the new ranks and workers exactly like
  a phase-0 epoch, with seeds derived from (seed, epoch, phase). Every sample of the epoch is delivered once; only
  the new phase's last partial global batch is dropped (logged). The earlier phases are part of the state, so a
  second change (or an exact same-setup resume) within the phase works too. Data, seed and ``resampled`` must not
  change mid-epoch; at an epoch boundary anything may. Resampled epochs have no fixed sample set: the new phase
  draws the epoch's remaining sample count afresh.
* ``set_epoch(e)`` with a different epoch starts it at batch 0; with the restored state's epoch it keeps the
  restored position. Iterating a finished epoch again restarts it. Workers are started per epoch (their state is
  the epoch's plan), so ``persistent_workers`` is not used.
"""

from __future__ import annotations

import atexit
import bisect
import collections
import hashlib
import json
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
from albef.data.shards import Missing, Shard, expand_dataset, iter_shard, listed_name
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


def replay_buffer(events: Iterator[Tuple[int, int]], n_out: int, on_out=None) -> Tuple[set, int]:
    """Advance ``shuffle_events`` until ``n_out`` samples are emitted: (the raw indices still buffered, the next
    raw index to read). ``on_out(r)`` sees every emitted index."""
    in_buffer, next_raw, emitted = set(), 0, 0
    while emitted < n_out:
        op, r = next(events)
        if op == _ADD:
            in_buffer.add(r)
            next_raw = r + 1
        else:
            in_buffer.discard(r)
            emitted += 1
            if on_out is not None:
                on_out(r)
    return in_buffer, next_raw


class Positions:
    """A sequence of sample positions (into an epoch's permuted shard concatenation or JSON permutation), kept as
    runs ``(start, length)``. An epoch starts as one run; what is left of it after a change of world size is a run
    per reader plus the samples its shuffle buffer held, so the sequence stays small however large the epoch."""

    def __init__(self, starts, lengths):
        starts, lengths = np.asarray(starts, np.int64), np.asarray(lengths, np.int64)
        keep = lengths > 0
        self.starts, self.lengths = starts[keep], lengths[keep]
        self.cum = np.concatenate([[0], np.cumsum(self.lengths)]).astype(np.int64)

    @classmethod
    def range(cls, n: int) -> "Positions":
        return cls([0], [n])

    @classmethod
    def of(cls, positions: np.ndarray) -> "Positions":
        positions = np.asarray(positions, np.int64)
        if len(positions) == 0:
            return cls([], [])
        breaks = np.flatnonzero(np.diff(positions) != 1) + 1
        first = np.concatenate([[0], breaks])
        return cls(positions[first], np.diff(np.concatenate([first, [len(positions)]])))

    @classmethod
    def concat(cls, parts: Sequence["Positions"]) -> "Positions":
        if not parts:
            return cls([], [])
        return cls(np.concatenate([p.starts for p in parts]), np.concatenate([p.lengths for p in parts]))

    def __len__(self) -> int:
        return int(self.cum[-1])

    def slice(self, lo: int, n: int) -> "Positions":
        """Items [lo, lo + n)."""
        if n <= 0:
            return Positions([], [])
        i = int(np.searchsorted(self.cum, lo, "right")) - 1
        j = int(np.searchsorted(self.cum, lo + n, "left")) - 1
        starts, lengths = self.starts[i : j + 1].copy(), self.lengths[i : j + 1].copy()
        head = lo - int(self.cum[i])
        starts[0] += head
        lengths[0] -= head
        lengths[-1] -= int(self.cum[j + 1]) - (lo + n)
        return Positions(starts, lengths)

    def at(self, index: np.ndarray) -> np.ndarray:
        """The positions of items ``index``."""
        index = np.asarray(index, np.int64)
        run = np.searchsorted(self.cum, index, "right") - 1
        return self.starts[run] + index - self.cum[run]

    def iter_from(self, start: int) -> Iterator[int]:
        rest = self.slice(start, len(self) - start)
        for s, n in zip(rest.starts.tolist(), rest.lengths.tolist()):
            yield from range(s, s + n)


def resplit_summary(remaining: int, batches: int, global_batch: int) -> str:
    """The log's account of a mid-epoch re-split (both loaders): samples dealt, batches per rank, tail dropped."""
    dropped = remaining - batches * global_batch
    return (
        f"the {remaining} sample(s) of the epoch not yet delivered are re-split over them, {batches} batch(es) "
        f"per rank" + (f"; the last {dropped} (less than one global batch) are dropped" if dropped else "")
    )


def phase_key(seed: int, epoch: int, phase: int) -> Tuple:
    """The seed prefix of one phase of an epoch (phase 0 keeps the original (seed, epoch))."""
    return (seed, epoch) if phase == 0 else (seed, epoch, f"phase{phase}")


def epoch_remainder(positions: Positions, phase: Dict, key: Tuple, buffered: bool) -> Positions:
    """What a phase of an epoch left unread: for every (rank, worker) of that phase in order, the samples still in
    its shuffle buffer (in position order), then the ones it had not read yet. The phase's tail (the positions past
    its last whole global batch) was never going to be read in that epoch and is not part of the remainder."""
    R, W, B, done = phase["world_size"], phase["num_workers"], phase["batch_size"], phase["batches"]
    size = phase["shuffle_buffer"] if buffered else 0
    K = len(positions) // (R * B)
    counts = worker_batch_counts(K, W)
    parts = []
    for r in range(R):
        for w in range(W):
            n_out = counts[w] * B
            lo = (r * K + sum(counts[:w])) * B
            events = shuffle_events(n_out, size, random.Random(derive_seed(*key, r, w, "buffer")))
            in_buffer, next_raw = replay_buffer(events, len(range(w, done, W)) * B)
            mine = positions.slice(lo, n_out)
            parts.append(Positions.of(mine.at(np.array(sorted(in_buffer), np.int64))))
            parts.append(mine.slice(next_raw, n_out - next_raw))
    return Positions.concat(parts)


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
    """The raw samples at ``positions`` of the epoch's permuted shard concatenation (``offsets``: each shard's
    first position). Consecutive positions in one shard are read in one pass; a shard is re-opened only to go back."""

    def __init__(self, shards: Sequence[Shard], offsets: Sequence[int], positions: Positions):
        self.shards, self.offsets, self.positions = shards, offsets, positions
        self.num_raw = len(positions)

    def items(self, start: int) -> Iterator:
        reader, current, cursor = None, -1, 0
        try:
            for pos in self.positions.iter_from(start):
                i = bisect.bisect_right(self.offsets, pos) - 1
                offset = pos - self.offsets[i]
                if i != current or offset < cursor:
                    if reader is not None:
                        reader.close()
                    reader, current, cursor = iter_shard(self.shards[i], offset), i, offset
                while cursor < offset:  # skip samples of this shard that are not ours
                    next(reader)
                    cursor += 1
                yield next(reader)
                cursor += 1
        finally:
            if reader is not None:
                reader.close()


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
    """Entries ``perm[p]`` for the positions p of a slice of the epoch's permutation of the JSON entries."""

    def __init__(self, perm: np.ndarray, positions: Positions):
        self.perm, self.positions, self.num_raw = perm, positions, len(positions)

    def items(self, start: int) -> Iterator[int]:
        for p in self.positions.iter_from(start):
            yield int(self.perm[p])


@dataclass
class _EpochPlan:
    """Everything a worker needs for one epoch (built in the main process, inherited by the workers)."""

    epoch: int
    phase: int  # > 0 after a change of world size (or workers, batch size, buffer) in the middle of the epoch
    first_batch: int
    num_batches: int  # of this phase
    rank: int
    num_workers: int  # logical workers (>= 1)
    batch_size: int
    seed: int
    shuffle_buffer: int
    shards: Optional[List[Shard]]  # non-resampled: permuted; resampled: all
    offsets: Optional[List[int]]
    positions: Optional[Positions]  # what this phase reads (non-resampled and JSON)
    cum_weights: Optional[List[float]]
    json: Optional[JsonCaptionDataset]
    perm: Optional[np.ndarray]


class _EpochDataset(IterableDataset):
    """One epoch of one rank; each DataLoader worker runs one logical worker's stream."""

    def __init__(
        self,
        plan: _EpochPlan,
        transform: ImageTransform,
        tokenizer,
        max_words: int,
        max_text_len: int,
        log_limit: int,
        max_bad_fraction: float = 1.0,
    ):
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
        key = phase_key(plan.seed, plan.epoch, plan.phase)
        if plan.json is not None:
            source, buffer_size = _JsonSlice(plan.perm, plan.positions.slice(lo, n_out)), 0
        elif plan.cum_weights is not None:
            seed = derive_seed(*key, plan.rank, w, "draw")
            source, buffer_size = _ResampledShards(plan.shards, plan.cum_weights, seed), plan.shuffle_buffer
        else:
            source = _ShardSlice(plan.shards, plan.offsets, plan.positions.slice(lo, n_out))
            buffer_size = plan.shuffle_buffer
        yield from _WorkerStream(self, source, buffer_size, w, n_out, done * plan.batch_size, key).batches()


class _WorkerStream:
    """One logical worker's epoch: shuffle buffer -> decode (with bad-sample fill) -> batches."""

    def __init__(
        self, ds: _EpochDataset, source, buffer_size: int, worker: int, n_out: int, first_slot: int, key: Tuple
    ):
        plan = ds.plan
        self.ds, self.source, self.worker, self.n_out, self.first_slot = ds, source, worker, n_out, first_slot
        self.slot_seed = (*key, plan.rank, worker)
        self.events = shuffle_events(
            source.num_raw, buffer_size, random.Random(derive_seed(*key, plan.rank, worker, "buffer"))
        )
        self.stats = collections.Counter({"samples": 0})
        self.logged = 0
        self.history: collections.deque = collections.deque(maxlen=_BACKFILL_WINDOW)

    # -- raw samples -------------------------------------------------------------------------------------------
    def _fast_forward(self) -> Tuple[Dict[int, object], Iterator]:
        """Replay the buffer to output ``first_slot``; re-read only the samples still buffered there."""
        in_buffer, next_raw = replay_buffer(self.events, self.first_slot, self.history.append)
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
                "deleted or unreadable?). Repair or re-prepare it, or raise data.max_bad_fraction."
            )
        if isinstance(item, Missing):  # the shard reader already logged the whole shard's loss once
            log.debug("skipping lost sample key=%s shard=%s: %s", key, shard, error.reason)
            return
        self.logged += 1
        if self.logged == self.ds.log_limit + 1:
            log.warning(
                "rank %d worker %d: further bad samples this epoch are logged at DEBUG (all are counted "
                "in loader.stats())",
                self.ds.plan.rank,
                self.worker,
            )
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
                raise RuntimeError(
                    f"rank {self.ds.plan.rank} worker {self.worker}, epoch {self.ds.plan.epoch}: "
                    f"no readable sample to fill bad slots {pending[0]}..{pending[-1]} (every "
                    f"sample nearby is bad; see the warnings above and loader.stats())"
                )
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
            fingerprint_items = [f"{s.dataset}\t{listed_name(s.url)}\t{s.num_samples}" for s in self._shards]
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
                        f"(smaller) shards, fewer data.num_workers, or data.resampled: true"
                    )
                epoch_samples = self.num_samples
        else:
            self._json = JsonCaptionDataset(cfg.json_files, self.transform, cfg.max_words, cfg.image_root, seed)
            self.num_samples = epoch_samples = len(self._json)
            fingerprint_items = [os.path.basename(path) for path in cfg.json_files] + [str(self.num_samples)]
        self.epoch_samples = epoch_samples
        self.num_batches = epoch_samples // (world_size * cfg.batch_size)
        if self.num_batches == 0:
            raise ValueError(
                f"{epoch_samples} samples per epoch are fewer than one global batch "
                f"(world_size {world_size} x data.batch_size {cfg.batch_size})"
            )
        self.fingerprint = hashlib.sha1(
            "\n".join([f"resampled={cfg.resampled}"] + fingerprint_items).encode()
        ).hexdigest()[:16]
        self._epoch = 0
        self._batch = 0
        self._phases: List[Dict] = []  # earlier phases of this epoch (see load_state_dict)
        self._phase_cache: Optional[Tuple] = None
        self._stats_base: collections.Counter = collections.Counter()
        self._worker_stats: Dict[int, Dict[str, int]] = {}
        log.info(
            "data: %d samples in %s; %d batches of %d per rank per epoch (%d ranks x %d workers)",
            self.num_samples,
            f"{len(self._shards)} shards" if self._shards else f"{len(cfg.json_files)} JSON file(s)",
            self.num_batches,
            cfg.batch_size,
            world_size,
            self.num_workers,
        )

    def __len__(self) -> int:
        """Batches per rank of a whole epoch (the one after a mid-epoch re-split may have fewer:
        ``batches_this_epoch``)."""
        return self.num_batches

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def batches_this_epoch(self) -> int:
        return self._phase()[2]

    def set_epoch(self, epoch: int) -> None:
        if epoch != self._epoch:
            self._epoch = epoch
            self._batch = 0
            self._phases = []

    def _geometry(self) -> Dict:
        return {
            "world_size": self.world_size,
            "num_workers": self.num_workers,
            "batch_size": self.cfg.batch_size,
            "shuffle_buffer": self.cfg.shuffle_buffer,
        }

    def _phase(self) -> Tuple[Optional[Positions], int, int]:
        """This phase's positions (None in resampled mode), their number, and batches per rank, after the earlier
        phases of the epoch."""
        cache_key = (self._epoch, json.dumps(self._phases))
        if self._phase_cache is None or self._phase_cache[0] != cache_key:
            resampled = self._cum_weights is not None
            positions = None if resampled else Positions.range(self.epoch_samples)
            count = self.epoch_samples
            for i, phase in enumerate(self._phases):
                per_global = phase["world_size"] * phase["batch_size"]
                if positions is not None:
                    positions = epoch_remainder(
                        positions, phase, phase_key(self.seed, self._epoch, i), buffered=self._json is None
                    )
                    count = len(positions)
                else:
                    count = (count // per_global - phase["batches"]) * per_global
            self._phase_cache = (cache_key, positions, count, count // (self.world_size * self.cfg.batch_size))
        return self._phase_cache[1:]

    def _plan(self) -> _EpochPlan:
        shards = offsets = perm = None
        positions, _, num_batches = self._phase()
        if self._shards is not None and self._cum_weights is None:
            order = list(range(len(self._shards)))
            random.Random(derive_seed(self.seed, self._epoch, "shards")).shuffle(order)
            shards = [self._shards[i] for i in order]
            offsets = np.cumsum([0] + [s.num_samples for s in shards[:-1]]).tolist()
        elif self._shards is not None:
            shards = self._shards
        else:
            perm = np.random.default_rng(derive_seed(self.seed, self._epoch, "json")).permutation(len(self._json))
        return _EpochPlan(
            self._epoch,
            len(self._phases),
            self._batch,
            num_batches,
            self.rank,
            self.num_workers,
            self.cfg.batch_size,
            self.seed,
            self.cfg.shuffle_buffer,
            shards,
            offsets,
            positions,
            self._cum_weights,
            self._json,
            perm,
        )

    def __iter__(self) -> Iterator[Dict]:
        if self._batch >= self.batches_this_epoch:
            self._batch = 0
            self._phases = []
        self._fold_stats()
        dataset = _EpochDataset(
            self._plan(),
            self.transform,
            self.tokenizer,
            self.cfg.max_words,
            self.cfg.max_text_len,
            self.cfg.log_bad_samples,
            self.cfg.max_bad_fraction,
        )
        if self.cfg.num_workers == 0:
            batches = iter(dataset)
        else:
            batches = iterate_workers(
                DataLoader(
                    dataset,
                    batch_size=None,
                    num_workers=self.cfg.num_workers,
                    prefetch_factor=self.cfg.prefetch_factor,
                    pin_memory=self.cfg.pin_memory and torch.cuda.is_available(),
                    worker_init_fn=ignore_stop_signals,
                )
            )
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
        """What a mid-epoch position depends on and may never change within an epoch."""
        return {"seed": self.seed, "resampled": self.cfg.resampled, "fingerprint": self.fingerprint}

    def state_dict(self) -> Dict:
        stats = self.stats()
        stats.pop("skipped")
        return {
            "version": STATE_VERSION,
            "epoch": self._epoch,
            "batch": self._batch,
            "num_batches": self.batches_this_epoch,
            "phases": [dict(p) for p in self._phases],
            "stats": stats,
            **self._geometry(),
            **self._identity(),
        }

    def load_state_dict(self, state: Dict) -> None:
        """Continue where ``state`` (any rank's ``state_dict()``) left off. Mid-epoch, the same setup continues
        exactly; a changed world size, ``data.num_workers``, ``data.batch_size`` or ``data.shuffle_buffer`` starts a
        new *phase* of the epoch: the samples no rank has delivered yet (``epoch_remainder``, computed from the
        saved position alone) are dealt over this run's ranks and workers, so every sample of the epoch is still
        delivered once; only the new phase's last partial global batch is dropped (fewer than ranks x batch size
        samples, as at the end of any epoch). The data, seed and mode must not change mid-epoch."""
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise ValueError(
                f"loader state: expected a dict with version {STATE_VERSION}, got "
                f"{state.get('version') if isinstance(state, dict) else type(state).__name__!r}"
            )
        for key in ("epoch", "batch", "num_batches"):
            if not isinstance(state.get(key), int) or state[key] < 0:
                raise ValueError(f"loader state: {key}={state.get(key)!r} must be an integer >= 0")
        epoch, batch, phases = state["epoch"], state["batch"], [dict(p) for p in state.get("phases") or []]
        saved = {k: state.get(k) for k in self._geometry()}
        self._stats_base = collections.Counter(state.get("stats") or {})
        self._worker_stats = {}
        mid_epoch = batch < state["num_batches"] and (batch > 0 or phases)
        if not mid_epoch:
            changed = {
                k: (state.get(k), v) for k, v in {**self._geometry(), **self._identity()}.items() if state.get(k) != v
            }
            if changed:
                log.info("loader state at an epoch boundary; changed since it was saved: %s", changed)
            if batch >= state["num_batches"]:  # that epoch is complete
                epoch, batch = epoch + 1, 0
            self._epoch, self._batch, self._phases = epoch, batch, []
            return
        changed = {k: (state.get(k), v) for k, v in self._identity().items() if state.get(k) != v}
        if changed:
            raise ValueError(
                "loader state is mid-epoch (epoch %d, batch %d) but %s changed; resume with the same data, seed and "
                "data.resampled, or from an epoch-boundary checkpoint"
                % (epoch, batch, ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changed.items()))
            )
        self._epoch, self._batch, self._phases = epoch, batch, phases
        if saved == self._geometry():
            if self.batches_this_epoch != state["num_batches"]:
                raise ValueError(
                    f"loader state: num_batches={state['num_batches']} but this loader computes "
                    f"{self.batches_this_epoch} for epoch {epoch} phase {len(phases)} (corrupt state?)"
                )
            return
        if batch > 0:  # else that phase delivered nothing: it is simply replaced
            self._phases.append({**saved, "batches": batch})
        self._batch = 0
        remaining, left = self._phase()[1:]
        log.warning(
            "data: resuming in the middle of epoch %d (batch %d of %d per rank with %s) on %d rank(s) x %d "
            "worker(s), batch size %d: %s",
            epoch,
            batch,
            state["num_batches"],
            ", ".join(f"{k} {v}" for k, v in saved.items()),
            self.world_size,
            self.num_workers,
            self.cfg.batch_size,
            resplit_summary(remaining, left, self.world_size * self.cfg.batch_size),
        )
        if left == 0:
            self._epoch, self._phases = epoch + 1, []


def build_pretrain_loader(cfg: DataConfig, tokenizer, rank: int, world_size: int, seed: int) -> PretrainLoader:
    """The pretraining loader for this rank (see the module docstring)."""
    if cfg.batch_size < 1:
        raise ValueError(
            f"data.batch_size={cfg.batch_size}: the loader needs a per-rank batch >= 1 (a run sets it "
            "from train.micro_batch_size)"
        )
    return PretrainLoader(cfg, tokenizer, rank, world_size, seed)
