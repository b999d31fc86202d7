"""The shard format (one definition: data_prep writes it, the loaders read it), dataset specs -> shards with exact
sizes, and reading samples from a shard. Torch-free: data_prep imports it without torch.

The format. A dataset directory holds:

* ``NNNNNN.tar`` (6-digit shard index, ``shard_file``): webdataset tar shards. Each sample is three members with the
  same key: ``<key>.jpg`` (JPEG bytes), ``<key>.txt`` (UTF-8 caption; several captions of one image are stored one
  per line), ``<key>.json`` (metadata: source url/path, caption(s), original and stored sizes, sha256, ...). Keys
  are ``sanitize_key``'d; a member's key and extension follow ``split_member`` (webdataset's rule).
* ``NNNNNN_stats.json`` (``stats_file``): per-shard counts (samples written, and failures by status / message).
* ``manifest.json`` (``MANIFEST``): ``{"format": 1, "num_samples": total, "shards": [{"name": "000000.tar",
  "num_samples": n}, ...]}`` (``build_manifest`` / ``parse_manifest``): exact epoch lengths without opening a tar.

A dataset spec (one ``data.shards`` entry) is one of

* a local directory holding ``manifest.json`` (written by ``data_prep.shards.write_manifest``) and its shards;
* a brace pattern of local tar files, ``/data/cc3m/{000000..000331}.tar``;
* a brace pattern of http(s) URLs, ``https://host/cc3m/{000000..000331}.tar``;
* a ``pipe:`` command whose stdout is a tar, ``pipe:aws s3 cp s3://bucket/cc3m/{000000..000331}.tar -``.

Sizes come from a manifest: the one named in ``data.manifests`` for this dataset, else ``manifest.json`` beside
the shards (local directory or URL directory). A shard is matched to its manifest entry by file name (for
``pipe:`` by the last ``*.tar`` token of the command). Without a manifest every shard is counted once at startup,
which reads each shard (a warning says so).

Reading (``iter_shard``) yields exactly the manifest's number of samples for a shard, so sample positions are
stable: a sample with missing parts is yielded as is (the decode step rejects it), and positions lost to a
truncated, unreadable or short shard are yielded as ``Missing`` placeholders. Samples beyond the manifest count
are ignored. The tar stream is expanded and grouped into samples by webdataset (``tar_file_iterator``,
``group_by_keys``): a sample is the run of consecutive regular members sharing a key, the member name up to the
first dot of its file name; members without an extension and ``__meta__`` files are skipped. What stays ours: the
exact positions above (resume, damaged shards), and opening the stream (``_Stream``: local files, http(s) through
urllib with retries, ``pipe:`` commands whose exit status is checked), where webdataset's ``gopen`` would run curl
for http. webdataset imports torch, so it is imported when a shard is read, and data_prep (which imports this
module for the format) stays torch-free.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Tuple, Union

from braceexpand import braceexpand

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = 1
_SAFE_KEY = re.compile(r"[^A-Za-z0-9_-]")
_TAR_NAME = re.compile(r"[^/\s'\"]+\.tar\b")
_HTTP_RETRIES = 3
_WDS_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset.tariterators.base_plus_ext
_WDS_META = re.compile(r"__[^/]*__($|/)")  # webdataset.tariterators.tar_file_iterator's skip_meta


@dataclass(frozen=True)
class Shard:
    url: str
    num_samples: int
    dataset: int  # index of the data.shards entry it came from


@dataclass
class RawSample:
    """The members of one tar sample: ``{extension: bytes}``."""

    key: str
    shard: str
    members: Dict[str, bytes]


@dataclass
class Missing:
    """A sample position the shard did not deliver (truncated or unreadable shard)."""

    key: str
    shard: str
    reason: str
    detail: str


def shard_file(index: int) -> str:
    """Shard ``index``'s file name in a dataset directory."""
    return f"{index:06d}.tar"


def stats_file(index: int) -> str:
    return f"{index:06d}_stats.json"


def sanitize_key(key: str) -> str:
    """A sample key as the writer stores it: no '/', '.', or anything a tar/webdataset reader could misread."""
    key = _SAFE_KEY.sub("_", key)
    if not key or key.startswith("-"):
        key = "k" + key
    return key


def build_manifest(sizes: Dict[str, int], extra: Optional[Dict] = None) -> Dict:
    """The manifest of shards ``{file name: num_samples}`` (in shard order), with ``extra`` top-level fields."""
    manifest = {
        "format": FORMAT,
        "num_samples": sum(sizes.values()),
        "shards": [{"name": name, "num_samples": n} for name, n in sizes.items()],
    }
    manifest.update(extra or {})
    return manifest


def _is_url(spec: str) -> bool:
    return spec.startswith(("http://", "https://"))


