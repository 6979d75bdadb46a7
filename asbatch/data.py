"""Data sets as uint8 tensors, and a device-resident loader with deterministic, resumable augmentation.

Data sets (`load(name, split, root)`):
  - cifar10, cifar100, svhn: read from torchvision's on-disk layout under the data root, never downloaded
    here (compute nodes have no internet); `download` is for a login node;
  - digits: scikit-learn's bundled 8x8 digits, split deterministically; digits_0to7: its classes 0-7 only
    (8 classes), and digits_8to9: every 8 and 9 of both splits, never seen by digits_0to7 (its OOD set);
  - synthetic: seeded class prototypes plus noise, small and learnable, for tests.

Data root: the explicit `root`, else $ASBATCH_DATA, else ./data.

`DeviceLoader` keeps a whole split on the device as one uint8 tensor; cropping, flipping and normalising
happen per batch on the device. All randomness of an epoch comes from a CPU generator seeded by
(seed, epoch) and drawn up front, so an epoch can be resumed exactly at any step from (epoch, step) alone.
"""

from __future__ import annotations

import math
import os
import pickle
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from asbatch.config import DataConfig
from asbatch.datafiles import CIFAR10_DIR, CIFAR100_DIR, SVHN_DIR
from asbatch.datafiles import resolve_root as _resolve_root
from asbatch.names import AUGMENTED_BY_DEFAULT, DATASETS, derived_seed

SPLITS: tuple[str, ...] = ("train", "test")

# Per-channel mean/std of the train splits, in [0, 1] pixel units (true std, not the often-copied 0.2023...).
_CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
_CIFAR100_STATS = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
_SVHN_STATS = ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970))
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # what the reference code uses on CIFAR

_CIFAR10_DIR, _CIFAR100_DIR, _SVHN_DIR = CIFAR10_DIR, CIFAR100_DIR, SVHN_DIR  # the layout lives in datafiles
_DIGITS_TEST = 360


class DataNotFoundError(FileNotFoundError):
    """A data set's files are missing under the data root (they are never downloaded implicitly)."""


@dataclass(frozen=True, eq=False)  # eq=False: comparing tensors has no single truth value
class Dataset:
    """One split of a data set: uint8 images N x C x H x W, int64 labels N, and normalisation stats.

    `mean` and `std` are per channel in [0, 1] pixel units (as torchvision's Normalize after ToTensor) and
    always those of the train split, so train and test are normalised alike.
    """

    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"images must be uint8 N x C x H x W, got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.dtype != torch.int64 or self.labels.shape != self.images.shape[:1]:
            raise ValueError(f"labels must be int64 of shape ({len(self.images)},), got {self.labels.dtype} "
                             f"{tuple(self.labels.shape)}")
        channels = self.images.shape[1]
        if len(self.mean) != channels or len(self.std) != channels:
            raise ValueError(f"mean/std need {channels} entries, got {len(self.mean)} and {len(self.std)}")

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W)."""
        c, h, w = self.images.shape[1:]
        return c, h, w

    def subset(self, n: int) -> Dataset:
        """The first `n` examples (all of them if there are fewer)."""
        if n <= 0:
            raise ValueError(f"subset size must be positive, got {n}")
        return replace(self, images=self.images[:n], labels=self.labels[:n])


# ------------------------------------------------------------------------------------------- data root


def resolve_root(root: str | os.PathLike[str] | None = None) -> Path:
    """The data root: `root` if given, else $ASBATCH_DATA if set and non-empty, else ./data."""
    return _resolve_root(root)


def _require(path: Path, name: str, root: Path) -> Path:
    """Return `path`, or raise DataNotFoundError naming it and the command that fetches it."""
    if path.is_file():
        return path
    raise DataNotFoundError(
        f"{name}: missing {path.absolute()}. Data sets are never downloaded during a run (compute nodes usually "
        f"have no internet); on a login node with internet run:\n"
        f"    asbatch data download {name} --root {root.absolute()}")


# -------------------------------------------------------------------------------------------- loaders


def _unpickle(path: Path) -> dict[str, Any]:
    """A CIFAR batch file as a dict with str keys (the files were pickled by Python 2, keys are bytes)."""
    with path.open("rb") as f:
        raw = pickle.load(f, encoding="bytes")  # noqa: S301 - the CIFAR format is a pickle from the user's data root
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in raw.items()}


def _cifar_arrays(files: list[Path], label_key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate CIFAR batch files into uint8 N x 3 x 32 x 32 images and int64 labels."""
    datas, labels = [], []
    for path in files:
        batch = _unpickle(path)
        datas.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))  # rows: R, G, B planes
        labels.append(np.asarray(batch[label_key], dtype=np.int64))
    return torch.from_numpy(np.concatenate(datas)), torch.from_numpy(np.concatenate(labels))


