"""The W&B run of one training run (rank 0 only): mode, init / resume, per-epoch history, final summary.

One W&B run per training run: id = the run id, group = sweep, job_type = stage, config = the resolved
config, tags from the spec. A requeued run continues the same W&B run: online with resume="allow";
offline, each process segment writes its own `wandb/offline-run-*` dir with the same id, and `asbatch sync`
uploads them in order into that id. History is logged with step = global step, and the run dir's W&B state
remembers the last step logged, so a resumed segment never logs a step twice. No API key is ever written:
W&B reads it from its own environment / netrc. The run dir is written whatever W&B does.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

from asbatch.config import RunConfig
from asbatch.figures import reliability_diagram, retained_curve
from asbatch.rundir import RunDir
from asbatch.tracking.keys import flatten_evaluation


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

    def __init__(self, config: RunConfig, run_dir: str | Path | RunDir, enabled: bool = True):
        self.run_dir = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
        self.mode = resolve_mode(config.tracking.wandb) if enabled else "disabled"
        self.state = self.run_dir.read_wandb_state() or {"last_step": -1}
        self.run = None
        if self.mode == "disabled":
            return
        import wandb

        t = config.tracking
        self.run = wandb.init(
            project=t.project, entity=t.entity, id=config.run_id, name=config.run_id, group=config.sweep,
            job_type=config.stage, tags=list(t.tags), config=config.to_dict(), dir=str(self.run_dir.path),
            resume="allow", mode=self.mode, reinit="finish_previous",
        )
        self.state.update(id=config.run_id, project=t.project, entity=t.entity, mode=self.mode)
        self.run_dir.write_wandb_state(self.state)

    def log_epoch(self, row: dict[str, Any], step: int) -> None:
        if self.run is None or step <= self.state["last_step"]:
            return  # already logged by an earlier segment of this run
        self.run.log(row, step=step)
        self.state["last_step"] = step
        self.run_dir.write_wandb_state(self.state)

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

        out = {}
        for name, make in (("retained_curve", retained_curve), ("reliability_diagram", reliability_diagram)):
            out[f"evaluation/{name}"] = wandb.Image(str(make(ev, self.run_dir.figure(name))))
        return out
