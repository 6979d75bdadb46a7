"""Weights & Biases tracking: the W&B run of a training run, syncing offline runs, and the key scheme."""

from asbatch.tracking.keys import EVAL_PREFIX, flatten_evaluation, unflatten_evaluation
from asbatch.tracking.sync import sync_run
from asbatch.tracking.wandb_run import (
    Tracker,
    can_reach,
    close_wandb_quietly,
    complete_tracking,
    has_api_key,
    persisted_steps,
    resolve_mode,
)

__all__ = ["EVAL_PREFIX", "Tracker", "can_reach", "close_wandb_quietly", "complete_tracking", "flatten_evaluation",
           "has_api_key", "persisted_steps", "resolve_mode", "sync_run", "unflatten_evaluation"]
