"""`python -m benchmarks [--quick] [--markdown PATH] [--only 1 3 ...]`: every benchmark in one process.

Prints the machine, then a table: row, measured value, goal, PASS / FAIL (info: no goal; SKIP: could not
run here, with the reason), note. A row that crashes is reported as ERROR and the others still run.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from benchmarks import (
    ascent_sign,
    channels_last,
    checkpoint_cost,
    compiled,
    evaluation,
    launches,
    loader,
    memory,
    packing,
    reference_step,
    step_time,
    submission,
)
from benchmarks.common import THREADS_ENV, Row, steady_allocator

STATUS_STYLE = {"PASS": "green", "FAIL": "bold red", "SKIP": "yellow", "info": "cyan", "ERROR": "bold red"}


def machine() -> dict[str, str]:
    cpu = "unknown"
    try:
        with Path("/proc/cpuinfo").open() as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or cpu
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return {"cpu": cpu, "cores": str(os.cpu_count()), "torch threads": str(torch.get_num_threads()),
            "torch": torch.__version__, "python": platform.python_version(),
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "load average (1/5/15 min)": load}


def _error_row(name: str, err: BaseException) -> Row:
    return Row(name, None, "", "-", False, f"ERROR: {type(err).__name__}: {err}")


GPU_ROWS = ("G1-G5", "G6", "G7")  # what `--gpu --only` can pick (a device session's time is short)


def run_all(quick: bool, only: set[str] | None, console: Console) -> list[Row]:
    """Run the benchmarks in order; rows 4 and 6 reuse row 1's AS step time when row 1 ran."""
    rows: list[Row] = []
    shared: dict[str, float] = {}

    def step_rows() -> list[Row]:
        row = step_time.run(quick)
        shared["as_step_s"] = row.extra["as_step_s"]
        return [row]

    plan: list[tuple[str, str, Callable[[], list[Row]]]] = [
        ("1", "AS step time", step_rows),
        ("2", "reference AS step", lambda: [reference_step.run(quick)]),
        ("3", "S-sample evaluation", lambda: [evaluation.run(quick)]),
        ("4", "data loader", lambda: [loader.run(quick, shared.get("as_step_s"))]),
        ("5", "submission and analysis", lambda: submission.run(quick)),
        ("6", "checkpoint cost", lambda: [checkpoint_cost.run(quick, shared.get("as_step_s"))]),
        ("7", "peak memory", lambda: [memory.run(quick)]),
        ("8", "reference ascent sign", lambda: [ascent_sign.run_memory(quick)]),
        ("9", "bf16 inner passes", lambda: ascent_sign.run_bf16(quick)),
        ("10", "launches, host reads and host time per step (rows 10-12)", lambda: launches.run(quick)),
        ("13", "compiled AS step", lambda: [compiled.run(quick)]),
        ("14", "packed quickstart sweep", lambda: [packing.run(quick)]),
        ("15", "channels_last AS step", lambda: channels_last.run(quick)),
    ]
    for key, title, fn in plan:
        if only and key not in only:
            continue
        start = time.perf_counter()
        with console.status(f"[{key}/{len(plan)}] {title} ..."):
            try:
                new = fn()
            except Exception as err:  # noqa: BLE001 - one broken benchmark must not hide the others
                traceback.print_exc()
                new = [_error_row(f"{key}. {title}", err)]
        console.log(f"[{key}/{len(plan)}] {title}: {time.perf_counter() - start:.0f} s")
        rows.extend(new)
    return rows


def status_of(row: Row) -> str:
    return "ERROR" if row.note.startswith("ERROR") else row.status


def rich_table(rows: list[Row], title: str) -> Table:
    table = Table(title=title, show_lines=True)
    table.add_column("row", no_wrap=True)
    table.add_column("value", justify="right", no_wrap=True)
    table.add_column("goal", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("note")
    for r in rows:
        s = status_of(r)
        table.add_row(r.name, r.value_text(), r.goal, f"[{STATUS_STYLE[s]}]{s}[/]", r.note)
    return table


def markdown(rows: list[Row], info: dict[str, str], title: str, wall_s: float) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = [f"## {title}", "", *(f"- {k}: {v}" for k, v in info.items()), f"- benchmark wall time: {wall_s:.0f} s",
             "", "| row | value | goal | status | note |", "|---|---:|---|---|---|"]
    lines += [f"| {cell(r.name)} | {cell(r.value_text())} | {cell(r.goal)} | {status_of(r)} | {cell(r.note)} |"
              for r in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds and samples (< 2 min)")
    parser.add_argument("--markdown", type=Path, metavar="PATH", help="also write the table as Markdown")
    parser.add_argument("--only", nargs="+", metavar="N",
                        choices=[*(str(n) for n in (*range(1, 11), 13, 14, 15)), *GPU_ROWS],
                        help="run only these rows (1-10, 13-15; 10 runs rows 10-12; with --gpu: G1-G5, G6, G7)")
    parser.add_argument("--gpu", action="store_true",
                        help="instead: the GPU smoke test and GPU rows (G1-G7; < 10 min on one H100)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: on a shared machine, 2 OpenMP threads slow down "
                             "~10x whenever another process takes a core, 1 thread only ~2x)")
    args = parser.parse_args(argv)
    if args.only and any((row in GPU_ROWS) != args.gpu for row in args.only):
        parser.error("--only: rows G1-G5, G6 and G7 go with --gpu, the others without it")
    torch.set_num_threads(args.threads)
    steady = steady_allocator()
    os.environ[THREADS_ENV] = str(args.threads)  # for the memory benchmark's subprocesses

    console = Console(width=max(Console().width, 160))
    info = machine()  # after set_num_threads, so it reports the threads used
    info["allocator"] = ("glibc, freed memory kept (mallopt: mmap threshold 32 MiB, no trim)" if steady
                         else "glibc defaults (mallopt not available)")
    console.print(" | ".join(f"{k}: {v}" for k, v in info.items()))
    start = time.perf_counter()
    if args.gpu:
        from benchmarks import gpu, gpu_baseline, gpu_packing

        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none visible"
        rows = []
        for key, title, fn in (("G1-G5", "GPU smoke test and rows G1-G5", gpu.run),
                               ("G6", "GPU row G6: packed runs", gpu_packing.run),
                               ("G7", "GPU row G7: this code against a baseline tree", gpu_baseline.run)):
            if not args.only or key in args.only:
                with console.status(f"{title} ..."):
                    rows += fn(args.quick)
    else:
        rows = run_all(args.quick, set(args.only) if args.only else None, console)
    wall = time.perf_counter() - start
    info["load average (1/5/15 min)"] += f" at start; {machine()['load average (1/5/15 min)']} at end"
    rows_text = ", rows " + " ".join(args.only) if args.only else ""
    title = f"asbatch benchmarks ({'quick' if args.quick else 'full'}{rows_text}{', GPU' if args.gpu else ''})"
    console.print(rich_table(rows, f"{title}, {wall:.0f} s"))
    if args.markdown:
        args.markdown.write_text(markdown(rows, info, title, wall))
        console.print(f"wrote {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
