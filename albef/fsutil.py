"""File helpers. Durable writes: a file that appears under its final name (a checkpoint's COMPLETE marker, a shard,
a manifest) survives a node crash whole. ``os.replace`` alone orders nothing on disk: the data and the rename must be
flushed (``fsync`` of the file, then of its directory) before anything points at them. ``read_json``: one JSON
reader whose errors name the file and what it is for (torch-free, like the rest of this module)."""

from __future__ import annotations

import json
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


def read_json(path: str, what: str):
    """A JSON file; an unreadable or malformed one is a ValueError naming ``what`` and ``path``."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {what} {path}: {e}") from None
