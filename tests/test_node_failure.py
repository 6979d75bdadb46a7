"""Faults of the cluster itself, injected for real on the local cluster: a node set DOWN under a running task
(Slurm requeues the job, NODE_FAIL; the task resumes from its checkpoint and ends bitwise equal to an
uninterrupted run), and slurmctld stopped and started during a sweep (`status` exits 0 with a one-line note
while the controller is away, `wait` waits through it, the sweep finishes bitwise equal). Every test puts the
cluster back (node resumed, slurmctld started) in a `finally`. Without a cluster: the note when squeue (or
squeue and sacct) does not answer, against fake Slurm commands.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from fakeslurm import FakeSlurm
from test_launch import (
    MEDIUM,
    Releaser,
    assert_same_results,
    epochs_done,
    hold,
    job_history,
    sacct,
    sh,
    train_reference,
    wait_for,
    wait_for_results,
    write_spec,
)

from asbatch.cli import main
from asbatch.launch import LaunchError, submit, sweep_status
from asbatch.rundir import RunDir
from asbatch.spec import load_sweep

REPO = Path(__file__).resolve().parents[1]
CLUSTER_SH = REPO / "slurm" / "local-cluster" / "cluster.sh"
CONTROLLER_DOWN = "slurm_load_jobs error: Unable to contact slurm controller (connect failure)"
ONE_RUN = {"train": {"resources": {"time": 5}}}


@pytest.fixture
def releaser(local_slurm):
    """Lifts the ~2 min BeginTime hold Slurm puts on a requeued job (a test aid, as in test_launch.py)."""
    r = Releaser()
    yield r
    r.stop()


def _need_root() -> None:
    if os.geteuid() != 0:  # only root can stop and start the cluster's daemons
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("CI=true but not root: cannot stop and start slurmctld", pytrace=False)
        pytest.skip("needs root to stop and start slurmctld")


def _node_state(node: str) -> str:
    proc = subprocess.run(["sinfo", "-h", "-n", node, "-o", "%T"], capture_output=True, text=True, timeout=60)
    return proc.stdout.strip()


def _restore_node(node: str) -> None:
    """`state=resume` where the node is still down or drained (with ReturnToService=2 a node whose slurmd
    answers is back by itself), then wait until it takes jobs again."""
    if not _node_state(node).rstrip("*~#!%$@^-").startswith(("idle", "mixed", "allocated", "completing")):
        subprocess.run(["scontrol", "update", f"NodeName={node}", "State=RESUME"], capture_output=True, timeout=60)
    wait_for(lambda: _node_state(node).startswith(("idle", "mixed", "allocated", "completing")), 60,
             f"node {node} to be back in service")


def _other(node: str) -> str:
    """The local cluster's other node."""
    return {"n1": "n2", "n2": "n1"}[node]


def _job_processes(job: str, slurm_dir: Path) -> list[int]:
    """This machine's processes of a job (the local cluster's nodes are this host): its slurmstepd, srun
    and the task's Python processes."""
    import psutil

    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if f"slurmstepd: [{job}." in cmdline or str(slurm_dir) in cmdline:
            found.append(proc.info["pid"])
    return found


def _asbatch(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "asbatch", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "COLUMNS": "200"})


def _row(output: str, run_id: str) -> str:
    return next(line for line in output.splitlines() if line.strip().startswith(run_id))


# ------------------------------------------------------------------------------------------ on the cluster


