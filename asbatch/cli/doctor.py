"""`asbatch doctor [SPEC]`: the site facts a sweep depends on, each ok, a warning or a problem, before anything runs.

One line per fact: Slurm's version, MaxArraySize and MaxJobCount, each partition (time limit, nodes, GPUs),
accounting, the user's submit limits, whether the runs root is the same directory on a compute node (a probe
job writes a file there), W&B credentials, and with a SPEC whether its stages fit the partitions they name
and its data is on disk. Exit 0 without problems (warnings allowed), 1 with a problem (the last line names
them), 2 for bad input (a spec that does not load).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import click

from asbatch.cli.app import main
from asbatch.cli.common import (
    FiniteFloat,
    check_wandb_mode,
    checked_runs_root,
    load_sweep_or_exit,
    overrides_argument,
    runs_root_option,
)
from asbatch.names import count

OK, WARNING, PROBLEM, SKIPPED = "ok", "warning", "problem", "skipped"
STYLE = {OK: "green", WARNING: "yellow", PROBLEM: "red", SKIPPED: "blue"}
WANDB_HOST = "api.wandb.ai"


@dataclass(frozen=True)
class Fact:
    """One line of the report."""

    status: str
    name: str
    detail: str


@dataclass
class Site:
    """What the Slurm checks learned that the spec checks use (empty without Slurm or when it did not answer)."""

    partitions: list | None = None
    max_array_size: int | None = None
    max_submit: int | None = None


@main.command("doctor", short_help="Check this site (Slurm, runs root, W&B) and a spec before submitting.")
@click.argument("spec_path", metavar="[SPEC]", required=False,
                type=click.Path(exists=True, dir_okay=False, path_type=Path))
@overrides_argument
@runs_root_option
@click.option("--probe-timeout", type=FiniteFloat(1, 3600), default=120, show_default=True,
              help="seconds to wait for the probe job that writes a file under the runs root from a compute node")
@click.option("--no-probe", is_flag=True, help="submit no probe job (the runs root is not checked from a node)")
def doctor_command(spec_path: Path | None, overrides: tuple[str, ...], runs_root: Path, probe_timeout: float,
                   no_probe: bool) -> None:
    """Check the site facts that matter before submitting: Slurm's version and limits (MaxArraySize,
    MaxJobCount), the partitions with their time limits, nodes and GPUs, accounting, your submit limits,
    whether the runs root is visible from a compute node (a probe job of a few seconds writes a file there),
    W&B credentials; with SPEC (and KEY=VALUE overrides, as for `submit`) also whether its stages' partitions,
    time limits and GPUs fit the cluster and its data is on disk.

    Each fact is ok, a warning (worth knowing, nothing fails) or a problem. Exit 0 without problems, 1 with
    one (the last line names them), 2 when the spec does not load. Without sbatch: the local executor, and
    only W&B and the spec are checked.
    """
    sweep = None
    if spec_path is not None:
        sweep, _, _ = load_sweep_or_exit(spec_path, (), runs_root, overrides)
    else:
        checked_runs_root(runs_root)
        check_wandb_mode(os.environ)
    facts: list[Fact] = []
    site = Site()
    from asbatch.launch import site as slurm_site

    if slurm_site.has_slurm():
        flags = _probe_flags(sweep)
        facts += slurm_facts(site, runs_root, None if no_probe else probe_timeout, flags)
    else:
        facts.append(Fact(OK, "Slurm", "no Slurm here (no sbatch on PATH): the local executor (`asbatch submit` "
                                       "trains the runs one after another in a background process)"))
    facts += wandb_facts(os.environ, sweep)
    if sweep is not None:
        facts += spec_facts(spec_path, sweep, site if slurm_site.has_slurm() else None)
    print_facts(facts)
    sys.exit(1 if any(f.status == PROBLEM for f in facts) else 0)


def print_facts(facts: list[Fact]) -> None:
    """One aligned line per fact, then a summary line."""
    width = max(len(f.name) for f in facts)
    for fact in facts:
        status = click.style(f"{fact.status:<8}", fg=STYLE[fact.status], bold=fact.status == PROBLEM)
        click.echo(f"{status} {fact.name:<{width}}  {fact.detail}")
    problems = [f.name for f in facts if f.status == PROBLEM]
    warnings = [f.name for f in facts if f.status == WARNING]
    noted = f" ({count(len(warnings), 'warning')}: {', '.join(dict.fromkeys(warnings))})" if warnings else ""
    if problems:
        click.echo(f"{count(len(problems), 'problem')}: {', '.join(dict.fromkeys(problems))}{noted}")
    else:
        click.echo(f"no problems{noted}")


# ------------------------------------------------------------------------------------------ Slurm

def slurm_facts(site: Site, runs_root: Path, probe_timeout: float | None, probe_flags: tuple[str, ...]) -> list[Fact]:
    """The cluster's facts, filling `site` with what the spec checks need."""
    from asbatch.launch import site as slurm_site

    facts = []
    try:
        facts.append(Fact(OK, "Slurm", f"version {slurm_site.read_version()}"))
    except slurm_site.SiteError as err:
        facts.append(Fact(WARNING, "Slurm", f"version not known: {err}"))
    try:
        config = slurm_site.read_config()
    except slurm_site.SiteError as err:
        return [*facts, Fact(PROBLEM, "Slurm", f"the controller does not answer ({err}): nothing can be submitted")]
    facts += config_facts(config)
    site.max_array_size = slurm_site.max_array_size(config)
    try:
        site.partitions = slurm_site.read_partitions()
        facts += partition_facts(site.partitions)
    except slurm_site.SiteError as err:
        facts.append(Fact(PROBLEM, "partitions", f"not known: {err}"))
    facts.append(accounting_fact(config))
    facts.append(limits_fact(site, config.get("ClusterName")))
    facts.append(runs_root_fact(runs_root, probe_timeout, probe_flags))
    return facts


