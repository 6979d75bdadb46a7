"""Slurm I/O: sbatch parameters and flags for a stage, squeue / sacct queries and the parsing of their lines.

The submitit executor writes the sbatch script; `executor_parameters` says what goes into it, and
`sbatch_flags` shows the same flags for `--dry-run`. Final job states come from `sacct` (needs slurmdbd),
live ones and pending reasons from `squeue`.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from asbatch.launch.errors import LaunchError
from asbatch.names import SENSITIVE_NAME_PARTS
from asbatch.rundir import RESULTS
from asbatch.spec import Resources, SweepStage

SIGNAL_DELAY_ENV = "ASBATCH_SIGNAL_DELAY_S"
DEFAULT_SIGNAL_DELAY_S = 90
# Slurm states of a job that is (or will again be) queued or running: its run must not be submitted again
ACTIVE = frozenset({"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING",
                    "COMPLETING", "RESIZING", "SUSPENDED", "STAGE_OUT", "SIGNALING", "STOPPED", "RESV_DEL_HOLD"})
# final states of a run that `retry` resubmits (when the run did not finish)
RETRYABLE = frozenset({"FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
                       "BOOT_FAIL", "DEADLINE"})
# why a job ended in each retryable state, for `asbatch status` (FAILED says it through the run's failure record)
ENDED_BECAUSE = {
    "CANCELLED": "cancelled (scancel, or by Slurm)",
    "TIMEOUT": "hit its time limit before it could requeue itself",
    "NODE_FAIL": "its node failed",
    "OUT_OF_MEMORY": "ran out of memory (raise the stage's mem_gb)",
    "PREEMPTED": "preempted and not requeued",
    "BOOT_FAIL": "its node failed to boot",
    "DEADLINE": "passed its deadline",
    "FAILED": "the job failed before the run could record why (see `asbatch logs RUN --err`)",
}
NEVER_RUNS = "DependencyNeverSatisfied"  # squeue reason of a task whose upstream array failed
SLURM_JOB_ID = re.compile(r"\d+(_\d+)?")
# SECRET_NAME=value in a shell line (also inside --env=NAME=value), the value up to an unquoted blank or ; & |
_SECRET_ASSIGNMENT = re.compile(rf"\b([A-Za-z0-9_]*(?:{SENSITIVE_NAME_PARTS})[A-Za-z0-9_]*)="
                                r"(?:'[^']*'|\"(?:[^\"\\]|\\.)*\"|\\.|[^\s;&|'\"])*", re.IGNORECASE)


def run(cmd: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
    """A Slurm command, output captured; never raises on a non-zero exit."""
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout)


# ------------------------------------------------------------------------------------------ parameters

def signal_delay_s(resources: Resources) -> int:
    """Seconds before the time limit at which USR2 comes: $ASBATCH_SIGNAL_DELAY_S or 90, at most half the
    limit (Slurm checks limits only every 30 s or so, so short jobs get the signal early anyway)."""
    delay = int(os.environ.get(SIGNAL_DELAY_ENV, DEFAULT_SIGNAL_DELAY_S))
    return max(1, min(delay, resources.timeout_min * 30))


def env_lines(env: dict[str, str]) -> list[str]:
    return [f"export {name}={shlex.quote(value)}" for name, value in env.items()]


def executor_parameters(sweep: str, stage: SweepStage, env: dict[str, str], dependency: str | None = None,
                        kind: str = "slurm", num_runs: int | None = None) -> dict[str, Any]:
    """submitit AutoExecutor parameters for one stage's array (generic names + `slurm_` ones).

    local / debug: one process trains every run in turn; its time limit is the sum of theirs, and TrainTask
    sets the env itself (before torch is imported)."""
    r = stage.resources
    params: dict[str, Any] = {"name": f"{sweep}:{stage.name}", "timeout_min": r.timeout_min}
    if kind != "slurm":
        params["timeout_min"] = r.timeout_min * max(1, num_runs or len(stage.runs))
        return params
    packed = r.runs_per_task > 1  # one task whose PackTask starts a worker per run (not one rank per GPU)
    params.update(nodes=r.nodes, tasks_per_node=1 if packed else max(1, r.gpus_per_node), cpus_per_task=r.cpus_per_task,
                  slurm_signal_delay_s=signal_delay_s(r), slurm_array_parallelism=r.array_parallelism,
                  # a rank that dies (an error, a signal) ends the step: the others must not wait in a
                  # collective until its timeout (10 min on NCCL, 30 on gloo)
                  slurm_srun_args=["--kill-on-bad-exit=1"])
    if r.gpus_per_node:
        params["gpus_per_node"] = r.gpus_per_node
    if r.mem_gb is not None:
        params["mem_gb"] = float(r.mem_gb)
    for name in ("partition", "account", "qos", "constraint"):
        if getattr(r, name) is not None:
            params[f"slurm_{name}"] = getattr(r, name)
    # requeueable whatever the site's JobRequeue: the task requeues itself before its time limit
    # (`scontrol requeue`), which a site with JobRequeue=0 refuses for a job not submitted with --requeue
    extra: dict[str, Any] = {"requeue": True}
    extra.update({flag: True if value == "" else value for flag, value in r.extra.items()})
    if dependency:
        extra["dependency"] = dependency
    params["slurm_additional_parameters"] = extra
    if env or r.setup:  # the profile's env first, so that its setup lines (and python) may use it
        params["slurm_setup"] = [*env_lines(env), *r.setup]
    if r.python:  # submitit takes it in the executor's constructor (`executor_of` pops it from here)
        params["slurm_python"] = r.python
    return params


def executor_of(folder: Path, params: dict[str, Any]) -> Any:
    """A submitit Slurm executor with these parameters: the job runs `<python> -u -m submitit.core._submit`
    with the profile's python command where it has one (an apptainer or conda command), else this one."""
    import submitit

    params = dict(params)
    python = params.pop("slurm_python", None)
    ex = submitit.AutoExecutor(folder=folder, cluster="slurm", **({"slurm_python": python} if python else {}))
    ex.update_parameters(**params)
    return ex


