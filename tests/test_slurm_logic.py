"""The Slurm logic without a cluster: status inference, planning and cancel against fake sbatch / squeue /
sacct / scancel (tests/fakeslurm), as submitit tests its own Slurm code. The real-cluster behaviour is
tested in test_launch.py; these cover the states a cluster rarely shows on demand."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import yaml
from fakeslurm import FakeSlurm

from asbatch.launch import LaunchError, Manifest, cancel, retry, submit, sweep_status
from asbatch.rundir import SweepDir
from asbatch.spec import load_sweep

CONFIG = {"cpu": True, "data": {"name": "digits", "batch_size": 64}, "model": {"name": "mlp", "width": 8},
          "schedule": {"name": "cosine", "epochs": 2}, "adversarial": {"lam": 0.8, "steps": 1}}
TWO_STAGES = {
    "pretrain": {"config": {"model": {"bayesian": False}, "adversarial": {"lam": 0.0}}, "resources": {"time": 5}},
    "fine_tune": {"after": "pretrain", "init_from": "pretrain", "resources": {"time": 5}},
}


@pytest.fixture
def slurm(tmp_path, monkeypatch) -> FakeSlurm:
    return FakeSlurm(tmp_path / "fake").activate(monkeypatch)


def spec(tmp_path: Path, seeds: int, stages: dict | None = None) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({"sweep": "s", "profile": "local", "defaults": CONFIG,
                                    "grid": {"seed": list(range(seeds))},
                                    "stages": stages or {"train": {"resources": {"time": 5}}}}))
    return path


def finish(run_dir: str | Path) -> None:
    """What a finished run leaves behind (as far as status and planning look)."""
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    SweepDir(Path(run_dir).parent).run(Path(run_dir).name).write_results({"run_id": Path(run_dir).name})


def states(sweep_dir: Path) -> list[tuple[str, str, str]]:
    return [(r.state, r.reason, r.source) for r in sweep_status(sweep_dir).runs]


def test_status_reads_pending_reasons_requeues_timeouts_cancellations_and_forgotten_jobs(tmp_path, slurm):
    manifest = submit(load_sweep(spec(tmp_path, 7)), tmp_path / "runs", executor="slurm")
    jobs = [r.job_id for r in manifest.submissions]
    assert jobs == [f"1000_{i}" for i in range(7)] and len(slurm.calls("sbatch")) == 1
    slurm.set(jobs[0], squeue=("PENDING", "Priority"), sacct="PENDING")
    slurm.set(jobs[1], squeue=("REQUEUED", ""), sacct="REQUEUED")
    slurm.set(jobs[2], squeue=None, sacct="TIMEOUT")
    slurm.set(jobs[3], squeue=("CANCELLED", ""), sacct="CANCELLED by 0")
    slurm.set(jobs[4], squeue=("RUNNING", ""), sacct="RUNNING")
    slurm.set(jobs[5], squeue=None, sacct=None)      # forgotten by Slurm, no results: nobody knows
    slurm.set(jobs[6], squeue=None, sacct=None)      # forgotten by Slurm, but it finished
    finish(manifest.submissions[6].run_dir)

    status = sweep_status(tmp_path / "runs" / "s")

    assert [(r.state, r.reason, r.source) for r in status.runs] == [
        ("PENDING", "Priority", "squeue"), ("REQUEUED", "", "squeue"),
        ("TIMEOUT", "hit its time limit before it could requeue itself; `asbatch retry` resumes it", "sacct"),
        ("CANCELLED", "cancelled (scancel, or by Slurm); `asbatch retry` resumes it", "sacct"),  # each says why
        ("RUNNING", "", "squeue"), ("UNKNOWN", "", ""), ("COMPLETED", "", "run dir")]
    assert [r.active for r in status.runs] == [True, True, False, False, True, False, False]
    assert [r.retryable for r in status.runs] == [False, False, True, True, False, False, False]
    assert status.note is None


def test_without_accounting_states_come_from_squeue_with_a_note(tmp_path, slurm):
    manifest = submit(load_sweep(spec(tmp_path, 2)), tmp_path / "runs", executor="slurm")
    slurm.set_sacct_down()
    slurm.set(manifest.submissions[0].job_id, squeue=("RUNNING", ""))
    slurm.set(manifest.submissions[1].job_id, squeue=None)

    status = sweep_status(tmp_path / "runs" / "s")

    assert [r.state for r in status.runs] == ["RUNNING", "UNKNOWN"]
    assert status.note.startswith("sacct failed (sacct: error: Slurm accounting storage is disabled)")


def test_task_i_of_the_same_grid_waits_for_task_i_of_its_upstream_array(tmp_path, slurm):
    manifest = submit(load_sweep(spec(tmp_path, 2, TWO_STAGES)), tmp_path / "runs", executor="slurm")
    assert [a.dependency for a in manifest.arrays] == [None, "aftercorr:1000"]
    assert [c for c in slurm.calls("scontrol") if c[0] == "update"] == [], "aftercorr needs no per-task update"
    assert [r.dependency for r in manifest.submissions] == ["", "", "afterok:1000_0", "afterok:1000_1"]


def test_each_task_of_a_collapsed_grid_waits_only_for_its_own_upstream_run(tmp_path, slurm):
    path = tmp_path / "spec.yaml"
    stages = {"pretrain": {**TWO_STAGES["pretrain"], "grid_ignore": ["adversarial.lam"]},
              "fine_tune": TWO_STAGES["fine_tune"]}
    path.write_text(yaml.safe_dump({"sweep": "s", "profile": "local", "defaults": CONFIG, "stages": stages,
                                    "grid": {"seed": [0, 1], "adversarial.lam": [0.0, 0.8]}}))
    manifest = submit(load_sweep(path), tmp_path / "runs", executor="slurm")

    assert [a.dependency for a in manifest.arrays] == [None, "afterok:1000"]  # at sbatch: the whole array
    seeds = [r.config["seed"] for r in manifest.submissions[2:]]
    assert [slurm.job(f"1001_{t}")["dependency"] for t in range(4)] == [f"afterok:1000_{s}" for s in seeds]
    groups = [",".join(str(t) for t in range(4) if seeds[t] == s) for s in (0, 1)]
    updates = [c for c in slurm.calls("scontrol") if c[0] == "update"]
    assert sorted(c[1] for c in updates) == [f"JobId=1001_[{g}]" for g in groups]
    assert [r.dependency for r in manifest.submissions[2:]] == [f"afterok:1000_{s}" for s in seeds]


def test_only_the_tasks_behind_a_failed_upstream_task_are_known_to_never_run(tmp_path, slurm):
    submit(load_sweep(spec(tmp_path, 2, TWO_STAGES)), tmp_path / "runs", executor="slurm")
    slurm.set("1000_0", squeue=None, sacct="FAILED")
    slurm.set("1000_1", squeue=("RUNNING", ""), sacct="RUNNING")

    runs = sweep_status(tmp_path / "runs" / "s").runs

    assert [(r.run_id.split("-")[0], r.state) for r in runs] == [
        ("pretrain", "FAILED"), ("pretrain", "RUNNING"), ("fine_tune", "PENDING"), ("fine_tune", "PENDING")]
    assert runs[2].blocked and runs[2].retryable and not runs[2].active
    assert runs[2].reason == "DependencyNeverSatisfied: upstream 1000_0 failed"
    assert not runs[3].blocked and runs[3].active, "the other fine-tune run still waits for its own upstream"


def test_a_second_submit_skips_finished_and_queued_runs_and_waits_only_for_queued_upstream_tasks(tmp_path, slurm):
    path = spec(tmp_path, 2, TWO_STAGES)
    first = submit(load_sweep(path), tmp_path / "runs", executor="slurm", spec_path=path)
    pre0, pre1, ft0, ft1 = first.submissions
    finish(pre0.run_dir)
    slurm.set(pre0.job_id, squeue=None, sacct="COMPLETED")
    slurm.set(pre1.job_id, squeue=("RUNNING", ""), sacct="RUNNING")
    for ft in (ft0, ft1):
        slurm.set(ft.job_id, squeue=None, sacct="CANCELLED by 0")

    again = submit(load_sweep(path), tmp_path / "runs", executor="slurm", spec_path=path)

    pretrain, fine_tune = again.submitted
    assert pretrain.run_ids == [] and set(pretrain.skipped.values()) == {
        "finished (results.json)", f"already queued as {pre1.job_id} (RUNNING)"}
    assert fine_tune.run_ids == [ft0.run_id, ft1.run_id] and fine_tune.dependency == f"afterok:{pre1.job_id}"
    script = Path(slurm.job("1002_0")["script"]).read_text()
    assert f"#SBATCH --dependency=afterok:{pre1.job_id}\n" in script
    # the run whose upstream finished waits for nothing; the other for its upstream's task only
    assert [slurm.job(f"1002_{t}")["dependency"] for t in (0, 1)] == [None, f"afterok:{pre1.job_id}"]
    assert len(Manifest.load(tmp_path / "runs" / "s").arrays) == 3


def test_a_run_whose_upstream_is_neither_finished_nor_queued_is_refused(tmp_path, slurm):
    path = spec(tmp_path, 1, TWO_STAGES)
    with pytest.raises(LaunchError, match=r"needs run pretrain-.* which has not finished and is not queued"):
        submit(load_sweep(path), tmp_path / "runs", executor="slurm", stages=["fine_tune"])
    assert slurm.calls("sbatch") == [] and not (tmp_path / "runs").exists(), "nothing written, not even the lock"


def test_retry_cancels_stuck_tasks_and_resubmits_them_after_the_new_upstream_array(tmp_path, slurm):
    path = spec(tmp_path, 2, TWO_STAGES)
    submit(load_sweep(path), tmp_path / "runs", executor="slurm", spec_path=path)
    slurm.set("1000_0", squeue=None, sacct="FAILED")
    slurm.set("1000_1", squeue=None, sacct="COMPLETED")
    finish(Manifest.load(tmp_path / "runs" / "s").submissions[1].run_dir)
    slurm.set("1001_0", squeue=("PENDING", "DependencyNeverSatisfied"), sacct="PENDING")
    slurm.set("1001_1", squeue=("PENDING", "DependencyNeverSatisfied"), sacct="PENDING")

    manifest = retry(tmp_path / "runs" / "s")

    assert [a.stage for a in manifest.arrays[2:]] == ["pretrain", "fine_tune"]
    assert manifest.arrays[3].dependency == "afterok:1002"
    assert ["1001_0", "1001_1"] in slurm.calls("scancel"), "the stuck tasks are cancelled first"
    assert [len(a.run_ids) for a in manifest.arrays[2:]] == [1, 2]


@pytest.mark.parametrize("overrides", [{"defaults.bogus": 1}, {"defaults.schedule.epochs": "two"}])
def test_retry_with_hand_edited_overrides_in_the_manifest_is_bad_input_naming_it(overrides, tmp_path, slurm):
    from cli_helpers import invoke, rejected

    path = spec(tmp_path, 2)
    submit(load_sweep(path), tmp_path / "runs", executor="slurm", spec_path=path)
    slurm.set("1000_0", squeue=None, sacct="FAILED")
    manifest = SweepDir(tmp_path / "runs" / "s").manifest_file
    data = json.loads(manifest.read_text())
    data["submissions"][0]["overrides"] = overrides
    manifest.write_text(json.dumps(data))
    rejected(invoke("retry", "s", "--runs-root", tmp_path / "runs"), f"{manifest}: the overrides",
             "do not apply to", f"{next(iter(overrides))}:")
    assert len(slurm.calls("sbatch")) == 1


def test_a_failed_sbatch_removes_what_that_submission_wrote_and_keeps_the_earlier_ones(tmp_path, slurm,
                                                                                        monkeypatch):
    from cli_helpers import invoke, rejected

    def tree(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else b"" for p in root.rglob("*")}

    refusing = tmp_path / "refusing"
    refusing.mkdir()
    # it passes the --test-only check and fails at submission (a controller that went away in between)
    (refusing / "sbatch").write_text("#!/bin/sh\ncase \"$*\" in *--test-only*) exit 0;; esac\n"
                                     "echo 'sbatch: error: Batch job submission failed' >&2\nexit 1\n")
    (refusing / "sbatch").chmod(0o755)
    path, runs = spec(tmp_path, 1), tmp_path / "runs"
    with monkeypatch.context() as m:
        m.setenv("PATH", f"{refusing}:{os.environ['PATH']}")
        rejected(invoke("submit", path, "--executor", "slurm", "--runs-root", runs), "sbatch failed", code=1)
    assert not runs.exists(), tree(runs)  # no empty manifest, no pickles, no submission script, no lock
    submit(load_sweep(path), runs, executor="slurm", spec_path=path)
    before = tree(runs)
    path = spec(tmp_path, 2)  # seed 0 is queued: only seed 1 is submitted, and that fails
    monkeypatch.setenv("PATH", f"{refusing}:{os.environ['PATH']}")
    rejected(invoke("submit", path, "--executor", "slurm", "--runs-root", runs), "sbatch failed", code=1)
    assert tree(runs) == before


def test_cancel_scancels_only_the_arrays_that_still_have_active_tasks(tmp_path, slurm):
    path = spec(tmp_path, 2, TWO_STAGES)
    submit(load_sweep(path), tmp_path / "runs", executor="slurm", spec_path=path)
    for task in ("1000_0", "1000_1"):
        slurm.set(task, squeue=None, sacct="COMPLETED")
    slurm.set("1001_1", squeue=("RUNNING", ""), sacct="RUNNING")

    assert cancel(tmp_path / "runs" / "s") == ["1001"]
    assert slurm.calls("scancel") == [["1001"]]
    assert [r.state for r in sweep_status(tmp_path / "runs" / "s").runs][2:] == ["CANCELLED", "CANCELLED"]
    assert cancel(tmp_path / "runs" / "s") == [], "nothing left to cancel"


def test_dry_run_flags_are_the_sbatch_lines_submitit_writes(tmp_path, slurm):
    path = spec(tmp_path, 3, TWO_STAGES)
    dry = submit(load_sweep(path), tmp_path / "runs", executor="slurm", dry_run=True)
    assert slurm.calls("sbatch") == [] and not (tmp_path / "runs").exists()

    real = submit(load_sweep(path), tmp_path / "runs", executor="slurm")

    for planned, submitted, array in zip(dry.submitted, real.submitted, ("1000", "1001"), strict=True):
        script = Path(slurm.job(f"{array}_0")["script"]).read_text()
        written = set(re.findall(r"^#SBATCH (.*)$", script, re.MULTILINE))
        flags = {f.replace("<pretrain array>", "1000") for f in planned.flags if f.startswith("--")}
        assert flags == {f for f in submitted.flags if f.startswith("--")}
        assert flags <= written, flags - written
        assert written - flags <= {"--open-mode=append", "--wckey=submitit", "--requeue"}, written - flags
        exports = [f for f in planned.flags if f.startswith("export ")]
        assert exports and all(f"\n{line}\n" in script for line in exports)


def test_a_damaged_manifest_is_one_error_naming_the_file(tmp_path, slurm):
    submit(load_sweep(spec(tmp_path, 1)), tmp_path / "runs", executor="slurm")
    manifest = tmp_path / "runs" / "s" / "manifest.json"
    data = json.loads(manifest.read_text())
    data["submissions"][0]["job_id"] = "1000_0; rm -rf /"
    manifest.write_text(json.dumps(data))
    with pytest.raises(LaunchError, match=rf"^{re.escape(str(manifest))}: damaged manifest: submissions.0.job_id"):
        sweep_status(tmp_path / "runs" / "s")
    manifest.write_text(manifest.read_text()[:40])
    with pytest.raises(LaunchError, match=rf"^{re.escape(str(manifest))}: cannot be read as JSON"):
        sweep_status(tmp_path / "runs" / "s")


def test_a_failed_run_shows_the_first_line_of_its_failure(tmp_path, slurm):
    manifest = submit(load_sweep(spec(tmp_path, 2)), tmp_path / "runs", executor="slurm")
    for record in manifest.submissions:
        slurm.set(record.job_id, squeue=None, sacct="FAILED")
    SweepDir(tmp_path / "runs" / "s").run(manifest.submissions[0].run_id).write_failure(
        "NonFiniteLossError: loss is nan at global step 12 (epoch 1); no checkpoint was written before it\nmore")

    runs = sweep_status(tmp_path / "runs" / "s").runs

    assert [(r.state, r.reason) for r in runs] == [
        ("FAILED", "NonFiniteLossError: loss is nan at global step 12 (epoch 1); no checkpoint was written before it"),
        ("FAILED", "the job failed before the run could record why (see `asbatch logs RUN --err`); `asbatch retry` "
                   "resumes it")]


def test_elapsed_time_of_a_requeued_run_leaves_out_the_time_it_waited_in_the_queue(tmp_path, slurm, monkeypatch):
    import time
    from types import SimpleNamespace

    import asbatch.launch.status as status_module

    now = time.time()  # status reads the clock through its module's `time`: here a clock that stands still
    monkeypatch.setattr(status_module, "time", SimpleNamespace(time=lambda: now, monotonic=time.monotonic,
                                                               sleep=time.sleep))
    manifest = submit(load_sweep(spec(tmp_path, 1)), tmp_path / "runs", executor="slurm")
    record = manifest.submissions[0]
    slurm.set(record.job_id, squeue=("RUNNING", ""), sacct="RUNNING")
    run_dir = SweepDir(tmp_path / "runs" / "s").run(record.run_id)
    run_dir.write_config(CONFIG)
    run_dir.metrics_file.write_text(json.dumps({"epoch": 0, "global_step": 10, "step_time_s": 1.0}) + "\n")
    an_hour_ago = now - 3600  # epoch 1 ended, then the task was requeued and waited an hour
    os.utime(run_dir.metrics_file, (an_hour_ago, an_hour_ago))
    run_dir.write_process({"pid": 1, "host": "n1", "create_time": now - 5})  # this segment: 5 s old

    (status,) = sweep_status(tmp_path / "runs" / "s").runs
    assert status.state == "RUNNING"
    assert status.elapsed_s == pytest.approx(10 + 5), status.elapsed_s  # 10 steps x 1 s of epoch 1, then 5 s
