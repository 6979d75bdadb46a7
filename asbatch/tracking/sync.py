"""Uploading a run's offline W&B segments (from a login node with internet) into its one W&B id."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from asbatch.rundir import RunDir, offline_segments


def sync_run(run_dir: str | Path | RunDir) -> list[str]:
    """Upload the run's not yet synced offline segments, in order, into its one W&B id (`wandb sync --id`,
    later segments `--append`); returns what was synced. Progress is recorded in the run's W&B state
    (`synced`), so it can be re-run safely."""
    run_dir = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    state = run_dir.read_wandb_state()
    if state is None:
        return []
    synced = state.setdefault("synced", [])
    done = []
    for segment in offline_segments(run_dir):
        if segment.name in synced:
            continue
        cmd = [sys.executable, "-m", "wandb", "sync", "--id", state["id"], "-p", state["project"]]
        if state.get("entity"):
            cmd += ["-e", state["entity"]]
        if synced:  # later segments continue the same run
            cmd.append("--append")
        subprocess.run([*cmd, str(segment)], check=True)
        synced.append(segment.name)
        done.append(segment.name)
        run_dir.write_wandb_state(state)
    return done
