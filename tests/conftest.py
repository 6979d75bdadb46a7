"""Shared fixtures. `local_slurm` brings up the real local Slurm cluster from slurm/local-cluster/."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CLUSTER_SH = REPO / "slurm" / "local-cluster" / "cluster.sh"
IN_CI = os.environ.get("CI", "").lower() == "true"


def _unavailable(reason: str):
    """Outside CI a missing cluster skips with a reason; under CI=true it is a failure, never a skip."""
    if IN_CI:
        pytest.fail(f"CI=true but the local Slurm cluster is unavailable: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def local_slurm() -> str:
    """Start (or reuse) the local 2-node cluster; returns its SLURM_CONF and exports it for subprocesses."""
    if shutil.which("sbatch") is None or shutil.which("slurmctld") is None:
        _unavailable("Slurm is not installed (run: sudo bash slurm/local-cluster/cluster.sh install)")
    action = "start" if os.geteuid() == 0 else "status"  # only root can start daemons
    proc = subprocess.run(["bash", str(CLUSTER_SH), action], capture_output=True, text=True)
    if proc.returncode != 0:
        _unavailable(f"local cluster '{action}' failed:\n{proc.stdout}{proc.stderr}")
    conf = subprocess.run(["bash", str(CLUSTER_SH), "env"], capture_output=True, text=True, check=True)
    slurm_conf = conf.stdout.strip().split("=", 1)[1]
    os.environ["SLURM_CONF"] = slurm_conf
    return slurm_conf
