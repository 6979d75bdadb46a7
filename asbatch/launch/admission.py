"""Would the live cluster take it? Each stage's flags checked with `sbatch --test-only` before anything is
queued, and a refusal for a site's submit limit said in one line with the way out.

`sbatch --test-only` validates a job against the running controller (partition, account, QOS, constraint,
GPUs, time and memory limits) and queues nothing. A refusal is bad input: one line naming the stage, the
flag Slurm's reason is about and the reason; nothing is written or queued.
"""

from __future__ import annotations

import re
import shutil
import subprocess

from asbatch.launch.plan import StageSubmission
from asbatch.launch.site import SiteError, read_submit_limits
from asbatch.launch.slurm import run
from asbatch.spec import SpecError

# flags that say where and how big the job is; the rest (array, output, signal, job name, dependency) are
# asbatch's own and cannot be wrong for the site
_NOT_TESTED = ("--array", "--output", "--error", "--signal", "--job-name", "--dependency", "--open-mode")
# which flag a refusal is about, from words in Slurm's reason (first match wins)
_ABOUT = (("reservation", "reservation"), ("partition", "partition"), ("account", "account"), ("qos", "qos"),
          ("feature|constraint", "constraint"), ("gres|gpu|tres", "gpus-per-node"), ("time limit", "time"),
          ("memory", "mem"), ("cpu|processor", "cpus-per-task"), ("node", "nodes"))
SUBMIT_LIMIT = re.compile(r"(QOSMaxSubmitJob\w*|AssocMaxSubmitJob\w*|AssocGrpSubmitJob\w*|QOSGrpSubmitJob\w*|"
                          r"MaxSubmitJob\w*|job submit limit)", re.IGNORECASE)


def test_flags(plan: StageSubmission) -> list[str]:
    """The stage's sbatch flags that the cluster judges (the dry run's flags without asbatch's own)."""
    return [f for f in plan.flags if f.startswith("--") and not f.startswith(_NOT_TESTED)]


def check_with_cluster(plans: list[StageSubmission]) -> None:
    """`sbatch --test-only` with each stage's flags (one call per distinct set); a refusal is a SpecError
    naming the stage, the flag and Slurm's reason. Nothing to ask without sbatch."""
    if not shutil.which("sbatch"):
        return
    asked: dict[tuple[str, ...], str | None] = {}
    for plan in plans:
        if not plan.runs or plan.executor != "slurm":
            continue
        flags = tuple(test_flags(plan))
        if flags not in asked:
            asked[flags] = _refusal(list(flags))
        reason = asked[flags]
        if reason is not None:
            flag = _flag_about(reason, list(flags))
            raise SpecError(f"stage {plan.name}: the cluster refuses {flag}: {reason} (sbatch --test-only; "
                            "nothing was submitted)")


def _refusal(flags: list[str]) -> str | None:
    try:
        proc = run(["sbatch", "--test-only", *flags, "--wrap", "true"], timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None  # sbatch does not answer: the real submission will say why
    if proc.returncode == 0:
        return None
    lines = [line.strip() for line in (proc.stderr or proc.stdout).splitlines() if line.strip()]
    reasons = [line.removeprefix("sbatch: error: ") for line in lines if "error" in line.lower()] or lines
    return reasons[-1].removeprefix("Batch job submission failed: ") if reasons else f"exit code {proc.returncode}"


def _flag_about(reason: str, flags: list[str]) -> str:
    """The flag (as given) that Slurm's reason names, or 'these resources'."""
    for words, name in _ABOUT:
        if re.search(words, reason, re.IGNORECASE):
            given = next((f for f in flags if f.split("=", 1)[0] == f"--{name}"), None)
            if given is not None:
                return given
    return "these resources (" + " ".join(flags) + ")"


def submit_limit_message(plan: StageSubmission, detail: str) -> str | None:
    """Where sbatch refused for a submit limit: the numbers (asked of sacctmgr where it answers) and the way
    out; None for any other refusal."""
    match = SUBMIT_LIMIT.search(detail)
    if match is None:
        return None
    try:
        cap = read_submit_limits().max_submit
    except SiteError:
        cap = None
    limit = f"at most {cap} queued jobs" if cap is not None else "a cap on queued jobs"
    tasks = len(plan.packs)
    return (f"the site's submit limit refused stage {plan.label!r} ({match.group(1)}: {limit}, and every array task "
            f"counts as one; this array has {tasks}): submit fewer runs at a time (`--stage`, a smaller grid, or again "
            "once queued jobs have ended) or pack several runs per task (resources.runs_per_task)")
