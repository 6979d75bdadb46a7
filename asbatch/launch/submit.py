"""Submitting a sweep (one submitit job array per stage, each run after its own upstream runs), cancel, retry.

    sweep = load_sweep("jobs/quickstart.yaml")
    manifest = submit(sweep, "runs")                # returns at once; nothing waits for jobs
    sweep_status("runs/quickstart").runs            # state, epoch, test accuracy per run
    cancel("runs/quickstart"); retry("runs/quickstart")

Planning (which runs, after what) is `asbatch.launch.plan`. A stage with `runs_per_task: K` packs K runs
into each array task (`PackTask`: one worker process per run).

Executors: `slurm` (sbatch through submitit), `local` (one background process that trains the runs stage
by stage, as many at once as the machine's cores allow; returns at once), `debug` (in this process, before
`submit` returns), `auto` (slurm where `sbatch` is on PATH, else local). A stage with a single array task is
a plain job (`<job>`, not `<array>_0`): submitit submits one task without `--array`.

Dependencies are per run, so one failed upstream run blocks only the runs that need it. Where task i of a
stage waits for task i of one upstream array (the same grid), the array is `aftercorr` that array.
Otherwise it is submitted `afterok` its whole upstream arrays (safe while it is refined), then each task's
dependency is set to the tasks of its own upstream runs (`scontrol update JobId=<array>_[i,j]
Dependency=afterok:<up>_<k>`, one call per distinct dependency). Slurm drops a dependency on an array task
that was cancelled before it ever started (it leaves no record); a run started that way finds its upstream
run unfinished and fails at once, saying so (`TrainTask`), and `asbatch retry` resubmits both.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import submitit

from asbatch.launch.admission import check_with_cluster, submit_limit_message
from asbatch.launch.errors import DamagedStateError, LaunchError
from asbatch.launch.manifest import IntentRecord, Manifest
from asbatch.launch.pack import local_jobs
from asbatch.launch.plan import (
    StageSubmission,
    aftercorr,
    array_dependency,
    plan_stages,
    run_dependencies,
    split_arrays,
    task_dependency,
)
from asbatch.launch.runlog import detached_output
from asbatch.launch.site import DEFAULT_MAX_ARRAY_SIZE, max_array_size
from asbatch.launch.slurm import ACTIVE, executor_of, executor_parameters, run, sbatch_flags, scancel
from asbatch.launch.status import RunStatus, run_statuses, sweep_status
from asbatch.launch.task import PackTask, SequentialTask, TrainTask
from asbatch.names import EXECUTORS, point_label
from asbatch.rundir import SweepDir
from asbatch.spec import SpecError, Sweep, SweepRun, SweepStage
from asbatch.spec.loading import CONTROL, is_utf8


def _upstream_dirs(run_: SweepRun, sweep_dir: SweepDir) -> list[str]:
    return [str(sweep_dir.run(up).path) for up in run_.upstream.values()]


def resolve_executor(kind: str) -> str:
    if kind not in EXECUTORS:
        raise LaunchError(f"unknown executor {kind!r} (one of {', '.join(EXECUTORS)})")
    if kind == "auto":
        return "slurm" if shutil.which("sbatch") else "local"
    if kind == "slurm" and not shutil.which("sbatch"):
        raise LaunchError("executor 'slurm': sbatch is not on PATH (use --executor local on a machine without Slurm)")
    return kind


def _set_task_dependencies(plan: StageSubmission) -> None:
    """Narrow each task's dependency from the whole upstream arrays to its own runs' upstream tasks."""
    groups: dict[str, list[str]] = {}
    for group, job_id in zip(plan.packs, plan.task_ids, strict=True):
        own = task_dependency(plan, group)
        if "_" in job_id and own != (plan.dependency or ""):
            groups.setdefault(own, []).append(job_id.split("_")[1])
    for dependency, tasks in groups.items():
        job = f"{plan.array_job_id}_[{','.join(tasks)}]"
        proc = run(["scontrol", "update", f"JobId={job}", f"Dependency={dependency}"])
        if proc.returncode != 0:
            raise LaunchError(f"stage {plan.name!r}: array {plan.array_job_id} was submitted after its whole upstream "
                              f"arrays, but narrowing tasks {job} to {dependency or 'no dependency'} failed: "
                              f"{(proc.stderr or proc.stdout).strip()}")


def _describe(plan: StageSubmission, sweep: Sweep, dependency: str | None) -> None:
    """Fill the plan's submitit parameters and sbatch flags (once: at submission, or for a dry run)."""
    plan.dependency = dependency
    plan.parameters = executor_parameters(sweep.name, plan.stage, sweep.env, dependency, plan.executor,
                                          len(plan.runs))
    if plan.executor == "slurm":
        plan.flags = sbatch_flags(plan.parameters, len(plan.packs), Path(plan.log_dir))


