"""Print the paper's tables for a sweep (Markdown by default); with --out also write tables.<ext> there.

    python analysis/tables.py runs/fine_tune_c100 [--format md|latex|csv|html] [--out DIR]
"""

from __future__ import annotations

from collections.abc import Sequence

import _common

from asbatch.analysis import sweep_tables

EXTENSIONS = {"md": "md", "latex": "tex", "csv": "csv", "html": "html"}


def main(argv: Sequence[str] | None = None) -> str:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--format", choices=tuple(EXTENSIONS), default="md")
    args = p.parse_args(argv)
    text = sweep_tables(_common.load(args), args.format)
    print(text, end="")
    if args.out is not None:
        (_common.out_dir(args) / f"tables.{EXTENSIONS[args.format]}").write_text(text)
    return text


if __name__ == "__main__":
    main()
