"""Row 5: submitting a 500-run sweep to Slurm, and analysing 1000 finished runs.

`bench_submit`: expand a 2-stage, 500-run spec (synthetic data, a tiny MLP) and submit it for real
(`dry_run=False`) to the local Slurm cluster (slurm/local-cluster/cluster.sh); measure the wall time of
expansion + submit and count sbatch calls through a logging `sbatch` shim put first on PATH (one job array
per stage means 2 calls). The arrays are scancelled right after. Needs `asbatch.launch.submit`, `sbatch` on
PATH and SLURM_CONF set; otherwise the row is skipped and says why (never a PASS).

`bench_analysis`: 1000 run dirs, each with a results.json shaped like train.py's; time loading all of them into
records (`asbatch.analysis.records_from_run_dirs`) and the aggregation `asbatch table` does (records -> mean / std
over seeds -> the paper's tables).
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import yaml

from benchmarks.common import Row, skipped

SUBMIT_GOAL_S = 5.0
ANALYSIS_GOAL_S = 5.0
SUBMIT_NAME = "5a. submit 500 runs (2 stages)"
ANALYSIS_NAME = "5b. analyse 1000 run dirs"

# A spec of 2 stages x 250 runs: a deterministic pretrain, then a Bayesian fine-tune after it.
SPEC = {
    "sweep": "bench-submit",
    "profile": "local",
    "defaults": {"cpu": True, "data": {"name": "synthetic", "batch_size": 32},
                 "model": {"name": "mlp", "width": 8}, "schedule": {"name": "constant", "epochs": 1},
                 "eval": {"num_samples": 2}},
    "grid": {"seed": list(range(250))},
    "stages": {
        # array_parallelism 1: at most one task of ours runs on the shared cluster before the scancel
        "pretrain": {"config": {"model": {"bayesian": False}, "adversarial": {"lam": 0.0}},
                     "resources": {"array_parallelism": 1}},
        "fine_tune": {"after": "pretrain", "init_from": "pretrain", "resources": {"array_parallelism": 1}},
    },
}

SHIM = """#!/usr/bin/env bash
# Logs every sbatch call (arguments, then the real sbatch's output) and runs the real sbatch.
echo "CALL $*" >> "{log}"
out=$("{real}" "$@")
rc=$?
printf '%s\\n' "$out" | tee -a "{log}"
exit $rc
"""
GOAL_TEXT = f"<= {SUBMIT_GOAL_S:.0f} s; 1 sbatch per stage"


def _job_ids(log_text: str) -> list[str]:
    """Job ids the real sbatch printed ("Submitted batch job 123", or "123[;cluster]" with --parsable)."""
    return re.findall(r"^(?:Submitted batch job )?(\d+)(?:;\S*)?$", log_text, re.MULTILINE)


def bench_submit() -> list[Row]:
    """Two rows, wall time of expand + submit and sbatch calls per stage, or one row saying why not."""
    try:
        launch = importlib.import_module("asbatch.launch")
    except ImportError:
        return [skipped(SUBMIT_NAME, GOAL_TEXT, "asbatch.launch not available")]
    if not hasattr(launch, "submit"):
        return [skipped(SUBMIT_NAME, GOAL_TEXT, "asbatch.launch has no submit")]
    real = shutil.which("sbatch")
    if real is None or not os.environ.get("SLURM_CONF"):
        return [skipped(SUBMIT_NAME, GOAL_TEXT, "no Slurm here: needs sbatch on PATH and SLURM_CONF set (sudo bash "
                        "slurm/local-cluster/cluster.sh start; eval \"$(bash slurm/local-cluster/cluster.sh env)\")")]
    from asbatch.spec import load_sweep

    stages = len(SPEC["stages"])
    with tempfile.TemporaryDirectory(prefix="asbatch-bench-submit-") as tmp:
        tmp_path = Path(tmp)
        shim_dir, log = tmp_path / "shim", tmp_path / "sbatch.log"
        shim_dir.mkdir()
        (shim_dir / "sbatch").write_text(SHIM.format(log=log, real=real))
        (shim_dir / "sbatch").chmod(0o755)
        spec_path = tmp_path / "spec.yaml"
        spec_path.write_text(yaml.safe_dump({**SPEC, "sweep": f"bench-submit-{os.getpid()}"}, sort_keys=False))
        old_path = os.environ["PATH"]
        os.environ["PATH"] = f"{shim_dir}{os.pathsep}{old_path}"  # sbatch (for submitit too) is now the shim
        arrays: list[str] = []
        try:
            start = time.perf_counter()
            sweep = load_sweep(spec_path)
            expanded = time.perf_counter()
            manifest = launch.submit(sweep, tmp_path / "runs", executor="slurm", dry_run=False, spec_path=spec_path)
            wall = time.perf_counter() - start
            arrays = [a.array_job_id for a in manifest.arrays]
        finally:
            os.environ["PATH"] = old_path
            text = log.read_text() if log.exists() else ""
            # cancel everything that was submitted, whether or not submit returned
            to_cancel = sorted(set(arrays) | set(_job_ids(text)), key=int)
            if to_cancel:
                subprocess.run(["scancel", *to_cancel], check=False, capture_output=True)
    calls = sum(1 for line in text.splitlines() if line.startswith("CALL ") and "--test-only" not in line)
    checks = sum(1 for line in text.splitlines() if line.startswith("CALL ") and "--test-only" in line)
    runs = len(sweep.runs)
    note = (f"load_sweep {expanded - start:.2f} s + launch.submit(executor='slurm', dry_run=False) "
            f"{wall - (expanded - start):.2f} s for {runs} runs to the local cluster; arrays {', '.join(arrays)} "
            f"scancelled right after")
    return [
        Row(f"{SUBMIT_NAME}: wall time", wall, "s", f"<= {SUBMIT_GOAL_S:.0f} s", wall <= SUBMIT_GOAL_S, note),
        Row(f"{SUBMIT_NAME}: sbatch calls per stage", calls / stages, "", "1", calls == stages,
            f"{calls} sbatch call(s) for {stages} stages, counted by a logging shim ahead of sbatch on PATH (and "
            f"{checks} `sbatch --test-only` check(s) before them: one per distinct set of flags, queueing nothing)"),
    ]


# ------------------------------------------------------------------------------------------- analysis


def _results(i: int, config: dict) -> dict:
    """A results.json body as train.py writes it (10 weight samples, entropy score, no OOD)."""
    acc = [0.80 + 0.01 * ((i * 7 + s) % 10) for s in range(10)]
    retained = {str(f): min(1.0, 0.9 + 0.02 * k) for k, f in enumerate((0.2, 0.4, 0.6, 0.8, 1.0))}
    return {
        "run_id": f"train-{i:010x}", "sweep": "bench-analysis", "stage": "train", "config": config,
        "code_version": "0" * 40,
        "evaluation": {"num_samples": 10, "num_examples": 10_000, "sample_accuracies": acc,
                       "lowest_accuracy": min(acc), "highest_accuracy": max(acc), "mean_accuracy": sum(acc) / 10,
                       "ensemble_accuracy": max(acc), "total_uncertainty": 0.4, "aleatoric_uncertainty": 0.3,
                       "epistemic_uncertainty": 0.1, "score": "entropy", "retained_accuracy": retained,
                       "ece": 0.02, "nll": 0.3, "brier": 0.15, "aurc": 0.03},
        "train": {"epochs": 200, "global_steps": 78_000, "best_test_acc": 0.9, "kl_weight": 2e-7, "world_size": 1,
                  "ranks_in_sync": True},
        "timing": {"train_time_s": 3600.0, "wall_time_s_this_segment": 3700.0},
    }


def write_run_dirs(root: Path, n: int) -> None:
    from asbatch.config import RunConfig

    models, lams = ("resnet20", "resnet56", "vgg16", "resnet110"), (0.0, 0.8)
    for i in range(n):
        model, lam, seed = models[i % 4], lams[(i // 4) % 2], i // 8
        config = RunConfig(sweep="bench-analysis", seed=seed, model={"name": model},
                           adversarial={"lam": lam}).to_dict()
        run_dir = root / "bench-analysis" / f"train-{i:010x}"
        run_dir.mkdir(parents=True)
        # train.py's format (checkpoint.atomic_write_json), without its fsync: writing is not what is timed
        (run_dir / "results.json").write_text(json.dumps(_results(i, config), indent=2, sort_keys=True) + "\n")


def analyse(sweep_dir: Path) -> str:
    """Load every finished run, flatten it into a Record, aggregate over seeds and format the tables:
    what `asbatch table` does."""
    from asbatch import analysis as A

    records = A.records_from_run_dirs(sweep_dir)
    groups = A.aggregate(records, by=A.default_grouping(records))
    A.sweep_tables(records)
    return f"{len(records)} records; asbatch.analysis aggregate + sweep_tables: {len(groups)} groups"


def bench_analysis(quick: bool = False) -> Row:
    n = 1000
    with tempfile.TemporaryDirectory(prefix="asbatch-bench-runs-") as tmp:
        root = Path(tmp)
        write_run_dirs(root, n)
        size_kb = sum(f.stat().st_size for f in root.glob("*/*/results.json")) / n / 1024
        times = []
        for _ in range(2 if quick else 3):
            start = time.perf_counter()
            what = analyse(root / "bench-analysis")
            times.append(time.perf_counter() - start)
    wall = statistics.median(times)
    note = (f"{n} results.json ({size_kb:.1f} kB each) -> {what}; median of {len(times)}, files in the page "
            f"cache (just written): a cold network file system adds its per-file latency")
    return Row(ANALYSIS_NAME, wall, "s", f"<= {ANALYSIS_GOAL_S:.0f} s", wall <= ANALYSIS_GOAL_S, note)


def run(quick: bool = False) -> list[Row]:
    return [*bench_submit(), bench_analysis(quick)]