def submit(sweep: Sweep, runs_root: str | Path, executor: str = "auto", stages: Sequence[str] | None = None,
           dry_run: bool = False, spec_path: str | Path | None = None, only: set[str] | None = None,
           overrides: dict[str, Any] | None = None, jobs: int | None = None) -> Manifest:
    """Submit every run of `sweep` that has not finished and is not queued: one job array per stage, each
    after (`afterok`) the arrays of its upstream runs. Returns at once with the updated manifest; its
    `submitted` lists the arrays of this call. `dry_run` plans and returns without submitting or writing.
    `only` restricts the submission to these run ids (what `retry` uses). `overrides` (the spec paths the
    sweep was loaded with, `load_sweep(path, overrides=...)`) are recorded with each run, for `retry`.
    Unknown `stages` are a SpecError. `jobs`: the local executor's runs at once (default: fill the cores)."""
    kind = resolve_executor(executor)
    if jobs is not None and kind == "slurm":
        raise SpecError(f"--jobs {jobs} is for the local executor (runs at once on this machine); on Slurm pack "
                        "several runs into each array task with resources.runs_per_task")
    selected = sweep.select_stages(stages)
    sweep_dir = SweepDir.at(Path(runs_root).resolve(), sweep.name)
    _check_script_strings(sweep, sweep_dir)
    spec = str(Path(spec_path).resolve()) if spec_path else None
    if dry_run:
        manifest = Manifest.load_or_new(sweep_dir, sweep.name, spec)
        return _submit_locked(sweep, sweep_dir, kind, manifest, selected, only, dry_run=True, jobs=jobs,
                              max_tasks=_max_tasks(kind))
    # plan once before taking the lock (which creates the sweep dir): a plan that cannot be submitted (a run
    # whose upstream is neither finished nor queued) fails here, with nothing written
    # and ask the cluster whether it takes each stage's resources (sbatch --test-only)
    status = run_statuses(Manifest.load_or_new(sweep_dir, sweep.name, spec))[0]
    max_tasks = _max_tasks(kind)
    first = _planned(sweep, sweep_dir, kind, status, selected, only, max_tasks)
    _describe_all(first, sweep, kind)
    check_with_cluster(first)
    created = [p for p in (sweep_dir.path, sweep_dir.path.parent) if not p.exists()]  # innermost first
    _make_runs_root(sweep_dir.path.parent)
    try:
        with sweep_dir.lock():
            manifest = Manifest.load_or_new(sweep_dir, sweep.name, spec)
            manifest.settle()  # a killed submit's jobs: recorded now, or (Slurm silent) never queued twice
            manifest.overrides = dict(overrides or {})
            return _submit_locked(sweep, sweep_dir, kind, manifest, selected, only, dry_run=False, jobs=jobs,
                                  max_tasks=max_tasks)
    except LaunchError:
        _remove_if_unused(sweep_dir, created)
        raise


def _max_tasks(kind: str) -> int | None:
    """The most tasks one array may have on this cluster (its MaxArraySize; Slurm's default 1001 where
    `scontrol` does not say); None for the local and debug executors."""
    return max_array_size() or DEFAULT_MAX_ARRAY_SIZE if kind == "slurm" else None


def _planned(sweep: Sweep, sweep_dir: SweepDir, kind: str, status: dict[str, RunStatus],
             stages: Sequence[SweepStage], only: set[str] | None, max_tasks: int | None) -> list[StageSubmission]:
    """The plan, with each Slurm stage of more than `max_tasks` array tasks split into several arrays."""
    plans = plan_stages(sweep, sweep_dir, kind, status, stages, only)
    return split_arrays(plans, max_tasks) if max_tasks is not None else plans


