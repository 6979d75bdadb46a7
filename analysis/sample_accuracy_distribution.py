"""Distribution of the accuracies of single weight samples, with and without AS.
Writes <out>/sample_accuracy_distribution.png.

    python analysis/sample_accuracy_distribution.py SWEEP_DIR [--out DIR] [--source local|wandb]
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import _common


def main(argv: Sequence[str] | None = None) -> Path:
    return _common.plot_main("sample_accuracy_distribution", __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    main()