def _load_cifar10(split: str, root: Path) -> Dataset:
    base = root / _CIFAR10_DIR
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    files = [_require(base / n, "cifar10", root) for n in names]
    images, labels = _cifar_arrays(files, "labels")
    return Dataset(images, labels, 10, *_CIFAR10_STATS, name="cifar10")


def _load_cifar100(split: str, root: Path) -> Dataset:
    path = _require(root / _CIFAR100_DIR / split, "cifar100", root)
    images, labels = _cifar_arrays([path], "fine_labels")
    return Dataset(images, labels, 100, *_CIFAR100_STATS, name="cifar100")


def _load_svhn(split: str, root: Path) -> Dataset:
    from scipy.io import loadmat  # scipy comes with scikit-learn; imported lazily as only SVHN needs it

    mat = loadmat(_require(root / _SVHN_DIR / f"{split}_32x32.mat", "svhn", root))
    images = np.ascontiguousarray(np.transpose(mat["X"], (3, 2, 0, 1)))  # H x W x C x N -> N x C x H x W
    labels = mat["y"].astype(np.int64).reshape(-1)
    labels[labels == 10] = 0  # SVHN stores the digit 0 as class 10
    return Dataset(torch.from_numpy(images), torch.from_numpy(labels), 10, *_SVHN_STATS, name="svhn")


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of uint8 images, in [0, 1] pixel units."""
    x = images.to(torch.float64).div(255).transpose(0, 1).reshape(images.shape[1], -1)
    return tuple(x.mean(1).tolist()), tuple(x.std(1, unbiased=False).tolist())


def _digits_splits() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.from_numpy(np.rint(bunch.images * (255 / 16)).astype(np.uint8)).unsqueeze(1)  # 0..16 -> 0..255
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    train, test = perm[:-_DIGITS_TEST], perm[-_DIGITS_TEST:]
    return {"train": (images[train], labels[train]), "test": (images[test], labels[test])}


def _load_digits(split: str, name: str = "digits") -> Dataset:
    """digits; digits_0to7 (classes 0-7 of each split); digits_8to9 (the 8s and 9s of both splits)."""
    splits = _digits_splits()
    if name == "digits_8to9":
        images, labels = (torch.cat(t) for t in zip(*splits.values(), strict=True))
        keep = labels >= 8
        mean, std = channel_stats(splits["train"][0][splits["train"][1] < 8])  # normalised as digits_0to7
        return Dataset(images[keep], labels[keep], 10, mean, std, name=name)
    if name == "digits_0to7":
        splits = {k: (x[y < 8], y[y < 8]) for k, (x, y) in splits.items()}
    mean, std = channel_stats(splits["train"][0])
    return Dataset(*splits[split], 8 if name == "digits_0to7" else 10, mean, std, name=name)


def synthetic(split: str, *, num_classes: int = 10, image_shape: tuple[int, int, int] = (3, 8, 8),
              n_train: int = 1000, n_test: int = 200, noise: float = 40.0, seed: int = 0) -> Dataset:
    """Seeded, learnable data: each class is a random prototype image, each example prototype + noise.

    With the defaults, a nearest-class-mean classifier is nearly perfect, so a small net learns it in a few
    steps. Prototypes depend only on `seed`; train and test draw their noise and labels from separate streams.
    """
    _check_split(split)
    protos = torch.rand((num_classes, *image_shape), generator=torch.Generator().manual_seed(seed)) * 255

    def draw(n: int, stream: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(derived_seed(seed, stream))
        labels = torch.randint(0, num_classes, (n,), generator=g)
        x = protos[labels] + noise * torch.randn((n, *image_shape), generator=g)
        return x.round().clamp(0, 255).to(torch.uint8), labels

    train = draw(n_train, 1)
    mean, std = channel_stats(train[0])
    images, labels = train if split == "train" else draw(n_test, 2)
    return Dataset(images, labels, num_classes, mean, std, name="synthetic")


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")


def load(name: str, split: str, root: str | os.PathLike[str] | None = None) -> Dataset:
    """Load one split ('train' or 'test') of a data set from the data root (see `resolve_root`)."""
    _check_split(split)
    base = resolve_root(root)
    if name == "cifar10":
        return _load_cifar10(split, base)
    if name == "cifar100":
        return _load_cifar100(split, base)
    if name == "svhn":
        return _load_svhn(split, base)
    if name in ("digits", "digits_0to7", "digits_8to9"):
        return _load_digits(split, name)
    if name == "synthetic":
        return synthetic(split)
    raise ValueError(f"unknown data set {name!r}; expected one of {DATASETS}")


def load_for(config: DataConfig, split: str) -> Dataset:
    """`load` for a run's data config, keeping only the first train_subset / test_subset examples, with the
    normalisation the config asks for."""
    dataset = load(config.name, split, config.root)
    if config.normalize == "imagenet":
        if dataset.image_shape[0] != len(IMAGENET_STATS[0]):
            raise ValueError(f"data.normalize: imagenet needs 3-channel images; {config.name} has "
                             f"{dataset.image_shape[0]}")
        dataset = replace(dataset, mean=IMAGENET_STATS[0], std=IMAGENET_STATS[1])
    n = config.train_subset if split == "train" else config.test_subset
    return dataset.subset(n) if n is not None else dataset


def download(name: str, root: str | os.PathLike[str] | None = None) -> Path:
    """Download a data set into the data root (needs internet: run on a login node). Returns the root."""
    import torchvision.datasets as tvd

    base = resolve_root(root)
    if name in ("cifar10", "cifar100"):
        cls = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
        for train in (True, False):
            cls(str(base), train=train, download=True)
    elif name == "svhn":
        for split in SPLITS:
            tvd.SVHN(str(base / _SVHN_DIR), split=split, download=True)
    elif name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; expected one of {DATASETS}")
    # digits ships with scikit-learn and synthetic is generated: nothing to fetch
    return base


# ------------------------------------------------------------------------------------------ the loader


class EpochPlan(NamedTuple):
    """An epoch's randomness, indexed by position in the epoch: example order, crop offsets, flips."""

    order: torch.Tensor  # int64 N: a permutation (identity for evaluation)
    offsets: torch.Tensor  # int64 N x 2: (top, left) of the crop in the padded image, each in [0, 2 * pad]
    flips: torch.Tensor  # bool N: flip horizontally


