"""Row 4: asbatch's device-resident loader against the reference setup's torchvision input pipeline.

  - asbatch: `DeviceLoader` over 50,000 CIFAR-10-shaped uint8 images held as one tensor (what
    `asbatch.data.load` returns), batch 128, shuffling and augmentation (crop with padding 4, flip) on;
  - reference: `torchvision.datasets.CIFAR10` over fake CIFAR-10 files in torchvision's exact on-disk
    format (tests/cifar_fixtures.py), PIL transforms RandomCrop(32, padding=4) + RandomHorizontalFlip +
    ToTensor + Normalize, `DataLoader(batch_size=128, shuffle=True, num_workers=0)`.

The torchvision path is ~100x slower, so it gets fewer images; the row compares images per second over
one full pass each. Both run on the CPU here: on a GPU the DeviceLoader's work moves to the device.
"""

from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path
from typing import ClassVar

import torch
from torch.utils.data import DataLoader

from asbatch.data import _CIFAR10_STATS, Dataset, DeviceLoader
from benchmarks.common import REPO, Row, interleaved

GOAL = 20.0
BATCH = 128
DEVICE_IMAGES = 50_000


def _cifar_fixtures():
    """tests/cifar_fixtures.py (tests/ is not a package)."""
    spec = importlib.util.spec_from_file_location("cifar_fixtures", REPO / "tests" / "cifar_fixtures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def torchvision_loader(root: Path, n_images: int) -> DataLoader:
    """The reference input pipeline over fake CIFAR-10 files with n_images training images."""
    import torchvision.transforms as T
    from torchvision.datasets import CIFAR10

    class FakeCIFAR10(CIFAR10):
        """CIFAR10 without the md5 checks: the fakes have the real format but not the real checksums."""

        meta: ClassVar[dict] = {**CIFAR10.meta, "md5": None}  # md5 None: check_integrity only checks existence

        def _check_integrity(self) -> bool:
            return True

    _cifar_fixtures().write_fake_cifar10(root, n_train_per_batch=n_images // 5, n_test=10)
    mean, std = _CIFAR10_STATS
    transform = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)])
    dataset = FakeCIFAR10(str(root), train=True, transform=transform)
    return DataLoader(dataset, batch_size=BATCH, shuffle=True, num_workers=0, drop_last=True)


def device_loader(n_images: int) -> DeviceLoader:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n_images, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (n_images,), generator=g)
    data = Dataset(images, labels, 10, *_CIFAR10_STATS, name="cifar10")
    return DeviceLoader(data, BATCH, train=True, augment=True, seed=0, device="cpu")


def run(quick: bool = False) -> Row:
    tv_images = 1280 if quick else 2560
    with tempfile.TemporaryDirectory(prefix="asbatch-bench-cifar-") as tmp:
        tv = torchvision_loader(Path(tmp), tv_images)
        dev = device_loader(DEVICE_IMAGES)
        epoch = iter(range(1_000_000))  # a new epoch (new order and augmentation) every pass
        counts = {"device": dev.steps_per_epoch * BATCH, "torchvision": len(tv) * BATCH}

        def device_pass() -> None:
            for _ in dev.epoch(next(epoch)):
                pass

        def torchvision_pass() -> None:
            for _ in tv:
                pass

        times = interleaved({"device": device_pass, "torchvision": torchvision_pass}, rounds=3 if quick else 5)
    for name, n in counts.items():
        times.per_unit(name, n)  # seconds per image
    speedup = times.ratio("torchvision", "device")  # = (images/s of DeviceLoader) / (images/s of torchvision)
    note = (f"DeviceLoader {1 / times.median('device'):,.0f} img/s over {counts['device']:,} images (augment on), "
            f"torchvision {1 / times.median('torchvision'):,.0f} img/s over {counts['torchvision']:,}; "
            f"{times.describe('torchvision', 'device')}; batch {BATCH}, CPU")
    return Row("4. DeviceLoader / torchvision DataLoader (img/s)", speedup, "x", f">= {GOAL:.0f}x",
               speedup >= GOAL, note)
