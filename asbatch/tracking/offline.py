"""Reading W&B's offline run files back: what a segment really persisted (wandb ships no reader any more).

A `.wandb` file is a leveldb-log framing of protobuf `Record`s: a 7-byte file header (":W&B", a 2-byte magic,
a version byte), then 32 KiB blocks of records, each with a 7-byte header (CRC-32, little-endian length,
type: 1 full, 2 first, 3 middle, 4 last fragment); a block tail shorter than a header is padding. A segment
killed before W&B's service wrote anything is just the 7-byte header (or less): it holds no record, and `wandb
sync` fails on it (`ERROR Failed to read ...: EOF`), so `asbatch sync` skips it (`is_empty_segment`).
"""

from __future__ import annotations

import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HEADER = b":W&B"
FILE_HEADER_SIZE = 7
BLOCK_SIZE = 32 * 1024
RECORD_HEADER = struct.Struct("<IHB")  # crc32, length, type
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


@dataclass
class Segment:
    """What one offline segment holds: the history steps in order, and whether it has a summary / an exit."""

    path: Path
    history_steps: list[int] = field(default_factory=list)
    summary_keys: set[str] = field(default_factory=set)
    exited: bool = False


def records(path: Path) -> list[bytes]:
    """The serialized protobuf records of a `.wandb` file, in order; a torn last record is dropped."""
    data = path.read_bytes()
    if len(data) < FILE_HEADER_SIZE and HEADER.startswith(data[:len(HEADER)]):
        return []  # killed while the file header was written: nothing in it
    if not data.startswith(HEADER):
        raise ValueError(f"{path}: not a W&B run file")
    out, pending, pos = [], b"", FILE_HEADER_SIZE
    while pos + RECORD_HEADER.size <= len(data):
        left = BLOCK_SIZE - pos % BLOCK_SIZE
        if left < RECORD_HEADER.size:  # block padding
            pos += left
            continue
        _, length, kind = RECORD_HEADER.unpack_from(data, pos)
        if kind == 0:  # zero fill up to the end of the block
            pos += left
            continue
        chunk = data[pos + RECORD_HEADER.size:pos + RECORD_HEADER.size + length]
        if len(chunk) < length:
            break  # the writer was killed mid-record
        pos += RECORD_HEADER.size + length
        if kind == FULL:
            out.append(chunk)
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            out.append(pending + chunk)
            pending = b""
    return out


def is_empty_segment(segment_dir: Path) -> bool:
    """Whether an offline segment dir's `.wandb` files hold no record: its process was killed before W&B's
    service wrote anything (the file is just the 7-byte header, or shorter, or ends inside its first record).
    A dir without a `.wandb` file, or with a file that is not a W&B run file, is not called empty: `wandb sync`
    says what is wrong with it."""
    files = sorted(segment_dir.glob("*.wandb"))
    try:
        return bool(files) and not any(records(path) for path in files)
    except ValueError:
        return False


def read_finished_segment(segment_dir: Path, timeout: float = 15.0) -> Segment:
    """`read_segment` once W&B's service has written the run's exit record: `run.finish()` returns before
    the service's writer has flushed everything (seen under load), so poll for up to `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            segment = read_segment(segment_dir)
        except (OSError, ValueError):
            segment = Segment(segment_dir)
        if segment.exited or time.monotonic() > deadline:
            return segment
        time.sleep(0.1)


def segment_records(segment_dir: Path) -> Iterator[Any]:
    """Every W&B record (a parsed `wandb_internal_pb2.Record`) of an offline segment dir, in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    for path in sorted(segment_dir.glob("*.wandb")):
        for raw in records(path):
            record = pb.Record()
            record.ParseFromString(raw)
            yield record


def read_segment(segment_dir: Path) -> Segment:
    """The history steps, summary keys and exit of an offline segment dir (`offline-run-*`)."""
    found = Segment(segment_dir)
    for record in segment_records(segment_dir):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            found.history_steps.append(record.history.step.num)
        elif kind == "summary":
            found.summary_keys.update(item.key or "/".join(item.nested_key) for item in record.summary.update)
        elif kind == "exit":
            found.exited = True
    return found
