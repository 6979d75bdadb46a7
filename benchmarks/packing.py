"""Row 14: sweep wall time of `asbatch run jobs/quickstart.yaml` with the default --jobs against --jobs 1.

Both runs go through the real CLI (a subprocess each, fresh runs roots), one after the other on this
machine; the default fills the cores (2 here: 2 runs at once, one thread each). The row also checks that
every run's results are bitwise equal between the two (the packing must not change a number).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import Row

SPEC = Path(__file__).resolve().parent.parent / "jobs" / "quickstart.yaml"


def _sweep(root: Path, *args: str) -> tuple[float, dict[str, dict]]:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "asbatch", "run", str(SPEC), "--runs-root", str(root), *args],
                   check=True, capture_output=True, text=True)
    took = time.perf_counter() - start
    results = {p.parent.name: json.loads(p.read_text())["evaluation"] for p in root.glob("quickstart/*/results.json")}
    return took, results


def run(quick: bool = False) -> Row:
    extra = ("schedule.epochs=5",) if quick else ()
    with tempfile.TemporaryDirectory() as tmp:
        one_s, one = _sweep(Path(tmp) / "one", *extra, "--jobs", "1")
        packed_s, packed = _sweep(Path(tmp) / "packed", *extra)
    equal = bool(one) and one == packed
    ratio = packed_s / one_s
    return Row("14. quickstart sweep: default --jobs / --jobs 1 (wall time)", ratio, "x", "<= 0.6, results equal",
               ratio <= 0.6 and equal, f"--jobs 1 {one_s:.1f} s, default {packed_s:.1f} s; {len(one)} runs, results "
               f"{'bitwise equal' if equal else 'DIFFER'}{' (5 epochs: --quick)' if quick else ''}")