@pytest.mark.slurm
@pytest.mark.slow
def test_a_task_whose_node_goes_down_is_requeued_by_slurm_and_resumes_to_the_uninterrupted_results(
        local_slurm, tmp_path, releaser):
    spec = write_spec(tmp_path / "spec.yaml", "node_down", ONE_RUN, defaults=MEDIUM)
    manifest = submit(load_sweep(spec), tmp_path / "runs", executor="slurm", spec_path=spec)
    job, run_dir = manifest.submissions[0].job_id, Path(manifest.submissions[0].run_dir)
    wait_for(lambda: epochs_done(run_dir) >= 2, 90, "2 epochs", every=0.05)
    pid = hold(job, run_dir)  # the node fails while the task is mid-training, however fast the machine is
    node = sh("squeue", "-h", "-j", job, "-o", "%N").strip()
    assert node in ("n1", "n2"), node
    try:
        sh("scontrol", "update", f"NodeName={node}", "State=DOWN", "Reason=asbatch test: node failure")
        requeued = wait_for(lambda: (st := sweep_status(tmp_path / "runs" / "node_down")).runs[0].state in (
            "PENDING", "REQUEUED") and st, 30, "Slurm to requeue the job of the failed node")
        assert requeued.runs[0].active and not requeued.runs[0].retryable, "a requeued run is not failed"
        # the local node answers at once (ReturnToService=2), but its slurmd lists the old job a moment after
        # its processes are gone: started there again then, the job is refused ("already running, do not
        # launch second copy") and Slurm drains the node. So the node is kept out until the requeued job has
        # started on the other one.
        wait_for(lambda: not _job_processes(job, run_dir.parent / ".slurm"), 60, f"job {job}'s processes to end")
        sh("scontrol", "update", f"NodeName={node}", "State=DRAIN", "Reason=asbatch test: the failed node kept out")
        releaser.watch(job)  # lift the ~2 min hold Slurm puts on a requeued job
        wait_for(lambda: sh("squeue", "-h", "-j", job, "-o", "%T %N").strip() in ("", f"RUNNING {_other(node)}")
                 or run_dir.joinpath("results.json").exists(), 60, f"job {job} to start again on {_other(node)}")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)  # should Slurm not have ended it
        _restore_node(node)
    reference = train_reference(load_sweep(spec).runs[0].config, tmp_path / "reference")
    wait_for_results([run_dir], 120)

    assert_same_results(run_dir, reference)
    history = job_history(job)
    assert history[0] == "NODE_FAIL" and history[-1] == "COMPLETED", history
    slurm_dir = run_dir.parent / ".slurm" / job
    assert "DUE TO NODE FAILURE" in (slurm_dir / f"{job}_0_log.err").read_text()
    log = (slurm_dir / f"{job}_0_log.out").read_text()
    resumed = re.search(rf"^{run_dir.name}: .* \| resumed (in|after) epoch (\d+)", log, re.M)
    assert resumed and int(resumed.group(2)) >= 2, log  # from its checkpoint, not from scratch
    status = _asbatch("status", "node_down", "--runs-root", str(tmp_path / "runs"))
    assert status.returncode == 0 and "COMPLETED" in _row(status.stdout, run_dir.name), status.stdout


