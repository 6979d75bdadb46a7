"""Uploading a run's offline W&B segments (from a login node with internet) into its one W&B id.

Each segment is one `wandb sync` process with a time limit (wandb retries a server that does not answer for
a long time); a failure is a `SyncError` whose message is one line: which segment, and wandb's first error
line or the time limit. `wandb sync` exits 0 even when the server refused the upload (it prints `wandb:
ERROR ...`), so such a line counts as a failure too: a segment is recorded as synced only when it was. What
was synced before is recorded, so a rerun continues. A segment that holds no record (its process was killed
before W&B's service wrote anything: the `.wandb` file is just its 7-byte header, and `wandb sync` would fail
on it with `ERROR Failed to read ...: EOF`) has nothing to upload: it is skipped with one note naming the file
and recorded as synced (and as `skipped_empty`), and the run's other segments are uploaded. Only the newest
segment of an unfinished run is not recorded, as W&B may still be writing it: a later sync looks again.
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
from asbatch.tracking.offline import is_empty_segment

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


def _note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr, flush=True)


def _empty_note(segment: Path, recorded: bool, nothing_else: bool) -> str:
    (path, *more) = sorted(segment.glob("*.wandb"))
    note = f"{segment if more else path} holds no W&B record: skipped, nothing to upload"
    if not recorded:
        return note + ("; it is the newest segment of an unfinished run, so W&B may still write it: a later "
                       "`asbatch sync` looks at it again")
    note += " (its process was killed before W&B wrote anything)"
    if nothing_else:  # W&B will have nothing of this run
        note += ("; no segment of this run holds any: running the run again logs it from its run dir (a finished "
                 "run is not trained again), then `asbatch sync` uploads that")
    return note


def sync_run(run_dir: str | Path | RunDir, timeout_s: float = DEFAULT_TIMEOUT_S,
             on_segment: Callable[[str, int, int], None] | None = None,
             on_note: Callable[[str], None] = _note) -> list[str]:
    """Upload the run's not yet synced offline segments, in order, into its one W&B id (`wandb sync --id`
    each); returns what was uploaded. Progress is recorded in the run's W&B state (`synced`), so it can be
    re-run safely. `on_segment(name, i, n)` is called before each upload (of n); each upload may take
    `timeout_s` seconds. A segment without records is not uploaded: `on_note` gets one line naming its file
    (default: `note: ...` on stderr), and it is recorded as synced unless it may still be written (the newest
    segment of an unfinished run)."""
    run_dir = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    state = run_dir.read_wandb_state()
    if state is None:
        return []
    synced = state.setdefault("synced", [])
    segments = offline_segments(run_dir)
    todo = [segment for segment in segments if segment.name not in synced]
    empty = [segment for segment in todo if is_empty_segment(segment)]
    uploads = [segment for segment in todo if segment not in empty]
    nothing_else = not uploads and set(synced) <= set(state.get("skipped_empty", []))
    done = []
    for segment in todo:
        if segment in empty:
            recorded = segment != segments[-1] or run_dir.is_finished()  # else it may be the live one
            on_note(_empty_note(segment, recorded, nothing_else and segment == empty[-1]))
            if recorded:
                synced.append(segment.name)
                state.setdefault("skipped_empty", []).append(segment.name)
                run_dir.write_wandb_state(state)
            continue
        if on_segment is not None:
            on_segment(segment.name, len(done) + 1, len(uploads))
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
