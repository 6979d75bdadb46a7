"""Callables that tests submit to the local cluster (importable on the nodes via PYTHONPATH)."""

import os
import socket


def whoami(x: int) -> dict:
    """Where did this array task run, and what did it compute."""
    return {
        "x": x,
        "square": x * x,
        "array_task_id": int(os.environ["SLURM_ARRAY_TASK_ID"]),
        "array_job_id": os.environ["SLURM_ARRAY_JOB_ID"],
        "host": socket.gethostname(),
    }
