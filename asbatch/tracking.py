"""Weights & Biases tracking for one training run (rank 0 only); the run dir is written regardless.

One W&B run per training run: id = the run id, group = sweep, job_type = stage, config = the resolved
config, tags from the spec. A requeued run continues the same W&B run: online with resume="allow"; offline,
each process segment writes its own `wandb/offline-run-*` dir with the same id, and `asbatch sync` uploads
them in order into that id (`wandb sync --id ID`, then `--append`). History is logged with step = global
step, and `wandb.json` in the run dir remembers the last step logged, so a resumed segment never logs a
step twice. No API key is ever written: W&B reads it from its own environment / netrc.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from asbatch.fsutil import atomic_write_json
from asbatch.config import RunConfig

STATE_FILE = "wandb.json"


def has_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def can_reach(host: str = "api.wandb.ai", port: int = 443, timeout: float = 2.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def resolve_mode(mode: str) -> str:
    """auto -> offline without an API key or without network, else online. WANDB_MODE overrides all."""
    if os.environ.get("WANDB_MODE") in ("online", "offline", "disabled"):
        return os.environ["WANDB_MODE"]
    if mode != "auto":
        return mode
    return "online" if has_api_key() and can_reach() else "offline"


class Tracker:
    """The W&B side of a run. All methods are no-ops when tracking is disabled."""

    def __init__(self, config: RunConfig, run_dir: Path, enabled: bool = True):
        self.run_dir = run_dir
        self.mode = resolve_mode(config.tracking.wandb) if enabled else "disabled"
        self.state_path = run_dir / STATE_FILE
        self.state = json.loads(self.state_path.read_text()) if self.state_path.exists() else {"last_step": -1}
        self.run = None
        if self.mode == "disabled":
            return
        import wandb

        t = config.tracking
        self.run = wandb.init(
            project=t.project, entity=t.entity, id=config.run_id, name=config.run_id, group=config.sweep,
            job_type=config.stage, tags=list(t.tags), config=config.to_dict(), dir=str(run_dir),
            resume="allow", mode=self.mode, reinit="finish_previous",
        )
        self.state.update(id=config.run_id, project=t.project, entity=t.entity, mode=self.mode)
        self._save_state()

    def _save_state(self) -> None:
        atomic_write_json(self.state_path, self.state)

    def log_epoch(self, row: dict[str, Any], step: int) -> None:
        if self.run is None or step <= self.state["last_step"]:
            return  # already logged by an earlier segment of this run
        self.run.log(row, step=step)
        self.state["last_step"] = step
        self._save_state()

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # stopped early (preemption, error): close the W&B run so that a later segment can continue it
        if self.run is not None:
            self.run.finish(exit_code=1 if exc_type is not None else 0)
            self.run = None

    def finish(self, results: dict[str, Any]) -> None:
        if self.run is None:
            return
        import wandb

        from asbatch.results import flatten_evaluation

        ev = results["evaluation"]
        self.run.summary.update(flatten_evaluation(ev))
        self.run.log({
            "evaluation/sample_accuracies": wandb.Table(
                columns=["sample", "accuracy"], data=[[i, a] for i, a in enumerate(ev["sample_accuracies"])]),
            "evaluation/retained": wandb.Table(
                columns=["retained_fraction", "accuracy"],
                data=[[float(f), a] for f, a in ev["retained_accuracy"].items()]),
            **self._plots(ev),
        }, step=max(self.state["last_step"], 0) + 1)

    def _plots(self, ev: dict[str, Any]) -> dict[str, Any]:
        import wandb

        from asbatch.plots import reliability_diagram, retained_curve

        out = {}
        for name, make in (("retained_curve", retained_curve), ("reliability_diagram", reliability_diagram)):
            path = self.run_dir / f"{name}.png"
            make(ev, path)
            out[f"evaluation/{name}"] = wandb.Image(str(path))
        return out


def offline_segments(run_dir: Path) -> list[Path]:
    """The run's offline W&B segments, oldest first (their names start with the start time)."""
    return sorted((run_dir / "wandb").glob("offline-run-*"))


def sync_run(run_dir: Path) -> list[str]:
    """Upload the run's not yet synced offline segments, in order, into its one W&B id; returns what was
    synced. Progress is recorded in wandb.json (`synced`), so it can be re-run safely."""
    state_path = run_dir / STATE_FILE
    if not state_path.exists():
        return []
    state = json.loads(state_path.read_text())
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
        subprocess.run(cmd + [str(segment)], check=True)
        synced.append(segment.name)
        done.append(segment.name)
        atomic_write_json(state_path, state)
    return done