def _masked(line: str) -> str:
    """A setup line with the values of secret-looking variables (`export WANDB_API_KEY=...`) as ***."""
    return _SECRET_ASSIGNMENT.sub(lambda m: f"{m[1]}=***", line)


def sbatch_flags(params: dict[str, Any], num_tasks: int, log_dir: Path) -> list[str]:
    """The sbatch flags submitit will write for these parameters (for `--dry-run`), then the job script's
    setup lines (the profile's env exports and setup) and a profile's python command; values of variables
    that look like secrets are masked."""
    native = {"job-name": params["name"], "time": params["timeout_min"]}
    for key, flag in (("slurm_partition", "partition"), ("slurm_account", "account"), ("slurm_qos", "qos"),
                      ("nodes", "nodes"), ("tasks_per_node", "ntasks-per-node"), ("cpus_per_task", "cpus-per-task"),
                      ("gpus_per_node", "gpus-per-node"), ("slurm_constraint", "constraint")):
        if key in params:
            native[flag] = params[key]
    if "mem_gb" in params:
        mem = params["mem_gb"]
        native["mem"] = f"{int(mem)}GB" if mem == int(mem) else f"{int(mem * 1024)}MB"
    if num_tasks > 1:
        native["array"] = f"0-{num_tasks - 1}%{min(num_tasks, params.get('slurm_array_parallelism', 256))}"
    native["signal"] = f"USR2@{params.get('slurm_signal_delay_s', DEFAULT_SIGNAL_DELAY_S)}"
    job = "%A_%a" if num_tasks > 1 else "%j"
    native["output"] = str(log_dir / job / f"{job}_0_log.out")  # as submitit writes it; srun adds per-rank logs
    native["error"] = str(log_dir / job / f"{job}_0_log.err")
    native.update(params.get("slurm_additional_parameters", {}))
    flags = [f"--{k}" if v is True else f"--{k}={v}" for k, v in native.items()]
    flags += [_masked(line) for line in params.get("slurm_setup", [])]  # the job script's lines, as written
    if params.get("slurm_python"):
        flags.append(f"python: {_masked(params['slurm_python'])}")
    return flags


# ------------------------------------------------------------------------------------------ job states

