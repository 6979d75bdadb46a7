"""Training loss and test accuracy per epoch, mean over seeds with a ± 1 std band, per group.
Writes <out>/training_curves.png.

    python analysis/training_curves.py SWEEP_DIR [--out DIR] [--source local|wandb]
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import _common


def main(argv: Sequence[str] | None = None) -> Path:
    return _common.plot_main("training_curves", __doc__.splitlines()[0], argv, history=True)


if __name__ == "__main__":
    main()
