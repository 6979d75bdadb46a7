"""Reliability diagrams per group (the bins of its seeds pooled), with and without AS.
Writes <out>/reliability.png (run dirs only: W&B keeps the per-run diagram as an image).

    python analysis/reliability.py SWEEP_DIR [--out DIR]
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import _common


def main(argv: Sequence[str] | None = None) -> Path:
    return _common.plot_main("reliability", __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    main()