def parse_job_lines(lines: Sequence[str]) -> dict[str, list[str]]:
    """'123_4|RUNNING|None', '123_[5-7%2]|PENDING|...', '123|CANCELLED by 0' -> {'123_4': [...], ...}; an
    array record without a task ('123', a never-started array) is kept under '123'."""
    out: dict[str, list[str]] = {}
    for line in lines:
        if not line.strip():
            continue
        job, *fields = line.split("|")
        fields = [fields[0].split()[0] if fields and fields[0] else "", *fields[1:]]  # 'CANCELLED by 0'
        match = re.fullmatch(r"(\d+)_\[([0-9,\-]+)(?:%\d+)?\]", job)
        if match:
            for part in match.group(2).split(","):
                lo, _, hi = part.partition("-")
                for task in range(int(lo), int(hi or lo) + 1):
                    out.setdefault(f"{match.group(1)}_{task}", fields)
        elif SLURM_JOB_ID.fullmatch(job):
            out[job] = fields
    return out


def _lookup(table: dict[str, list[str]], job_id: str) -> list[str] | None:
    return table.get(job_id) or table.get(job_id.split("_")[0])


# what a Slurm client prints when slurmctld is down, restarting or unreachable
CONTROLLER_AWAY = re.compile(r"Unable to contact slurm controller|Socket timed out|Connection refused|"
                             r"Zero Bytes were transmitted|Transport endpoint is not connected", re.IGNORECASE)


def _ask(cmd: list[str]) -> tuple[subprocess.CompletedProcess | None, str]:
    """A Slurm query: (the finished process or None, why it failed in one line; "" when it answered)."""
    try:
        proc = run(cmd)
    except subprocess.TimeoutExpired as err:
        return None, f"{cmd[0]}: no answer within {err.timeout:g} s"
    except FileNotFoundError:
        return None, f"{cmd[0]} is not on PATH"
    except OSError as err:
        return None, f"{cmd[0]}: {err.strerror or err}"
    text = " ".join((proc.stderr or proc.stdout).split())
    return proc, "" if proc.returncode == 0 else (text or f"{cmd[0]}: exit {proc.returncode}")


@dataclass
class SlurmView:
    """What Slurm says about some jobs: live {id: (state, reason)} from squeue, final {id: state} from sacct,
    a one-line note when either did not answer, whether squeue answered (then a job it does not list is gone:
    neither queued nor running) and, without accounting, why (`sacct` missing, failing or knowing none of
    the jobs)."""

    live: dict[str, tuple[str, str]] = field(default_factory=dict)
    final: dict[str, str] = field(default_factory=dict)
    note: str | None = None
    squeue_error: str = ""           # "" when squeue answered
    no_accounting: str | None = None  # why sacct gives no final states; None when it answered with records

    def gone(self, job_id: str) -> bool:
        """squeue answered and does not list the job: it is not queued or running any more."""
        return not self.squeue_error and job_id not in self.live

    def unknown_reason(self, job_id: str, run_id: str) -> str:
        """Why a job neither squeue nor sacct reports has no state, and what to do ('' where accounting
        works and has merely no record of it)."""
        if self.squeue_error and self.no_accounting:
            return (f"no accounting: {self.no_accounting}, and squeue did not answer either; `asbatch status` "
                    "again once Slurm's controller answers")
        if self.no_accounting and not self.squeue_error:
            return (f"no accounting: job {job_id} has left the queue and Slurm keeps no record of how it ended; "
                    f"`asbatch logs {run_id} --err` shows it; `asbatch retry` resubmits the run")
        return ""


