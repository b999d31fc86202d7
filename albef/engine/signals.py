"""Stop requests: SIGUSR1 (SLURM's warning before the time limit, ``--signal=B:USR1@N``) and SIGTERM (scancel,
requeue, preemption) set a flag; the trainer checkpoints at the next step boundary and exits with 75.

Evaluation loops (which can outlast SLURM's warning) iterate through ``until_stop``: on a stop request each rank
leaves its loop at its next batch, then every rank meets in one all-reduce at the loop's end (a rank that finished
its batches meets there too), and all raise ``StopRequested`` together, before any collective of the evaluation
itself; the trainer then checkpoints and exits with 75. No collective may run inside such a loop.

``install()`` runs first thing in every entrypoint, so that a signal arriving during the slow start-up (imports,
DeepSpeed initialisation) is remembered instead of killing the process.
"""

from __future__ import annotations

import logging
import signal
from typing import Iterable, Iterator, Optional, TypeVar

T = TypeVar("T")

log = logging.getLogger(__name__)
_received: Optional[int] = None


class StopRequested(Exception):
    """A stop signal was received: checkpoint what must be kept and exit with 75 (requeue)."""


def _handler(signum, frame) -> None:
    global _received
    _received = signum
    log.warning("received signal %d: will checkpoint at the next step boundary and stop", signum)


def install() -> None:
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, _handler)


def received() -> Optional[int]:
    return _received


def until_stop(items: Iterable[T]) -> Iterator[T]:
    """``items`` until this rank received a stop request; then, whether stopped or exhausted, one all-reduce over the
    ranks decides, and ``StopRequested`` is raised on every rank if any of them was asked to stop."""
    from albef.engine import dist

    for item in items:
        if _received is not None:
            break
        yield item
    if dist.any_over_ranks(_received is not None)[0]:
        raise StopRequested()
