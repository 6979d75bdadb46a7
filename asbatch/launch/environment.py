"""The profile's environment in the process that trains: the same for `asbatch run` and for a submitted task.

A Slurm job script exports the profile's `env` (it wins over the submitter's environment); the local and
debug executors' task and `asbatch run` set it here, the same way, before torch is imported. Where torch is
already imported (a notebook, a debug executor, a test), `OMP_NUM_THREADS` is applied to torch's thread pool
too: the number of threads changes the order of floating-point sums, so without it the same run id would end
with different numbers under `run` and `submit`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

THREADS_ENV = "OMP_NUM_THREADS"


def profile_threads(env: Mapping[str, str]) -> int | None:
    """The threads per run `env` sets (OMP_NUM_THREADS, a positive integer); None where it sets none."""
    threads = env.get(THREADS_ENV, "")
    return int(threads) if threads.isdigit() and int(threads) > 0 else None


def apply_profile_env(env: Mapping[str, str]) -> None:
    """Export the profile's variables (they win, as in a job script) and apply the thread count to torch."""
    os.environ.update(env)
    threads = profile_threads(env)
    if "torch" in sys.modules and threads is not None:
        sys.modules["torch"].set_num_threads(threads)
