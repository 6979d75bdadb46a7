"""A job-private CUDA MPS control daemon, so that the runs packed onto one GPU share it concurrently.

Without MPS, the processes on one GPU take turns (time slicing); with it, their kernels run side by side.
The daemon's pipe and log dirs are private to the job (under the job's tmp dir), so two jobs on one node
never talk to each other's daemon; the workers inherit CUDA_MPS_PIPE_DIRECTORY and find it. Sites that run
MPS themselves (`--gres=mps`) need none of this: leave `resources.mps` off there.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

CONTROL = "nvidia-cuda-mps-control"


def _private_dir() -> Path:
    job = os.environ.get("SLURM_JOB_ID", str(os.getpid()))
    base = os.environ.get("SLURM_TMPDIR") or os.environ.get("TMPDIR") or tempfile.gettempdir()
    return Path(base) / f"asbatch-mps-{job}-{os.getpid()}"


@contextlib.contextmanager
def mps_daemon() -> Iterator[Path]:
    """Start the daemon (`nvidia-cuda-mps-control -d`) with job-private dirs, export them for the workers,
    and stop it (`quit`) when the block ends, whatever ends it. A daemon that does not start is an error."""
    root = _private_dir()
    pipe, log = root / "pipe", root / "log"
    pipe.mkdir(parents=True, exist_ok=True)
    log.mkdir(exist_ok=True)
    env = {"CUDA_MPS_PIPE_DIRECTORY": str(pipe), "CUDA_MPS_LOG_DIRECTORY": str(log)}
    try:
        proc = subprocess.run([CONTROL, "-d"], env={**os.environ, **env}, capture_output=True, text=True, timeout=60)
    except OSError as err:
        raise RuntimeError(f"resources.mps: cannot start {CONTROL} ({err.strerror or err}); is this a GPU node with "
                           "the CUDA driver's MPS tools?") from None
    if proc.returncode != 0:
        raise RuntimeError(f"resources.mps: `{CONTROL} -d` failed: {(proc.stderr or proc.stdout).strip()}")
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    print(f"[asbatch] CUDA MPS daemon started (pipe {pipe})", flush=True)
    try:
        yield root
    finally:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run([CONTROL], input="quit\n", env={**os.environ, **env}, capture_output=True, text=True,
                           timeout=60)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
