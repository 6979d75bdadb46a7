"""Atomic, multi-rank checkpoints in `<run_dir>/checkpoints/step-<global step>/`.

Layout of one checkpoint: `shared.pt` (model, optimizer, scheduler, scaler, progress; written by rank 0),
`rank<r>.pt` (what only rank r has: its RNG states), and `COMPLETE` (written last, with the SHA-256 of every
other file). Everything is written into a hidden temp dir, fsynced, and the dir renamed into place, so a
kill at any moment leaves either a whole checkpoint or none under a `step-*` name. Loading walks from the
newest and skips (with a warning naming it) any checkpoint that is partial, unreadable or whose bytes
changed since they were written (a bit flip, a truncated or replaced copy); every rank checks every file,
so all ranks pick the same one. Files are loaded with `weights_only=True`: a pickle planted in a run dir
runs nothing. A run whose checkpoints are all damaged does not start over on its own
(`NoValidCheckpointError`): its progress would be lost silently.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from asbatch.fsutil import atomic_write_bytes, atomic_write_json, fsync_dir
from asbatch.train.faults import kill_point

PREFIX = "step-"
COMPLETE = "COMPLETE"


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (a full disk or quota); the previous one is kept."""


class NoValidCheckpointError(RuntimeError):
    """The run has checkpoints, and every one is damaged: it does not start over on its own."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save(
    ckpt_root: Path,
    step: int,
    shared: dict[str, Any] | None,
    rank_state: dict[str, Any],
    rank: int,
    world_size: int,
    barrier: Callable[[], None],
    keep: int,
) -> Path:
    """Collective: every rank calls it. Rank 0 passes `shared`; each rank its own `rank_state`."""
    final = ckpt_root / f"{PREFIX}{step:09d}"
    tmp = ckpt_root / f".tmp-{PREFIX}{step:09d}"
    if final.exists():  # already saved at this step (e.g. periodic and epoch-end coincide)
        return final
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a save that was killed
        tmp.mkdir(parents=True)
    barrier()
    try:
        atomic_write_bytes(tmp / f"rank{rank}.pt", lambda f: torch.save(rank_state, f))
        if rank == 0:
            atomic_write_bytes(tmp / "shared.pt", lambda f: torch.save(shared, f))
    except OSError as err:  # a full disk or quota: free what this save took, so the error can be recorded
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointWriteError(f"checkpoint at step {step} not written ({err}); the previous checkpoint is "
                                   "kept: free space and run the same command to resume") from err
    kill_point("checkpoint", step)
    barrier()
    if rank == 0:
        checksums = {f.name: _sha256(f) for f in sorted(tmp.glob("*.pt"))}
        atomic_write_json(tmp / COMPLETE, {"step": step, "world_size": world_size, "sha256": checksums})
        tmp.replace(final)
        fsync_dir(ckpt_root)
        _prune(ckpt_root, keep)
    barrier()
    return final


def _prune(ckpt_root: Path, keep: int) -> None:
    for old in sorted(ckpt_root.glob(f"{PREFIX}*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def latest_step(ckpt_root: Path) -> int | None:
    """The global step of the newest complete checkpoint, or None."""
    done = [c for c in sorted(ckpt_root.glob(f"{PREFIX}*")) if (c / COMPLETE).is_file()]
    return int(done[-1].name.removeprefix(PREFIX)) if done else None


def _verify(ckpt: Path) -> None:
    """Raise ValueError if the checkpoint is partial or a file's bytes changed since it was written. Every file
    of the record is checked (every rank's), so every rank comes to the same verdict. Checkpoints written
    before checksums were recorded are taken as they are."""
    marker = ckpt / COMPLETE
    if not marker.is_file():
        raise ValueError("no COMPLETE marker")
    try:
        record = json.loads(marker.read_text())
        checksums = record.get("sha256", {})
    except (ValueError, UnicodeDecodeError, AttributeError) as err:
        raise ValueError(f"{COMPLETE} is damaged ({err})") from None
    for name, expected in checksums.items():
        path = ckpt / name
        if not path.is_file():
            raise ValueError(f"{name} is missing")
        if _sha256(path) != expected:
            raise ValueError(f"{name}: its bytes changed since it was written (SHA-256 differs)")


def load_latest(ckpt_root: Path, rank: int) -> tuple[Path, dict[str, Any], dict[str, Any] | None] | None:
    """(its dir, shared, rank_state) of the newest valid checkpoint, or None when there is none at all.
    rank_state is None when the checkpoint was written by fewer ranks (resuming on a different world size:
    that rank re-seeds). Damaged ones are skipped with a warning; if all are: NoValidCheckpointError."""
    damaged = []
    for ckpt in sorted(ckpt_root.glob(f"{PREFIX}*"), reverse=True):
        try:
            _verify(ckpt)
            shared = torch.load(ckpt / "shared.pt", map_location="cpu", weights_only=True)
            rank_file = ckpt / f"rank{rank}.pt"
            rank_state = torch.load(rank_file, map_location="cpu", weights_only=True) if rank_file.exists() else None
            return ckpt, shared, rank_state
        except Exception as err:  # noqa: BLE001 - corrupt or partial (torch.load raises anything): older one
            reason = " ".join(str(err).split())[:300]
            warnings.warn(f"skipping checkpoint {ckpt}: {reason}", stacklevel=2)
            damaged.append(f"{ckpt.name} ({reason[:120]})")
    if damaged:
        raise NoValidCheckpointError(
            f"{ckpt_root}: no valid checkpoint, every one is damaged: {'; '.join(damaged)}. The run had progress, "
            f"so it does not start over on its own: move {ckpt_root} away to train it afresh")
    return None