def _describe_all(plans: list[StageSubmission], sweep: Sweep, kind: str) -> None:
    """Each plan's parameters and flags as the real submission would write them (placeholder job ids)."""
    job_of: dict[str, str] = {}
    for plan in plans:
        placeholders = {s: f"<{s} array>" for s in plan.upstream_stages}
        dependency = aftercorr(plan, job_of) or array_dependency(plan, placeholders) if kind == "slurm" else None
        _describe(plan, sweep, dependency)
        job_of.update(zip(plan.run_ids, plan.task_of([f"<{plan.label} array>_{i}" for i in range(len(plan.packs))]),
                          strict=True))


def _remove_if_unused(sweep_dir: SweepDir, created: list[Path]) -> None:
    """After a failed first submission: the lock file and the dirs this call created, where nothing else is
    in them (rmdir never removes content, so an earlier or concurrent submission's files stay)."""
    if sweep_dir.path in created and {p.name for p in sweep_dir.path.iterdir()} <= {sweep_dir.lock_file.name,
                                                                                  sweep_dir.log_dir.name}:
        with contextlib.suppress(OSError):
            sweep_dir.log_dir.rmdir()
            sweep_dir.lock_file.unlink()
    for path in created:
        with contextlib.suppress(OSError):
            path.rmdir()


def _check_script_strings(sweep: Sweep, sweep_dir: SweepDir) -> None:
    """sbatch reads `#SBATCH` lines one by one, so a newline in anything written into a job script (the log
    paths under the runs root, the job name, env values) would inject a flag; `%` in a path is a Slurm
    filename pattern. The spec checked its own strings; this is the door for the rest, before anything is written."""
    texts = {"runs root": str(sweep_dir.path), "sweep name": sweep.name,
             **{f"env {name}": value for name, value in sweep.env.items()}}
    for what, text in texts.items():
        if CONTROL.search(text) or (what == "runs root" and "%" in text) or not is_utf8(text):
            raise SpecError(f"{what}: control characters (or '%' in a path, or bytes that are not UTF-8) cannot go "
                            f"into a job script (got {text!r})")


def _make_runs_root(root: Path) -> None:
    """Create the runs root once the plan stands (a failure is a LaunchError naming it, not a traceback)."""
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise LaunchError(f"cannot create the runs root {str(root)!r}: {err.strerror or err}") from None


def _submit_locked(sweep: Sweep, sweep_dir: SweepDir, kind: str, manifest: Manifest, stages: list[SweepStage],
                   only: set[str] | None, dry_run: bool, jobs: int | None = None,
                   max_tasks: int | None = None) -> Manifest:
    status, _ = run_statuses(manifest)
    plans = _planned(sweep, sweep_dir, kind, status, stages, only, max_tasks)
    manifest.dry_run, manifest.submitted = dry_run, plans
    if dry_run:
        _describe_all(plans, sweep, kind)
        check_with_cluster(plans)
        return manifest
    if not any(p.runs for p in plans):
        return manifest
    if kind == "slurm":
        _submit_slurm(sweep, sweep_dir, manifest, plans, status)
    else:
        _submit_sequential(sweep, sweep_dir, kind, manifest, plans, jobs)
    return manifest


def _record(manifest: Manifest, plan: StageSubmission, intent: IntentRecord, job_ids: list[str], array_id: str) -> None:
    plan.array_job_id, plan.job_ids = array_id, job_ids
    manifest.add(*intent.fulfil(array_id, job_ids))


def _kill_point(n: int) -> None:
    """Tests: `ASBATCH_FAULT=sbatch:<n>` SIGKILLs the submit once its n-th sbatch answered, before its records."""
    if os.environ.get("ASBATCH_FAULT") == f"sbatch:{n}":
        os.kill(os.getpid(), signal.SIGKILL)


