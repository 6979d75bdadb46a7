"""What a Slurm site allows: its version, limits, partitions, accounting and submit limits, read from its commands.

Pure parsers of the commands' output (`scontrol show config`, `sinfo`, `sacctmgr`), tested with canned text
as submitit tests its own, and thin readers that run the commands: a command that fails or does not answer
is a `SiteError` (one line), which `asbatch doctor` shows as a warning or a problem. The launcher asks
`max_array_size()` how many tasks one array may have. `probe_runs_root` submits a tiny job that writes a file
under the runs root and reads it back here: the runs root must be the same directory on the compute nodes.
"""

from __future__ import annotations

import contextlib
import getpass
import math
import os
import re
import shlex
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from asbatch.launch.slurm import ACTIVE
from asbatch.launch.slurm import run as run_command

DEFAULT_MAX_ARRAY_SIZE = 1001  # Slurm's default MaxArraySize: task ids 0-1000
SINFO_FORMAT = "%P|%l|%D|%G|%a"  # name (default marked *), time limit, node count, gres per node, up / down
ASSOC_FIELDS = ("Account", "Partition", "QOS", "MaxSubmitJobs", "MaxJobs", "GrpSubmitJobs", "GrpJobs")
QOS_FIELDS = ("Name", "MaxSubmitJobsPerUser", "MaxJobsPerUser")
SUBMIT_KEYS = ("MaxSubmitJobs", "GrpSubmitJobs", "MaxSubmitJobsPerUser")  # the ones that cap queued jobs
PROBE_NAME = "asbatch-doctor"


class SiteError(RuntimeError):
    """A Slurm command failed or did not answer; the message is one line naming it and its reason."""


def has_slurm() -> bool:
    """Whether this machine submits to Slurm (sbatch on PATH), as the executor `auto` decides."""
    return shutil.which("sbatch") is not None


def ask(cmd: list[str], timeout: float = 30) -> str:
    """A Slurm command's output; a failure or no answer within `timeout` is a SiteError."""
    try:
        proc = run_command(cmd, timeout)
    except subprocess.TimeoutExpired:
        raise SiteError(f"{cmd[0]}: no answer within {timeout:g} s") from None
    except OSError as err:
        raise SiteError(f"{cmd[0]}: {err.strerror or err}") from None
    if proc.returncode != 0:
        text = " ".join((proc.stderr or proc.stdout).split())
        raise SiteError(f"{cmd[0]}: {text or f'exit {proc.returncode}'}")
    return proc.stdout


def current_user() -> str:
    try:
        return os.environ.get("USER") or getpass.getuser()
    except (OSError, KeyError):  # no passwd entry (a container): sacctmgr knows the user by name only
        return str(os.getuid())


# ------------------------------------------------------------------------------------------ parsing

def parse_version(text: str) -> str:
    """'slurm-wlm 22.05.8' / 'slurm 23.11.4' -> '22.05.8' (the text itself when it holds no version)."""
    match = re.search(r"\d+\.\d+(?:\.\d+)?", text)
    return match.group(0) if match else " ".join(text.split())


def parse_config(text: str) -> dict[str, str]:
    """`scontrol show config` -> {key: value}; the first of a repeated key wins (plugin sections come last)."""
    config: dict[str, str] = {}
    for line in text.splitlines():
        match = re.match(r"\s*([A-Za-z][\w\[\]().]*)\s*=\s?(.*)$", line)
        if match:
            config.setdefault(match.group(1), match.group(2).strip())
    return config


def config_int(config: dict[str, str], key: str) -> int | None:
    """A whole-number setting ('MaxArraySize = 1001'); None when absent or not a number."""
    match = re.match(r"\d+", config.get(key, ""))
    return int(match.group(0)) if match else None


def accounting_storage(config: dict[str, str]) -> str | None:
    """The accounting storage plugin ('accounting_storage/slurmdbd'), None when accounting is off."""
    value = config.get("AccountingStorageType", "")
    return None if value in ("", "(null)") or value.endswith("/none") else value


