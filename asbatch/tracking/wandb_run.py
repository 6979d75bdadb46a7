"""The W&B run of one training run (rank 0 only): mode, init / resume, history, final summary.

One W&B run per training run: id = the run id, group = sweep, job_type = stage, config = the resolved
config, tags from the spec. A requeued run continues the same W&B run: online with resume="allow";
offline, each process segment writes its own `wandb/offline-run-*` dir with the same id, and `asbatch sync`
uploads them in order into that id. History is logged with step = global step.

What W&B holds is read back, never assumed: offline, the steps earlier segments really persisted (a segment
whose W&B service was killed with the job may hold nothing); online, the resumed run's step counter. Rows
of the run's metrics file that W&B lacks are logged again, so every epoch appears exactly once. Tracking
errors never change what training does: a failing W&B call is reported once and tracking stops for the
segment. The final summary is marked done in the run dir only after W&B finished the run, so a restart (or
`asbatch sync`) completes it. No API key is ever written: W&B reads it from its own environment / netrc.
"""

from __future__ import annotations

import contextlib
import io
import os
import socket
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from asbatch.config import RunConfig
from asbatch.figures import reliability_diagram, retained_curve
from asbatch.names import WANDB_MODES
from asbatch.rundir import RunDir, offline_segments
from asbatch.tracking.keys import flatten_evaluation
from asbatch.tracking.offline import Segment, read_finished_segment, read_segment


def _wandb_host():
    """The W&B server wandb talks to (its settings: WANDB_BASE_URL, the settings files, else its default)."""
    from wandb.sdk import wandb_setup
    from wandb.sdk.lib import wbauth

    settings = wandb_setup.singleton().settings
    return wbauth.HostUrl(settings.base_url, app_url=settings.app_url)


def has_api_key() -> bool:
    """Whether wandb finds credentials for its server by its own lookup, as `wandb.init` does: WANDB_API_KEY,
    an identity-token file, the netrc entry `wandb login` wrote (for whichever host name this wandb uses), the
    settings files. Offline: nothing is sent, nothing is prompted, the session is left as it was."""
    try:
        from wandb.sdk.lib import wbauth

        auth = wbauth.authenticate_session(host=_wandb_host(), source="asbatch", prompt=False, verify=False,
                                           update_session=False)
        return auth is not None
    except ImportError:  # a wandb without this API: the environment is all that can be checked
        return bool(os.environ.get("WANDB_API_KEY"))
    except Exception:  # noqa: BLE001 - malformed credentials: W&B would refuse them; run offline
        return False


def can_reach(host: str | None = None, port: int | None = None, timeout: float = 2.0) -> bool:
    """Whether a TCP connection to the W&B server (default: the one wandb is configured for) opens."""
    if host is None:
        from urllib.parse import urlsplit

        url = urlsplit(_wandb_host().url)
        host, port = url.hostname or "", port or url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def close_wandb_quietly() -> None:
    """Tear wandb down now, ignoring a service that is already gone: a Slurm signal reaches every process of
    the job step, W&B's service included, and wandb's own exit hook would then print a ConnectionResetError
    traceback into the job's log after asbatch's clean stop line. What W&B persisted is read back anyway."""
    wandb = sys.modules.get("wandb")
    if wandb is None:
        return
    with contextlib.suppress(Exception, SystemExit), contextlib.redirect_stderr(io.StringIO()):
        wandb.teardown()


def resolve_mode(mode: str) -> str:
    """auto -> offline without an API key or without network, else online. WANDB_MODE overrides all (the CLI
    refused a value wandb does not know at the door)."""
    if os.environ.get("WANDB_MODE") in WANDB_MODES:
        return WANDB_MODES[os.environ["WANDB_MODE"]]
    if mode != "auto":
        return mode
    return "online" if has_api_key() and can_reach() else "offline"


def persisted_steps(run_dir: RunDir) -> set[int]:
    """The history steps the run's earlier offline segments really wrote (read back from their files)."""
    steps: set[int] = set()
    for segment in offline_segments(run_dir):
        try:
            steps.update(read_segment(segment).history_steps)
        except (OSError, ValueError):
            continue  # unreadable: count nothing from it, so its rows are logged again
    return steps