@pytest.mark.slurm
@pytest.mark.slow
def test_slurmctld_stopped_and_started_mid_sweep_status_notes_it_and_the_sweep_finishes(local_slurm, tmp_path):
    """Two runs held mid-training; slurmctld stopped; one run continued, it finishes while the controller is
    away; `status` meanwhile: exit 0, states from sacct and the run dirs, one note; slurmctld started, the
    other run continued: `wait` (running throughout) exits 0 and both runs equal uninterrupted ones."""
    _need_root()
    spec = write_spec(tmp_path / "spec.yaml", "ctld", ONE_RUN, defaults=MEDIUM, grid={"seed": [0, 1]})
    root = tmp_path / "runs"
    manifest = submit(load_sweep(spec), root, executor="slurm", spec_path=spec)
    (first, second), dirs = manifest.submissions, [Path(r.run_dir) for r in manifest.submissions]
    held: dict[int, int] = {}  # run index -> its training process, held (SIGSTOP)

    def hold_each_after_an_epoch() -> bool:  # each is held as soon as it has trained an epoch
        for i, (record, run_dir) in enumerate(zip(manifest.submissions, dirs, strict=True)):
            if i not in held and epochs_done(run_dir) >= 1:
                held[i] = hold(record.job_id, run_dir)
        return len(held) == 2

    waiter, finished = None, False
    pid_file = Path(re.search(r"SlurmctldPidFile\s*=\s*(\S+)", sh("scontrol", "show", "config")).group(1))
    try:
        wait_for(hold_each_after_an_epoch, 90, "both runs to train an epoch", every=0.05)
        # slurmdbd records a job's start asynchronously: status reads it from sacct once the controller is away
        wait_for(lambda: (rs := sacct([first.array_job_id])) and len(rs) == 2 and all(r[1] == "RUNNING" for r in rs),
                 30, "slurmdbd to record both jobs RUNNING", every=0.5)
        ctld = int(pid_file.read_text())
        waiter = subprocess.Popen([sys.executable, "-m", "asbatch", "wait", "ctld", "--poll", "1", "--timeout",
                                   "240", "--runs-root", str(root)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True)
        try:
            os.kill(ctld, signal.SIGTERM)
            wait_for(lambda: not Path(f"/proc/{ctld}").exists(), 30, "slurmctld to stop", every=0.1)
            os.kill(held[1], signal.SIGCONT)  # trains to its end while the controller is away
            wait_for_results([dirs[1]], 60)
            start = time.monotonic()
            status = subprocess.Popen([sys.executable, "-m", "asbatch", "status", "ctld", "--runs-root", str(root)],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      env={**os.environ, "COLUMNS": "200"})
            references = [train_reference(run.config, tmp_path / f"reference-{run.run_id}")  # meanwhile
                          for run in load_sweep(spec).runs]
            out, err = status.communicate(timeout=120)
            away = subprocess.CompletedProcess(status.args, status.returncode, out, err)
            took = time.monotonic() - start
            assert not Path(f"/proc/{ctld}").exists(), "slurmctld came back while status ran"
        finally:
            try:
                subprocess.run(["bash", str(CLUSTER_SH), "start"], capture_output=True, timeout=120, check=True)
            finally:
                for pid in held.values():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGCONT)
        assert away.returncode == 0, away.stdout + away.stderr
        assert "Traceback" not in away.stdout + away.stderr and away.stderr == "", away.stderr
        notes = [line for line in away.stdout.splitlines() if line.startswith("note:")]
        assert len(notes) == 1 and notes[0].startswith("note: Slurm's controller is not answering ("), away.stdout
        assert "Unable to contact slurm controller" in notes[0] and "states come from sacct" in notes[0]
        assert "RUNNING" in _row(away.stdout, first.run_id), away.stdout  # sacct (slurmdbd) still answers
        assert "COMPLETED" in _row(away.stdout, second.run_id), away.stdout  # its results.json
        waited = waiter.communicate(timeout=180)[0]
        assert waiter.returncode == 0, waited
        assert "all 2 runs completed" in waited, waited
        assert waited.count("note: Slurm's controller is not answering") == 1, waited
        finished = True
    finally:
        if not finished:  # leave nothing held or queued behind
            if waiter is not None and waiter.poll() is None:
                waiter.kill()
                waiter.communicate()
            for pid in held.values():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
            subprocess.run(["scancel", *{r.array_job_id for r in manifest.submissions}], capture_output=True,
                           timeout=60)

    # Slurm's own record: the job that ended while the controller was away reached it once it was back
    assert [job_history(r.job_id)[-1] for r in manifest.submissions] == ["COMPLETED", "COMPLETED"]

    for run_dir, reference in zip(dirs, references, strict=True):
        assert_same_results(run_dir, reference)
    after = _asbatch("status", "ctld", "--runs-root", str(root))
    assert after.returncode == 0 and "note:" not in after.stdout, after.stdout
    assert all("COMPLETED" in _row(after.stdout, r.run_id) for r in manifest.submissions), after.stdout
    # a step that ended while the controller was away reports that within a minute (slurmstepd retries):
    # until then its job is COMPLETING and its node takes no new job; leave the cluster as it was found
    arrays = ",".join({r.array_job_id for r in manifest.submissions})
    wait_for(lambda: not sh("squeue", "-h", "-t", "CG", "-j", arrays).strip(), 90, "the jobs to finish completing",
             every=1)
    print(f"status while slurmctld was away took {took:.1f} s")


