"""`asbatch run`: train every run of a spec (or one run's config) in this process."""

from __future__ import annotations

import os
from pathlib import Path

import click

from asbatch.cli.app import error_line, main
from asbatch.cli.common import check_data_or_exit, load_sweep_or_exit, make_runs_root, runs_root_option


@main.command("run")
@click.argument("spec_path", metavar="CONFIG_OR_SPEC", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@runs_root_option
@click.option("--stage", "stages", multiple=True, help="only these stages (default: all, in order)")
def run_command(spec_path: Path, runs_root: Path, stages: tuple[str, ...]) -> None:
    """Run every run of a spec (or one run's config) in this process, stage by stage.

    Finished runs are skipped, interrupted ones resume. Under torchrun / srun every process runs this
    command and the runs train with DDP.
    """
    from asbatch.launch.task import export_distributed_env

    export_distributed_env()  # `srun -n N asbatch run SPEC`: one DDP run of N ranks, not N rank-0 runs
    sweep, selected = load_sweep_or_exit(spec_path, stages, runs_root)  # before torch is imported
    _check_upstream_finished(spec_path, sweep, selected, runs_root)
    check_data_or_exit(sweep, selected)
    make_runs_root(runs_root)
    from rich.console import Console

    from asbatch.analysis import record_from_results, run_table
    from asbatch.analysis.effect import as_effect_lines
    from asbatch.train import train

    results = []
    for stage in selected:
        for run in stage.runs:
            results.append(train(run.config, runs_root / sweep.name / run.run_id, progress_bar=True))
    if int(os.environ.get("RANK", "0")) == 0:
        bayesian = [r for r in results if r["config"]["model"]["bayesian"]]
        console = Console(width=max(Console().width, 130))
        console.print(run_table(bayesian, title=f"{sweep.name}: Bayesian runs (accuracy in %)"))
        for line in as_effect_lines(record_from_results(r) for r in bayesian):
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