class Tracker:
    """The W&B side of a run. All methods are no-ops when tracking is disabled, and none ever raises."""

    def __init__(self, config: RunConfig, run_dir: str | Path | RunDir, enabled: bool = True,
                 mode: str | None = None):
        self.run_dir = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
        self.mode = (mode or resolve_mode(config.tracking.wandb)) if enabled else "disabled"
        self.state = self.run_dir.read_wandb_state() or {}
        self.run = None
        self._persisted: set[int] = set()  # offline: steps earlier segments wrote
        self._server_step = 0              # online: steps below it are on the server
        self._last_logged = -1
        self._segment: Path | None = None  # offline: this segment's dir
        self._as_on = config.model.bayesian and config.adversarial.lam > 0  # the figures' method colour
        if self.mode != "disabled":
            self._guard(self._init, config)

    def _init(self, config: RunConfig) -> None:
        import wandb

        if self.mode == "offline":
            self._persisted = persisted_steps(self.run_dir)
        t = config.tracking
        self.run = wandb.init(
            project=t.project, entity=t.entity, id=config.run_id, name=config.run_id, group=config.sweep,
            job_type=config.stage, tags=list(t.tags), config=config.to_dict(), dir=str(self.run_dir.path),
            resume="allow", mode=self.mode, reinit="finish_previous",
        )
        if self.mode == "online":
            self._server_step = int(getattr(self.run, "step", 0) or 0)
        else:
            self._segment = Path(self.run.dir).parent
        self.state.update(id=config.run_id, project=t.project, entity=t.entity, mode=self.mode)
        self.run_dir.write_wandb_state(self.state)

    def _guard(self, call: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """Run a W&B call; on any failure report it once and stop tracking for this segment."""
        try:
            call(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - W&B must never change what training does
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            print(f"[asbatch] W&B failed ({type(err).__name__}: {first}); training goes on, every metric is in "
                  f"the run dir, and a restart or `asbatch sync` completes W&B", file=sys.stderr, flush=True)
            self.run = None
            self._shutdown_wandb()

    @staticmethod
    def _shutdown_wandb() -> None:
        """Drop the (dead) W&B service connection now, so that W&B's own exit hook does not print a traceback
        for it later and a next run in this process starts a fresh service."""
        import wandb

        with contextlib.suppress(Exception):
            wandb.teardown()

    def has(self, step: int) -> bool:
        """Whether W&B already holds history step `step` (from an earlier segment or this one)."""
        return step <= self._last_logged or step in self._persisted or step < self._server_step

    def log_epoch(self, row: dict[str, Any], step: int) -> None:
        if self.run is None or self.has(step):
            return
        self._guard(self.run.log, row, step=step)
        self._last_logged = step

    def catch_up(self, rows: Iterable[dict[str, Any]]) -> None:
        """Log the metrics rows (in order) that W&B lacks, e.g. those a killed segment never persisted."""
        for row in rows:
            self.log_epoch(row, step=row["global_step"])

    def complete(self, results: dict[str, Any]) -> None:
        """The final evaluation as summary values and tables, then finish the W&B run; marked done in the
        run dir only once W&B has finished it (so a later segment does it again if it did not)."""
        if self.run is None or self.state.get("finished"):
            return
        ev = results["evaluation"]
        self._guard(self.run.summary.update, flatten_evaluation(ev))
        if self.run is not None:
            self._guard(self.run.log, self._final_tables(ev), step=results["train"]["global_steps"] + 1)
        if self.run is not None:
            self._guard(self.run.finish, exit_code=0)
        if self.run is None:
            return
        self.run = None
        if self._segment is not None and "evaluation/ensemble_accuracy" not in self._read_back().summary_keys:
            print("[asbatch] W&B finished but its offline files lack the summary; a restart or `asbatch sync` "
                  "completes W&B", file=sys.stderr, flush=True)
            return
        self.state["finished"] = True
        self.run_dir.write_wandb_state(self.state)

    def _read_back(self) -> Segment:
        return read_finished_segment(self._segment)

    def _final_tables(self, ev: dict[str, Any]) -> dict[str, Any]:
        import wandb

        out = {
            "evaluation/sample_accuracies": wandb.Table(
                columns=["sample", "accuracy"], data=[[i, a] for i, a in enumerate(ev["sample_accuracies"])]),
            "evaluation/retained": wandb.Table(
                columns=["retained_fraction", "accuracy"],
                data=[[float(f), a] for f, a in ev["retained_accuracy"].items()]),
        }
        for name, make in (("retained_curve", retained_curve), ("reliability_diagram", reliability_diagram)):
            out[f"evaluation/{name}"] = wandb.Image(str(make(ev, self.run_dir.figure(name), as_on=self._as_on)))
        return out

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # stopped early (preemption, error): close the W&B run so that a later segment can continue it
        if self.run is not None:
            self._guard(self.run.finish, exit_code=1 if exc_type is not None else 0)
            self.run = None


def complete_tracking(config: RunConfig, run_dir: RunDir, results: dict[str, Any], mode: str | None = None) -> None:
    """For a finished run whose W&B run was started but not completed (killed in between, or W&B failed):
    log what W&B lacks and the summary, in a new segment. A no-op when W&B is complete or off."""
    state = run_dir.read_wandb_state()
    if not state or state.get("finished") or (mode or resolve_mode(config.tracking.wandb)) == "disabled":
        return
    with Tracker(config, run_dir, mode=mode) as tracker:
        tracker.catch_up(run_dir.read_metrics())
        tracker.complete(results)
