"""Several runs at once: `asbatch run --jobs K` with real processes and real signals, and Slurm array tasks
that pack `runs_per_task` runs on the real local cluster (a failing pack-mate, a requeued packed task); the
packing rules at the door, in the sbatch parameters, the dry run and the manifest; the MPS daemon's life."""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml
from cli_helpers import on_terminal
from click.testing import CliRunner
from test_launch import (
    MEDIUM,
    OFFLINE_WANDB,
    TINY,
    Releaser,
    assert_same_results,
    assert_wandb_has_every_epoch_once,
    hold,
    job_history,
    release,
    sacct,
    train_reference,
    wait_for,
    wait_for_results,
)
from test_watching import DEFAULTS, env, outcome, run_dirs

from asbatch.cli import main
from asbatch.launch import submit, sweep_status
from asbatch.spec import SpecError, load_sweep


def asbatch(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "asbatch", *map(str, args)], capture_output=True, text=True,
                          timeout=600, env=kw.pop("env", env()), **kw)


def write(path: Path, spec: dict) -> Path:
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def two_runs(path: Path, sweep: str, epochs: int) -> Path:
    return write(path, {"sweep": sweep, "profile": "local", "defaults": {**DEFAULTS, "schedule": {
        "name": "cosine", "epochs": epochs}}, "grid": {"adversarial.lam": [0.0, 0.8]}})


@pytest.fixture(scope="module")
def one_by_one(tmp_path_factory):
    """The two runs trained one after another in one process (--jobs 1): what packing must reproduce."""
    root = tmp_path_factory.mktemp("one_by_one")
    ran = asbatch("run", two_runs(root / "spec.yaml", "packed", 6), "--jobs", "1", "--runs-root", root / "runs")
    assert ran.returncode == 0, ran.stderr
    return {d.name: outcome(d) for d in run_dirs(root / "runs" / "packed")}


def held_workers(pid: int, n: int) -> list[int]:
    """The pids of `n` worker processes of `pid` once each has held itself (SIGSTOP at its fault point)."""
    def held():
        stopped = [c.pid for c in psutil.Process(pid).children() if c.status() == psutil.STATUS_STOPPED]
        return stopped if len(stopped) == n else None
    return wait_for(held, 120, f"{n} workers to hold themselves", every=0.05)


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "to_group", "code", "what"), [
    (signal.SIGINT, True, 130, "interrupted"),         # Ctrl-C: the terminal signals every process of the job
    (signal.SIGTERM, False, 143, "stopped by SIGTERM"),  # `kill PID`: only the parent, which forwards it
    (signal.SIGHUP, False, 129, "stopped by SIGHUP")])
def test_jobs_2_trains_two_runs_at_once_a_signal_checkpoints_both_and_the_rerun_ends_as_one_by_one(
        tmp_path, one_by_one, signum, to_group, code, what):
    spec = two_runs(tmp_path / "spec.yaml", "packed", 6)
    cmd = [sys.executable, "-m", "asbatch", "run", str(spec), "--jobs", "2", "--runs-root", str(tmp_path / "runs")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env=env(ASBATCH_FAULT="hold-epoch:1"),
                            preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL))
    workers = held_workers(proc.pid, 2)  # both runs are between two steps of epoch 2, at once
    os.killpg(proc.pid, signum) if to_group else proc.send_signal(signum)
    time.sleep(0.5)  # the parent forwards the signal to the held workers, where it waits for SIGCONT
    for pid in workers:
        os.kill(pid, signal.SIGCONT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == code, err
    assert "2 runs at once, each in its own process (1 thread each)" in out, out
    assert "Traceback" not in err and "WorkerDied" not in err, err
    dirs = run_dirs(tmp_path / "runs" / "packed")
    for run_dir in dirs:
        assert list((run_dir / "checkpoints").glob("step-*")) and not (run_dir / "results.json").exists()
        if signum != signal.SIGHUP:  # after SIGHUP nothing more is said, but every run saves
            assert re.search(rf"{run_dir.name} {what} at epoch \d+ step \d+ .*; checkpoint saved", err), err
    assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
                   for pid in workers), "no worker outlives the command"

    again = asbatch("run", spec, "--jobs", "2", "--runs-root", tmp_path / "runs")
    assert again.returncode == 0, again.stderr
    assert len(re.findall(r"\| resumed (in|after) epoch \d+/6", again.stdout)) == 2, again.stdout
    assert {d.name: outcome(d) for d in dirs} == one_by_one, "packed and resumed must equal one by one, bitwise"


