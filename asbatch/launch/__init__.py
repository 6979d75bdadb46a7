"""Launching a sweep on Slurm (or locally), split by where the code runs.

- `submit`: on the login node: plan, submit (one submitit array per stage, `afterok` between them),
  cancel, retry;
- `slurm`: sbatch parameters and flags, squeue / sacct queries and their parsing;
- `manifest`: the sweep's typed record of what was submitted;
- `status`: each run's state from its run dir, Slurm or its process;
- `task`: on the compute node: the submitted callables, signals, distributed env, requeue.
"""

from asbatch.launch.errors import DamagedStateError, LaunchError, UnmetUpstreamError
from asbatch.launch.manifest import ArrayRecord, Manifest, SubmissionRecord
from asbatch.launch.plan import StageSubmission
from asbatch.launch.status import RunStatus, SweepStatus, sweep_status, wait_for_sweep
from asbatch.launch.submit import cancel, resolve_executor, retry, submit
from asbatch.launch.task import MAX_REQUEUES, SequentialTask, TrainTask, export_distributed_env

__all__ = [
           "MAX_REQUEUES",
           "ArrayRecord",
           "DamagedStateError",
           "LaunchError",
           "Manifest",
           "RunStatus",
           "SequentialTask",
           "StageSubmission",
           "SubmissionRecord",
           "SweepStatus",
           "TrainTask",
           "UnmetUpstreamError",
           "cancel",
           "export_distributed_env",
           "resolve_executor",
           "retry",
           "submit",
           "sweep_status",
           "wait_for_sweep",
]
