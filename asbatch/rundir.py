"""`RunDir` and `SweepDir`: the only code that knows the names and layout of run dirs and sweep dirs.

    <runs root>/<sweep>/                  SweepDir
        manifest.json                     what was submitted (asbatch.launch.manifest)
        .submit.lock                      serialises submit / retry / cancel of the sweep (flock)
        .submit.lock.owner                the same where flock is unsupported: host, pid of its holder
        .slurm/<job id>/                  submitit's files and the jobs' stdout / stderr (Slurm)
        .slurm/local/                     the same for the local executor's job (one process, all runs)
        report/                           `asbatch report`
        <run id>/                         RunDir
            config.yaml                   the resolved RunConfig (written when the run starts)
            metrics.jsonl                 one line per finished epoch
            checkpoints/step-*/           asbatch.train.checkpoint
            model.pt                      final weights
            results.json                  written last: the run is finished
            wandb/ wandb.json             W&B files and what W&B holds / what was synced
            requeues.json                 the task's own requeues
            failure.json                  why the last attempt failed (removed when an attempt starts)
            process.json                  pid and host of the process training it (removed when it stops)
            .train.rank<r>.lock           held by the process training rank r (one trainer per run dir)
            .train.rank<r>.lock.owner     the same where flock is unsupported (asbatch.locks)
            stdout.log stderr.log         the run's own output under the local executor
            <figure>.png                  per-run figures logged to W&B

Modelled on submitit's `JobPaths`: one object names every file; everyone else asks it.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from asbatch.fsutil import atomic_write_json
from asbatch.names import RUN_ID
from asbatch.runshape import RunDirError, check_config, check_metrics_row, check_results, damaged

RUN_REF_PREFIX = "run:"
RESULTS = "results.json"  # written last: a run with it is finished (messages name it too)


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except PermissionError:
        raise unreadable(path) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RunDirError(f"{path}: cannot be read as JSON ({err})") from None


def unreadable(path: Path) -> RunDirError:
    return RunDirError(f"{path}: cannot read (permission denied)")


@contextlib.contextmanager
def reading(path: Path) -> Iterator[None]:
    """A dir or file we may not read is damaged state too: one line naming it, not an errno line."""
    try:
        yield
    except PermissionError as err:
        raise unreadable(Path(err.filename or path)) from None


@dataclass(frozen=True)
class RunDir:
    """The files of one training run."""

    path: Path

    def __init__(self, path: str | Path) -> None:
        object.__setattr__(self, "path", Path(path))

    @property
    def run_id(self) -> str:
        return self.path.name

    # ------------------------------------------------------------------------------------------- paths
    @property
    def config_file(self) -> Path:
        return self.path / "config.yaml"

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def results_file(self) -> Path:
        return self.path / RESULTS

    @property
    def model_file(self) -> Path:
        return self.path / "model.pt"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def wandb_dir(self) -> Path:
        return self.path / "wandb"

    @property
    def wandb_state_file(self) -> Path:
        return self.path / "wandb.json"

    @property
    def requeues_file(self) -> Path:
        return self.path / "requeues.json"

    @property
    def failure_file(self) -> Path:
        return self.path / "failure.json"

    @property
    def process_file(self) -> Path:
        return self.path / "process.json"

    def train_lock_file(self, rank: int) -> Path:
        return self.path / f".train.rank{rank}.lock"

    @contextlib.contextmanager
    def training(self, rank: int) -> Iterator[bool]:
        """Hold rank `rank`'s training lock while the block runs; yields False (and holds nothing) when another
        live process holds it. An OS lock (flock): a killed trainer's lock is released with its process; where
        flock is unsupported, a lock file naming its holder (asbatch.locks), taken over once that is gone."""
        from asbatch.locks import exclusive

        self.path.mkdir(parents=True, exist_ok=True)
        with exclusive(self.train_lock_file(rank), timeout=0) as mine:
            yield mine

    @property
    def stdout_log(self) -> Path:
        return self.path / "stdout.log"

    @property
    def stderr_log(self) -> Path:
        return self.path / "stderr.log"

    def figure(self, name: str) -> Path:
        return self.path / f"{name}.png"

    # ------------------------------------------------------------------------------------------- state
    def is_finished(self) -> bool:
        """results.json exists: the run is done and is never trained again (reading says if it is damaged)."""
        with reading(self.path):
            return self.results_file.exists()

    def is_started(self) -> bool:
        with reading(self.path):
            return self.config_file.is_file()

    def looks_like_run(self) -> bool:
        with reading(self.path):
            return self.path.is_dir() and any(p.exists() for p in (self.results_file, self.config_file,
                                                                   self.checkpoints))

    def write_config(self, config: dict[str, Any]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        self.config_file.write_text(yaml.safe_dump(config, sort_keys=False))

    def read_config(self, complete: bool = False) -> dict[str, Any] | None:
        """The run's config.yaml (None before the run starts); a damaged one is a RunDirError naming it.
        `complete`: it must have every section, as `train` writes it (a hand-written one may have fewer)."""
        if not self.is_started():
            return None
        with reading(self.config_file):
            text = self.config_file.read_text(errors="replace")
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise damaged(self.config_file, "config", f"not YAML: {getattr(err, 'problem', None) or err}{where}") \
                from None
        return check_config(self.config_file, data, complete)

    def write_results(self, results: dict[str, Any]) -> None:
        atomic_write_json(self.results_file, results)

    def read_results(self) -> dict[str, Any] | None:
        """The run's results.json, or None while it has not finished."""
        if not self.is_finished():
            return None
        if self.results_file.is_dir():
            raise damaged(self.results_file, "results", "a directory, not a file")
        return check_results(self.results_file, read_json(self.results_file))

    def read_metrics(self) -> list[dict[str, Any]]:
        """The per-epoch rows of metrics.jsonl ([] before the first epoch ends)."""
        with reading(self.metrics_file):
            if not self.metrics_file.is_file():
                return []
            text = self.metrics_file.read_text(errors="replace")
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise RunDirError(f"{self.metrics_file}: line {number} is not JSON ({err.msg})") from None
                rows.append(check_metrics_row(self.metrics_file, number, row))
        return rows

    def read_wandb_state(self) -> dict[str, Any] | None:
        return read_json(self.wandb_state_file) if self.wandb_state_file.is_file() else None

    def write_wandb_state(self, state: dict[str, Any]) -> None:
        atomic_write_json(self.wandb_state_file, state)

    def read_requeues(self) -> dict[str, Any]:
        """{"count": n, "events": [...]}: how often the task requeued itself."""
        if not self.requeues_file.is_file():
            return {"count": 0, "events": []}
        return read_json(self.requeues_file)

    def write_requeues(self, record: dict[str, Any]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.requeues_file, record)

    def write_failure(self, error: str) -> None:
        """Record why this attempt failed (`error`: 'Type: message'), for `asbatch status`."""
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.failure_file, {"error": error})

    def read_failure(self) -> str | None:
        """The first line of why the last attempt failed, or None."""
        if not self.failure_file.is_file():
            return None
        try:
            error = str(read_json(self.failure_file).get("error", ""))
        except (RunDirError, AttributeError):
            return None
        return error.strip().splitlines()[0] if error.strip() else None

    def clear_failure(self) -> None:
        self.failure_file.unlink(missing_ok=True)

    def write_process(self, record: dict[str, Any]) -> None:
        """Record which process trains the run now (`asbatch status` of a sweep run by `asbatch run`)."""
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.process_file, record)

    def read_process(self) -> dict[str, Any] | None:
        """The process record ({"pid", "host", ...}) while a process trains the run (or after it was killed)."""
        try:
            record = read_json(self.process_file) if self.process_file.is_file() else None
        except RunDirError:
            return None
        return record if isinstance(record, dict) else None

    def clear_process(self) -> None:
        self.process_file.unlink(missing_ok=True)


