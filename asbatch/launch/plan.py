"""Planning a submission: which runs of each stage go to Slurm now, after what, and why others are skipped.

Pure: it reads the sweep, the run dirs and the runs' states, and writes nothing. `asbatch.launch.submit`
turns each `StageSubmission` into an array (one task per run, or per `runs_per_task` packed runs).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from asbatch.launch.errors import LaunchError, UnmetUpstreamError
from asbatch.launch.pack import packs
from asbatch.launch.status import RunStatus
from asbatch.rundir import SweepDir
from asbatch.spec import Sweep, SweepRun, SweepStage


@dataclass
class StageSubmission:
    """One stage's share of a submit call: what it submits (or, in a dry run, would), after what, and why
    other runs of the stage are skipped. `parameters` (submitit's) are built once, when it is submitted."""

    stage: SweepStage
    executor: str
    runs: list[SweepRun]
    log_dir: str
    skipped: dict[str, str] = field(default_factory=dict)  # run id -> why it was not submitted
    upstream_jobs: set[str] = field(default_factory=set)   # still-queued upstream tasks of older arrays
    upstream_stages: set[str] = field(default_factory=set)  # upstream stages submitted in this call
    waits_for: dict[str, list[str]] = field(default_factory=dict)  # run id -> its unfinished upstream run ids
    run_dependencies: dict[str, str] = field(default_factory=dict)  # run id -> its own `afterok:...` ('' none)
    stale_jobs: list[str] = field(default_factory=list)     # old tasks of these runs that can never start
    parameters: dict[str, Any] = field(default_factory=dict)
    flags: list[str] = field(default_factory=list)
    dependency: str | None = None
    array_job_id: str | None = None
    job_ids: list[str] = field(default_factory=list)  # each run's job (packed runs share one)
    task_ids: list[str] = field(default_factory=list)  # each array task's job
    part: tuple[int, int] | None = None  # (i, n): the i-th of the n arrays a stage larger than MaxArraySize became

    @property
    def name(self) -> str:
        return self.stage.name

    @property
    def label(self) -> str:
        """The stage's name, and which of its arrays this is where it was split."""
        return self.name if self.part is None else f"{self.name} (array {self.part[0] + 1} of {self.part[1]})"

    @property
    def run_ids(self) -> list[str]:
        return [r.run_id for r in self.runs]

    @property
    def runs_per_task(self) -> int:
        """Runs packed into each array task (Slurm only; the local executor fills the machine its own way)."""
        return self.stage.resources.runs_per_task if self.executor == "slurm" else 1

    @property
    def packs(self) -> list[list[SweepRun]]:
        """The runs of each array task, in task order."""
        return packs(self.runs, self.runs_per_task)

    def task_of(self, job_ids: list[str]) -> list[str]:
        """Each run's job id, from the ids of the array's tasks."""
        return [job_ids[i // self.runs_per_task] for i in range(len(self.runs))]


def plan_stages(sweep: Sweep, sweep_dir: SweepDir, kind: str, status: dict[str, RunStatus],
                stages: Sequence[SweepStage], only: set[str] | None) -> list[StageSubmission]:
    """Each stage's runs to submit now (not finished, not queued), what they wait for, and why the others
    are skipped; an upstream run neither finished nor queued nor submitted now is an error."""
    finished = {run.run_id for run in sweep.runs if sweep_dir.run(run.run_id).is_finished()}
    plans: list[StageSubmission] = []
    submitted_now: dict[str, set[str]] = {}
    for stage in stages:
        plan = StageSubmission(stage, kind, [], str(sweep_dir.log_dir))
        for run_ in stage.runs:
            if only is not None and run_.run_id not in only:
                continue
            st = status.get(run_.run_id)
            if run_.run_id in finished:
                plan.skipped[run_.run_id] = f"finished ({sweep_dir.run(run_.run_id).results_file.name})"
                continue
            if st is not None and st.active:
                plan.skipped[run_.run_id] = f"already queued as {st.job_id} ({st.state})"
                continue
            for up_stage, up_id in run_.upstream.items():
                _add_upstream(plan, kind, stage, run_, up_stage, up_id, finished, submitted_now, status)
            if st is not None and st.blocked:
                plan.stale_jobs.append(st.job_id)
            plan.runs.append(run_)
        submitted_now[stage.name] = set(plan.run_ids)
        plans.append(plan)
    return plans


def _add_upstream(plan: StageSubmission, kind: str, stage: SweepStage, run_: SweepRun, up_stage: str, up_id: str,
                  finished: set[str], submitted_now: dict[str, set[str]], status: dict[str, RunStatus]) -> None:
    """Record what `run_` must wait for in stage `up_stage`; an upstream run that is neither finished nor
    queued nor submitted now is an error."""
    up = status.get(up_id)
    if up_id in finished:
        return
    plan.waits_for.setdefault(run_.run_id, []).append(up_id)
    if up_id in submitted_now.get(up_stage, set()):
        plan.upstream_stages.add(up_stage)
    elif up is not None and up.active and up.executor == "slurm" and kind == "slurm":
        plan.upstream_jobs.add(up.job_id)
    elif up is not None and up.active:
        raise LaunchError(f"stage {stage.name}: upstream run {up_id} ({up_stage}) is still running "
                          f"under the {up.executor} executor; wait for it, then submit again")
    else:
        raise UnmetUpstreamError(f"stage {stage.name}: run {run_.run_id} needs run {up_id} of stage "
                                 f"{up_stage!r}, which has not finished and is not queued; submit stage "
                                 f"{up_stage!r} too")


def job_order(job: str) -> list[int]:
    return [int(x) for x in job.split("_")]


def array_dependency(plan: StageSubmission, arrays: dict[str, str]) -> str | None:
    """The array's dependency at sbatch time: the whole upstream arrays (refined per task after it)."""
    ids = [arrays[s] for s in plan.stage.after if s in plan.upstream_stages and s in arrays]
    ids += sorted(plan.upstream_jobs, key=job_order)
    return f"afterok:{':'.join(ids)}" if ids else None


def run_dependencies(plan: StageSubmission, job_of: dict[str, str], status: dict[str, RunStatus]) -> None:
    """Each run's own dependency: `afterok` the tasks of its unfinished upstream runs ('' when none)."""
    for run_ in plan.runs:
        jobs = {job_of.get(up) or status[up].job_id for up in plan.waits_for.get(run_.run_id, [])}
        plan.run_dependencies[run_.run_id] = f"afterok:{':'.join(sorted(jobs, key=job_order))}" if jobs else ""


def task_dependency(plan: StageSubmission, runs: list[SweepRun]) -> str:
    """The dependency of the task that trains `runs`: `afterok` every upstream task of every one of them."""
    jobs = {job for r in runs for job in plan.run_dependencies[r.run_id].removeprefix("afterok:").split(":") if job}
    return f"afterok:{':'.join(sorted(jobs, key=job_order))}" if jobs else ""


def aftercorr(plan: StageSubmission, job_of: dict[str, str]) -> str | None:
    """`aftercorr:<array>` when task i of the stage waits for exactly task i of one array submitted now (every
    run of the task waits for one upstream run, and all of them are in that one task)."""
    groups = plan.packs
    if plan.upstream_jobs or len(groups) < 2:
        return None
    tasks = []
    for group in groups:
        waits = [plan.waits_for.get(r.run_id, []) for r in group]
        ups = {job_of.get(w[0]) for w in waits if len(w) == 1}
        if any(len(w) != 1 for w in waits) or len(ups) != 1 or None in ups:
            return None
        tasks.append(ups.pop())
    arrays = {t.split("_")[0] for t in tasks}
    aligned = all(t == f"{next(iter(arrays))}_{i}" for i, t in enumerate(tasks))
    return f"aftercorr:{arrays.pop()}" if len(arrays) == 1 and aligned else None


def split_arrays(plans: list[StageSubmission], max_tasks: int) -> list[StageSubmission]:
    """A stage with more array tasks than the cluster's MaxArraySize becomes several arrays of at most
    `max_tasks` tasks each (task ids start at 0 in each); the runs keep their order, status, cancel and retry
    see each run's own job, and a downstream stage split the same way still waits task for task."""
    out: list[StageSubmission] = []
    for plan in plans:
        per_array = max(1, max_tasks) * plan.runs_per_task
        chunks = [plan.runs[i:i + per_array] for i in range(0, len(plan.runs), per_array)]
        if len(chunks) <= 1:
            out.append(plan)
            continue
        out += [replace(plan, runs=chunk, part=(i, len(chunks)), skipped=plan.skipped if i == 0 else {},
                        stale_jobs=plan.stale_jobs if i == 0 else [], run_dependencies={}, job_ids=[], task_ids=[])
                for i, chunk in enumerate(chunks)]
    return out


def packing_lines(stage: SweepStage, runs: Sequence[SweepRun] | None = None) -> list[str]:
    """For people (`show`, `submit --dry-run`): which runs share which array task, and each one's CPUs and
    GPU share. Nothing when the stage does not pack (`runs_per_task` 1)."""
    res = stage.resources
    k = res.runs_per_task
    runs = list(stage.runs if runs is None else runs)
    if k == 1 or not runs:
        return []
    cpus = f"{res.cpus_per_task} CPUs split {k} ways" if res.cpus_per_task >= k else \
        f"{k} runs sharing {res.cpus_per_task} CPU{'s' if res.cpus_per_task != 1 else ''}"
    gpu = {0: "no GPU", 1: f"one GPU shared by {k}" + (" (MPS)" if res.mps else "")}.get(res.gpus_per_node,
                                                                                       f"{k} GPUs, one each")
    groups = packs(runs, k)
    lines = [f"stage {stage.name}: {len(runs)} runs packed {k} per task -> {len(groups)} array tasks "
             f"({cpus}; {gpu}; they share the task's time limit of {res.timeout_min} min)"]
    lines += [f"  task {i}: {', '.join(r.run_id for r in group)}" for i, group in enumerate(groups)]
    return lines