def parse_time_limit(text: str) -> int | None:
    """A Slurm time limit in whole minutes (seconds round up); None for no limit ('infinite', 'UNLIMITED').
    Slurm's forms: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S. Anything else is a ValueError."""
    value = text.strip().lower()
    if value in ("infinite", "unlimited"):
        return None
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", value)
    if not match:
        raise ValueError(f"not a Slurm time limit: {text!r}")
    days, *rest = match.groups()
    nums = [int(n) for n in rest if n is not None]
    if days is not None:
        hours, mins, secs = [*nums, 0, 0][:3]
        return int(days) * 1440 + hours * 60 + mins + math.ceil(secs / 60)
    if len(nums) == 1:
        return nums[0]
    if len(nums) == 2:
        return nums[0] + math.ceil(nums[1] / 60)
    return nums[0] * 60 + nums[1] + math.ceil(nums[2] / 60)


def format_minutes(minutes: int | None) -> str:
    """Minutes as Slurm prints a time limit: 'D-HH:MM:SS', 'HH:MM:SS' ('infinite' for None)."""
    if minutes is None:
        return "infinite"
    days, rest = divmod(minutes, 1440)
    clock = f"{rest // 60:02d}:{rest % 60:02d}:00"
    return f"{days}-{clock}" if days else clock


def gres_gpus(gres: str) -> tuple[int, tuple[str, ...]]:
    """One node's gres ('gpu:a100:4(S:0-1),shard:8') -> (its GPUs, their types): (4, ('a100',))."""
    count, types = 0, []
    for item in re.split(r",(?![^()]*\))", gres):  # commas inside '(S:0,1)' do not separate items
        parts = re.sub(r"\(.*?\)", "", item).strip().split(":")
        if parts[0] != "gpu":
            continue
        number = re.match(r"\d+", parts[-1]) if len(parts) > 1 else None
        count += int(number.group(0)) if number else 1
        if len(parts) == 3 or (len(parts) == 2 and not number):
            types.append(parts[1])
    return count, tuple(dict.fromkeys(types))


@dataclass(frozen=True)
class Partition:
    """One partition as sinfo shows it: `max_minutes` None is no time limit; `gpus_per_node` is the most
    GPUs one of its nodes has."""

    name: str
    default: bool
    time_limit: str
    max_minutes: int | None
    nodes: int
    gpus_per_node: int
    gpu_types: tuple[str, ...]
    state: str

    @property
    def up(self) -> bool:
        return self.state == "up"


def parse_partitions(text: str) -> list[Partition]:
    """`sinfo -h -o '%P|%l|%D|%G|%a'` -> one Partition per name, in sinfo's order; sinfo prints a partition
    once per kind of node (different gres), so node counts add up and the GPUs are the most per node."""
    rows: dict[str, list[list[str]]] = {}
    for line in text.splitlines():
        fields = line.strip().split("|")
        if len(fields) == 5 and fields[0]:
            rows.setdefault(fields[0].rstrip("*"), []).append(fields)
    found = []
    for name, lines in rows.items():
        first = lines[0]
        try:
            limit = parse_time_limit(first[1])
        except ValueError:  # 'n/a': no limit that can be compared
            limit = None
        gpus = [gres_gpus(f[3]) for f in lines]
        found.append(Partition(name=name, default=any(f[0].endswith("*") for f in lines), time_limit=first[1],
                               max_minutes=limit, nodes=sum(int(f[2]) for f in lines if f[2].isdigit()),
                               gpus_per_node=max(n for n, _ in gpus),
                               gpu_types=tuple(dict.fromkeys(t for _, ts in gpus for t in ts)), state=first[4]))
    return found


@dataclass(frozen=True)
class Limit:
    """One limit on a user's jobs: `key` is sacctmgr's name, `owner` where it is set ('account a', 'QOS q')."""

    key: str
    value: int
    owner: str

    @property
    def caps_submit(self) -> bool:
        """Whether it caps queued jobs (each array task counts), not only running ones."""
        return self.key in SUBMIT_KEYS