def epoch_seed(seed: int, epoch: int) -> int:
    """The generator seed of an epoch; the same on every rank, so all ranks agree on the permutation."""
    return derived_seed(seed, epoch)


def crop_flip(images: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor, pad: int) -> torch.Tensor:
    """Per-example random crop of the zero-padded batch, and horizontal flip, without a loop.

    images: B x C x H x W; offsets: B x 2 (top, left) in [0, 2 * pad]; flips: B bool. Same dtype out.
    `unfold` views every crop window of the padded batch without copying; one index picks each example's.
    """
    b, _c, h, w = images.shape
    if not pad:
        return torch.where(flips[:, None, None, None], images.flip(3), images)
    padded = F.pad(images, (pad, pad, pad, pad))
    windows = padded.unfold(2, h, 1).unfold(3, w, 1)  # B x C x (2p+1) x (2p+1) x H x W, a view
    crops = windows[torch.arange(b, device=images.device), :, offsets[:, 0], offsets[:, 1]]  # B x C x H x W
    return torch.where(flips[:, None, None, None], crops.flip(3), crops)


class DeviceLoader:
    """Batches of one split, held whole on `device` (the whole split must fit in device memory).

    `batch_size` is the global batch; rank r of `world_size` gets the r-th contiguous slice of each
    global batch, so the union over ranks at step k is what one process sees at step k. Training
    loaders shuffle (and, if `augment`, crop + flip) from a generator seeded by (seed, epoch);
    evaluation loaders (train=False) keep the data order and never augment.
    """

    def __init__(self, dataset: Dataset, batch_size: int, *, train: bool, augment: bool, seed: int,
                 device: torch.device | str, rank: int = 0, world_size: int = 1,
                 drop_last: bool | None = None, memory_format: torch.memory_format = torch.preserve_format) -> None:
        if batch_size <= 0 or world_size <= 0:
            raise ValueError(f"batch_size and world_size must be positive, got {batch_size} and {world_size}")
        if batch_size % world_size:
            raise ValueError(f"global batch_size {batch_size} is not divisible by world_size {world_size}; "
                             f"each process needs the same batch_size // world_size examples per step")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world_size {world_size}")
        self.device = torch.device(device)
        self.images = dataset.images.to(self.device)
        self.labels = dataset.labels.to(self.device)
        self.num_examples = len(dataset)
        self.num_classes, self.image_shape = dataset.num_classes, dataset.image_shape
        self.batch_size = batch_size
        self.local_batch_size = batch_size // world_size
        self.train, self.augment = train, augment and train  # evaluation never augments
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.drop_last = train if drop_last is None else drop_last
        self.memory_format = memory_format  # of the batches (channels_last: made by normalize's cast, no extra op)
        self.pad = dataset.images.shape[2] // 8  # 4 for 32x32, 1 for 8x8
        shape = (1, -1, 1, 1)
        self.mean = torch.tensor(dataset.mean, dtype=torch.float32, device=self.device).view(shape)
        self.std = torch.tensor(dataset.std, dtype=torch.float32, device=self.device).view(shape)
        if self.steps_per_epoch == 0:
            raise ValueError(f"{self.num_examples} examples make no full global batch of {batch_size} "
                             f"(drop_last); lower the batch size or use more data")

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch (the same on every rank)."""
        if self.drop_last:
            return self.num_examples // self.batch_size
        return math.ceil(self.num_examples / self.batch_size)

    def __len__(self) -> int:
        return self.steps_per_epoch

    def plan(self, epoch: int) -> EpochPlan:
        """The epoch's order, crop offsets and flips on the CPU; a pure function of (seed, epoch)."""
        n = self.num_examples
        if not self.train:
            return EpochPlan(torch.arange(n), torch.full((n, 2), self.pad), torch.zeros(n, dtype=torch.bool))
        g = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
        order = torch.randperm(n, generator=g)
        offsets = torch.randint(0, 2 * self.pad + 1, (n, 2), generator=g)
        flips = torch.rand(n, generator=g) < 0.5
        return EpochPlan(order, offsets, flips)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images -> float32, scaled to [0, 1] and normalised with the data set's mean and std."""
        return (images.to(torch.float32, memory_format=self.memory_format) / 255 - self.mean) / self.std

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's (x, y) batches of `epoch`, from `start_step` on (bit-identical to a full pass).

        Ranks whose slice of a final partial batch is empty get an empty batch, so all ranks take the
        same number of steps (collectives stay aligned).
        """
        steps = self.steps_per_epoch
        if not 0 <= start_step <= steps:
            raise ValueError(f"start_step {start_step} out of range [0, {steps}]")
        return self._batches(epoch, start_step, steps)

    def _batches(self, epoch: int, start_step: int, steps: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        plan = self.plan(epoch) if self.train else None
        if plan is not None:  # one transfer per epoch instead of one per batch
            plan = EpochPlan(*(t.to(self.device) for t in plan))
        end = min(steps * self.batch_size, self.num_examples)
        for step in range(start_step, steps):
            lo = min(step * self.batch_size + self.rank * self.local_batch_size, end)
            hi = min(lo + self.local_batch_size, end)
            if plan is None:
                x, y = self.images[lo:hi], self.labels[lo:hi]
            else:
                idx = plan.order[lo:hi]
                x, y = self.images.index_select(0, idx), self.labels.index_select(0, idx)
                if self.augment:
                    x = crop_flip(x, plan.offsets[lo:hi], plan.flips[lo:hi], self.pad)
            yield self.normalize(x), y

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """An evaluation pass in data order (re-iterable); training loaders need an explicit `epoch(e)`."""
        if self.train:
            raise TypeError("iterate a training loader with loader.epoch(epoch, start_step); its order "
                            "depends on the epoch")
        return self.epoch(0)


def default_augment(config: DataConfig) -> bool:
    """Crop + flip unless the config says otherwise; on by default for CIFAR only (digits must not flip)."""
    return config.augment if config.augment is not None else config.name in AUGMENTED_BY_DEFAULT


def loader_for(config: DataConfig, split: str, *, seed: int, device: torch.device | str, rank: int = 0,
               world_size: int = 1, channels_last: bool = False) -> DeviceLoader:
    """The loader a run uses: train split shuffled (and augmented per config), test split in order; batches in
    channels_last memory order for a channels_last model (`speed.channels_last`)."""
    train = split == "train"
    return DeviceLoader(load_for(config, split), config.batch_size if train else config.test_batch_size,
                        train=train, augment=default_augment(config), seed=seed, device=device, rank=rank,
                        world_size=world_size,
                        memory_format=torch.channels_last if channels_last else torch.preserve_format)
