"""Row 7 (informational): peak memory of one AS step against one plain step, and the reference design's.

tracemalloc does not see torch's allocations, so each variant runs in a fresh subprocess that measures its
resident set: after a warm-up step (Adam state, oneDNN kernels), the kernel's peak-RSS mark is reset
(`echo 5 > /proc/self/clear_refs`), and peak RSS (VmHWM) minus the RSS before the step is the step's peak
extra memory. glibc's mmap threshold is pinned at 64 KiB in the child, so every tensor buffer is its own
mapping and freed buffers leave the RSS at once (otherwise the heap keeps them and hides later peaks).
Where the peak mark cannot be reset, the child skips the warm-up and uses ru_maxrss instead.
"""

from __future__ import annotations

import gc
import json
import os
import re
import resource
import subprocess
import sys
from pathlib import Path

from benchmarks.common import REPO, THREADS_ENV, Row

VARIANTS = ("plain", "as", "reference")


def _status_kb(field: str) -> int:
    with Path("/proc/self/status").open() as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE).group(1))


def _reset_peak() -> bool:
    try:
        with Path("/proc/self/clear_refs").open("w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def child(variant: str, repeats: int) -> dict:
    """Runs in the subprocess: peak extra RSS (MB) of `repeats` steps of `variant`."""
    import torch

    torch.set_num_threads(int(os.environ.get(THREADS_ENV, torch.get_num_threads())))
    from benchmarks.common import (
        ALPHA,
        KL_WEIGHT,
        LAM,
        STEPS,
        bayesian_resnet20,
        cifar_batch,
    )
    from benchmarks.reference_step import reference_as_step
    from benchmarks.step_time import training_step

    x, y = cifar_batch()
    model = bayesian_resnet20()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step() -> None:
        if variant == "reference":
            reference_as_step(model, x, y, opt, lam=LAM, steps=STEPS, alpha=ALPHA, kl_weight=KL_WEIGHT)
        else:
            training_step(model, opt, x, y, LAM if variant == "as" else 0.0)

    resettable = _reset_peak()
    if resettable:
        step()  # warm-up: one-time allocations are not the step's
    deltas = []
    for _ in range(repeats if resettable else 1):
        gc.collect()
        _reset_peak()
        base_kb = _status_kb("VmRSS")
        step()
        peak_kb = _status_kb("VmHWM") if resettable else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        deltas.append((peak_kb - base_kb) / 1024)
    return {"variant": variant, "peak_extra_mb": sorted(deltas)[len(deltas) // 2],
            "method": "VmHWM after clear_refs" if resettable else "ru_maxrss, no warm-up"}


def measure(variant: str, repeats: int) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-m", "benchmarks.memory", variant, str(repeats)], cwd=REPO, env=env,
                         capture_output=True, text=True, check=True, timeout=600)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(quick: bool = False) -> Row:
    repeats = 1 if quick else 3
    got = {v: measure(v, repeats) for v in (VARIANTS[:2] if quick else VARIANTS)}
    mb = {v: r["peak_extra_mb"] for v, r in got.items()}
    ratio = mb["as"] / mb["plain"]
    note = f"peak extra RSS of one step: plain {mb['plain']:.0f} MB, AS {mb['as']:.0f} MB"
    if "reference" in mb:
        note += f", reference design {mb['reference']:.0f} MB ({mb['reference'] / mb['plain']:.2f}x plain)"
    note += f"; fresh subprocess per variant, {got['as']['method']}, median of {repeats}"
    return Row("7. peak memory AS step / plain step", ratio, "x", "- (info)", None, note, extra={"mb": mb})


if __name__ == "__main__":
    print(json.dumps(child(sys.argv[1], int(sys.argv[2]))))
