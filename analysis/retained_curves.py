"""Ensembled accuracy against the fraction of most certain data retained, with and without AS.
Writes <out>/retained_curves.png.

    python analysis/retained_curves.py SWEEP_DIR [--out DIR] [--source local|wandb]
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import _common


def main(argv: Sequence[str] | None = None) -> Path:
    return _common.plot_main("retained_curves", __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    main()