def listed_name(url: str) -> str:
    """The file name a manifest lists this shard under."""
    if url.startswith("pipe:"):
        names = _TAR_NAME.findall(url)
        if not names:
            raise ValueError(f"cannot find a '*.tar' file name in the pipe command {url!r} to match it to a manifest")
        return names[-1]
    if _is_url(url):
        return os.path.basename(urllib.parse.urlparse(url).path)
    return os.path.basename(url)


def _read_bytes(location: str) -> bytes:
    if _is_url(location):
        with _urlopen(location) as f:
            return f.read()
    with open(location, "rb") as f:
        return f.read()


def parse_manifest(raw: bytes, location: str) -> Dict[str, int]:
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except ValueError as e:
        raise ValueError(f"manifest {location} is not valid UTF-8 JSON: {e}") from None
    if (
        not isinstance(manifest, dict)
        or manifest.get("format") != FORMAT
        or not isinstance(manifest.get("shards"), list)
    ):
        raise ValueError(f"manifest {location}: expected {{'format': 1, 'shards': [...]}} (see albef.data.shards)")
    sizes = {}
    for i, entry in enumerate(manifest["shards"]):
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("name"), str)
            or not isinstance(entry.get("num_samples"), int)
            or entry["num_samples"] < 0
        ):
            raise ValueError(f"manifest {location}: shards[{i}]={entry!r} needs a 'name' and 'num_samples' >= 0")
        sizes[entry["name"]] = entry["num_samples"]
    return sizes


def load_manifest(location: str) -> Dict[str, int]:
    """``{shard file name: num_samples}`` from a manifest path or URL; malformed files are errors naming them."""
    try:
        raw = _read_bytes(location)
    except (OSError, urllib.error.URLError) as e:
        raise ValueError(f"cannot read manifest {location}: {e}") from None
    return parse_manifest(raw, location)


def _manifest_beside(url: str) -> Optional[str]:
    """``manifest.json`` in the shard's directory, if it can exist there (never for pipe: commands)."""
    if url.startswith("pipe:"):
        return None
    if _is_url(url):
        return urllib.parse.urljoin(url, MANIFEST)
    return os.path.join(os.path.dirname(url), MANIFEST)


def _try_manifest(location: str) -> Optional[Dict[str, int]]:
    """The manifest at ``location``, or None where there is none (no such file, HTTP 404)."""
    if not _is_url(location):
        return load_manifest(location) if os.path.isfile(location) else None
    try:
        raw = _read_bytes(location)
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return None
        raise ValueError(f"cannot read manifest {location}: {e}") from None
    except (OSError, urllib.error.URLError) as e:
        raise ValueError(f"cannot read manifest {location}: {e}") from None
    return parse_manifest(raw, location)


def expand_dataset(spec: str, index: int, manifest: str = "") -> List[Shard]:
    """All shards of one dataset spec, with their sample counts (see the module docstring)."""
    if not _is_url(spec) and not spec.startswith("pipe:") and os.path.isdir(spec):
        location = manifest or os.path.join(spec, MANIFEST)
        if not _is_url(location) and not os.path.isfile(location):
            raise FileNotFoundError(
                f"data.shards[{index}]={spec!r} is a directory without {MANIFEST}: run data_prep "
                f"(or data_prep.shards.write_manifest) or give a brace pattern of tar files"
            )
        sizes = load_manifest(location)
        return [Shard(os.path.join(spec, name), n, index) for name, n in sizes.items() if n > 0]
    urls = list(braceexpand(spec))
    if not _is_url(spec) and not spec.startswith("pipe:"):
        missing = [u for u in urls if not os.path.isfile(u)]
        if missing:
            raise FileNotFoundError(
                f"data.shards[{index}]={spec!r}: {len(missing)} of {len(urls)} shards do not exist, e.g. {missing[0]}"
            )
    found: Dict[str, Optional[Dict[str, int]]] = {}
    counts: List[Optional[int]] = []
    for url in urls:
        location = manifest or _manifest_beside(url)
        if location is not None and location not in found:
            found[location] = load_manifest(location) if manifest else _try_manifest(location)
        sizes = found.get(location) if location is not None else None
        name = listed_name(url)
        if sizes is None:
            counts.append(None)
        elif name in sizes:
            counts.append(sizes[name])
        else:
            raise ValueError(
                f"data.shards[{index}]: shard {url} is not listed in its manifest {location}; rebuild the manifest"
            )
    uncounted = [i for i, n in enumerate(counts) if n is None]
    if uncounted:
        log.warning(
            "data.shards[%d]=%r: no manifest for %d shard(s); counting their samples by reading them "
            "(write a %s with data_prep.shards.write_manifest, or set data.manifests, to skip this)",
            index,
            spec,
            len(uncounted),
            MANIFEST,
        )
        t0 = time.time()
        for i in uncounted:
            counts[i] = count_samples(urls[i])
        log.info("counted %d shard(s) in %.1fs", len(uncounted), time.time() - t0)
    return [Shard(url, n, index) for url, n in zip(urls, counts) if n]


