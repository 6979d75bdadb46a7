"""`asbatch show`: the resolved config of every run of a spec, with ids, stages and grid points; runs nothing."""

from __future__ import annotations

from pathlib import Path

import click

from asbatch.cli.app import main
from asbatch.cli.common import fail, load_sweep_or_exit, overrides_argument, spec_argument


@main.command("show", short_help="Print each run's resolved config (runs nothing).")
@spec_argument("CONFIG_OR_SPEC")
@overrides_argument
@click.option("--run", "run_id", help="only this run (its id or the start of it)")
@click.option("--stage", "stages", multiple=True, help="only these stages (default: all)")
def show_command(spec_path: Path, overrides: tuple[str, ...], run_id: str | None, stages: tuple[str, ...]) -> None:
    """Print the resolved RunConfig of every run of a spec (with OVERRIDES, KEY=VALUE as for `asbatch run`)
    as YAML documents, each headed by its run id, stage, grid point and upstream runs. Nothing is written.
    """
    import yaml

    from asbatch.names import count, point_label

    sweep, selected, mapped = load_sweep_or_exit(spec_path, stages, None, overrides)
    runs = [(stage, run) for stage in selected for run in stage.runs]
    if run_id is not None:
        exact = [(s, r) for s, r in runs if r.run_id == run_id]
        runs = exact or [(s, r) for s, r in runs if r.run_id.startswith(run_id)]
        if len(runs) != 1:
            known = ", ".join(r.run_id for s in selected for r in s.runs)
            fail(f"--run {run_id!r}: {'no' if not runs else 'more than one'} run of {spec_path} "
                 f"{'has' if not runs else 'starts with'} that id (runs: {known})", 2)
    given = f"; overrides: {', '.join(f'{k}={v!r}' for k, v in mapped.items())}" if mapped else ""
    click.echo(f"# sweep {sweep.name} from {spec_path}: {count(len(runs), 'run')}{given}")
    if run_id is None:
        from asbatch.launch.plan import packing_lines

        for stage in selected:  # on Slurm (`asbatch run --jobs` trains them as many at once as fit)
            click.echo("".join(f"# {line}\n" for line in packing_lines(stage)), nl=False)
    for i, (stage, run) in enumerate(runs):
        after = ", ".join(run.upstream.values()) or "-"
        click.echo(("---\n" if i else "") + f"# run {run.run_id}  stage {stage.name}  grid point: "
                   f"{point_label(run.point)}  after: {after}")
        click.echo(yaml.safe_dump(run.config.to_dict(), sort_keys=False), nl=False)
