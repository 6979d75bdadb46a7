"""What every benchmark shares: the Row it returns, the AS settings, a CIFAR-shaped batch, paired timing.

Timings on a shared machine are noisy (other jobs come and go), so contenders are never timed in separate
blocks: each round runs every contender once, back to back, and a ratio is the median of the per-round
ratios. Consecutive rounds alternate the order (A B, B A, ...) so neither contender always runs first.
Both wall and CPU time are recorded; see `Timings` for which one a row reports.
"""

from __future__ import annotations

import copy
import ctypes
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
THREADS_ENV = "ASBATCH_BENCH_THREADS"  # torch threads of subprocesses (the memory benchmark's)

# The AS setting of the paper and of RunConfig's defaults: N = 5 steps of alpha = 0.02 on eps, lambda = 0.8.
STEPS = 5
ALPHA = 0.02
LAM = 0.8
BATCH = 100
CIFAR10_TRAIN = 50_000
KL_WEIGHT = 1.0 / (100 * CIFAR10_TRAIN)  # train.py's default beta = 1 / (100 * N_train)


@dataclass
class Row:
    """One line of the results table. `passed` is None for informational rows and for skipped ones."""

    name: str
    value: float | None
    unit: str
    goal: str
    passed: bool | None
    note: str = ""
    skipped: bool = False
    extra: dict = field(default_factory=dict)  # numbers other benchmarks reuse (not printed)

    @property
    def status(self) -> str:
        if self.skipped:
            return "SKIP"
        if self.passed is None:
            return "info"
        return "PASS" if self.passed else "FAIL"

    def value_text(self) -> str:
        if self.value is None:
            return "-"
        magnitude = abs(self.value)
        text = f"{self.value:.3g}" if magnitude < 100 else f"{self.value:,.0f}"
        return f"{text} {self.unit}".strip()


def skipped(name: str, goal: str, reason: str) -> Row:
    return Row(name, None, "", goal, None, f"skipped: {reason}", skipped=True)


def cifar_batch(n: int = BATCH, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n CIFAR-shaped examples (3 x 32 x 32, 10 classes) of asbatch's synthetic data, normalised as in training."""
    from asbatch.data import DeviceLoader, synthetic

    data = synthetic("train", image_shape=(3, 32, 32), n_train=n, seed=seed)
    loader = DeviceLoader(data, n, train=False, augment=False, seed=0, device="cpu")
    return next(iter(loader))


def bayesian_resnet20(seed: int = 0) -> nn.Module:
    from asbatch.models import build_model

    torch.manual_seed(seed)
    return build_model("resnet20", 10, bayesian=True).train()


def twin(model: nn.Module) -> nn.Module:
    """An independent copy with identical weights and BN state (each contender gets its own optimizer)."""
    return copy.deepcopy(model)


def steady_allocator() -> bool:
    """Make glibc keep freed memory instead of returning it to the OS at once; True if it took effect.

    By default every activation tensor above glibc's (dynamic) mmap threshold gets fresh pages, so each
    forward pays page faults (millions per row; expensive and uneven in a VM). That noise moved row 3's
    ratio between 0.9 and 1.4 from run to run. Pinning the thresholds makes the heap behave like a caching
    allocator, which is what the timings should compare: the work of the code, not the VM's page faults.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    # 32 MiB is glibc's largest mmap threshold; trim only when 2 GiB are free at the top of the heap
    return bool(libc.mallopt(m_mmap_threshold, 32 << 20)) and bool(libc.mallopt(m_trim_threshold, (1 << 31) - 1))


@dataclass
class Timings:
    """Seconds per round of each contender, by two clocks: wall time and this process's CPU time.

    The headline clock is CPU time when torch runs one thread: the work done, not how long the process
    waited for a core on a busy machine (which can stretch wall times several-fold, and unevenly). With
    more threads CPU time also counts spinning threads, so the headline is wall time.
    """

    wall: dict[str, list[float]]
    cpu: dict[str, list[float]]

    @property
    def clock(self) -> str:
        return "cpu" if torch.get_num_threads() == 1 else "wall"

    def per_unit(self, name: str, units: float) -> None:
        """Divide a contender's times by the units of work it did in a round (steps, samples, images)."""
        for times in (self.wall, self.cpu):
            times[name] = [t / units for t in times[name]]

    def median(self, name: str, clock: str | None = None) -> float:
        return statistics.median(getattr(self, clock or self.clock)[name])

    def ratio(self, num: str, den: str, clock: str | None = None) -> float:
        """Median over rounds of time[num] / time[den] (paired: both ran in the same round)."""
        times = getattr(self, clock or self.clock)
        return statistics.median(a / b for a, b in zip(times[num], times[den], strict=True))

    def describe(self, num: str, den: str) -> str:
        """'CPU-time ratio, per-round min-max; wall-clock ratio' for a row's note."""
        times = getattr(self, self.clock)
        ratios = [a / b for a, b in zip(times[num], times[den], strict=True)]
        other = "wall" if self.clock == "cpu" else "cpu"
        return (f"{self.clock} time, median of {len(ratios)} paired rounds (range {min(ratios):.2f}-"
                f"{max(ratios):.2f}); by {other} time {self.ratio(num, den, other):.2f}")


def interleaved(contenders: dict[str, Callable[[], object]], rounds: int, warmup: int = 1) -> Timings:
    """Times of each contender in each of `rounds` rounds (after `warmup` untimed rounds).

    Within a round the contenders run back to back, so a paired ratio compares them under the same load.
    """
    items = list(contenders.items())
    for _ in range(warmup):
        for _, fn in items:
            fn()
    timings = Timings({name: [] for name, _ in items}, {name: [] for name, _ in items})
    for r in range(rounds):
        for name, fn in (items if r % 2 == 0 else items[::-1]):
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            timings.cpu[name].append(time.process_time() - cpu)
            timings.wall[name].append(time.perf_counter() - wall)
    return timings


def median(values: list[float]) -> float:
    return statistics.median(values)