def _submit_slurm(sweep: Sweep, sweep_dir: SweepDir, manifest: Manifest, plans: list[StageSubmission],
                  status: dict[str, RunStatus]) -> None:
    arrays: dict[str, str] = {}  # stage -> its array id(s), ':'-joined where it was split
    job_of: dict[str, str] = {}  # run id -> job id, for the runs submitted in this call
    sbatches = 0
    stale = [job for plan in plans for job in plan.stale_jobs]
    if stale:  # tasks that wait on a failed upstream array forever; their runs are submitted again below
        run(["scancel", *stale])
    before = _pending_files(sweep_dir)
    try:
        for plan in plans:
            if not plan.runs:
                continue
            run_dependencies(plan, job_of, status)
            single = len(plan.packs) == 1  # a plain job: its own dependency goes straight into the script
            own = task_dependency(plan, plan.runs) or None
            corresponding = aftercorr(plan, job_of)
            _describe(plan, sweep, own if single else corresponding or array_dependency(plan, arrays))
            manifest.intents.append(intent := manifest.intend(plan))
            manifest.save()  # before sbatch: the jobs of a submit killed after it are still found
            ex = executor_of(sweep_dir.job_folder, plan.parameters)
            # sbatch runs when the batch closes; its error goes into the LaunchError, not a second line on stderr
            with contextlib.redirect_stderr(io.StringIO()), ex.batch():
                jobs = [ex.submit(task) for task in _callables(plan, sweep_dir)]
            plan.task_ids = [job.job_id for job in jobs]
            job_ids = plan.task_of(plan.task_ids)
            sbatches += 1
            _kill_point(sbatches)
            array_id = job_ids[0].split("_")[0]
            arrays[plan.name] = f"{arrays[plan.name]}:{array_id}" if plan.name in arrays else array_id
            job_of.update(zip(plan.run_ids, job_ids, strict=True))
            manifest.intents.remove(intent)
            _record(manifest, plan, intent, job_ids, array_id)
            manifest.save()  # after each array: a failure later still leaves a true manifest
            if not corresponding:
                _set_task_dependencies(plan)
    except (subprocess.CalledProcessError, submitit.core.utils.FailedJobError, OSError) as err:
        for path in _pending_files(sweep_dir) - before:  # the failed array's pickles and script
            path.unlink(missing_ok=True)
        manifest.intents.clear()  # sbatch failed: nothing of it was queued
        if manifest.arrays:
            manifest.save()
        else:  # a first submission that failed leaves no manifest
            manifest.path.unlink(missing_ok=True)
        detail = getattr(err, "stderr", None) or getattr(err, "output", None) or err
        if isinstance(detail, bytes):
            detail = detail.decode(errors="replace")
        done = ", ".join(f"{s}: {a}" for s, a in arrays.items()) or "nothing"
        said = submit_limit_message(plan, str(detail)) or f"sbatch failed for stage {plan.label!r}: {detail!s}".strip()
        raise LaunchError(f"{said} (submitted before the failure: {done})") from err


def _callables(plan: StageSubmission, sweep_dir: SweepDir) -> list[TrainTask | PackTask]:
    """One TrainTask per run, or one PackTask per `runs_per_task` runs."""
    def one(r: SweepRun) -> TrainTask:
        return TrainTask(r.config.to_dict(), sweep_dir.run(r.run_id).path, upstream=_upstream_dirs(r, sweep_dir),
                         label=point_label(r.point))

    if plan.runs_per_task == 1:
        return [one(r) for r in plan.runs]
    res = plan.stage.resources
    return [PackTask([one(r) for r in group], gpus=res.gpus_per_node, mps=res.mps) for group in plan.packs]


def _pending_files(sweep_dir: SweepDir) -> set[Path]:
    """What submitit writes next to the job dirs before sbatch answers (moved into the job's dir after)."""
    if not sweep_dir.log_dir.is_dir():
        return set()
    return {p for p in sweep_dir.log_dir.iterdir()
            if p.is_file() and not p.is_symlink() and (p.suffix == ".pkl" or p.name.startswith(".submission_file_"))}


def _submit_sequential(sweep: Sweep, sweep_dir: SweepDir, kind: str, manifest: Manifest,
                       plans: list[StageSubmission], jobs: int | None = None) -> None:
    """local / debug: one job that trains every planned run in stage order."""
    items = []
    for plan in plans:
        for run_ in plan.runs:
            task = TrainTask(run_.config.to_dict(), sweep_dir.run(run_.run_id).path, env=sweep.env,
                             label=point_label(run_.point))
            items.append((task, _upstream_dirs(run_, sweep_dir)))
    for plan in plans:
        _describe(plan, sweep, None)
    timeout = sum(p.stage.resources.timeout_min * len(p.runs) for p in plans)
    ex = submitit.AutoExecutor(folder=sweep_dir.job_folder_of(kind), cluster=kind)
    first = next(p for p in plans if p.runs)
    ex.update_parameters(name=f"{sweep.name}:{first.name}", timeout_min=timeout)
    jobs, threads = local_jobs(sweep.env, len(items), jobs) if kind == "local" else (1, None)
    with detached_output() if kind == "local" else contextlib.nullcontext():
        job = ex.submit(SequentialTask(items, jobs=jobs, threads=threads))
    for plan in plans:
        if plan.runs:
            _record(manifest, plan, manifest.intend(plan), [str(job.job_id)] * len(plan.runs), str(job.job_id))
    manifest.save()
    if kind == "debug":
        with contextlib.suppress(Exception):  # failures are visible in the run states and the job's log
            job.result()