def config_facts(config: dict[str, str]) -> list[Fact]:
    """MaxArraySize and MaxJobCount from `scontrol show config`."""
    from asbatch.launch.site import config_int

    size, jobs = config_int(config, "MaxArraySize"), config_int(config, "MaxJobCount")
    facts = []
    if size is None:
        facts.append(Fact(WARNING, "MaxArraySize", "not shown by scontrol show config"))
    elif size <= 1:
        facts.append(Fact(PROBLEM, "MaxArraySize", f"{size}: job arrays are off on this cluster"))
    else:
        facts.append(Fact(OK, "MaxArraySize", f"{size} (array task ids 0-{size - 1}: at most {size} runs per array)"))
    if jobs is None:
        facts.append(Fact(WARNING, "MaxJobCount", "not shown by scontrol show config"))
    else:
        facts.append(Fact(OK, "MaxJobCount", f"{jobs} (jobs the controller holds at once, every user's together)"))
    return facts


def partition_facts(partitions: list) -> list[Fact]:
    if not partitions:
        return [Fact(PROBLEM, "partitions", "sinfo shows none: nothing can run")]
    facts = []
    for p in partitions:
        gpus = "no GPUs" if not p.gpus_per_node else \
            f"{p.gpus_per_node} GPUs per node{' (' + ', '.join(p.gpu_types) + ')' if p.gpu_types else ''}"
        default = " (default)" if p.default else ""
        detail = f"time limit {p.time_limit}, {count(p.nodes, 'node')}, {gpus}, {p.state}"
        facts.append(Fact(OK if p.up else WARNING, f"partition {p.name}{default}", detail))
    return facts


def accounting_fact(config: dict[str, str]) -> Fact:
    from asbatch.launch.site import SiteError, accounting_storage, check_sacct

    storage = accounting_storage(config)
    if storage is None:
        return Fact(WARNING, "accounting", "off (AccountingStorageType none): sacct cannot tell how a finished job "
                                           "ended; status reads the run dirs and squeue")
    try:
        check_sacct()
    except SiteError as err:
        return Fact(WARNING, "accounting", f"on ({storage}) but sacct fails: {err}")
    return Fact(OK, "accounting", f"on ({storage}; sacct answers)")


