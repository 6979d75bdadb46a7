"""`asbatch run`: train every run of a spec (or one run's config) in this process, stoppable with Ctrl-C."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import click

from asbatch.cli.app import error_line, main
from asbatch.cli.common import (
    check_data_or_exit,
    load_sweep_or_exit,
    make_runs_root,
    overrides_argument,
    runs_root_option,
    spec_argument,
)

SIGNAL_NAMES = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM", signal.SIGHUP: "SIGHUP"}


class StopSignals:
    """Ctrl-C, `kill` (SIGTERM: also what Slurm sends to an `srun asbatch run` it cancels or times out) and a
    closed terminal (SIGHUP) ask training to stop after the current step (every rank saves a checkpoint); a
    second signal ends the process at once (the newest complete checkpoint is kept: they are written
    atomically). The exit code is 128 + the first signal, as a shell reports a process that signal ended.
    A signal this process was started to ignore (`nohup`, a background job) stays ignored."""

    def __init__(self, speak: bool) -> None:
        self.count, self.speak, self.first = 0, speak, signal.SIGINT
        self.on_force: list = []  # called before a second signal ends the process (the workers' kill)

    def install(self) -> StopSignals:
        for signum in SIGNAL_NAMES:
            if signal.getsignal(signum) is not signal.SIG_IGN:
                signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: object) -> None:
        if signum == signal.SIGHUP:  # the terminal is gone: output must not fail the checkpoint that follows
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1), os.dup2(devnull, 2)
        self.count += 1
        name = SIGNAL_NAMES[signum]
        if self.count > 1:
            self._say(f"\n{name} again: stopped at once; the run resumes from its newest checkpoint")
            for force in self.on_force:
                force()
            os._exit(self.exit_code)
        self.first = signum
        self._say(f"\n{name}: stopping after the current step and saving a checkpoint ({name} again stops at once)")

    def _say(self, text: str) -> None:
        if self.speak:
            print(text, file=sys.stderr, flush=True)

    @property
    def exit_code(self) -> int:
        return 128 + self.first

    @property
    def what(self) -> str:
        return "interrupted" if self.first == signal.SIGINT else f"stopped by {SIGNAL_NAMES[self.first]}"

    def is_set(self) -> bool:
        return self.count > 0


@main.command("run", short_help="Train a spec's runs on this machine (Ctrl-C stops, rerun resumes).")
@spec_argument("CONFIG_OR_SPEC")
@overrides_argument
@runs_root_option
@click.option("--stage", "stages", multiple=True, help="only these stages (default: all, in order)")
@click.option("--jobs", "-j", type=click.IntRange(1, 4096), default=None,
              help="train up to this many runs at once, each in its own process (default: fill the machine)")
def run_command(spec_path: Path, overrides: tuple[str, ...], runs_root: Path, stages: tuple[str, ...],
                jobs: int | None) -> None:
    """Train every run of a spec (or one run's config) in this process, stage by stage.

    OVERRIDES are KEY=VALUE with a dotted RunConfig path: `schedule.epochs=2` sets it for every run,
    `adversarial.lam=[0,0.8]` sets a grid axis; they are part of the runs' configs and ids. Finished runs
    are skipped, interrupted ones resume. Ctrl-C (or SIGTERM, SIGHUP) stops after the current step with a
    checkpoint (exit 130; 143, 129; run the same command to resume); a second signal stops at once. The
    profile's env (e.g. OMP_NUM_THREADS) applies here as in a submitted job, so `run` and `submit` give the
    same results. Under torchrun / srun every process runs this command and the runs train with DDP.

    --jobs K trains up to K runs at once, each in its own worker process with its share of the CPUs (or of
    the GPUs); the results are the same as one by one. The default fills the machine: CPU cores divided by
    the profile's threads per run (OMP_NUM_THREADS), or one run per GPU times the stage's runs_per_task.
    --jobs 1 trains them one after another in this process.
    """
    from asbatch.launch.task import export_distributed_env, release_process_group

    export_distributed_env()  # `srun -n N asbatch run SPEC`: one DDP run of N ranks, not N rank-0 runs
    sweep, selected, _ = load_sweep_or_exit(spec_path, stages, runs_root, overrides)  # before torch is imported
    _check_upstream_finished(spec_path, sweep, selected, runs_root)
    check_data_or_exit(sweep, selected)
    from asbatch.launch.environment import apply_profile_env

    apply_profile_env(sweep.env)  # as the job script / the local task does, before torch is imported
    make_runs_root(runs_root)
    main_rank = int(os.environ.get("RANK", "0")) == 0
    runs = [run for stage in selected for run in stage.runs]
    from asbatch.names import count, point_label

    if main_rank:
        given = f" with {' '.join(overrides)}" if overrides else ""
        click.echo(f"{sweep.name}: {count(len(runs), 'run')} in "
                   f"{', '.join(s.name for s in selected)}{given} -> {runs_root / sweep.name}; Ctrl-C stops after the "
                   "current step")
    slots = _slots(sweep, selected, runs, jobs)
    if len(slots) > 1 and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        error_line(f"--jobs {len(slots)}: under torchrun / srun every process trains the same run with DDP; use "
                   "--jobs 1", 2)
    stop = StopSignals(speak=main_rank).install()
    if len(slots) > 1:
        from asbatch.cli.packed import run_packed

        _print_table(sweep.name, run_packed(sweep, selected, runs_root, slots, stop), runs_root)
        return
    from asbatch.train import TrainingInterrupted, train

    results = []
    try:
        for run in runs:
            if stop.is_set():
                _interrupted(f"{sweep.name}: {stop.what} before run {run.run_id}", stop.exit_code)
            try:
                results.append(train(run.config, runs_root / sweep.name / run.run_id, should_stop=stop.is_set,
                                     label=point_label(run.point)))
            except TrainingInterrupted as err:
                _interrupted(f"{run.run_id} {stop.what} at {err.where}; checkpoint saved", stop.exit_code)
    finally:
        release_process_group()
    if main_rank:
        _print_table(sweep.name, results, runs_root)


def _slots(sweep, selected, runs, jobs: int | None) -> list:
    """Where the runs train at once (`asbatch.launch.pack.local_slots`: `--jobs`, by default the machine
    filled); none (one by one, here) with one run, `--jobs 1`, or under torchrun / srun without `--jobs`."""
    from asbatch.launch.pack import local_slots, visible_gpus

    if len(runs) < 2 or jobs == 1 or (jobs is None and int(os.environ.get("WORLD_SIZE", "1")) > 1):
        return []
    gpus = visible_gpus() if any(not run.config.cpu for run in runs) else []
    return local_slots(sweep.env, len(runs), jobs, gpus, max(stage.resources.runs_per_task for stage in selected))


def _interrupted(what: str, code: int) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        click.echo(f"{what}; run the same command to resume", err=True)
    sys.exit(code)


def _print_table(sweep: str, results: list[dict], runs_root: Path) -> None:
    from rich import box

    from asbatch.analysis import record_from_results, run_table
    from asbatch.analysis.effect import as_effect_lines
    from asbatch.cli.common import console as make_console
    from asbatch.cli.common import fit_table, root_flag

    bayesian = [r for r in results if r["config"]["model"]["bayesian"]]
    if not bayesian:
        return
    console = make_console()
    table = run_table(bayesian, title=f"{sweep}: Bayesian runs (accuracy in %)")
    table.box, table.title_justify, table.show_edge = box.SIMPLE_HEAD, "left", False
    kept = [c.header for c in table.columns if str(c.header).endswith("kept")]
    dropped = fit_table(table, console.width, [*reversed(kept), "model", "seed"])
    console.print(table)
    if dropped:
        console.print(f"(not shown, the terminal is {console.width} columns wide: {', '.join(dropped)}; "
                      f"`asbatch table {sweep}{root_flag(runs_root)}` has them all)", style="dim")
    for line in as_effect_lines(record_from_results(r) for r in bayesian):  # what the table says, in one line
        console.print(line, highlight=False, soft_wrap=True)


def _check_upstream_finished(spec_path: Path, sweep, selected, runs_root: Path) -> None:
    """With --stage, a run's upstream runs in stages not selected must have finished already (this process
    trains the selected stages only)."""
    from asbatch.rundir import SweepDir

    names = {stage.name for stage in selected}
    for stage in selected:
        for run in stage.runs:
            for up_stage, up_id in run.upstream.items():
                if up_stage not in names and not SweepDir.at(runs_root, sweep.name).run(up_id).is_finished():
                    error_line(f"{spec_path}: --stage {stage.name}: run {run.run_id} needs run {up_id} of stage "
                               f"{up_stage!r}, which has not finished under {runs_root}; run stage {up_stage!r} too", 2)
