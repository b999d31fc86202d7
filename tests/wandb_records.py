"""Read back what W&B wrote to an offline run file (``run-<id>.wandb``), without network or W&B's internal reader.

The file is a 7-byte header (``:W&B``, magic, version) followed by LevelDB-log framing: 32 KiB blocks of records
with a 7-byte header (crc32c, length, type FULL=1/FIRST=2/MIDDLE=3/LAST=4); every logical record is a serialised
``wandb.proto.wandb_internal_pb2.Record``.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Dict, List

BLOCK = 32 * 1024
HEADER = 7


def records(path: Path):
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()[HEADER:]
    buf = b""
    pos = 0
    while pos + 7 <= len(data):
        left_in_block = BLOCK - ((pos + HEADER) % BLOCK)
        if left_in_block < 7:
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            pos += left_in_block
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 1:
            buf = chunk
        elif kind == 2:
            buf = chunk
            continue
        elif kind == 3:
            buf += chunk
            continue
        elif kind == 4:
            buf += chunk
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(buf)
        yield rec


def history(path: Path) -> List[Dict]:
    rows = []
    for rec in records(path):
        if rec.WhichOneof("record_type") == "history":
            rows.append(
                {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in rec.history.item}
            )
    return rows


def run_id(path: Path) -> str:
    for rec in records(path):
        if rec.WhichOneof("record_type") == "run":
            return rec.run.run_id
    raise ValueError(f"{path}: no run record")