def limits_fact(site: Site, cluster: str | None) -> Fact:
    from asbatch.launch.site import SiteError, read_submit_limits

    try:
        limits = read_submit_limits(cluster=cluster)
    except SiteError as err:
        return Fact(WARNING, "submit limits", f"not shown ({err})")
    where = ", ".join(filter(None, [f"account {', '.join(limits.accounts)}" if limits.accounts else "",
                                    f"QOS {', '.join(limits.qos)}" if limits.qos else ""]))
    if not limits.limits:
        return Fact(OK, "submit limits", f"none set ({where})")
    site.max_submit = limits.max_submit
    shown = "; ".join(f"{limit.key}={limit.value} ({limit.owner})" for limit in limits.limits)
    return Fact(OK, "submit limits", f"{shown}; every array task counts as one job")


def runs_root_fact(runs_root: Path, probe_timeout: float | None, flags: tuple[str, ...]) -> Fact:
    from asbatch.launch.site import probe_runs_root

    where = str(runs_root.absolute())
    if probe_timeout is None:
        return Fact(SKIPPED, "runs root", f"{where}: not checked from a compute node (--no-probe)")
    probe = probe_runs_root(runs_root, probe_timeout, flags)
    status = {True: OK, False: PROBLEM, None: WARNING}[probe.visible]
    return Fact(status, "runs root", f"{where}: {probe.detail}")


def _probe_flags(sweep) -> tuple[str, ...]:
    """The first stage's partition, account and qos: the probe job runs where the spec's jobs will."""
    if sweep is None or not sweep.stages:
        return ()
    r = sweep.stages[0].resources
    return tuple(f"--{name}={getattr(r, name)}" for name in ("partition", "account", "qos") if getattr(r, name))


# ------------------------------------------------------------------------------------------ W&B

def wandb_facts(environ, sweep) -> list[Fact]:
    """Credentials for W&B (WANDB_API_KEY, or a netrc entry for its host), and WANDB_MODE as the runs see it."""
    env = {**environ, **(sweep.env if sweep is not None else {})}
    modes = sorted({run.config.tracking.wandb for run in sweep.runs}) if sweep is not None else []
    if sweep is not None and modes == ["disabled"]:
        return [Fact(OK, "W&B", "not used by the spec's runs (tracking.wandb: disabled)")]
    mode = env.get("WANDB_MODE", "")
    origin = "the profile's env" if sweep is not None and "WANDB_MODE" in sweep.env else "the environment"
    if mode in ("offline", "dryrun", "disabled"):
        then = "no tracking" if mode == "disabled" else "`asbatch sync` uploads offline runs later"
        return [Fact(OK, "W&B", f"WANDB_MODE={mode} (from {origin}): no credentials needed here; {then}")]
    found, why = wandb_credentials(env)
    used = f" (the spec's runs: tracking.wandb {', '.join(modes)})" if modes else ""
    if found:
        return [Fact(OK, "W&B", f"credentials: {found}{used}")]
    return [Fact(WARNING, "W&B", f"no credentials ({why}): runs with tracking.wandb auto log offline, online ones "
                                 f"stop tracking; run `wandb login` or set WANDB_API_KEY{used}")]


def wandb_credentials(env) -> tuple[str, str]:
    """(where credentials are, '') or ('', why none were found): WANDB_API_KEY, else the netrc entry `wandb
    login` writes for the server's host ($WANDB_BASE_URL, else api.wandb.ai) in $NETRC or ~/.netrc."""
    import netrc
    from urllib.parse import urlsplit

    if env.get("WANDB_API_KEY"):
        return "WANDB_API_KEY is set", ""
    host = urlsplit(env.get("WANDB_BASE_URL", "")).hostname or WANDB_HOST
    path = Path(env.get("NETRC") or Path(env.get("HOME") or Path.home()) / ".netrc")
    if not path.is_file():
        return "", f"no WANDB_API_KEY, no {path}"
    try:
        entry = netrc.netrc(str(path)).authenticators(host)
    except (netrc.NetrcParseError, OSError) as err:
        return "", f"no WANDB_API_KEY; {path} does not parse: {' '.join(str(err).split())}"
    if entry and entry[2]:
        return f"{path} has an entry for {host}", ""
    return "", f"no WANDB_API_KEY, no {host} entry in {path}"