@dataclass(frozen=True)
class SweepDir:
    """The files of one sweep: its runs, its manifest, its lock, its Slurm logs and its report."""

    path: Path

    def __init__(self, path: str | Path) -> None:
        object.__setattr__(self, "path", Path(path))

    @classmethod
    def at(cls, runs_root: str | Path, sweep: str) -> SweepDir:
        return cls(Path(runs_root) / sweep)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def runs_root(self) -> Path:
        return self.path.parent

    @property
    def manifest_file(self) -> Path:
        return self.path / "manifest.json"

    @property
    def lock_file(self) -> Path:
        return self.path / ".submit.lock"

    @property
    def log_dir(self) -> Path:
        return self.path / ".slurm"

    @property
    def job_folder(self) -> Path:
        """submitit's folder pattern for Slurm jobs: one dir per job (`%j` is the job id)."""
        return self.log_dir / "%j"

    @property
    def local_job_folder(self) -> Path:
        """submitit's folder for the local executor, whose controller would create a `%j` pattern literally."""
        return self.log_dir / "local"

    def job_folder_of(self, executor: str) -> Path:
        return self.local_job_folder if executor == "local" else self.job_folder

    @property
    def report_dir(self) -> Path:
        return self.path / "report"

    def is_submitted(self) -> bool:
        with reading(self.path):
            return self.manifest_file.is_file()

    def submitted_run_ids(self) -> list[str]:
        """Run ids the manifest records as submitted, in first-submission order ([] without a manifest)."""
        if not self.manifest_file.is_file():
            return []
        data = read_json(self.manifest_file)
        submissions = data.get("submissions") if isinstance(data, dict) else None
        if not isinstance(submissions, list) or not all(isinstance(s, dict) and "run_id" in s for s in submissions):
            raise RunDirError(f"{self.manifest_file}: damaged manifest: no list of submissions with run ids")
        return list(dict.fromkeys(str(s["run_id"]) for s in submissions))

    def run(self, run_id: str) -> RunDir:
        return RunDir(self.path / run_id)

    def runs(self) -> list[RunDir]:
        """Every dir under the sweep that holds a run (started or finished), sorted by run id."""
        with reading(self.path):
            if not self.path.is_dir():
                return []
            return [RunDir(p) for p in sorted(self.path.iterdir()) if RunDir(p).looks_like_run()]

    def job_logs(self, job_id: str, task: int = 0, executor: str = "slurm") -> tuple[Path, Path]:
        """(stdout, stderr) that submitit writes for a job (`123_4`, `123` or a local pid) and task (rank)."""
        from submitit.core.utils import JobPaths

        folder = self.job_folder_of(executor)
        paths = JobPaths(folder, job_id=job_id, task_id=task)
        if executor == "local" and not paths.stdout.exists():  # submitted before `.slurm/local/` existed
            paths = JobPaths(self.job_folder, job_id=job_id, task_id=task)
        return paths.stdout, paths.stderr

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive lock on `.submit.lock`: read manifest -> submit -> write manifest is atomic with respect
        to other submits, retries and cancels of the same sweep (other processes or threads); a soft lock
        file where flock is unsupported (asbatch.locks)."""
        from asbatch.locks import exclusive

        self.path.mkdir(parents=True, exist_ok=True)
        with exclusive(self.lock_file):
            yield


def list_sweeps(runs_root: str | Path) -> list[SweepDir]:
    """Sweep dirs under a runs root: those with a manifest (submitted) or with run dirs (`asbatch run`)."""
    root = Path(runs_root)
    with reading(root):
        if not root.is_dir():
            return []
        return [SweepDir(p) for p in sorted(root.iterdir()) if p.is_dir() and _holds_sweep(SweepDir(p))]


def _holds_sweep(sweep: SweepDir) -> bool:
    try:
        return sweep.is_submitted() or bool(sweep.runs())
    except RunDirError:  # cannot look inside: listed, so that reading it names the problem
        return True


# ---------------------------------------------------------------------------------------------- run refs

def run_ref(run_id: str) -> str:
    """The `model.init_from` value that points at run `run_id` of the same sweep: 'run:<run id>'."""
    return f"{RUN_REF_PREFIX}{run_id}"


def ref_run_id(value: str) -> str | None:
    """'run:<run id>' -> the run id (ValueError for a malformed one); any other value (a path) -> None."""
    if not value.startswith(RUN_REF_PREFIX):
        return None
    run_id = value.removeprefix(RUN_REF_PREFIX)
    if not RUN_ID.fullmatch(run_id):  # never let a reference climb out of the runs root
        raise ValueError(f"bad run reference {value!r}: expected 'run:<stage>-<10 hex digits>'")
    return run_id


def resolve_init_from(value: str, sweep_dir: SweepDir) -> Path:
    """`model.init_from` -> the file holding the weights: 'run:<id>' is that run's model.pt in the sweep; a
    run dir is its model.pt; any other path is taken as a file."""
    run_id = ref_run_id(value)
    path = sweep_dir.run(run_id).path if run_id else Path(value).expanduser()
    return RunDir(path).model_file if path.is_dir() or run_id else path


_SEGMENT = re.compile(r"offline-run-.*")


def offline_segments(run_dir: RunDir) -> list[Path]:
    """The run's offline W&B segments, oldest first (their names start with the start time)."""
    if not run_dir.wandb_dir.is_dir():
        return []
    return sorted(p for p in run_dir.wandb_dir.iterdir() if _SEGMENT.fullmatch(p.name))
