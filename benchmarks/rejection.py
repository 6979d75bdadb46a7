"""How fast bad input is turned away: every spec of tests/specs/bad/ plus generated hostile files (a 10 MB
file, an alias bomb, 10,000-deep nesting, a 1000-stage cycle, binary data), each rejected by a fresh
`python -m asbatch` process, as a user meets it: wall time and peak memory of the slowest rejection, against
the same process printing `--version` (start-up alone).

    python -m benchmarks.rejection [--quick]      # --quick: `submit --dry-run` only (default: also `run`)
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import REPO, Row

BAD = REPO / "tests" / "specs" / "bad"
GOAL_S = 1.0


def _generated(folder: Path) -> list[Path]:
    bomb = "".join(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]\n" for i in range(1, 10))
    files = {
        "huge.yaml": b"sweep: a\n" + b"# padding padding padding\n" * 400_000,
        "bomb.yaml": ("sweep: a\nx:\n  l0: &l0 [a, a, a, a, a, a, a, a, a, a]\n"
                      + "".join("  " + line + "\n" for line in bomb.splitlines())).encode(),
        "deep.yaml": b"sweep: a\ngrid: {seed: " + b"[" * 10_000 + b"]" * 10_000 + b"}\n",
        "cycle.yaml": ("sweep: a\nstages:\n" + "".join(f"  s{i}: {{after: s{(i + 1) % 1000}}}\n"
                                                       for i in range(1000))).encode(),
        "binary.yaml": bytes(range(256)) * 64,
        "wide.yaml": ("sweep: a\ngrid:\n  seed: [" + ",".join(["0"] * 60_000) + "]\n").encode(),
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return [folder / name for name in files]


def _time(args: list[str], runs: Path) -> tuple[float, float, int]:
    """(wall s, peak RSS MB, exit code) of one fresh `python -m asbatch ...`. The peak comes from GNU time:
    a child forked from this (torch-holding) process would report this process's memory as its own peak."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "%M", sys.executable, "-m", "asbatch", *args, "--runs-root",
                           str(runs)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    wall = time.perf_counter() - start
    return wall, int(proc.stderr.strip().splitlines()[-1]) / 1024, proc.returncode


def run(quick: bool = False) -> list[Row]:
    commands = [["submit", "--dry-run"]] if quick else [["submit", "--dry-run"], ["run"]]
    with tempfile.TemporaryDirectory(prefix="asbatch-bench-reject-") as tmp:
        runs = Path(tmp) / "runs"
        inputs = [*sorted(BAD.glob("*.yaml")), *_generated(Path(tmp))]
        base = [_time(["--version"], runs)[:2] for _ in range(5)]
        results = []
        for path in inputs:
            for command in commands:
                wall, rss, code = _time([*command, str(path)], runs)
                results.append((wall, rss, code, f"{command[0]} {path.name}"))
        wrong = [name for _, _, code, name in results if code != 2]
        written = runs.exists()
    results.sort(reverse=True)
    slowest = results[0]
    start_s, start_mb = statistics.median(b[0] for b in base), statistics.median(b[1] for b in base)
    note = (f"{len(results)} rejections of {len(inputs)} inputs; slowest: "
            f"{', '.join(f'{name} {wall:.2f} s' for wall, _, _, name in results[:3])}; median "
            f"{statistics.median(r[0] for r in results):.2f} s; peak memory {max(r[1] for r in results):.0f} MB; "
            f"`asbatch --version` alone {start_s:.2f} s, {start_mb:.0f} MB")
    ok = not wrong and not written and slowest[0] <= GOAL_S
    if wrong or written:
        note += f"; NOT REJECTED WITH EXIT 2: {', '.join(wrong[:5]) or '-'}; runs root written: {written}"
    return [Row("8 slowest rejection of bad input (fresh process)", slowest[0], "s", f"<= {GOAL_S:g} s", ok, note)]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    for row in run(parser.parse_args().quick):
        print(f"{row.name}: {row.value:.2f} {row.unit} (goal {row.goal}: {'PASS' if row.passed else 'FAIL'}); "
              f"{row.note}")
