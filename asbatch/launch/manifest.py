"""The sweep's manifest: typed records of every submitted run and array.

`submissions` holds one `SubmissionRecord` per submitted run (the newest per run id counts); `arrays` one
`ArrayRecord` per submitted array. status, logs, cancel and retry read it (with Slurm and the run dirs),
never the memory of the process that submitted. It is written atomically under the sweep's lock.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from asbatch.fsutil import atomic_write_json
from asbatch.launch.errors import DamagedStateError, LaunchError
from asbatch.names import RUN_ID
from asbatch.rundir import RunDirError, SweepDir, read_json

if TYPE_CHECKING:
    from asbatch.launch.submit import StageSubmission

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


class SubmissionRecord(_Record):
    """One run as submitted: which job trains it, from which config, into which run dir."""

    run_id: str = Field(pattern=RUN_ID.pattern)
    stage: str
    executor: Literal["slurm", "local", "debug"]
    job_id: str = Field(pattern=JOB_ID)        # `<array>_<task>`, a plain job id, or a local pid
    array_job_id: str = Field(pattern=JOB_ID)
    config: dict[str, Any]
    upstream: dict[str, str] = Field(default_factory=dict)  # stage -> run id this run runs after
    run_dir: str
    wandb_id: str
    submitted_at: str
    # this task's own `afterok:` on its upstream runs' tasks ('' none; None: not recorded, older manifests)
    dependency: str | None = Field(None, pattern=rf"{DEPENDENCY}|^$")
    overrides: dict[str, Any] = Field(default_factory=dict)  # command-line overrides as spec paths (retry reapplies)

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


class _ManifestFile(_Record):
    sweep: str
    spec: str | None = None
    arrays: list[ArrayRecord] = Field(default_factory=list)
    submissions: list[SubmissionRecord] = Field(default_factory=list)


@dataclass
class Manifest:
    """What was submitted for a sweep; `submitted` is what the call that returned it submitted."""

    sweep_dir: SweepDir
    sweep: str
    spec: str | None = None
    arrays: list[ArrayRecord] = field(default_factory=list)
    submissions: list[SubmissionRecord] = field(default_factory=list)
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
        return cls(sweep_dir=sweep_dir, sweep=data.sweep, spec=data.spec, arrays=data.arrays,
                   submissions=data.submissions)

    @classmethod
    def load_or_new(cls, sweep_dir: SweepDir, sweep: str, spec: str | None) -> Manifest:
        if sweep_dir.is_submitted():
            manifest = cls.load(sweep_dir)
            manifest.spec = spec or manifest.spec
            return manifest
        return cls(sweep_dir=sweep_dir, sweep=sweep, spec=spec)

    def save(self) -> None:
        self.sweep_dir.path.mkdir(parents=True, exist_ok=True)
        data = _ManifestFile(sweep=self.sweep, spec=self.spec, arrays=self.arrays, submissions=self.submissions)
        atomic_write_json(self.path, data.model_dump(mode="json"))

    def latest(self) -> dict[str, SubmissionRecord]:
        """run id -> its newest submission record, in first-submitted order."""
        out: dict[str, SubmissionRecord] = {}
        for record in self.submissions:
            out[record.run_id] = record  # a dict keeps a key's first position when its value changes
        return out
