"""Atomic, multi-rank checkpoints in `<run_dir>/checkpoints/step-<global step>/`.

Layout of one checkpoint: `shared.pt` (model, optimizer, scheduler, scaler, progress; written by rank 0),
`rank<r>.pt` (what only rank r has: its RNG states), and `COMPLETE` (written last). Everything is written
into a hidden temp dir, fsynced, and the dir renamed into place, so a kill at any moment leaves either a
whole checkpoint or none under a `step-*` name. Loading walks from the newest and skips (with a warning)
any checkpoint that is partial or unreadable.
"""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from asbatch.fsutil import atomic_write_bytes, atomic_write_json, fsync_dir
from asbatch.train.faults import kill_point

PREFIX = "step-"


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
    atomic_write_bytes(tmp / f"rank{rank}.pt", lambda f: torch.save(rank_state, f))
    if rank == 0:
        atomic_write_bytes(tmp / "shared.pt", lambda f: torch.save(shared, f))
    kill_point("checkpoint", step)
    barrier()
    if rank == 0:
        atomic_write_json(tmp / "COMPLETE", {"step": step, "world_size": world_size})
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
    done = [c for c in sorted(ckpt_root.glob(f"{PREFIX}*")) if (c / "COMPLETE").is_file()]
    return int(done[-1].name.removeprefix(PREFIX)) if done else None


def load_latest(ckpt_root: Path, rank: int) -> tuple[Path, dict[str, Any], dict[str, Any] | None] | None:
    """(its dir, shared, rank_state) of the newest valid checkpoint, or None. rank_state is None when the
    checkpoint was written by fewer ranks (resuming on a different world size: that rank re-seeds)."""
    for ckpt in sorted(ckpt_root.glob(f"{PREFIX}*"), reverse=True):
        try:
            if not (ckpt / "COMPLETE").is_file():
                raise ValueError("no COMPLETE marker")
            shared = torch.load(ckpt / "shared.pt", map_location="cpu", weights_only=False)
            rank_file = ckpt / f"rank{rank}.pt"
            rank_state = torch.load(rank_file, map_location="cpu", weights_only=False) if rank_file.exists() else None
            return ckpt, shared, rank_state
        except Exception as err:  # noqa: BLE001 - corrupt or partial (torch.load raises anything): older one
            warnings.warn(f"skipping checkpoint {ckpt}: {err}", stacklevel=2)
    return None
