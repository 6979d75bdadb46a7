"""Build the static report of a sweep: report.md and report.html (tables and figures) in SWEEP_DIR/report/.

    python analysis/report.py SWEEP_DIR [--out DIR] [--source local|wandb]
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import _common

from asbatch.analysis import build_static_report


def main(argv: Sequence[str] | None = None) -> Path:
    args = _common.parser(__doc__.splitlines()[0]).parse_args(argv)
    path = build_static_report(args.sweep_dir, args.out, records=_common.load(args, history=True))
    print(path)
    return path


if __name__ == "__main__":
    main()
