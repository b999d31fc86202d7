"""A resumable loader for the fine-tuning tasks' map-style datasets (official JSON annotation files).

    loader = MapLoader(dataset, collate_fn, batch_size=32, rank=r, world_size=w, seed=42, num_workers=4)
    loader.set_epoch(e); len(loader); for batch in loader: ...; loader.state_dict() / load_state_dict()

Semantics (the same contract as ``PretrainLoader``, which the engine relies on):

* Epoch ``e`` is a permutation of the dataset drawn from ``(seed, e)``; rank ``r`` takes every ``world``-th index
  starting at ``r`` and keeps ``len(dataset) // world`` of them, so every rank yields the same number of batches
  (``len(loader)``; the last incomplete batch is dropped, like ``DistributedSampler`` + ``drop_last``).
* Sample ``i`` of epoch ``e`` draws its augmentation from ``(seed, e, i)``, whatever worker loads it, so a run
  resumed from ``state_dict()`` (epoch and batches already yielded) yields exactly the batches an uninterrupted run
  would have yielded next.
* Resume on another world size or batch size (a new *phase* of the epoch): the indices no rank has delivered yet
  (each old rank's list after its ``position`` batches, in rank order) are dealt over the new ranks in the same
  strided way; only the new phase's last partial global batch is dropped.
* A sample whose file is missing or undecodable (``BadSample``) is replaced by the next index of the dataset that
  loads, and counted by reason in ``stats()``; the batch keeps its size, so ranks stay in step (the queue's
  all-gather needs equal batch sizes).

A dataset implements ``__len__`` and ``load(index, rng) -> dict``; ``collate_fn(list_of_dicts) -> batch``.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from typing import Callable, Dict, Iterator, List

import numpy as np
from torch.utils.data import DataLoader, Dataset

from albef.data.loader import ignore_stop_signals, iterate_workers, resplit_summary
from albef.data.samples import BadSample, derive_seed

MAX_REPLACEMENTS = 16
log = logging.getLogger(__name__)


class _EpochView(Dataset):
    def __init__(self, dataset, seed: int, epoch: int):
        self.dataset, self.seed, self.epoch = dataset, seed, epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Dict:
        bad: List[str] = []
        for k in range(MAX_REPLACEMENTS):
            j = (index + k) % len(self.dataset)
            try:
                sample = self.dataset.load(j, random.Random(derive_seed(self.seed, self.epoch, j)))
            except BadSample as e:
                bad.append(e.reason)
                continue
            sample["_bad"] = bad
            return sample
        raise RuntimeError(f"{MAX_REPLACEMENTS} consecutive unusable samples from index {index}: {bad}")


class MapLoader:
    def __init__(
        self,
        dataset,
        collate_fn: Callable,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        num_workers: int = 0,
        shuffle: bool = True,
    ):
        if len(dataset) // world_size < batch_size:
            raise ValueError(
                f"{type(dataset).__name__} has {len(dataset)} samples: fewer than one batch of {batch_size} per rank "
                f"over {world_size} ranks"
            )
        self.dataset, self.collate_fn = dataset, collate_fn
        self.batch_size, self.rank, self.world, self.seed = batch_size, rank, world_size, seed
        self.num_workers, self.shuffle = num_workers, shuffle
        self.epoch, self.position = 0, 0
        self.phases: List[Dict] = []  # earlier phases of this epoch: {"world_size", "batch_size", "batches"}
        self._stats: Counter = Counter()

    def __len__(self) -> int:
        """Batches per rank of a whole epoch (after a mid-epoch re-split: ``batches_this_epoch``)."""
        return (len(self.dataset) // self.world) // self.batch_size

    @property
    def batches_this_epoch(self) -> int:
        return (len(self._phase_indices()) // self.world) // self.batch_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.position, self.phases = epoch, 0, []

    @staticmethod
    def _split(indices: np.ndarray, world: int, batch: int) -> List[np.ndarray]:
        per_rank = (len(indices) // world) // batch * batch
        return [indices[r::world][:per_rank] for r in range(world)]

    def _phase_indices(self) -> np.ndarray:
        n = len(self.dataset)
        order = (
            np.random.default_rng(derive_seed(self.seed, self.epoch)).permutation(n) if self.shuffle else np.arange(n)
        )
        for phase in self.phases:
            parts = self._split(order, phase["world_size"], phase["batch_size"])
            order = np.concatenate([p[phase["batches"] * phase["batch_size"] :] for p in parts])
        return order

    def _indices(self) -> np.ndarray:
        return self._split(self._phase_indices(), self.world, self.batch_size)[self.rank]

    def _collate(self, samples: List[Dict]) -> Dict:
        bad = [r for s in samples for r in s.pop("_bad")]
        batch = self.collate_fn(samples)
        batch["_bad"] = bad
        return batch

    def __iter__(self) -> Iterator[Dict]:
        idx = self._indices()
        batches = [
            idx[b * self.batch_size : (b + 1) * self.batch_size].tolist()
            for b in range(self.position, len(idx) // self.batch_size)
        ]
        loader = DataLoader(
            _EpochView(self.dataset, self.seed, self.epoch),
            batch_sampler=batches,
            collate_fn=self._collate,
            num_workers=self.num_workers,
            worker_init_fn=ignore_stop_signals if self.num_workers else None,
        )
        for batch in iterate_workers(loader):
            self._stats.update(batch.pop("_bad"))
            self.position += 1
            yield batch

    def state_dict(self) -> Dict:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "num_samples": len(self.dataset),
            "world_size": self.world,
            "batch_size": self.batch_size,
            "num_batches": self.batches_this_epoch,
            "phases": [dict(p) for p in self.phases],
            "stats": dict(self._stats),
        }

    def load_state_dict(self, state: Dict) -> None:
        """Continue where ``state`` (any rank's) left off; another world size or batch size mid-epoch re-splits
        the rest of the epoch (see the module docstring). The dataset must be the same."""
        if state["num_samples"] != len(self.dataset):
            raise ValueError(
                f"loader state was saved with num_samples={state['num_samples']}, this run has "
                f"{len(self.dataset)}: another dataset, so the position in the epoch is meaningless"
            )
        self.epoch, self.position = state["epoch"], state["position"]
        self.phases = [dict(p) for p in state.get("phases") or []]
        self._stats = Counter(state.get("stats") or {})
        saved = {"world_size": state["world_size"], "batch_size": state["batch_size"]}
        total = state.get("num_batches", (state["num_samples"] // saved["world_size"]) // saved["batch_size"])
        if self.position >= total:  # that epoch is complete
            self.epoch, self.position, self.phases = self.epoch + 1, 0, []
            return
        if saved == {"world_size": self.world, "batch_size": self.batch_size} or (
            self.position == 0 and not self.phases
        ):
            return
        if self.position:
            self.phases.append({**saved, "batches": self.position})
        self.position = 0
        remaining, left = len(self._phase_indices()), self.batches_this_epoch
        log.warning(
            "data: resuming in the middle of epoch %d (batch %d of %d per rank with world_size %d, "
            "batch_size %d) on %d rank(s), batch size %d: %s",
            self.epoch,
            state["position"],
            total,
            saved["world_size"],
            saved["batch_size"],
            self.world,
            self.batch_size,
            resplit_summary(remaining, left, self.world * self.batch_size),
        )
        if left == 0:
            self.epoch, self.phases = self.epoch + 1, []

    def stats(self) -> Dict[str, int]:
        return dict(self._stats)