def query_jobs(job_ids: Sequence[str], strict: bool = True) -> SlurmView:
    """For job ids ('123_4' or '123'): their live states from `squeue -t all`, their final ones from `sacct`.
    squeue needs slurmctld, sacct only slurmdbd: while the controller is away (stopped, restarting,
    unreachable) a `strict=False` caller (status, wait) gets the states sacct still knows and a note; a strict
    one (submit, retry, cancel: they act on the states, and a job sacct has not recorded yet would be queued
    twice) a LaunchError. Without accounting (sacct not on PATH, failing, e.g. 'accounting storage is
    disabled', or knowing none of the jobs) the view says so, and nobody raises: squeue still lists every
    queued and running job, so a job it does not list is gone."""
    arrays = sorted({j.split("_")[0] for j in job_ids}, key=int)
    view = SlurmView()
    if not arrays:
        return view
    ids = ",".join(arrays)
    sq, sq_error = _ask(["squeue", "-h", "-r", "-t", "all", "-j", ids, "-o", "%i|%T|%r"])
    if sq is not None and sq.returncode == 0:
        table = parse_job_lines(sq.stdout.splitlines())
        view.live = {j: (f[0], f[1] if len(f) > 1 else "") for j in job_ids if (f := _lookup(table, j))}
    elif "Invalid job id" in sq_error:
        sq_error = ""  # squeue has forgotten every one of these jobs (MinJobAge): sacct knows how they ended
    if sq_error and strict:
        raise LaunchError(f"squeue failed: {sq_error}")
    view.squeue_error = sq_error
    sa, sa_error = _ask(["sacct", "-n", "-P", "-X", "-j", ids, "-o", "JobID,State"])
    if sa is not None and sa.returncode == 0:
        table = parse_job_lines(sa.stdout.splitlines())
        view.final = {j: f[0] for j in job_ids if (f := _lookup(table, j))}
        if not table:
            view.no_accounting = "sacct knows none of the sweep's jobs (accounting off, or not recording)"
    else:
        view.no_accounting = sa_error if sa is None else f"sacct failed ({sa_error})"
    view.note = _note(view, job_ids, sq_error, sa_error)
    return view


def _note(view: SlurmView, job_ids: Sequence[str], sq_error: str, sa_error: str) -> str | None:
    away = "Slurm's controller is not answering" if CONTROLLER_AWAY.search(sq_error) else "squeue failed"
    without = (f"{view.no_accounting}: no accounting, so states come from the run dirs and squeue, which forgets "
               f"a job MinJobAge after it ends: then a run with {RESULTS} shows as COMPLETED, one with a recorded "
               "failure as FAILED, the others as UNKNOWN (`asbatch logs RUN --err` shows how one ended; `asbatch "
               "retry` resubmits them)")
    if sq_error and sa_error:
        return (f"{away} ({sq_error}) and {view.no_accounting}: Slurm states unknown; runs with {RESULTS} show as "
                "COMPLETED, the others as UNKNOWN")
    if sq_error:
        return (f"{away} ({sq_error}): states come from sacct and the run dirs, without pending reasons, until it "
                "answers again")
    if sa_error:
        return without
    if view.no_accounting and any(j not in view.live for j in job_ids):
        return without  # sacct answered nothing, and some job has left the queue
    return None


def query_slurm(job_ids: Sequence[str], strict: bool = True) -> tuple[dict[str, tuple[str, str]], dict[str, str],
                                                                    str | None]:
    """`query_jobs` as (live, final, note)."""
    view = query_jobs(job_ids, strict)
    return view.live, view.final, view.note


def scancel(job_ids: Sequence[str]) -> None:
    """Cancel jobs (array ids cancel every task); a failure is a LaunchError."""
    proc = run(["scancel", *job_ids])
    if proc.returncode != 0:
        raise LaunchError(f"scancel {' '.join(job_ids)} failed: {(proc.stderr or proc.stdout).strip()}")


def find_jobs(name: str, script_dir: Path, since: str) -> set[str] | None:
    """The (array) job ids of the jobs named `name` whose batch script lies in `script_dir` (where submitit
    writes it) and that were submitted at or after `since` (Slurm's local time, `YYYY-MM-DDTHH:MM:SS`):
    queued or recently ended ones from squeue, ended ones from sacct. None when none is found and squeue
    (which knows every queued job) did not answer."""
    prefix = f"{script_dir}/"
    found: set[str] = set()
    squeue_answered = False
    for cmd in (["squeue", "-h", "-t", "all", "-n", name, "-o", "%F|%V|%o"],
                ["sacct", "-X", "-n", "-P", "--name", name, "-S", since, "-o", "JobID,Submit,SubmitLine"]):
        try:
            proc = run(cmd)
        except (OSError, subprocess.TimeoutExpired):
            continue
        squeue_answered = squeue_answered or (cmd[0] == "squeue" and proc.returncode == 0)
        for line in proc.stdout.splitlines() if proc.returncode == 0 else []:
            job, submitted, script = ([*line.split("|", 2), "", ""])[:3]
            array = job.split("_")[0]
            if array.isdigit() and submitted >= since and script.removeprefix("sbatch ").startswith(prefix):
                found.add(array)
    return found if found or squeue_answered else None
