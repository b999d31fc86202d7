"""Durable file writes: a file that appears under its final name (a checkpoint's COMPLETE marker, a shard, a
manifest) survives a node crash whole. ``os.replace`` alone orders nothing on disk: the data and the rename must be
flushed (``fsync`` of the file, then of its directory) before anything points at them."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

PathLike = Union[str, Path]


def fsync_path(path: PathLike) -> None:
    """Flush a file's data, or a directory's entries (renames, new files), to disk."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if os.path.isdir(path) else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def durable_replace(src: PathLike, dst: PathLike) -> None:
    """``os.replace(src, dst)`` with ``src``'s data flushed first and the rename flushed after."""
    fsync_path(src)
    os.replace(src, dst)
    fsync_path(Path(dst).parent)


def atomic_write(path: PathLike, data: Union[str, bytes]) -> None:
    """Write ``path`` whole or not at all, durably (temporary file, fsync, rename, fsync of the directory)."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)
