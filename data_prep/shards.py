"""The shard writer of every data_prep step: shards written atomically, their stats, the manifest. The format
itself (file names, keys, manifest layout) is defined once, in ``albef.data.shards``, which the loaders read with.

Shards are written to ``NNNNNN.tar.tmp`` and renamed only when complete (after the stats file), so a killed run
never leaves a truncated tar under a final name and a rerun can trust every ``.tar`` it finds.
"""

from __future__ import annotations

import io
import json
import tarfile
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple, Union

from albef.data.shards import MANIFEST, build_manifest, sanitize_key, shard_file, split_member, stats_file
from albef.fsutil import atomic_write, durable_replace


def _add_member(tar: tarfile.TarFile, name: str, data: bytes, mtime: float) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = int(mtime)
    info.mode = 0o644
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


class ShardWriter:
    """Write one shard atomically. Use as a context manager; ``commit(stats)`` publishes it.

    Leaving the ``with`` block without ``commit`` (an exception) deletes the temporary file.
    """

    def __init__(self, out_dir: Union[str, Path], index: int):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.index = index
        self.path = self.out_dir / shard_file(index)
        self.tmp = self.out_dir / (shard_file(index) + ".tmp")
        self._tar = tarfile.open(self.tmp, "w")
        self._keys = set()
        self.num_samples = 0
        self._mtime = time.time()

    def write(self, key: str, image: bytes, caption: Union[str, List[str]], meta: Dict, ext: str = "jpg") -> str:
        key = sanitize_key(key)
        if key in self._keys:
            raise ValueError(f"duplicate key {key!r} in shard {self.path.name}")
        self._keys.add(key)
        text = caption if isinstance(caption, str) else "\n".join(caption)
        _add_member(self._tar, f"{key}.{ext}", image, self._mtime)
        _add_member(self._tar, f"{key}.txt", text.encode("utf-8"), self._mtime)
        _add_member(
            self._tar, f"{key}.json", json.dumps(meta, ensure_ascii=False, sort_keys=True).encode(), self._mtime
        )
        self.num_samples += 1
        return key

    def commit(self, stats: Optional[Dict] = None) -> Path:
        self._tar.close()
        return publish(self.out_dir, self.index, self.tmp, self.num_samples, stats)

    def abort(self) -> None:
        if not self._tar.closed:
            self._tar.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.tmp.exists():
            return
        if exc_type is not None or not self.path.exists():
            self.abort()


def publish(
    out_dir: Union[str, Path], index: int, tar_path: Union[str, Path], num_samples: int, stats: Optional[Dict] = None
) -> Path:
    """Publish a complete tar (on the same filesystem) as shard ``index``: the stats file first, then a rename."""
    out_dir = Path(out_dir)
    stats = dict(stats or {})
    stats.update(shard=shard_file(index), num_samples=num_samples)
    atomic_write_json(out_dir / stats_file(index), stats)
    path = out_dir / shard_file(index)
    durable_replace(tar_path, path)  # the shard appears under its final name only when complete, and stays so
    return path


def iter_tar_samples(path: Union[str, Path]) -> Iterator[Tuple[str, Dict[str, bytes]]]:
    """Yield ``(key, {extension: bytes})`` for each sample of a shard, in tar order."""
    with tarfile.open(path) as tar:
        key, members = None, {}
        for info in tar:
            member = split_member(info.name) if info.isreg() else None
            if member is None:  # as webdataset: not a regular file, no extension, a __meta__ file
                continue
            name, ext = member
            if name != key and members:
                yield key, members
                members = {}
            key = name
            members[ext] = tar.extractfile(info).read()
        if members:
            yield key, members


def atomic_write_json(path: Union[str, Path], obj) -> None:
    atomic_write(path, json.dumps(obj, indent=1, sort_keys=True))


def finished_shards(out_dir: Union[str, Path]) -> Dict[int, int]:
    """{shard index: num_samples} of the shards that were committed (tar + stats present)."""
    out = {}
    for stats in sorted(Path(out_dir).glob("[0-9]" * 6 + "_stats.json")):
        index = int(stats.name[:6])
        if (Path(out_dir) / shard_file(index)).is_file():
            out[index] = int(json.loads(stats.read_text())["num_samples"])
    return out


def write_manifest(out_dir: Union[str, Path], extra: Optional[Dict] = None) -> Dict:
    """(Re)build ``manifest.json`` from the committed shards; returns it."""
    shards = finished_shards(out_dir)
    manifest = build_manifest({shard_file(i): n for i, n in sorted(shards.items())}, extra)
    atomic_write_json(Path(out_dir) / MANIFEST, manifest)
    return manifest


def read_manifest(out_dir: Union[str, Path]) -> Dict:
    path = Path(out_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run data_prep (or data_prep.shards.write_manifest) first")
    return json.loads(path.read_text())


def merge_stats(out_dir: Union[str, Path]) -> Dict[str, int]:
    """Sum the integer counters of every shard's stats file (``status`` counts and the like)."""
    total: Dict[str, int] = {}

    def add(prefix: str, d: Dict) -> None:
        for k, v in d.items():
            name = f"{prefix}{k}"
            if isinstance(v, dict):
                add(name + ".", v)
            elif isinstance(v, int) and not isinstance(v, bool):
                total[name] = total.get(name, 0) + v

    for stats in sorted(Path(out_dir).glob("[0-9]" * 6 + "_stats.json")):
        add("", {k: v for k, v in json.loads(stats.read_text()).items() if k != "shard"})
    return total
