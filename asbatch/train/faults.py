"""Fault injection for the tests that kill real processes: `ASBATCH_FAULT=<point>:<step>[:<rank>]`.

Points: `step`, `epoch`, `checkpoint` SIGKILL this process there (resume tests), `hold-<point>` SIGSTOPs it
there (signal tests); `nan` makes rank <rank>
(default 0) see a non-finite loss at that global step (the multi-rank failure test). Unset in normal use.
"""

from __future__ import annotations

import os
import signal

ENV = "ASBATCH_FAULT"


def _armed(name: str, step: int, rank: int = 0) -> bool:
    point, _, rest = os.environ.get(ENV, "").partition(":")
    at, _, on_rank = rest.partition(":")
    return point == name and at == str(step) and (on_rank or "0") == str(rank)


def kill_point(name: str, step: int) -> None:
    """SIGKILL this process here when `ASBATCH_FAULT=<name>:<step>`; SIGSTOP it when `hold-<name>:<step>`
    (a test then sends its signal while the process is held exactly there, however fast the machine is)."""
    if _armed(name, step):
        os.kill(os.getpid(), signal.SIGKILL)
    if _armed(f"hold-{name}", step):
        os.kill(os.getpid(), signal.SIGSTOP)


def nan_loss(step: int, rank: int) -> bool:
    """Whether this rank is to see a non-finite loss at this step (`ASBATCH_FAULT=nan:<step>:<rank>`)."""
    return _armed("nan", step, rank)
