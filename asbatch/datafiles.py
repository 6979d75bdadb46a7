"""What each data set is, without loading it: image shape, classes, training-set size and its files on disk.

No torch here: the spec checks (OOD shapes, batch size against the training set, init_from fits) and the
command line's "is the data there?" check before any run dir is made both ask this table, while
`asbatch.data` (which loads the files) takes its directory names from it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

DATA_ENV = "ASBATCH_DATA"
CIFAR10_DIR = "cifar-10-batches-py"
CIFAR100_DIR = "cifar-100-python"
SVHN_DIR = "svhn"


@dataclass(frozen=True)
class DatasetFacts:
    """One data set: C x H x W of its images, its classes, its training-set size, its files per split under
    the data root (none: it ships with scikit-learn or is generated)."""

    image_shape: tuple[int, int, int]
    num_classes: int
    train_size: int
    files: dict[str, tuple[str, ...]] = field(default_factory=dict)


FACTS: dict[str, DatasetFacts] = {
    "cifar10": DatasetFacts((3, 32, 32), 10, 50_000, {
        "train": tuple(f"{CIFAR10_DIR}/data_batch_{i}" for i in range(1, 6)), "test": (f"{CIFAR10_DIR}/test_batch",)}),
    "cifar100": DatasetFacts((3, 32, 32), 100, 50_000, {
        "train": (f"{CIFAR100_DIR}/train",), "test": (f"{CIFAR100_DIR}/test",)}),
    "svhn": DatasetFacts((3, 32, 32), 10, 73_257, {
        "train": (f"{SVHN_DIR}/train_32x32.mat",), "test": (f"{SVHN_DIR}/test_32x32.mat",)}),
    "digits": DatasetFacts((1, 8, 8), 10, 1_437),    # scikit-learn's 1797 digits less the 360 test images
    "digits_0to7": DatasetFacts((1, 8, 8), 8, 1_159),  # the classes 0-7 of digits' training split
    "digits_8to9": DatasetFacts((1, 8, 8), 10, 354),   # every 8 and 9 (digits_0to7's OOD set)
    "synthetic": DatasetFacts((3, 8, 8), 10, 1_000),  # asbatch.data.synthetic's defaults
}


def resolve_root(root: str | os.PathLike[str] | None = None, environ: Mapping[str, str] | None = None) -> Path:
    """The data root: `root` if given, else $ASBATCH_DATA if set and non-empty, else ./data."""
    if root is not None:
        return Path(root)
    return Path((os.environ if environ is None else environ).get(DATA_ENV) or "data")


class DataMissingError(FileNotFoundError):
    """A data set's files are missing under its data root; the message is one line naming the file and the fix."""


def check_present(needs: Iterable[tuple[str, str, str | None]], environ: Mapping[str, str] | None = None) -> None:
    """Raise DataMissingError for the first missing file of the (data set, split, data.root) triples."""
    for name, split, root in dict.fromkeys(needs):
        base = resolve_root(root, environ)
        for rel in FACTS[name].files.get(split, ()):
            path = base / rel
            try:
                present = path.is_file()
            except OSError:  # a name too long for the file system: not there either
                present = False
            if not present:
                raise DataMissingError(
                    f"{name}: missing {path.absolute()}; data sets are never downloaded during a run, so on a machine "
                    f"with internet run: asbatch data download {name} --root {base.absolute()}")


def data_needs(configs) -> list[tuple[str, str, str | None]]:
    """(data set, split, root) of every file set these runs read: train and test split of their data, the
    test split of their OOD set."""
    needs = []
    for config in configs:
        data = config.data
        needs += [(data.name, "train", data.root), (data.name, "test", data.root)]
        if config.eval.ood:
            needs.append((config.eval.ood, "test", data.root))
    return needs
