"""A real site's limits, met before anything runs: a stage larger than MaxArraySize split into several arrays
(on the local cluster with its MaxArraySize lowered, and a dry run of more runs than the default 1001), the
cluster's own `sbatch --test-only` refusing a partition (nothing queued, nothing written), and a submit
limit's refusal said with the numbers and the way out (fake Slurm commands)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml
from cli_helpers import invoke, rejected
from fakeslurm import FakeSlurm
from test_launch import TINY, sacct, wait_for, wait_for_results

from asbatch.launch import LaunchError, Manifest, cancel, submit, sweep_status
from asbatch.rundir import SweepDir
from asbatch.spec import load_sweep

REPO = Path(__file__).resolve().parents[1]
CLUSTER_SH = REPO / "slurm" / "local-cluster" / "cluster.sh"
ONE_EPOCH = {**TINY, "schedule": {"name": "cosine", "epochs": 1}}
TWO_STAGES = {"pretrain": {"config": {"model": {"bayesian": False}, "adversarial": {"lam": 0.0}}},
              "fine_tune": {"after": "pretrain", "init_from": "pretrain", "config": {"adversarial": {"lam": 0.8}}}}


def spec(path: Path, sweep: str, seeds: int, stages: dict | None = None, **resources) -> Path:
    stages = stages or {"train": {"config": {"adversarial": {"lam": 0.8}}}}
    for stage in stages.values():
        stage["resources"] = {"time": 5, **resources}
    path.write_text(yaml.safe_dump({"sweep": sweep, "profile": "local", "defaults": ONE_EPOCH,
                                    "grid": {"seed": list(range(seeds))}, "stages": stages}, sort_keys=False))
    return path


@pytest.fixture
def slurm(tmp_path, monkeypatch) -> FakeSlurm:
    return FakeSlurm(tmp_path / "fake").activate(monkeypatch)


def test_stages_larger_than_max_array_size_become_several_arrays_and_each_downstream_array_waits_task_for_task(
        tmp_path, slurm):
    slurm.set_max_array_size(3)
    path = spec(tmp_path / "spec.yaml", "split", 5, {k: dict(v) for k, v in TWO_STAGES.items()})
    manifest = submit(load_sweep(path), tmp_path / "runs", executor="slurm", spec_path=path)
    arrays = [(a.stage, a.array_job_id, len(a.run_ids), a.dependency) for a in manifest.arrays]
    assert arrays == [("pretrain", "1000", 3, None), ("pretrain", "1001", 2, None),
                      ("fine_tune", "1002", 3, "aftercorr:1000"), ("fine_tune", "1003", 2, "aftercorr:1001")]
    jobs = [r.job_id for r in manifest.submissions]
    assert jobs == ["1000_0", "1000_1", "1000_2", "1001_0", "1001_1", "1002_0", "1002_1", "1002_2", "1003_0",
                    "1003_1"], "task ids start at 0 in every array (MaxArraySize caps the index)"
    assert len(slurm.calls("sbatch")) == 4
    assert {r.state for r in sweep_status(tmp_path / "runs" / "split").runs} == {"PENDING"}
    again = submit(load_sweep(path), tmp_path / "runs", executor="slurm", spec_path=path)
    assert [p.runs for p in again.submitted] == [[], []], "every run of every array is known as queued"
    assert cancel(tmp_path / "runs" / "split") == ["1000", "1001", "1002", "1003"], "cancel reaches every array"
    assert slurm.calls("scancel")[-1] == ["1000", "1001", "1002", "1003"]


def test_a_submit_limit_refusal_says_the_numbers_and_the_way_out_and_the_manifest_holds_what_was_queued(
        tmp_path, slurm, monkeypatch):
    path = spec(tmp_path / "spec.yaml", "limited", 3, {k: dict(v) for k, v in TWO_STAGES.items()})
    limited = tmp_path / "limited"
    limited.mkdir()
    count = tmp_path / "count"
    # the site's sbatch: takes the first array, refuses the second for the user's submit limit
    (limited / "sbatch").write_text(
        f'#!/bin/sh\ncase "$*" in *--test-only*) exec {slurm.bin}/sbatch "$@";; esac\n'
        f'echo x >> {count}\n[ "$(wc -l < {count})" -gt 1 ] || exec {slurm.bin}/sbatch "$@"\n'
        "echo 'sbatch: error: QOSMaxSubmitJobPerUserLimit' >&2\n"
        "echo 'sbatch: error: Batch job submission failed: Job violates accounting/QOS policy (job submit limit, "
        "user'\"'\"'s size and/or time limits)' >&2\nexit 1\n")
    (limited / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{limited}:{os.environ['PATH']}")
    with pytest.raises(LaunchError) as err:
        submit(load_sweep(path), tmp_path / "runs", executor="slurm", spec_path=path)
    message = str(err.value)
    assert message.startswith("the site's submit limit refused stage 'fine_tune' (QOSMaxSubmitJobPerUserLimit:"), \
        message
    assert "every array task counts as one; this array has 3" in message
    assert "pack several runs per task (resources.runs_per_task)" in message
    assert message.endswith("(submitted before the failure: pretrain: 1000)"), message
    manifest = Manifest.load(SweepDir(tmp_path / "runs" / "limited"))
    assert [r.stage for r in manifest.submissions] == ["pretrain"] * 3 and not manifest.intents


def test_a_stage_the_cluster_refuses_is_one_line_exit_2_and_nothing_is_queued_or_written(tmp_path, slurm):
    slurm.refuse("--partition=debug", "invalid partition specified: debug")
    path = spec(tmp_path / "spec.yaml", "refused", 2)
    for extra in (["--dry-run"], []):
        result = invoke("submit", path, "--executor", "slurm", "--runs-root", tmp_path / "runs", *extra)
        rejected(result, "stage train: the cluster refuses --partition=debug: invalid partition specified: debug "
                 "(sbatch --test-only; nothing was submitted)")
    assert slurm.calls("sbatch") == [] and len(slurm.calls("sbatch-test-only")) == 2
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------------------------------ the real cluster


@pytest.mark.slurm
def test_the_live_cluster_refuses_a_partition_it_does_not_have_before_anything_is_queued(local_slurm, tmp_path):
    path = spec(tmp_path / "spec.yaml", "nope", 2, partition="nope")
    for extra in (["--dry-run"], []):
        result = invoke("submit", path, "--executor", "slurm", "--runs-root", tmp_path / "runs", *extra)
        message = rejected(result, "stage train: the cluster refuses --partition=nope: ")
        assert "invalid partition" in message.lower(), message
    assert not (tmp_path / "runs").exists()


@pytest.mark.slurm
def test_a_dry_run_of_more_runs_than_the_default_max_array_size_shows_two_arrays(local_slurm, tmp_path):
    path = spec(tmp_path / "spec.yaml", "big", 1200)
    result = invoke("submit", path, "--executor", "slurm", "--dry-run", "--runs-root", tmp_path / "runs")
    assert result.exit_code == 0, result.output
    lines = [line.strip() for line in result.output.splitlines() if "stage train" in line or "--array" in line]
    assert lines == ["stage train (array 1 of 2): 1001 runs to submit (slurm executor)", "--array=0-1000%64",
                     "stage train (array 2 of 2): 199 runs to submit (slurm executor)", "--array=0-198%64"], lines


@pytest.fixture
def small_max_array_size(local_slurm):
    """The local cluster as a site whose MaxArraySize is 3 (cluster.sh restarts slurmctld), then back."""
    subprocess.run(["bash", str(CLUSTER_SH), "max-array-size", "3"], check=True, capture_output=True, timeout=180)
    yield 3
    subprocess.run(["bash", str(CLUSTER_SH), "max-array-size", "1001"], check=True, capture_output=True, timeout=180)


@pytest.mark.slurm
@pytest.mark.slow
def test_on_a_site_with_max_array_size_3_four_runs_go_as_two_arrays_and_all_finish(small_max_array_size, tmp_path):
    path = spec(tmp_path / "spec.yaml", "small_site", 4)
    result = invoke("submit", path, "--executor", "slurm", "--runs-root", tmp_path / "runs")
    assert result.exit_code == 0, result.output
    manifest = Manifest.load(SweepDir(tmp_path / "runs" / "small_site"))
    assert [len(a.run_ids) for a in manifest.arrays] == [3, 1]
    assert "stage train (array 1 of 2)" in result.output and "stage train (array 2 of 2)" in result.output
    wait_for_results([r.run_dir for r in manifest.submissions], 180)
    arrays = [a.array_job_id for a in manifest.arrays]
    wait_for(lambda: len(rows := sacct(arrays)) == 4 and all(r[1] == "COMPLETED" for r in rows), 60,
             "sacct to record the 4 tasks of both arrays COMPLETED")
    status = invoke("status", "small_site", "--runs-root", tmp_path / "runs")
    assert "4 runs: 4 COMPLETED" in status.output, status.output