@dataclass(frozen=True)
class SubmitLimits:
    """A user's job limits from their associations and the QOS these name (none set: `limits` is empty)."""

    accounts: tuple[str, ...]
    qos: tuple[str, ...]
    limits: tuple[Limit, ...]

    @property
    def max_submit(self) -> int | None:
        """The fewest jobs (array tasks) the user may have queued at once; None when nothing caps it."""
        values = [limit.value for limit in self.limits if limit.caps_submit]
        return min(values) if values else None


def _rows(text: str, fields: tuple[str, ...]) -> list[dict[str, str]]:
    return [dict(zip(fields, line.split("|"), strict=False)) for line in text.splitlines() if line.strip()]


def parse_submit_limits(assoc_text: str, qos_text: str) -> SubmitLimits:
    """`sacctmgr -n -P show assoc ... format=<ASSOC_FIELDS>` and `... show qos format=<QOS_FIELDS>` -> the
    limits set on the user's associations and on the QOS they may use."""
    assocs = _rows(assoc_text, ASSOC_FIELDS)
    limits: list[Limit] = []
    for row in assocs:
        owner = f"account {row.get('Account', '')}" + (f" partition {row['Partition']}" if row.get("Partition") else "")
        limits += [Limit(key, int(row[key]), owner) for key in ASSOC_FIELDS[3:] if row.get(key, "").isdigit()]
    names = tuple(dict.fromkeys(q for row in assocs for q in row.get("QOS", "").split(",") if q))
    for row in _rows(qos_text, QOS_FIELDS):
        if row.get("Name") in names:
            limits += [Limit(key, int(row[key]), f"QOS {row['Name']}") for key in QOS_FIELDS[1:]
                       if row.get(key, "").isdigit()]
    accounts = tuple(dict.fromkeys(row.get("Account", "") for row in assocs if row.get("Account")))
    return SubmitLimits(accounts, names, tuple(limits))


# ------------------------------------------------------------------------------------------ readers

def read_version() -> str:
    try:
        return parse_version(ask(["sinfo", "--version"]))
    except SiteError:
        return parse_version(ask(["scontrol", "--version"]))


def read_config() -> dict[str, str]:
    """`scontrol show config`, parsed (asks slurmctld: a SiteError while it is away)."""
    return parse_config(ask(["scontrol", "show", "config"]))


def max_array_size(config: dict[str, str] | None = None) -> int | None:
    """The cluster's MaxArraySize (an array's task ids run from 0 to this minus one), from `config` or asked
    of `scontrol show config`; None when Slurm does not say (no Slurm here, or slurmctld not answering)."""
    if config is None:
        try:
            config = read_config()
        except SiteError:
            return None
    return config_int(config, "MaxArraySize")


def read_partitions() -> list[Partition]:
    return parse_partitions(ask(["sinfo", "-h", "-o", SINFO_FORMAT]))


def check_sacct() -> None:
    """sacct answers (it needs slurmdbd); a SiteError says why not ('accounting storage is disabled')."""
    ask(["sacct", "-n", "-X", "-S", "now", "-o", "JobID"])


def read_submit_limits(user: str | None = None, cluster: str | None = None) -> SubmitLimits:
    """The user's limits as sacctmgr shows them; a SiteError when it does not answer or shows no association."""
    user = user or current_user()
    where = [f"user={user}", *([f"cluster={cluster}"] if cluster else [])]
    assoc = ask(["sacctmgr", "-n", "-P", "show", "assoc", *where, f"format={','.join(ASSOC_FIELDS)}"])
    if not assoc.strip():
        raise SiteError(f"sacctmgr shows no association for user {user}")
    qos = ask(["sacctmgr", "-n", "-P", "show", "qos", f"format={','.join(QOS_FIELDS)}"])
    return parse_submit_limits(assoc, qos)


# ------------------------------------------------------------------------------------------ the probe job