def cancel(sweep_dir: str | Path | SweepDir) -> list[str]:
    """Cancel the sweep's queued and running jobs (`scancel` of the arrays that still have active tasks;
    SIGTERM to a local executor's process). Returns the job ids cancelled."""
    sweep_dir = sweep_dir if isinstance(sweep_dir, SweepDir) else SweepDir(sweep_dir)
    Manifest.load(sweep_dir)  # a sweep that was never submitted: say so (and create nothing)
    with sweep_dir.lock():
        status = sweep_status(sweep_dir)
        active = [r for r in status.runs if r.state in ACTIVE]
        slurm_ids = sorted({r.job_id.split("_")[0] for r in active if r.executor == "slurm"}, key=int)
        if slurm_ids:
            scancel(slurm_ids)
        pids = sorted({r.job_id for r in active if r.executor == "local"})
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGTERM)
        return [*slurm_ids, *pids]


def _load_for_retry(manifest: Manifest, overrides: dict[str, Any], run_ids: set[str]) -> Sweep:
    """The sweep's spec with the overrides the manifest recorded for `run_ids`. Overrides that the spec alone
    does not explain (it loads without them) came from a hand-edited manifest: bad input naming it."""
    from asbatch.spec import load_sweep
    from asbatch.spec.errors import show

    try:
        return load_sweep(manifest.spec, overrides=overrides)
    except (SpecError, OSError) as err:
        error = err
    try:
        spec_loads = bool(overrides) and isinstance(error, SpecError) and load_sweep(manifest.spec) is not None
    except (SpecError, OSError):
        spec_loads = False
    if spec_loads:
        raise DamagedStateError(f"{manifest.path}: the overrides {show(overrides)} recorded for "
                                f"{', '.join(sorted(run_ids))} do not apply to {manifest.spec}: {error}")
    raise LaunchError(f"retry needs the sweep's spec {manifest.spec}: {error}")


def retry(sweep_dir: str | Path | SweepDir, executor: str | None = None) -> Manifest:
    """Submit again the runs that failed, were cancelled, timed out, lost their node or ran out of memory
    (and did not finish), plus runs whose tasks wait on a failed upstream forever. One array per stage
    again, after the still-running upstream tasks. The configs and resources come from the spec the sweep
    was submitted from."""
    sweep_dir = sweep_dir if isinstance(sweep_dir, SweepDir) else SweepDir(sweep_dir)
    manifest = Manifest.load(sweep_dir)
    status = sweep_status(sweep_dir)
    todo = {r.run_id for r in status.runs if r.retryable and r.job_id}  # submitted runs (not `asbatch run`'s)
    if not manifest.spec:
        raise LaunchError(f"{manifest.path} does not name the spec it came from; run `asbatch submit SPEC`")
    kind = executor or (manifest.arrays[-1].executor if manifest.arrays else "auto")
    if not todo:
        manifest.submitted = []
        return manifest
    groups: dict[str, tuple[dict[str, Any], set[str]]] = {}  # each run again with its own overrides
    for run_id, record in manifest.latest().items():
        if run_id in todo:
            groups.setdefault(repr(sorted(record.overrides.items())), (record.overrides, set()))[1].add(run_id)
    submitted: list[StageSubmission] = []
    for overrides, run_ids in groups.values():
        sweep = _load_for_retry(manifest, overrides, run_ids)
        if sweep.name != manifest.sweep:
            raise LaunchError(f"{manifest.spec} is now sweep {sweep.name!r}, not {manifest.sweep!r}")
        gone = run_ids - {r.run_id for r in sweep.runs}
        if gone:
            raise LaunchError(f"runs {', '.join(sorted(gone))} are no longer in {manifest.spec} (edited since "
                              "submission?); submit the spec instead")
        manifest = submit(sweep, sweep_dir.runs_root, executor=kind, spec_path=manifest.spec, only=run_ids,
                          overrides=overrides)
        submitted += manifest.submitted
    manifest.submitted = submitted
    return manifest
