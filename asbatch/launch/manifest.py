"""The sweep's manifest: typed records of every submitted run and array.

`submissions` holds one `SubmissionRecord` per submitted run (the newest per run id counts); `arrays` one
`ArrayRecord` per submitted array. status, logs, cancel and retry read it (with Slurm and the run dirs),
never the memory of the process that submitted. It is written atomically under the sweep's lock.

Before each sbatch the submit saves an `IntentRecord` (the array's job name, its runs, the time), and replaces
it with the array's records once sbatch answered. A submit killed in between leaves the intent: every load
resolves it by asking Slurm for the job of that name whose batch script lies in the sweep's `.slurm` dir
(`find_jobs`): found, it becomes the array's records (so status, cancel and a second submit see its runs
queued); unknown to Slurm, sbatch never ran and it is dropped. A submit saves what a load resolved.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from asbatch.fsutil import atomic_write_json
from asbatch.launch.errors import DamagedStateError, LaunchError
from asbatch.launch.slurm import find_jobs
from asbatch.names import RUN_ID
from asbatch.rundir import RunDirError, SweepDir, read_json

if TYPE_CHECKING:
    from asbatch.launch.plan import StageSubmission

JOB_ID = r"^(\d+(_\d+)?|DEBUG_\d+)$"  # a Slurm job / array task, a local executor's pid, a debug job
DEPENDENCY = r"^(afterok|aftercorr)(:\d+(_\d+)?)+$"  # what asbatch writes into --dependency
_JOB_ID_OF = {"slurm": re.compile(r"\d{1,18}(_\d{1,9})?"), "local": re.compile(r"\d{1,9}"),
              "debug": re.compile(r"DEBUG_\d+")}  # what each executor's job ids look like


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _job_ids_match_executor(executor: str, *job_ids: str) -> None:
    pattern = _JOB_ID_OF[executor]
    for job_id in job_ids:
        if not pattern.fullmatch(job_id):
            raise ValueError(f"job id {job_id!r} is not a {executor} job id")


class PlannedRun(_Record):
    """One run as it is submitted, before sbatch gave it a job (an `IntentRecord`'s runs)."""

    run_id: str = Field(pattern=RUN_ID.pattern)
    stage: str
    executor: Literal["slurm", "local", "debug"]
    config: dict[str, Any]
    upstream: dict[str, str] = Field(default_factory=dict)  # stage -> run id this run runs after
    run_dir: str
    wandb_id: str
    submitted_at: str
    # this task's own `afterok:` on its upstream runs' tasks ('' none; None: not recorded, older manifests)
    dependency: str | None = Field(None, pattern=rf"{DEPENDENCY}|^$")
    overrides: dict[str, Any] = Field(default_factory=dict)  # command-line overrides as spec paths (retry reapplies)


class SubmissionRecord(PlannedRun):
    """One run as submitted: which job trains it, from which config, into which run dir."""

    job_id: str = Field(pattern=JOB_ID)        # `<array>_<task>`, a plain job id, or a local pid
    array_job_id: str = Field(pattern=JOB_ID)

    @model_validator(mode="after")
    def _consistent(self) -> SubmissionRecord:
        _job_ids_match_executor(self.executor, self.job_id, self.array_job_id)
        if not isinstance((self.config.get("schedule") or {}).get("epochs"), int):
            raise ValueError("config.schedule.epochs is missing")
        return self


class ArrayRecord(_Record):
    """One submitted job array (a stage, or the local executor's one job)."""

    stage: str
    executor: Literal["slurm", "local", "debug"]
    array_job_id: str = Field(pattern=JOB_ID)
    dependency: str | None = Field(None, pattern=DEPENDENCY)
    run_ids: list[str]
    submitted_at: str
    log_dir: str

    @model_validator(mode="after")
    def _consistent(self) -> ArrayRecord:
        _job_ids_match_executor(self.executor, self.array_job_id)
        return self


class IntentRecord(_Record):
    """An array about to be sbatch'd (saved before sbatch, replaced by its `ArrayRecord` after): the job name
    and script dir it is found by in Slurm, and `since`, just before sbatch."""

    stage: str
    executor: Literal["slurm", "local", "debug"] = "slurm"
    job_name: str
    log_dir: str
    dependency: str | None = Field(None, pattern=DEPENDENCY)  # the array's own, at sbatch
    since: str
    runs: list[PlannedRun]
    runs_per_task: int = Field(1, ge=1)  # packed runs share a task

    def fulfil(self, array_id: str, job_ids: list[str], narrowed: bool = True) -> tuple[ArrayRecord,
                                                                                      list[SubmissionRecord]]:
        """The array's records once sbatch gave its jobs. `narrowed=False`: each task still waits for the
        whole upstream arrays (a kill came before their narrowing), so no run records a dependency of its own."""
        array = ArrayRecord(stage=self.stage, executor=self.executor, array_job_id=array_id, dependency=self.dependency,
                            run_ids=[r.run_id for r in self.runs], submitted_at=self.since, log_dir=self.log_dir)
        keep = narrowed or len(self.runs) <= self.runs_per_task or not (self.dependency or "").startswith("afterok")
        return array, [SubmissionRecord(**{**r.model_dump(), "dependency": r.dependency if keep else None},
                                        job_id=job, array_job_id=array_id) for r, job in zip(self.runs, job_ids,
                                                                                             strict=True)]


def _resolve(intent: IntentRecord, known: set[str]) -> tuple[ArrayRecord, list[SubmissionRecord]] | bool | None:
    """An intent's array found in Slurm (its records), False where Slurm knows no such job (sbatch never ran),
    None where Slurm does not answer."""
    since = (datetime.fromisoformat(intent.since) - timedelta(minutes=1)).astimezone()  # Slurm's clock, local time
    found = find_jobs(intent.job_name, Path(intent.log_dir), since.strftime("%Y-%m-%dT%H:%M:%S"))
    if found is None:
        return None
    arrays = sorted(set(found) - known, key=int)
    if not arrays:
        return False
    k = intent.runs_per_task
    single = len(intent.runs) <= k
    return intent.fulfil(arrays[0], [arrays[0] if single else f"{arrays[0]}_{i // k}" for i in range(len(intent.runs))],
                         narrowed=False)


class _ManifestFile(_Record):
    sweep: str
    spec: str | None = None
    arrays: list[ArrayRecord] = Field(default_factory=list)
    submissions: list[SubmissionRecord] = Field(default_factory=list)
    intents: list[IntentRecord] = Field(default_factory=list)  # arrays sbatch may have queued (a killed submit)


@dataclass
class Manifest:
    """What was submitted for a sweep; `submitted` is what the call that returned it submitted."""

    sweep_dir: SweepDir
    sweep: str
    spec: str | None = None
    arrays: list[ArrayRecord] = field(default_factory=list)
    submissions: list[SubmissionRecord] = field(default_factory=list)
    intents: list[IntentRecord] = field(default_factory=list)  # unresolved: Slurm did not answer
    resolved: bool = False  # the load resolved intents (found or dropped) that the file still holds
    submitted: list[StageSubmission] = field(default_factory=list)  # this call's arrays (not saved)
    overrides: dict[str, Any] = field(default_factory=dict)  # this call's command-line overrides (saved per run)
    dry_run: bool = False

    @property
    def path(self) -> Path:
        return self.sweep_dir.manifest_file

    @classmethod
    def load(cls, sweep_dir: str | Path | SweepDir) -> Manifest:
        """The sweep's manifest; a missing or damaged file is a LaunchError naming it."""
        sweep_dir = sweep_dir if isinstance(sweep_dir, SweepDir) else SweepDir(sweep_dir)
        path = sweep_dir.manifest_file
        if not path.is_file():
            raise LaunchError(f"{sweep_dir.path}: no {path.name} (nothing was submitted for this sweep here)")
        try:
            data = _ManifestFile.model_validate(read_json(path))
        except RunDirError as err:
            raise DamagedStateError(str(err)) from None
        except ValidationError as err:
            first = err.errors(include_url=False)[0]
            where = ".".join(str(p) for p in first["loc"])
            raise DamagedStateError(f"{path}: damaged manifest: {where}: {first['msg']}") from None
        manifest = cls(sweep_dir=sweep_dir, sweep=data.sweep, spec=data.spec, arrays=data.arrays,
                       submissions=data.submissions)
        manifest.resolved = bool(data.intents)
        for intent in data.intents:  # a submit killed between sbatch and its records (module docstring)
            resolved = _resolve(intent, {a.array_job_id for a in manifest.arrays})
            if resolved is None:
                manifest.intents.append(intent)
            elif resolved:
                manifest.add(*resolved)
        return manifest

    @classmethod
    def load_or_new(cls, sweep_dir: SweepDir, sweep: str, spec: str | None) -> Manifest:
        if sweep_dir.is_submitted():
            manifest = cls.load(sweep_dir)
            manifest.spec = spec or manifest.spec
            return manifest
        return cls(sweep_dir=sweep_dir, sweep=sweep, spec=spec)

    def intend(self, plan: StageSubmission) -> IntentRecord:
        """A planned array's intent record (on Slurm saved before sbatch: see the module docstring)."""
        at = now()
        return IntentRecord(stage=plan.name, executor=plan.executor, job_name=plan.parameters["name"],
                            log_dir=plan.log_dir, dependency=plan.dependency, since=at,
                            runs_per_task=plan.runs_per_task, runs=[PlannedRun(
            run_id=r.run_id, stage=plan.name, executor=plan.executor, config=r.config.to_dict(), upstream=r.upstream,
            run_dir=str(self.sweep_dir.run(r.run_id).path), wandb_id=r.run_id, submitted_at=at,
            dependency=plan.run_dependencies.get(r.run_id), overrides=self.overrides) for r in plan.runs])

    def settle(self) -> None:
        """Under the lock, before submitting: save what the load resolved of a killed submit's intents. One that
        Slurm did not resolve may be queued already: a LaunchError (never run twice)."""
        if self.intents:
            raise LaunchError(f"{self.path}: cannot tell whether the {self.intents[0].job_name} array of a killed "
                              "submit was queued (squeue does not answer); submit again when it does")
        if self.resolved:
            self.save()

    def add(self, array: ArrayRecord, submissions: list[SubmissionRecord]) -> None:
        self.arrays.append(array)
        self.submissions.extend(submissions)

    def save(self) -> None:
        self.sweep_dir.path.mkdir(parents=True, exist_ok=True)
        data = _ManifestFile(sweep=self.sweep, spec=self.spec, arrays=self.arrays, submissions=self.submissions,
                             intents=self.intents)
        atomic_write_json(self.path, data.model_dump(mode="json", exclude=None if self.intents else {"intents"}))

    def latest(self) -> dict[str, SubmissionRecord]:
        """run id -> its newest submission record, in first-submitted order."""
        out: dict[str, SubmissionRecord] = {}
        for record in self.submissions:
            out[record.run_id] = record  # a dict keeps a key's first position when its value changes
        return out