def _urlopen(url: str):
    for attempt in range(_HTTP_RETRIES):
        try:
            return urllib.request.urlopen(url, timeout=60)
        except urllib.error.HTTPError:
            raise
        except (urllib.error.URLError, OSError) as e:
            if attempt == _HTTP_RETRIES - 1:
                raise
            log.warning("opening %s failed (%s); retrying", url, e)
            time.sleep(2**attempt)
    raise AssertionError("unreachable")


class _Stream:
    """A readable byte stream for a shard URL; ``close()`` also reaps a ``pipe:`` command. Its ``str`` is the URL
    (webdataset appends the stream to the messages of the errors it re-raises)."""

    def __init__(self, url: str):
        self.url = url
        self.proc: Optional[subprocess.Popen] = None
        if url.startswith("pipe:"):
            self.proc = subprocess.Popen(url[len("pipe:") :], shell=True, stdout=subprocess.PIPE, bufsize=1 << 20)
            self.file = self.proc.stdout
        elif _is_url(url):
            self.file = _urlopen(url)
        else:
            self.file = open(url, "rb", buffering=1 << 20)

    def read(self, n: int = -1) -> bytes:
        return self.file.read(n)

    def __str__(self) -> str:
        return self.url

    def close(self, finished: bool) -> Optional[str]:
        """Close; for a pipe that ran to the end, return an error text if the command failed."""
        self.file.close()
        if self.proc is None:
            return None
        if not finished:
            self.proc.kill()
        rc = self.proc.wait()
        if finished and rc != 0:
            return f"command exited with status {rc}"
        return None


def split_member(name: str) -> Optional[Tuple[str, str]]:
    """A regular tar member's (sample key, lower-cased extension) as webdataset groups it (``base_plus_ext``, and
    ``tar_file_iterator``'s skipping), without importing it: the key is the member path up to the first dot of its
    file name; None for a member webdataset skips (no extension, a ``__meta__`` file)."""
    if _WDS_META.match(name):  # also every "__name__" at the top level
        return None
    hit = _WDS_KEY.match(name)
    return (hit.group(1), hit.group(2).lower()) if hit else None


def _iter_tar(stream: _Stream, url: str, skip: int) -> Iterator[Union[RawSample, None]]:
    """Samples of a tar stream in order (webdataset's expansion and grouping); the first ``skip`` as None."""
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    failure = []

    def files():
        # A read error ends the grouping first, then is raised: the sample grouped so far goes out (whole if the
        # error hit the next sample's first member; else the decode step rejects what is missing), where
        # group_by_keys alone would drop it with the error.
        try:
            for f in tar_file_iterator(stream):
                yield {**f, "__url__": url}
        except Exception as e:
            failure.append(e)

    for position, sample in enumerate(group_by_keys(files())):
        members = {k: v for k, v in sample.items() if not k.startswith("__")}
        yield RawSample(sample["__key__"], url, members) if position >= skip else None
    if failure:
        raise failure[0]


def iter_shard(shard: Shard, skip: int = 0) -> Iterator[Union[RawSample, Missing]]:
    """Exactly ``shard.num_samples - skip`` items: the shard's samples from position ``skip`` on, ``Missing``
    placeholders for positions the shard could not deliver."""
    name = listed_name(shard.url)
    position = skip
    error = None
    stream = None
    finished = False
    try:
        stream = _Stream(shard.url)
        index = 0
        for sample in _iter_tar(stream, shard.url, skip):
            if index >= shard.num_samples:
                break
            if sample is not None:
                yield sample
                position += 1
            index += 1
        else:
            finished = True
    except (tarfile.TarError, OSError, EOFError, urllib.error.URLError, ValueError) as e:
        error = f"{type(e).__name__}: {e}"
    finally:
        if stream is not None:
            pipe_error = stream.close(finished)
            error = error or pipe_error
    if position < shard.num_samples:
        detail = error or f"the shard ends after {position} of {shard.num_samples} samples (manifest is stale?)"
        log.error(
            "shard %s: %s; its remaining %d sample position(s) are skipped",
            shard.url,
            detail,
            shard.num_samples - position,
        )
        for p in range(position, shard.num_samples):
            yield Missing(f"{name}#{p}", shard.url, "truncated_shard", detail)


def count_samples(url: str) -> int:
    """Number of samples in a shard (local files: headers only; streams: read through)."""
    if not _is_url(url) and not url.startswith("pipe:"):
        keys = 0
        last = None
        with tarfile.open(url, mode="r:") as tar:
            for info in tar:
                member = split_member(info.name) if info.isreg() else None
                if member is not None and member[0] != last:
                    keys, last = keys + 1, member[0]
        return keys
    stream = _Stream(url)
    try:
        n = sum(1 for _ in _iter_tar(stream, url, skip=1 << 62))
    finally:
        error = stream.close(True)
    if error:
        raise RuntimeError(f"counting {url}: {error}")
    return n
