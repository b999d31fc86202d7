"""Read URL+caption lists as a stream of rows for data_prep.download (not a CLI).

Formats: ``txt`` (one URL per line, no captions), ``csv``, ``tsv`` (a header row, or names given with ``columns``
for header-less files such as CC3M's TSV), ``jsonl``, ``json`` (a list of objects), ``parquet`` (read one record
batch at a time with pyarrow, never the whole file); every text format may be gzip'd (``.gz``). An input is a file
or a folder (its files of the known formats, sorted by name); several inputs are read in the order given.

Each row is ``{"url": ..., "caption": str | [str], "extra": {column: value}}``; ``extra`` holds the other
columns (all of them, none, or a chosen list). Captions are made single-line (whitespace runs become one space)
because the shard format stores several captions one per line. Bad input raises ``InputError`` naming the file,
line or column.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import math
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

FORMATS = ("txt", "csv", "tsv", "json", "jsonl", "parquet")
_PARQUET_BATCH_ROWS = 8192


class InputError(ValueError):
    pass


@dataclass(frozen=True)
class ListSpec:
    files: Tuple[str, ...]
    input_format: Optional[str] = None  # None: from each file's extension
    url_col: str = "url"
    caption_col: Optional[str] = "caption"  # None: no captions
    extra_cols: Optional[Tuple[str, ...]] = None  # None: every other column; (): none
    columns: Optional[Tuple[str, ...]] = None  # names of the columns of header-less csv/tsv files
    sha256_col: Optional[str] = None  # the expected sha256 (hex) of each URL's bytes, when the list has one


def file_format(path: Path, forced: Optional[str] = None) -> Tuple[str, bool]:
    """(format, gzipped) of a list file, from ``forced`` or the file name."""
    suffixes = [s.lower().lstrip(".") for s in path.suffixes]
    gz = bool(suffixes) and suffixes[-1] == "gz"
    if gz:
        suffixes = suffixes[:-1]
    fmt = forced or (suffixes[-1] if suffixes else "")
    if fmt not in FORMATS:
        raise InputError(f"{path}: unknown list format {fmt!r} (use one of {', '.join(FORMATS)} or --input-format)")
    if gz and fmt == "parquet":
        raise InputError(f"{path}: parquet files are compressed inside; do not gzip them")
    return fmt, gz


def resolve_inputs(inputs: Sequence[str], forced: Optional[str] = None) -> List[Path]:
    files: List[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and _is_list_file(p, forced))
            if not found:
                raise InputError(f"{path}: folder holds no list files ({', '.join(FORMATS)}, optionally .gz)")
            files += found
        elif path.is_file():
            file_format(path, forced)
            files.append(path)
        else:
            raise InputError(f"{path}: no such file or folder")
    return files


def _is_list_file(path: Path, forced: Optional[str]) -> bool:
    try:
        fmt = file_format(path)[0]
    except InputError:
        return False
    return forced is None or fmt == forced


def single_line(text: str) -> str:
    """Captions are stored one per line, so whitespace runs (newlines included) become one space."""
    return " ".join(str(text).split())


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, bytes):
        return value.hex()
    return str(value)


class _Columns:
    """Checks the columns of one file once and turns its records into rows."""

    def __init__(self, spec: ListSpec, path: Path, names: Sequence[str], url_only: bool):
        self.spec, self.url_only = spec, url_only
        self.own = [spec.url_col] + [c for c in (spec.caption_col, spec.sha256_col) if c]
        wanted = self.own + list(spec.extra_cols or ())
        missing = [c for c in wanted if c not in names]
        if missing:
            raise InputError(f"{path}: no column {missing[0]!r}; its columns are {list(names)}")
        used = set(self.own)
        self.extra = [c for c in names if c not in used] if spec.extra_cols is None else list(spec.extra_cols)

    def needed(self) -> List[str]:
        if self.url_only:
            return [self.spec.url_col]
        return list(dict.fromkeys(self.own + self.extra))

    def row(self, record: Dict[str, Any]) -> Dict[str, Any]:
        url = record.get(self.spec.url_col)
        url = url.strip() if isinstance(url, str) else url
        if self.url_only:
            return {"url": url}
        caption = record.get(self.spec.caption_col) if self.spec.caption_col else None
        if isinstance(caption, (list, tuple)):
            caption = [single_line(c) for c in caption]
        elif caption is None or (isinstance(caption, float) and math.isnan(caption)):
            caption = ""
        else:
            caption = single_line(caption)
        row = {"url": url, "caption": caption, "extra": {c: _json_safe(record.get(c)) for c in self.extra}}
        if self.spec.sha256_col:
            value = record.get(self.spec.sha256_col)
            row["sha256"] = value.strip().lower() if isinstance(value, str) and value.strip() else None
        return row


def _open_text(path: Path, gz: bool) -> io.TextIOBase:
    return gzip.open(path, "rt", encoding="utf-8", newline="") if gz else open(path, encoding="utf-8", newline="")


def _read_file(spec: ListSpec, path: Path, url_only: bool) -> Iterator[Dict[str, Any]]:
    fmt, gz = file_format(path, spec.input_format)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        cols = _Columns(spec, path, pf.schema_arrow.names, url_only)
        for batch in pf.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=cols.needed()):
            for record in batch.to_pylist():
                yield cols.row(record)
        return
    with _open_text(path, gz) as f:
        if fmt == "txt":
            cols = _Columns(replace(spec, caption_col=None, extra_cols=()), path, [spec.url_col], url_only)
            for line in f:
                if line.strip():
                    yield cols.row({spec.url_col: line})
        elif fmt in ("csv", "tsv"):
            csv.field_size_limit(sys.maxsize)
            dialect = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if fmt == "tsv" else {}
            reader = csv.reader(f, **dialect)
            names = list(spec.columns) if spec.columns else next(reader, [])
            cols = _Columns(spec, path, names, url_only)
            for values in reader:
                if values:
                    yield cols.row(dict(zip(names, values)))
        elif fmt == "jsonl":
            cols = None
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise InputError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
                if not isinstance(record, dict):
                    raise InputError(f"{path}:{lineno}: expected a JSON object per line")
                cols = cols or _Columns(spec, path, list(record), url_only)
                if spec.url_col not in record:
                    raise InputError(f"{path}:{lineno}: no column {spec.url_col!r}")
                yield cols.row(record)
        else:  # json
            records = json.load(f)
            if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
                raise InputError(f"{path}: expected a JSON list of objects")
            cols = _Columns(spec, path, list(records[0]) if records else [spec.url_col], url_only)
            for record in records:
                yield cols.row(record)


def iter_rows(spec: ListSpec, url_only: bool = False) -> Iterator[Dict[str, Any]]:
    """Rows of every list file in order; ``url_only`` reads just the URL column (the fast dedup pass)."""
    for name in spec.files:
        path = Path(name)
        try:
            yield from _read_file(spec, path, url_only)
        except InputError:
            raise
        except Exception as e:  # gzip/csv/pyarrow/unicode errors: say which file
            raise InputError(
                f"{path}: cannot read as a {file_format(path, spec.input_format)[0]} list: {type(e).__name__}: {e}"
            ) from e