@dataclass(frozen=True)
class Probe:
    """What the probe job found: `visible` True (its file came back), False (it ran, the file is not here) or
    None (it did not run in time, or was refused); `detail` says it in one line."""

    visible: bool | None
    detail: str


def job_state(job_id: str) -> tuple[str, str, str]:
    """(state, reason, node) of a job: squeue while it knows the job, else sacct; ('', '', '') if neither."""
    for cmd in (["squeue", "-h", "-t", "all", "-j", job_id, "-o", "%T|%r|%N"],
                ["sacct", "-n", "-P", "-X", "-j", job_id, "-o", "State,ExitCode,NodeList"]):
        try:
            line = next((x for x in ask(cmd).splitlines() if x.strip()), "")
        except SiteError:
            continue
        if line:
            state, reason, node = [*line.split("|"), "", ""][:3]
            return (state.split() or [""])[0], reason if reason not in ("None", "0:0") else "", node
    return "", "", ""


def probe_runs_root(runs_root: Path, timeout_s: float = 120, flags: tuple[str, ...] = (), poll_s: float = 1.0,
                    grace_s: float = 30.0, sleep: Callable[[float], None] = time.sleep) -> Probe:
    """Submit a 1-minute job (with `flags`: partition, account, qos) that writes its host name into a new
    file under the runs root, and wait up to `timeout_s` for the file to appear here. A job that ended
    without the file showing within `grace_s` (NFS caches directory lookups) means the runs root is not
    that directory on the node. The file (and a runs root made for the probe) is removed again."""
    root = runs_root.absolute()
    made = [p for p in (root, *root.parents) if not p.exists()]  # removed again, innermost first
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        return Probe(False, f"cannot create {root}: {err.strerror or err}")
    target = root / f".{PROBE_NAME}-{uuid.uuid4().hex[:12]}"
    part = shlex.quote(f"{target}.part")
    script = f'echo "${{SLURMD_NODENAME:-$(hostname)}}" > {part} && mv {part} {shlex.quote(str(target))}'
    try:
        cmd = ["sbatch", "--parsable", f"--job-name={PROBE_NAME}", "--time=1", "--ntasks=1", "--output=/dev/null",
               "--chdir=/", *flags, "--wrap", script]
        job_id = ask(cmd).strip().split(";")[0]
        return _wait_for(job_id, target, timeout_s, poll_s, grace_s, sleep)
    except SiteError as err:
        return Probe(None, f"the probe job was refused: {err}")
    finally:
        for path in (target, Path(f"{target}.part")):
            path.unlink(missing_ok=True)
        for path in made:
            try:
                path.rmdir()
            except OSError:  # something else wrote there meanwhile: keep it
                break


def _wait_for(job_id: str, target: Path, timeout_s: float, poll_s: float, grace_s: float,
              sleep: Callable[[float], None]) -> Probe:
    start = time.monotonic()
    ended_at = None
    state, reason, node = "PENDING", "", ""
    while True:
        host = _read(target)
        if host:
            return Probe(True, f"probe job {job_id} on {host} wrote a file there, read back here")
        found = job_state(job_id)
        if found[0]:
            state, reason, node = found
        now = time.monotonic()
        if state not in ACTIVE:
            ended_at = ended_at or now
            if now - ended_at >= grace_s or now - start >= timeout_s:
                on = f" on {node}" if node else ""
                why = f" ({reason})" if reason else ""
                return Probe(False, f"probe job {job_id} ended {state}{why}{on} but its file {target} is not here: "
                                    "the runs root is not the same directory on the compute nodes (use a shared "
                                    "file system: home, project or scratch)")
        if now - start >= timeout_s:
            _scancel(job_id)
            because = f", {reason}" if reason else ""
            return Probe(None, f"probe job {job_id} did not run within {timeout_s:g} s ({state}{because}; "
                               "cancelled): not checked")
        sleep(poll_s)


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):  # not there (yet), or unreadable: not read back
        return ""


def _scancel(job_id: str) -> None:
    with contextlib.suppress(SiteError):  # already gone
        ask(["scancel", job_id])
