"""Tiny fake CIFAR-10/100 (and SVHN) files in torchvision's exact on-disk layout, for offline tests.

The real CIFAR files are Python-2 pickles of dicts with bytes keys: b"data" is uint8 N x 3072, each row the
R, G then B planes of a 32x32 image (row-major); labels are lists of ints. Each writer returns what it wrote
as {"train": (data, labels), "test": (data, labels)} (CIFAR train batches concatenated in file order).
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np

Arrays = dict[str, tuple[np.ndarray, np.ndarray]]


class _Py2Str(bytes):
    """Bytes pickled as a Python-2 `str` (BINSTRING), like every key and name in the real files.

    Such strings load as bytes with encoding="bytes" and as str with encoding="latin1" (torchvision's
    choice); Python-3 bytes would load as bytes either way, and torchvision could not read the fakes.
    """


class _Py2Pickler(pickle._Pickler):  # the pure-Python pickler, whose dispatch table can be extended
    dispatch = pickle._Pickler.dispatch.copy()

    def _save_py2str(self, obj: _Py2Str) -> None:
        n = len(obj)
        if n < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([n]) + bytes(obj))
        else:
            self.write(pickle.BINSTRING + n.to_bytes(4, "little") + bytes(obj))

    dispatch[_Py2Str] = _save_py2str


def _py2(obj: object) -> object:
    """Mark every bytes object (dict keys, names) inside dicts and lists as a Python-2 str."""
    if isinstance(obj, bytes):
        return _Py2Str(obj)
    if isinstance(obj, dict):
        return {_py2(k): _py2(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_py2(v) for v in obj]
    return obj


def _dump(path: Path, obj: dict[bytes, object]) -> None:
    with open(path, "wb") as f:
        _Py2Pickler(f, protocol=2).dump(_py2(obj))  # protocol 2 and py2 strings, as the original files


def _images(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)


def write_fake_cifar10(root: str | os.PathLike[str], n_train_per_batch: int = 20, n_test: int = 20,
                       seed: int = 0) -> Arrays:
    """Write <root>/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}."""
    rng = np.random.default_rng(seed)
    base = Path(root) / "cifar-10-batches-py"
    base.mkdir(parents=True, exist_ok=True)
    written: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {"train": [], "test": []}
    files = [(f"data_batch_{i}", "train", n_train_per_batch, f"training batch {i} of 5") for i in range(1, 6)]
    files.append(("test_batch", "test", n_test, "testing batch 1 of 1"))
    for fname, split, n, label in files:
        data, labels = _images(rng, n), rng.integers(0, 10, size=n)
        _dump(base / fname, {b"batch_label": label.encode(), b"labels": [int(v) for v in labels], b"data": data,
                             b"filenames": [f"fake_{fname}_{i}.png".encode() for i in range(n)]})
        written[split].append((data, labels.astype(np.int64)))
    _dump(base / "batches.meta", {b"num_cases_per_batch": n_train_per_batch, b"num_vis": 3072,
                                  b"label_names": [f"class{i}".encode() for i in range(10)]})
    return {s: (np.concatenate([d for d, _ in parts]), np.concatenate([labels for _, labels in parts]))
            for s, parts in written.items()}


def write_fake_cifar100(root: str | os.PathLike[str], n_train: int = 40, n_test: int = 20, seed: int = 0) -> Arrays:
    """Write <root>/cifar-100-python/{train, test, meta}; the returned labels are the fine labels."""
    rng = np.random.default_rng(seed)
    base = Path(root) / "cifar-100-python"
    base.mkdir(parents=True, exist_ok=True)
    written: Arrays = {}
    for split, n in (("train", n_train), ("test", n_test)):
        data, fine = _images(rng, n), rng.integers(0, 100, size=n)
        _dump(base / split, {b"filenames": [f"fake_{split}_{i}.png".encode() for i in range(n)],
                             b"batch_label": f"{split}ing batch 1 of 1".encode(),
                             b"fine_labels": [int(v) for v in fine], b"coarse_labels": [int(v) // 5 for v in fine],
                             b"data": data})
        written[split] = (data, fine.astype(np.int64))
    _dump(base / "meta", {b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
                          b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)]})
    return written


def write_fake_svhn(root: str | os.PathLike[str], n_train: int = 20, n_test: int = 20, seed: int = 0) -> Arrays:
    """Write <root>/svhn/{train,test}_32x32.mat; returns the raw X (32 x 32 x 3 x N) and y (1..10, 10 = digit 0)."""
    from scipy.io import savemat

    rng = np.random.default_rng(seed)
    base = Path(root) / "svhn"
    base.mkdir(parents=True, exist_ok=True)
    written: Arrays = {}
    for split, n in (("train", n_train), ("test", n_test)):
        x = rng.integers(0, 256, size=(32, 32, 3, n), dtype=np.uint8)
        y = rng.integers(1, 11, size=(n, 1)).astype(np.uint8)
        y[0, 0] = 10  # always include the relabelled class
        savemat(base / f"{split}_32x32.mat", {"X": x, "y": y})
        written[split] = (x, y)
    return written
