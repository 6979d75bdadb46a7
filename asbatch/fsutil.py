"""Crash-safe file writes (no torch here: the launcher and the CLI import this without paying for torch)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, write: Callable[[Any], None]) -> None:
    """Write a file through `write(fileobj)` to a temp name, fsync, then rename over `path` (the temp name
    carries the pid, so concurrent writers never share one)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
    with tmp.open("wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    fsync_dir(path.parent)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, lambda f: f.write((json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()))