@pytest.mark.slow
def test_on_a_terminal_the_command_draws_a_bar_per_active_run_from_its_workers(tmp_path):
    spec = two_runs(tmp_path / "spec.yaml", "bars", 2)
    code, text, screen = on_terminal(["run", str(spec), "--jobs", "2", "--runs-root", str(tmp_path / "runs")],
                                     env(COLUMNS="100", TERM="xterm"))
    assert code == 0, text[-2000:]
    bars = [line for line in screen if "━" in line]
    for label in ("lam=0 ", "lam=0.8 "):
        assert any(line.startswith(label) and "epoch 2/2  loss" in line for line in bars), text[-3000:]
    assert sum(line.startswith("final evaluation") and "3 weight samples" in line for line in screen[-12:]) == 2
    assert not any(" epoch 1/2  loss" in line and "img/s" in line for line in screen), "bars, not epoch lines"
    assert sum(" done: ensemble " in line for line in screen) == 2 and "Traceback" not in text


@pytest.mark.slow
def test_a_killed_worker_fails_only_its_run_and_the_rerun_resumes_it_to_the_results_of_one_by_one(tmp_path,
                                                                                                 one_by_one):
    spec = two_runs(tmp_path / "spec.yaml", "packed", 6)
    cmd = [sys.executable, "-m", "asbatch", "run", str(spec), "--jobs", "2", "--runs-root", str(tmp_path / "runs")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env=env(ASBATCH_FAULT="hold-epoch:1"))
    killed, other = held_workers(proc.pid, 2)
    os.kill(killed, signal.SIGKILL)  # the OOM killer's way: no checkpoint, no last word
    os.kill(other, signal.SIGCONT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, err
    assert re.search(r"^train-\w+ failed: WorkerDied: the worker process training it ended \(signal SIGKILL; out of "
                     r"memory\?\)$", err, re.M), err
    assert err.strip().splitlines()[-1].startswith("error: 1 run of 2 did not finish: "), err
    dirs = run_dirs(tmp_path / "runs" / "packed")
    assert sum((d / "results.json").exists() for d in dirs) == 1, "its pack-mate finished"
    status = asbatch("status", "packed", "--runs-root", tmp_path / "runs").stdout
    assert "FAILED" in status and "WorkerDied" in status, status
    again = asbatch("run", spec, "--jobs", "2", "--runs-root", tmp_path / "runs")
    assert again.returncode == 0, again.stderr
    assert "finished earlier" in again.stdout and "| resumed " in again.stdout, again.stdout
    assert {d.name: outcome(d) for d in dirs} == one_by_one


@pytest.mark.slow
def test_packed_runs_started_under_nohup_keep_ignoring_sighup(tmp_path):
    spec = two_runs(tmp_path / "spec.yaml", "nohup", 3)
    cmd = [sys.executable, "-m", "asbatch", "run", str(spec), "--jobs", "2", "--runs-root", str(tmp_path / "runs")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env=env(), preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    for line in proc.stdout:
        if " epoch 1/3 " in line:
            os.killpg(proc.pid, signal.SIGHUP)  # the terminal closes: every process of the job gets it
            break
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert all((d / "results.json").exists() for d in run_dirs(tmp_path / "runs" / "nohup"))


@pytest.mark.slow
def test_a_failing_run_does_not_stop_its_pack_mate_and_the_command_ends_with_one_error_line(tmp_path):
    spec = write(tmp_path / "spec.yaml", {"sweep": "mates", "profile": "local", "defaults": {
        **DEFAULTS, "schedule": {"name": "cosine", "epochs": 1}}, "grid": {"data.train_subset": [320, 64]}})
    ran = asbatch("run", spec, "--jobs", "2", "--runs-root", tmp_path / "runs", env=env(ASBATCH_FAULT="nan:3"))
    assert ran.returncode == 1, ran.stderr
    failed, done = run_dirs(tmp_path / "runs" / "mates")
    if (failed / "results.json").exists():
        failed, done = done, failed
    assert (done / "results.json").exists() and not (failed / "results.json").exists()
    assert re.search(rf"^{failed.name} failed: NonFiniteLossError: loss is nan", ran.stderr, re.M), ran.stderr
    last = ran.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: 1 run of 2 did not finish: {failed.name}: NonFiniteLossError"), last
    assert f"{done.name} done: ensemble" in ran.stdout and "mates: Bayesian runs" in ran.stdout
    status = asbatch("status", "mates", "--runs-root", tmp_path / "runs").stdout
    assert re.search(rf"{failed.name} .* FAILED", status) and re.search(rf"{done.name} .* COMPLETED", status), status


# ------------------------------------------------------------------------------------------ Slurm


@pytest.fixture
def releaser(local_slurm):
    """Lifts the ~2 min BeginTime hold Slurm puts on a requeued job (a test aid, as in test_launch.py)."""
    r = Releaser()
    yield r
    r.stop()


def packed_spec(path: Path, sweep: str, defaults: dict, grid: dict, **resources) -> Path:
    return write(path, {"sweep": sweep, "profile": "local", "defaults": defaults, "grid": grid, "stages": {
        "train": {"resources": {"time": 5, "runs_per_task": 2, "cpus_per_task": 2, **resources}}}})


@pytest.mark.slurm
@pytest.mark.slow
def test_a_packed_array_runs_two_per_task_a_failing_pack_mate_fails_alone_and_retry_reruns_only_it(
        local_slurm, tmp_path, monkeypatch):
    """3 runs, 2 per task: task 0 trains the run that fails (5 steps, NaN at step 3) beside one that finishes."""
    spec = packed_spec(tmp_path / "spec.yaml", "packs", {**TINY, "schedule": {"name": "cosine", "epochs": 1}},
                       {"data.train_subset": [320, 64, 128]})
    monkeypatch.setenv("ASBATCH_FAULT", "nan:3")  # sbatch passes the submitter's environment on
    manifest = submit(load_sweep(spec), tmp_path / "runs", executor="slurm", spec_path=spec)
    monkeypatch.delenv("ASBATCH_FAULT")
    bad, mate, alone = manifest.submissions
    array = bad.array_job_id
    assert [r.job_id for r in manifest.submissions] == [f"{array}_0", f"{array}_0", f"{array}_1"]
    wait_for_results([mate.run_dir, alone.run_dir], 180)
    wait_for(lambda: len(rows := sacct([array])) == 2 and all(r[1] == "COMPLETED" for r in rows), 60,
             "both tasks COMPLETED in sacct: a failed pack-mate does not fail the task")
    states = {r.run_id: (r.state, r.reason) for r in sweep_status(tmp_path / "runs" / "packs").runs}
    assert states[bad.run_id][0] == "FAILED" and "NonFiniteLossError: loss is nan" in states[bad.run_id][1]
    assert states[mate.run_id] == ("COMPLETED", "") and states[alone.run_id] == ("COMPLETED", "")

    logs = CliRunner().invoke(main, ["logs", mate.run_id, "--runs-root", str(tmp_path / "runs")])
    assert logs.exit_code == 0 and f"{mate.run_id} done: ensemble" in logs.output
    assert bad.run_id not in logs.output, "a packed run's log is its own"

    retried = CliRunner().invoke(main, ["retry", "packs", "--runs-root", str(tmp_path / "runs")])
    assert retried.exit_code == 0, retried.output
    again = latest_records(tmp_path / "runs" / "packs")
    assert again[bad.run_id].array_job_id != array and again[mate.run_id].array_job_id == array, "only it again"
    wait_for_results([bad.run_dir], 120)


def latest_records(sweep_dir: Path) -> dict:
    from asbatch.launch import Manifest
    from asbatch.rundir import SweepDir

    return Manifest.load(SweepDir(sweep_dir)).latest()


@pytest.mark.slurm
@pytest.mark.slow
def test_usr2_to_a_packed_task_checkpoints_both_runs_requeues_once_and_both_resume_exactly(local_slurm, tmp_path,
                                                                                           releaser):
    spec = packed_spec(tmp_path / "spec.yaml", "packed_usr2", {**MEDIUM, **OFFLINE_WANDB}, {"seed": [0, 1]})
    manifest = submit(load_sweep(spec), tmp_path / "runs", executor="slurm", spec_path=spec)
    first, second = manifest.submissions
    assert first.job_id == second.job_id and "_" not in first.job_id, "one task: a plain job"
    job, dirs = first.job_id, [Path(first.run_dir), Path(second.run_dir)]
    releaser.watch(job)
    wait_for(lambda: all(len((d / "metrics.jsonl").read_text().splitlines()) >= 2 for d in dirs
                         if (d / "metrics.jsonl").exists()) and all((d / "metrics.jsonl").exists() for d in dirs),
             120, "both packed runs to train 2 epochs", every=0.05)
    for run_dir in dirs:
        hold(job, run_dir)  # the first call holds the whole task; both workers are stopped mid-run
    subprocess.run(["scancel", "--signal=USR2", job], check=True, timeout=60)
    release(job)
    reference = train_reference(load_sweep(spec).runs[0].config, tmp_path / "reference")
    wait_for_results(dirs, 240)
    history = job_history(job)
    assert history[0] == "REQUEUED" and history[-1] == "COMPLETED", history
    for run_dir in dirs:
        assert json.loads((run_dir / "requeues.json").read_text())["count"] == 1, "the task requeued once"
        assert_wandb_has_every_epoch_once(run_dir)  # each packed run's own W&B run, across the requeue
    assert_same_results(dirs[0], reference)
    log = (dirs[0].parent / ".slurm" / job / f"{job}_0_log.out").read_text()
    assert "2 packed runs: SIGUSR2 -> checkpoints; requeued job" in log, log[-3000:]


# ------------------------------------------------------------------------------------------ the rules


@pytest.mark.parametrize(("resources", "message"), [
    ({"runs_per_task": 2, "nodes": 2}, "runs_per_task 2 with nodes 2: packed runs share one node's task"),
    ({"runs_per_task": 4, "gpus_per_node": 2}, "a multi-GPU DDP run is not packed"),
    ({"runs_per_task": 2, "mps": True}, "mps: true needs GPUs"),
    ({"runs_per_task": 1, "gpus_per_node": 1, "mps": True}, "and packed runs (runs_per_task > 1)")])
def test_packing_that_cannot_work_is_refused_at_the_door(tmp_path, resources, message):
    spec = packed_spec(tmp_path / "spec.yaml", "door", TINY, {"seed": [0, 1]}, **resources)
    with pytest.raises(SpecError, match=re.escape(message)):
        load_sweep(spec)


def test_a_packed_stage_is_one_task_per_k_runs_with_one_process_each_and_the_dry_run_shows_which(
        local_slurm, tmp_path):
    from asbatch.launch.slurm import executor_parameters

    gpus = packed_spec(tmp_path / "gpus.yaml", "dry", TINY, {"seed": [0, 1, 2]}, gpus_per_node=1, cpus_per_task=8)
    params = executor_parameters("dry", load_sweep(gpus).stages[0], {})
    assert (params["tasks_per_node"], params["gpus_per_node"], params["cpus_per_task"]) == (1, 1, 8)
    spec = packed_spec(tmp_path / "spec.yaml", "dry", TINY, {"seed": [0, 1, 2]})  # the local cluster has no GPUs
    stage = load_sweep(spec).stages[0]
    result = CliRunner().invoke(main, ["submit", str(spec), "--dry-run", "--executor", "slurm", "--runs-root",
                                       str(tmp_path / "runs")])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "--array=0-1%2" in text and "--ntasks-per-node=1" in text, text
    assert "stage train: 3 runs packed 2 per task -> 2 array tasks (2 CPUs split 2 ways; no GPU;" in text
    ids = [r.run_id for r in stage.runs]
    assert f"task 0: {ids[0]}, {ids[1]}" in text and f"task 1: {ids[2]}" in text
    shown = CliRunner().invoke(main, ["show", str(spec)])
    assert f"#   task 1: {ids[2]}" in shown.output, shown.output
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(("pretrain_k", "dependency", "narrowed"), [
    (2, "aftercorr:1000", []),  # packed alike: task i waits for task i
    (1, "afterok:1000", [["update", "JobId=1001_[0]", "Dependency=afterok:1000_0:1000_1"],
                         ["update", "JobId=1001_[1]", "Dependency=afterok:1000_2:1000_3"]])])
def test_a_packed_fine_tune_task_waits_for_the_tasks_of_its_own_runs_upstream_runs(tmp_path, monkeypatch, pretrain_k,
                                                                                   dependency, narrowed):
    from fakeslurm import FakeSlurm

    slurm = FakeSlurm(tmp_path / "fake").activate(monkeypatch)
    spec = write(tmp_path / "spec.yaml", {"sweep": "two", "profile": "local", "defaults": TINY,
                                          "grid": {"seed": [0, 1, 2, 3]}, "stages": {
        "pretrain": {"config": {"model": {"bayesian": False}, "adversarial": {"lam": 0.0}},
                     "resources": {"runs_per_task": pretrain_k}},
        "fine_tune": {"after": "pretrain", "init_from": "pretrain", "resources": {"runs_per_task": 2}}}})
    manifest = submit(load_sweep(spec), tmp_path / "runs", executor="slurm", spec_path=spec)
    fine = [a for a in manifest.arrays if a.stage == "fine_tune"]
    assert [a.dependency for a in fine] == [dependency]
    assert [r.job_id for r in manifest.submissions if r.stage == "fine_tune"] == ["1001_0", "1001_0", "1001_1",
                                                                                  "1001_1"]
    assert sorted(c for c in slurm.calls("scontrol") if c[0] == "update") == narrowed


def test_submit_jobs_sets_the_local_executors_runs_at_once_and_is_refused_for_slurm(local_slurm, tmp_path):
    from cli_helpers import invoke, rejected

    spec = two_runs(tmp_path / "spec.yaml", "local_jobs", 1)
    local = invoke("submit", spec, "--executor", "local", "--dry-run", "--jobs", "2", "--runs-root", tmp_path / "r")
    assert local.exit_code == 0 and "in one background process, up to 2 at once in stage order: " in local.output
    rejected(invoke("submit", spec, "--executor", "slurm", "--jobs", "2", "--runs-root", tmp_path / "r"),
             "--jobs 2 is for the local executor (runs at once on this machine); on Slurm pack several runs into each "
             "array task with resources.runs_per_task")
    assert not (tmp_path / "r").exists()


def test_a_killed_submit_of_a_packed_array_is_resolved_to_each_runs_task(tmp_path, monkeypatch):
    from asbatch.launch import manifest as manifest_module
    from asbatch.launch.manifest import IntentRecord, PlannedRun

    runs = [PlannedRun(run_id=f"train-{i:010x}", stage="train", executor="slurm", upstream={},
                       config={"schedule": {"epochs": 1}},
                       run_dir=str(tmp_path / f"train-{i:010x}"), wandb_id=f"train-{i:010x}",
                       submitted_at="2026-12-06T12:00:00+00:00") for i in range(3)]
    intent = IntentRecord(stage="train", job_name="s:train", log_dir=str(tmp_path), since="2026-12-06T12:00:00+00:00",
                          runs=runs, runs_per_task=2)
    monkeypatch.setattr(manifest_module, "find_jobs", lambda *a: {"77"})
    _, records = manifest_module._resolve(intent, set())
    assert [r.job_id for r in records] == ["77_0", "77_0", "77_1"]


def test_the_machine_is_filled_from_the_cpus_this_process_may_use_even_without_an_affinity_call(monkeypatch):
    from asbatch.launch import pack

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {4, 5, 6, 7, 9}, raising=False)  # `taskset -c 4-7,9`
    assert pack.default_cpu_jobs(2) == 2 and pack.default_cpu_jobs(None) == 1
    assert pack.split_cpus(2) == [(4, 5, 6), (7, 9)] and pack.split_cpus(6) == [None] * 6
    monkeypatch.delattr(os, "sched_getaffinity")  # macOS has none: every CPU
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert pack.default_cpu_jobs(1) == 8 and pack.local_jobs({"OMP_NUM_THREADS": "4"}, runs=6) == (2, 4)


def test_the_mps_daemon_runs_with_job_private_dirs_while_the_block_runs_and_is_told_to_quit(tmp_path, monkeypatch):
    from asbatch.launch.mps import mps_daemon

    calls = tmp_path / "calls"
    fake = tmp_path / "bin" / "nvidia-cuda-mps-control"
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/sh\necho "$* | $CUDA_MPS_PIPE_DIRECTORY | $(cat)" >> {calls}\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_TMPDIR", str(tmp_path / "tmp"))
    with mps_daemon() as root:
        assert os.environ["CUDA_MPS_PIPE_DIRECTORY"] == str(root / "pipe") and (root / "log").is_dir()
        assert str(tmp_path / "tmp" / "asbatch-mps-4242") in str(root)
    started, stopped = calls.read_text().splitlines()
    assert started.startswith(f"-d | {root / 'pipe'}") and stopped == f" | {root / 'pipe'} | quit"
    assert "CUDA_MPS_PIPE_DIRECTORY" not in os.environ, "the variables go with the daemon"

    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    with pytest.raises(RuntimeError, match=r"resources\.mps: cannot start nvidia-cuda-mps-control"), mps_daemon():
        pass
