"""Shared command line of the analysis scripts: `python analysis/<name>.py SWEEP_DIR [--out DIR]
[--source local|wandb] [--wandb-path ENTITY/PROJECT]`. The logic lives in asbatch.analysis."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

try:
    import asbatch  # noqa: F401
except ImportError:  # run from a source tree that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from asbatch.analysis import RecordList, describe, load_records
from asbatch.cli.app import DEBUG_ENV, error_line, is_bad_input


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("sweep_dir", type=Path, metavar="SWEEP_DIR", help="<runs root>/<sweep>: the sweep's run dirs")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: SWEEP_DIR/report)")
    p.add_argument("--source", choices=("local", "wandb"), default="local",
                   help="read run dirs (default) or the W&B runs of group <sweep name>")
    p.add_argument("--wandb-path", default=None,
                   help="W&B entity/project (default: from the runs' tracking config, else 'asbatch')")
    return p


def load(args: argparse.Namespace, history: bool = False) -> RecordList:
    """The sweep's records; `history=True` also reads every run's per-epoch rows (the training curves). A
    sweep that cannot be read ends the script with asbatch's one `error:` line (exit 2: a wrong path or a
    damaged file; 1: W&B could not be asked), as `asbatch table` does."""
    try:
        records = load_records(args.sweep_dir, source=args.source, wandb_path=args.wandb_path, history=history)
    except Exception as err:
        if os.environ.get(DEBUG_ENV, "").lower() not in ("", "0", "false", "no"):
            raise
        error_line(err, 2 if isinstance(err, (FileNotFoundError, NotADirectoryError)) or is_bad_input(err) else 1)
    print(f"{args.sweep_dir.name}: {describe(records)}", file=sys.stderr)
    return records


def out_dir(args: argparse.Namespace) -> Path:
    path = args.out if args.out is not None else args.sweep_dir / "report"
    path.mkdir(parents=True, exist_ok=True)
    return path


def plot_main(name: str, description: str, argv: Sequence[str] | None = None, history: bool = False) -> Path:
    """A figure script: parse, load the records, write `<out>/<name>.png`, print its path."""
    from asbatch.analysis import ANALYSIS_PLOTS

    args = parser(description).parse_args(argv)
    path = ANALYSIS_PLOTS[name][1](load(args, history), out_dir(args) / f"{name}.png")
    print(path)
    return path