# ------------------------------------------------------------------------------------------ without a cluster


def test_status_without_an_answering_controller_exits_0_with_one_note(tmp_path, monkeypatch):
    """squeue fails as it does while slurmctld is down: states from sacct and the run dirs, one note; sacct
    failing too: every run without results UNKNOWN, still exit 0 and one note, never a traceback."""
    slurm = FakeSlurm(tmp_path / "fake").activate(monkeypatch)
    spec = write_spec(tmp_path / "spec.yaml", "s", ONE_RUN, grid={"seed": [0, 1, 2]})
    manifest = submit(load_sweep(spec), tmp_path / "runs", executor="slurm")
    a, b, c = manifest.submissions
    slurm.set(a.job_id, squeue=("RUNNING", ""), sacct="RUNNING")
    slurm.set(b.job_id, squeue=("PENDING", "Priority"), sacct="PENDING")
    slurm.set(c.job_id, squeue=("RUNNING", ""), sacct="RUNNING")
    Path(c.run_dir).mkdir(parents=True, exist_ok=True)
    RunDir(c.run_dir).write_results({"run_id": c.run_id})  # finished while the controller was away
    down = slurm.bin / "squeue"
    down.write_text(f"#!/bin/sh\necho '{CONTROLLER_DOWN}' >&2\nexit 1\n")
    runner = CliRunner()

    result = runner.invoke(main, ["status", "s", "--runs-root", str(tmp_path / "runs")], terminal_width=200)

    assert result.exit_code == 0, result.output
    assert [(r.state, r.source) for r in sweep_status(tmp_path / "runs" / "s", strict=False).runs] == [
        ("RUNNING", "sacct"), ("PENDING", "sacct"), ("COMPLETED", "run dir")]
    with pytest.raises(LaunchError, match=r"^squeue failed: slurm_load_jobs error: Unable to contact"):
        sweep_status(tmp_path / "runs" / "s")  # strict (submit, retry, cancel): no acting on partial states
    notes = [line for line in result.output.splitlines() if line.startswith("note:")]
    assert notes == [f"note: Slurm's controller is not answering ({CONTROLLER_DOWN}): states come from sacct "
                     "and the run dirs, without pending reasons, until it answers again"], result.output

    slurm.set_sacct_down()
    result = runner.invoke(main, ["status", "s", "--runs-root", str(tmp_path / "runs")], terminal_width=200)

    assert result.exit_code == 0, result.output
    assert [r.state for r in sweep_status(tmp_path / "runs" / "s", strict=False).runs] == [
        "UNKNOWN", "UNKNOWN", "COMPLETED"]
    notes = [line for line in result.output.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "sacct failed (sacct: error: Slurm accounting storage is disabled)" in notes[0]
    assert notes[0].startswith("note: Slurm's controller is not answering"), notes


def test_a_squeue_that_hangs_past_its_timeout_is_a_note_too(monkeypatch):
    from asbatch.launch import slurm

    def hanging(cmd, timeout=60):
        if cmd[0] == "squeue":
            raise subprocess.TimeoutExpired(cmd, timeout)
        return subprocess.CompletedProcess(cmd, 0, "7_0|RUNNING\n", "")

    monkeypatch.setattr(slurm, "run", hanging)

    live, final, note = slurm.query_slurm(["7_0"], strict=False)

    assert (live, final) == ({}, {"7_0": "RUNNING"})
    assert note == ("squeue failed (squeue: no answer within 60 s): states come from sacct and the run dirs, "
                    "without pending reasons, until it answers again")
