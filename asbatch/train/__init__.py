"""Training one run: `train(config, run_dir) -> results` with Accelerate, checkpoints and exact resume.

- `run`: `train`, the loop over epochs, metrics and tracking;
- `trainer`: what a run holds while it trains (model, optimizer, data, generators, progress), one step;
- `setup`: the Accelerator, precision, model init, optimizer and schedule, RNG state;
- `checkpoint`: atomic multi-rank checkpoints.
"""

from asbatch.train.checkpoint import NoValidCheckpointError
from asbatch.train.run import train
from asbatch.train.setup import lr_factor
from asbatch.train.trainer import NonFiniteLossError, Progress, TrainingInterrupted

__all__ = ["NoValidCheckpointError", "NonFiniteLossError", "Progress", "TrainingInterrupted", "lr_factor", "train"]
