"""Ensembled and lowest accuracy against lambda, per model.
Writes <out>/lambda_influence.png.

    python analysis/lambda_influence.py SWEEP_DIR [--out DIR] [--source local|wandb]
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import _common


def main(argv: Sequence[str] | None = None) -> Path:
    return _common.plot_main("lambda_influence", __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    main()
