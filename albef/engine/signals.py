"""Stop requests: SIGUSR1 (SLURM's warning before the time limit, ``--signal=B:USR1@N``) and SIGTERM (scancel,
requeue, preemption) set a flag; the trainer checkpoints at the next step boundary and exits with 75.

``install()`` runs first thing in every entrypoint, so that a signal arriving during the slow start-up (imports,
DeepSpeed initialisation) is remembered instead of killing the process.
"""
from __future__ import annotations

import logging
import signal
from typing import Optional

log = logging.getLogger(__name__)
_received: Optional[int] = None


def _handler(signum, frame) -> None:
    global _received
    _received = signum
    log.warning("received signal %d: will checkpoint at the next step boundary and stop", signum)


def install() -> None:
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, _handler)


def received() -> Optional[int]:
    return _received