# ------------------------------------------------------------------------------------------ the spec

def spec_facts(spec_path: Path, sweep, site: Site | None) -> list[Fact]:
    """The spec loads; with Slurm, each stage fits its partition; the data of every run is on disk."""
    stages = ", ".join(f"{s.name} ({len(s.runs)})" for s in sweep.stages)
    facts = [Fact(OK, "spec", f"{spec_path}: sweep {sweep.name}, {count(len(sweep.runs), 'run')} (stages {stages})")]
    if site is not None:
        facts += [stage_fact(stage, site) for stage in sweep.stages]
    facts.append(data_fact(sweep))
    return facts


def stage_fact(stage, site: Site) -> Fact:
    """Whether a stage fits the cluster: its partition exists, its time limit, nodes and GPUs fit it, its
    array tasks are not more than the user's submit limit (more than MaxArraySize are split, said as a note)."""
    from asbatch.launch.pack import task_count
    from asbatch.launch.site import format_minutes

    r, name = stage.resources, f"stage {stage.name}"
    runs = len(stage.runs)
    tasks = task_count(runs, r.runs_per_task)  # array tasks: packed runs share one
    wrong, notes = [], []
    if site.max_array_size is not None and tasks > site.max_array_size:
        notes.append(f"split into {task_count(tasks, site.max_array_size)} arrays (MaxArraySize {site.max_array_size})")
    if site.max_submit is not None and tasks > site.max_submit:
        wrong.append(f"{count(tasks, 'array task')}, more than the {site.max_submit} jobs you may have queued "
                     "(pack several runs per task: resources.runs_per_task)")
    if site.partitions is None:
        return Fact(PROBLEM if wrong else WARNING, name, "; ".join([*wrong, "partitions not known"]))
    known = {p.name: p for p in site.partitions}
    part = known.get(r.partition) if r.partition else next((p for p in site.partitions if p.default), None)
    if part is None:
        named = f"partition {r.partition!r} does not exist" if r.partition else "no partition and no default one"
        wrong.append(f"{named} (partitions: {', '.join(known) or 'none'})")
        return Fact(PROBLEM, name, "; ".join(wrong))
    if part.max_minutes is not None and r.timeout_min > part.max_minutes:
        wrong.append(f"time {format_minutes(r.timeout_min)} is longer than partition {part.name}'s limit "
                     f"{part.time_limit}")
    if r.gpus_per_node > part.gpus_per_node:
        has = f"at most {part.gpus_per_node} per node" if part.gpus_per_node else "no GPUs"
        wrong.append(f"{count(r.gpus_per_node, 'GPU')} per node, but partition {part.name} has {has}")
    if r.nodes > part.nodes:
        wrong.append(f"{count(r.nodes, 'node')}, but partition {part.name} has {part.nodes}")
    if wrong:
        return Fact(PROBLEM, name, "; ".join(wrong))
    gpus = f", {count(r.gpus_per_node, 'GPU')} per node" if r.gpus_per_node else ""
    return Fact(OK, name, f"{count(runs, 'run')} on partition {part.name}: time {format_minutes(r.timeout_min)} "
                          f"within {part.time_limit}, {count(r.nodes, 'node')}{gpus}"
                          + "".join(f"; {note}" for note in notes))


def data_fact(sweep) -> Fact:
    """Every run's data sets on disk, as `asbatch submit` checks them before it writes anything."""
    from asbatch.datafiles import FACTS, DataMissingError, check_present, data_needs

    needs = data_needs(run.config for run in sweep.runs)
    try:
        check_present(needs, {**os.environ, **sweep.env})
    except DataMissingError as err:
        return Fact(PROBLEM, "data", str(err))
    names = list(dict.fromkeys(name for name, _, _ in needs))
    built_in = [n for n in names if not FACTS[n].files]
    on_disk = [n for n in names if FACTS[n].files]
    parts = ([f"{', '.join(on_disk)} on disk"] if on_disk else []) + \
        ([f"{', '.join(built_in)} built in (no files)"] if built_in else [])
    return Fact(OK, "data", "; ".join(parts))
