"""Row 4: the data time of a training step, as a share of the AS step; and asbatch's device-resident loader
against the reference setup's torchvision input pipeline (in the note).

  - asbatch: `DeviceLoader` over 50,000 CIFAR-10-shaped uint8 images held as one tensor (what
    `asbatch.data.load` returns), batch 128, shuffling and augmentation (crop with padding 4, flip) on;
  - reference: `torchvision.datasets.CIFAR10` over fake CIFAR-10 files in torchvision's exact on-disk
    format (tests/cifar_fixtures.py), PIL transforms RandomCrop(32, padding=4) + RandomHorizontalFlip +
    ToTensor + Normalize, `DataLoader(batch_size=128, shuffle=True, num_workers=0)`.

The torchvision path is ~100x slower, so it gets fewer images; the note compares images per second over
one full pass each. Both run on the CPU here: on a GPU the DeviceLoader's work moves to the device. The row's
value is the DeviceLoader's time for one batch of 128 over the AS step's time for a batch of 128 (row 1's
step at batch 100, scaled): the goal is that data costs at most 1 % of a step.
"""

from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path
from typing import ClassVar

import torch
from torch.utils.data import DataLoader

from asbatch.data import _CIFAR10_STATS, Dataset, DeviceLoader
from benchmarks.common import BATCH as STEP_BATCH
from benchmarks.common import REPO, Row, interleaved

GOAL = 1.0  # percent of an AS step
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


def run(quick: bool = False, as_step_s: float | None = None) -> Row:
    """`as_step_s`: row 1's AS step time at batch 100 (measured here when row 1 did not run)."""
    if as_step_s is None:
        from benchmarks import step_time

        as_step_s = step_time.as_step_seconds()
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
    share = 100 * times.median("device") * BATCH / (as_step_s * BATCH / STEP_BATCH)
    note = (f"DeviceLoader {times.median('device') * BATCH * 1e3:.2f} ms per batch of {BATCH} against an AS step of "
            f"{as_step_s * BATCH / STEP_BATCH * 1e3:.0f} ms at batch {BATCH} (row 1 scaled from {STEP_BATCH}); "
            f"DeviceLoader {1 / times.median('device'):,.0f} img/s over {counts['device']:,} images (augment on), "
            f"torchvision {1 / times.median('torchvision'):,.0f} img/s over {counts['torchvision']:,}: "
            f"{speedup:.1f}x ({times.describe('torchvision', 'device')}); CPU")
    return Row("4. data time / AS step time", share, "%", f"<= {GOAL:.0f} %", share <= GOAL, note)
