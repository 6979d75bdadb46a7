"""Each run's own log under the local executor, whose one process trains every run: stdout and stderr teed.

Slurm gives every array task (one run) its own stdout / stderr; the local executor's job trains the runs one
after another in one process, so its job log mixes them. While a run trains, what Python writes to stdout and
stderr also goes (appended, one header line per attempt) to the run's `RunDir.stdout_log` / `stderr_log`,
which `asbatch logs RUN` prints.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import TextIO

from asbatch.rundir import RunDir


class Tee(io.TextIOBase):
    """A text stream that writes to its original stream and to a file (the original's fd stays the fd)."""

    def __init__(self, original: TextIO, copy: TextIO):
        self.original, self.copy = original, copy

    def write(self, text: str) -> int:
        self.original.write(text)
        with contextlib.suppress(ValueError, OSError):  # the copy is best effort; the job log is not
            self.copy.write(text)
        return len(text)

    def flush(self) -> None:
        self.original.flush()
        with contextlib.suppress(ValueError, OSError):
            self.copy.flush()

    def fileno(self) -> int:
        return self.original.fileno()

    def isatty(self) -> bool:
        return False

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.original, "encoding", "utf-8")


@contextlib.contextmanager
def run_log(run_dir: RunDir) -> Iterator[None]:
    """Tee this process's stdout and stderr into the run's log files while the block runs."""
    run_dir.path.mkdir(parents=True, exist_ok=True)
    header = f"==> {datetime.now(UTC).isoformat(timespec='seconds')} pid {os.getpid()}: {run_dir.run_id} <==\n"
    with run_dir.stdout_log.open("a", buffering=1) as out, run_dir.stderr_log.open("a", buffering=1) as err:
        out.write(header)
        err.write(header)
        saved = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = Tee(saved[0], out), Tee(saved[1], err)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            sys.stdout, sys.stderr = saved


@contextlib.contextmanager
def detached_output() -> Iterator[None]:
    """While the block runs, this process's stdout / stderr file descriptors point to /dev/null, so a process
    started inside (the local executor's controller, which outlives `asbatch submit`) does not inherit them:
    `asbatch submit ... | tee` would otherwise wait for the whole sweep. The runs log into their run dirs."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(ValueError, OSError):
            stream.flush()
    saved = [os.dup(fd) for fd in (1, 2)]
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        for fd in (1, 2):
            os.dup2(null, fd)
        yield
    finally:
        for fd, copy in zip((1, 2), saved, strict=True):
            os.dup2(copy, fd)
            os.close(copy)
        os.close(null)
