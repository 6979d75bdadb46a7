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


def naming(err: OSError, path: Path) -> OSError:
    """`err` with `path` as its file name when it has none (a disk-full error from a write names no file)."""
    return err if err.filename is not None else type(err)(err.errno, err.strerror, str(path))


def atomic_write_bytes(path: Path, write: Callable[[Any], None]) -> None:
    """Write a file through `write(fileobj)` to a temp name, fsync, then rename over `path` (the temp name
    carries the pid, so concurrent writers never share one). If the write fails (a full disk or quota:
    ENOSPC, EDQUOT) the temp file is removed, `path` is left as it was, and the OSError names `path`."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
    recording = None
    try:
        with tmp.open("wb") as f:
            recording = _Recording(f)
            write(recording)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        # torch.save reports a failed write as a RuntimeError ("unexpected pos ..."): the OSError is the cause
        cause = err if isinstance(err, OSError) else recording.error if recording is not None else None
        if cause is not None:
            raise naming(cause, path) from err
        raise
    fsync_dir(path.parent)


class _Recording:
    """A file object that remembers the OSError of a failed write (writers such as torch.save replace it
    with an error of their own)."""

    def __init__(self, f: Any):
        self.f, self.error = f, None

    def write(self, data: Any) -> int:
        try:
            return self.f.write(data)
        except OSError as err:
            self.error = err
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self.f, name)


def append_line(path: Path, line: str) -> None:
    """Append one line whole or not at all: a write that fails part-way (a full disk) is cut back to the
    file's previous end, so every line in the file stays complete; the OSError names `path`."""
    data = (line + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        end = os.lseek(fd, 0, os.SEEK_END)
        try:
            written = os.write(fd, data)
            if written != len(data):
                raise OSError(28, os.strerror(28), str(path))  # a short write: the disk filled up
            os.fsync(fd)
        except OSError as err:
            os.ftruncate(fd, end)
            raise naming(err, path) from err
    finally:
        os.close(fd)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, lambda f: f.write((json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()))
