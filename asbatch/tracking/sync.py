"""Uploading a run's offline W&B segments (from a login node with internet) into its one W&B id.

Each segment is one `wandb sync` process with a time limit (wandb retries a server that does not answer for
a long time); a failure is a `SyncError` whose message is one line: which segment, and wandb's first error
line or the time limit. `wandb sync` exits 0 even when the server refused the upload (it prints `wandb:
ERROR ...`), so such a line counts as a failure too: a segment is recorded as synced only when it was. What
was synced before is recorded, so a rerun continues.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from asbatch.rundir import RunDir, offline_segments

DEFAULT_TIMEOUT_S = 600.0


class SyncError(RuntimeError):
    """`wandb sync` failed or timed out for a segment; the message is one line."""


def _errors(output: str) -> list[str]:
    """wandb's error lines (`wandb: ERROR ...`), each on one line."""
    return [" ".join(line.split())[:300] for line in output.splitlines() if re.match(r"\s*wandb: ERROR\b", line)]


def _last_line(output: str) -> str:
    lines = [" ".join(line.split()) for line in output.splitlines() if line.strip()]
    return lines[-1][:300] if lines else "no output"


def _run(cmd: list[str], timeout_s: float) -> tuple[int, str]:
    """Run `cmd` in its own process group; past `timeout_s` the whole group (wandb starts a service) is
    killed and TimeoutError raised."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise TimeoutError from None
    return proc.returncode, out or ""


def sync_run(run_dir: str | Path | RunDir, timeout_s: float = DEFAULT_TIMEOUT_S,
             on_segment: Callable[[str, int, int], None] | None = None) -> list[str]:
    """Upload the run's not yet synced offline segments, in order, into its one W&B id (`wandb sync --id`
    each); returns what was synced. Progress is recorded in the run's W&B state
    (`synced`), so it can be re-run safely. `on_segment(name, i, n)` is called before each upload; each
    upload may take `timeout_s` seconds."""
    run_dir = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    state = run_dir.read_wandb_state()
    if state is None:
        return []
    synced = state.setdefault("synced", [])
    todo = [segment for segment in offline_segments(run_dir) if segment.name not in synced]
    done = []
    for i, segment in enumerate(todo, 1):
        if on_segment is not None:
            on_segment(segment.name, i, len(todo))
        # `--id` uploads into the existing run: later segments continue it (wandb 0.31 has no `--append`)
        cmd = [sys.executable, "-m", "wandb", "sync", "--id", state["id"], "-p", state["project"]]
        if state.get("entity"):
            cmd += ["-e", state["entity"]]
        try:
            code, output = _run([*cmd, str(segment)], timeout_s)
        except TimeoutError:
            raise SyncError(f"wandb sync of {segment} did not finish within {timeout_s:g} s (is the W&B server "
                            "reachable from here?)") from None
        errors = _errors(output)
        if code != 0 or errors:
            raise SyncError(f"wandb sync of {segment} failed (exit {code}): {(errors or [_last_line(output)])[0]}")
        synced.append(segment.name)
        done.append(segment.name)
        run_dir.write_wandb_state(state)
    return done
