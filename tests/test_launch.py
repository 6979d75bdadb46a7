"""The launch layer against the real local Slurm cluster: arrays per stage with afterok, idempotent and
concurrent submission, requeue / USR2 / time-limit interruptions that resume to identical results, a
2-node gloo run, bad specs and dry runs that submit nothing; and the local and debug executors.

Slurm holds a requeued job for its credential lifetime (about 2 minutes) before it may start again; the
`releaser` fixture lifts that hold (`scontrol update StartTime=now`) for the jobs these tests requeue, so
that they finish in seconds. Nothing in asbatch does this.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from unittest import mock

import pytest
import yaml
from click.testing import CliRunner

from asbatch.cli import main
from asbatch.launch import Manifest, submit, sweep_status
from asbatch.rundir import RunDir
from asbatch.spec import load_sweep

REPO = Path(__file__).resolve().parents[1]
BAD_SPECS = REPO / "tests" / "specs" / "bad"

TINY = {"cpu": True, "checkpoint_every": 5,
        "data": {"name": "digits", "batch_size": 64, "test_batch_size": 360, "train_subset": 512},
        "model": {"name": "mlp", "width": 16, "init_sigma": 0.01}, "optim": {"name": "adam", "lr": 0.003},
        "schedule": {"name": "cosine", "epochs": 2}, "adversarial": {"steps": 1, "alpha": 0.02},
        "eval": {"num_samples": 2}}
# 14 epochs (~6 s of training on one idle CPU) to interrupt after a few: the tests hold the job (SIGSTOP) at
# the point they wait for and send the signal while it is held (Slurm continues a held step right before it
# delivers a signal), so it lands there however fast the machine is
MEDIUM = {**TINY, "checkpoint_every": 10, "data": {**TINY["data"], "train_subset": None},
          "model": {"name": "mlp", "width": 256, "init_sigma": 0.01}, "schedule": {"name": "cosine", "epochs": 14},
          "adversarial": {"lam": 0.8, "steps": 3, "alpha": 0.02}}
OFFLINE_WANDB = {"tracking": {"wandb": "offline", "project": "asbatch-tests"}}


def write_spec(path: Path, sweep: str, stages: dict | None = None, defaults: dict | None = None,
               grid: dict | None = None) -> Path:
    spec = {"sweep": sweep, "profile": "local", "defaults": defaults or TINY}
    if grid:
        spec["grid"] = grid
    spec["stages"] = stages or {"train": {"config": {"adversarial": {"lam": 0.8}}, "resources": {"time": 5}}}
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


TWO_STAGES = {
    "pretrain": {"config": {"model": {"bayesian": False}, "adversarial": {"lam": 0.0}}, "resources": {"time": 5}},
    "fine_tune": {"after": "pretrain", "init_from": "pretrain", "config": {"adversarial": {"lam": 0.8}},
                  "resources": {"time": 5}},
}


def sh(*cmd: str, check: bool = True) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, check=check, timeout=60).stdout


def queue(where: Path, since: int) -> list[str]:
    """'id|state|name' of the jobs Slurm knows (any state) that were submitted from `where` after job id
    `since` (other sessions may share the cluster, and Slurm remembers older runs of the same test)."""
    out = []
    for line in sh("squeue", "-h", "-r", "-t", "all", "-o", "%F|%i|%T|%j|%Z").splitlines():
        array, job, state, name, workdir = line.split("|")
        if int(array) > since and Path(workdir).is_relative_to(where):
            out.append(f"{job}|{state}|{name}")
    return sorted(out)


def last_job_id() -> int:
    return max((int(j) for j in sh("squeue", "-h", "-t", "all", "-o", "%F").split()), default=0)


def sacct(job_ids, fields="JobID,State", duplicates=False) -> list[list[str]]:
    cmd = ["sacct", "-n", "-P", "-X", "-j", ",".join(job_ids), "-o", fields] + (["-D"] if duplicates else [])
    return [line.split("|") for line in sh(*cmd).splitlines() if line.strip()]


def wait_for(predicate, timeout: float, what: str, every: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def wait_for_results(run_dirs, timeout: float) -> None:
    wait_for(lambda: all((Path(d) / "results.json").exists() for d in run_dirs), timeout,
             f"results.json in {[Path(d).name for d in run_dirs]}")


def job_history(job_id: str, timeout: float = 30) -> list[str]:
    """Every state a job went through (sacct -D: one record per requeue), once the last one is final."""
    def final():
        history = [row[1].split()[0] for row in sacct([job_id], duplicates=True)]
        return history if history and history[-1] not in ("PENDING", "RUNNING", "REQUEUED", "COMPLETING") else None
    return wait_for(final, timeout, f"a final state of job {job_id} in sacct")


def assert_wandb_has_every_epoch_once(run_dir: Path) -> None:
    """Read the run's offline W&B files back: each epoch's step exactly once over all segments, the final
    evaluation once, and the summary."""
    from asbatch.rundir import RunDir, offline_segments
    from asbatch.tracking.offline import read_segment

    epochs = [json.loads(line)["global_step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]

    def segments():  # the last segment's W&B service may still be writing when results.json appears
        found = [read_segment(s) for s in offline_segments(RunDir(run_dir))]
        done = any("evaluation/ensemble_accuracy" in seg.summary_keys for seg in found)
        return found if done and sorted(s for seg in found for s in seg.history_steps)[-1:] == [epochs[-1] + 1] \
            else None

    found = wait_for(segments, 30, f"{run_dir.name}: W&B's summary in its offline files")
    steps = [step for seg in found for step in seg.history_steps]
    assert sorted(steps) == [*epochs, epochs[-1] + 1], (run_dir.name, [s.history_steps for s in found])


def epochs_done(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def job_log(run_dir: Path, job: str) -> str:
    path = run_dir.parent / ".slurm" / job / f"{job}_0_log.out"
    return path.read_text() if path.exists() else ""


def _proc_status(pid: int) -> dict[str, str]:
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:  # the process is gone
        return {}
    return dict(line.split(":\t", 1) for line in lines if ":\t" in line)


def stopped(pid: int) -> bool:
    return _proc_status(pid).get("State", "").startswith("T")


def hold(job: str, run_dir: Path) -> int:
    """Stop the job's processes (SIGSTOP) and wait until its training process is stopped; returns its pid.
    Slurm continues a held step (SIGCONT) right before it delivers a signal to it (`scancel --signal`,
    `scontrol requeue`, the time-limit warning), so the signal lands where the job was held."""
    record = RunDir(run_dir).read_process()  # the local cluster's nodes are this machine
    assert record and not (run_dir / "results.json").exists(), f"{run_dir.name} ended before it could be held"
    pid = int(record["pid"])
    sh("scancel", "--signal=STOP", job)
    wait_for(lambda: stopped(pid), 30, f"job {job} to be held", every=0.05)
    return pid


def release(job: str) -> None:
    """SIGCONT, in case Slurm has not continued the held job (it has, where it delivered a signal)."""
    subprocess.run(["scancel", "--signal=CONT", job], capture_output=True, check=False, timeout=60)


def assert_same_results(run_dir: Path, reference_dir: Path) -> None:
    import torch

    got = json.loads((run_dir / "results.json").read_text())
    want = json.loads((reference_dir / "results.json").read_text())
    assert got["evaluation"] == want["evaluation"], f"{run_dir.name}: evaluation differs from the reference"
    assert {k: v for k, v in got["train"].items()} == want["train"]
    a = torch.load(run_dir / "model.pt", weights_only=True)
    b = torch.load(reference_dir / "model.pt", weights_only=True)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{run_dir.name}: tensor {key} differs from the reference"


def train_reference(config, run_dir: Path) -> Path:
    """The same config trained in this process without interruption (one thread, as the jobs run)."""
    import torch

    from asbatch.train import train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(config.model_validate({**config.to_dict(), "sweep": "reference", "tracking": {"wandb": "disabled"}}),
              run_dir)
    finally:
        torch.set_num_threads(threads)
    return run_dir


class Releaser:
    """Lifts Slurm's post-requeue BeginTime hold of the registered jobs (a background thread)."""

    def __init__(self) -> None:
        self.jobs: set[str] = set()
        self.released: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def watch(self, *job_ids: str) -> None:
        self.jobs.update(job_ids)

    def _loop(self) -> None:
        while not self._stop.wait(0.5):
            if not self.jobs:
                continue
            arrays = ",".join(sorted({j.split("_")[0] for j in self.jobs}))
            out = subprocess.run(["squeue", "-h", "-r", "-t", "PD", "-j", arrays, "-o", "%i|%r"],
                                 check=False, capture_output=True, text=True).stdout
            for line in out.split():
                job, _, reason = line.partition("|")
                if reason == "BeginTime" and (job in self.jobs or job.split("_")[0] in self.jobs):
                    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=False,
                                   capture_output=True)
                    self.released.append(job)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


@pytest.fixture(scope="module")
def releaser(local_slurm):
    r = Releaser()
    yield r
    r.stop()


class HeldUntilUsr2(threading.Thread):
    """Holds a run (SIGSTOP) once its first epoch is done, until Slurm continues it to deliver its time-limit
    USR2 (25 s before the 1 min limit, at its next check of time limits: 5 to 35 s after the start): the
    warning lands while it trains however fast training is."""

    def __init__(self, job: str, run_dir: Path) -> None:
        super().__init__(daemon=True)
        self.job, self.run_dir, self.error = job, run_dir, None
        self.start()

    def run(self) -> None:
        try:
            wait_for(lambda: epochs_done(self.run_dir) >= 1, 180, "the time-limit run's first epoch", every=0.05)
            pid = hold(self.job, self.run_dir)
            assert not (self.run_dir / "results.json").exists(), "the run ended before it could be held"
            wait_for(lambda: not stopped(pid), 150, "Slurm to continue the held run with its time-limit USR2",
                     every=0.2)
        except BaseException as err:  # noqa: BLE001 - reported by the test that checks this run
            self.error = err
        finally:
            release(self.job)


@pytest.fixture(scope="module")
def time_limit_run(local_slurm, releaser, tmp_path_factory):
    """A MEDIUM run with a 1 min limit and USR2 25 s before it, held from its first epoch until the USR2 is
    sent; submitted when the module's first Slurm test asks for it so that it waits while the other tests run;
    `test_time_limit_...` checks it."""
    root = tmp_path_factory.mktemp("time_limit")
    spec = write_spec(root / "spec.yaml", "time_limit", defaults={**MEDIUM, **OFFLINE_WANDB},
                      stages={"train": {"config": {"adversarial": {"lam": 0.8}}, "resources": {"time": 1}}})
    sweep = load_sweep(spec)
    with mock.patch.dict(os.environ, {"ASBATCH_SIGNAL_DELAY_S": "25"}):
        manifest = submit(sweep, root / "runs", executor="slurm", spec_path=spec)
    releaser.watch(*(r.job_id for r in manifest.latest().values()))
    holder = HeldUntilUsr2(manifest.submissions[0].job_id, Path(manifest.submissions[0].run_dir))
    yield manifest, sweep.runs[0].config, holder
    subprocess.run(["scancel", *{r.array_job_id for r in manifest.submissions}], check=False, capture_output=True)


# ------------------------------------------------------------------------------------------ tests


@pytest.mark.slurm
def test_dry_run_prints_runs_and_sbatch_parameters_and_submits_nothing(local_slurm, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a job submitted from here would show this work dir
    spec = write_spec(tmp_path / "spec.yaml", "dry", TWO_STAGES, grid={"seed": [0, 1]})
    since = last_job_id()

    result = CliRunner().invoke(main, ["submit", str(spec), "--dry-run", "--executor", "slurm",
                                       "--runs-root", str(tmp_path / "runs")], terminal_width=200)

    assert result.exit_code == 0, result.output
    assert "dry run" in result.output and "nothing submitted" in result.output
    for run in load_sweep(spec).runs:
        assert run.run_id in result.output
    for flag in ("--job-name=dry:pretrain", "--job-name=dry:fine_tune", "--partition=debug", "--time=5",
                 "--mem=1GB", "--cpus-per-task=1", "--ntasks-per-node=1", "--array=0-1%2", "--signal=USR2@90",
                 "--dependency=aftercorr:<pretrain array>", "export OMP_NUM_THREADS=1"):
        assert flag in result.output, flag
    assert queue(tmp_path, since) == []
    assert not (tmp_path / "runs").exists()


@pytest.mark.slurm
def test_dry_run_flags_are_the_sbatch_lines_of_the_scripts_submitit_writes(local_slurm, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = write_spec(tmp_path / "spec.yaml", "script", TWO_STAGES, grid={"seed": [0, 1]})
    dry = submit(load_sweep(spec), tmp_path / "runs", executor="slurm", dry_run=True)
    real = submit(load_sweep(spec), tmp_path / "runs", executor="slurm")
    sh("scancel", *(a.array_job_id for a in real.arrays))

    for planned, submitted in zip(dry.submitted, real.submitted, strict=True):
        array = submitted.array_job_id
        script = (tmp_path / "runs" / "script" / ".slurm" / array / f"{array}_submission.sh").read_text()
        written = {line.removeprefix("#SBATCH ") for line in script.splitlines() if line.startswith("#SBATCH ")}
        arrays = {f"<{a.stage} array>": a.array_job_id for a in real.arrays}
        flags = set()
        for flag in planned.flags:
            for placeholder, job in arrays.items():
                flag = flag.replace(placeholder, job)
            flags.add(flag)
        assert {f for f in flags if f.startswith("--")} <= written
        assert written - flags <= {"--open-mode=append", "--wckey=submitit"}, written - flags
        assert all(f in script.splitlines() for f in flags if f.startswith("export "))


@pytest.mark.slurm
@pytest.mark.parametrize("bad", ["partition_shell_chars.yaml", "unknown_key_in_defaults.yaml", "after_cycle.yaml"])
def test_bad_spec_exits_2_and_submits_nothing(local_slurm, tmp_path, monkeypatch, bad):
    monkeypatch.chdir(tmp_path)
    since = last_job_id()

    result = CliRunner().invoke(main, ["submit", str(BAD_SPECS / bad), "--executor", "slurm",
                                       "--runs-root", str(tmp_path / "runs")])

    assert result.exit_code == 2, result.output
    assert "error:" in result.output
    assert queue(tmp_path, since) == []
    assert not (tmp_path / "runs").exists()


@pytest.mark.slurm
@pytest.mark.slow
def test_two_stages_become_two_arrays_in_order_and_a_resubmit_submits_nothing(local_slurm, tmp_path, monkeypatch,
                                                                                 time_limit_run):
    monkeypatch.chdir(tmp_path)
    spec = write_spec(tmp_path / "spec.yaml", "two_stages", TWO_STAGES, grid={"seed": [0, 1]})
    root = tmp_path / "runs"
    runner = CliRunner()
    since = last_job_id()

    result = runner.invoke(main, ["submit", str(spec), "--executor", "slurm", "--runs-root", str(root)],
                           terminal_width=200)

    assert result.exit_code == 0, result.output
    manifest = Manifest.load(root / "two_stages")
    arrays = {a.stage: a.array_job_id for a in manifest.arrays}
    assert list(arrays) == ["pretrain", "fine_tune"] and len(set(arrays.values())) == 2
    assert f"stage pretrain: array {arrays['pretrain']}, 2 runs" in result.output
    assert sorted(s.array_job_id for s in manifest.submissions) == sorted([*arrays.values()] * 2)
    assert len(list((root / "two_stages" / ".slurm").glob("*/*_submission.sh"))) == 2, "one sbatch per stage"
    dependency = sh("scontrol", "show", "job", "-o", arrays["fine_tune"])
    assert f"Dependency=aftercorr:{arrays['pretrain']}" in dependency, dependency  # task i after task i
    assert {s.wandb_id for s in manifest.submissions} == {s.run_id for s in manifest.submissions}

    run_dirs = [Path(s.run_dir) for s in manifest.submissions]
    wait_for_results(run_dirs, 120)

    rows = sacct(arrays.values(), "JobID,State,Start,End")
    assert sorted(r[0] for r in rows) == sorted(f"{a}_{t}" for a in arrays.values() for t in (0, 1))
    times = {r[0]: (r[2], r[3]) for r in rows}
    for task in (0, 1):  # each fine-tune run starts after its own pretrain run ended
        assert times[f"{arrays['fine_tune']}_{task}"][0] >= times[f"{arrays['pretrain']}_{task}"][1], rows
    done = wait_for(lambda: (st := sweep_status(root / "two_stages")) and all(
        r.slurm_state == "COMPLETED" and r.slurm_source == "sacct" for r in st.runs) and st, 30,
        "sacct to report COMPLETED")
    assert [r.state for r in done.runs] == ["COMPLETED"] * 4 and done.note is None
    for r in done.runs:  # the last epoch's test accuracy: mean weights for the Bayesian fine-tune runs
        last = json.loads((Path(r.run_dir) / "metrics.jsonl").read_text().splitlines()[-1])
        assert (r.epochs_done, r.test_acc) == (2, last["test_acc_mean" if r.stage == "fine_tune" else "test_acc"])
    status = runner.invoke(main, ["status", "two_stages", "--runs-root", str(root)], terminal_width=200)
    assert status.exit_code == 0 and status.output.count("COMPLETED") >= 4, status.output
    logs = runner.invoke(main, ["logs", manifest.submissions[-1].run_id, "--runs-root", str(root)])
    assert logs.exit_code == 0 and "Job completed successfully" in logs.output, logs.output

    before, manifest_bytes = queue(tmp_path, since), (root / "two_stages" / "manifest.json").read_bytes()
    assert len(before) == 4
    again = runner.invoke(main, ["submit", str(spec), "--executor", "slurm", "--runs-root", str(root)])
    assert again.exit_code == 0, again.output
    assert "nothing to submit" in again.output
    assert queue(tmp_path, since) == before
    assert (root / "two_stages" / "manifest.json").read_bytes() == manifest_bytes


@pytest.mark.slurm
@pytest.mark.slow
def test_concurrent_submits_of_one_spec_submit_each_run_once(local_slurm, tmp_path):
    spec = write_spec(tmp_path / "spec.yaml", "concurrent", grid={"seed": [0, 1, 2]})
    root = tmp_path / "runs"
    cmd = [sys.executable, "-m", "asbatch", "submit", str(spec), "--executor", "slurm", "--runs-root", str(root)]
    since = last_job_id()

    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
             for _ in range(3)]
    outputs = [p.communicate(timeout=60)[0] for p in procs]

    assert [p.returncode for p in procs] == [0, 0, 0], outputs
    manifest = Manifest.load(root / "concurrent")
    run_ids = [s.run_id for s in manifest.submissions]
    assert sorted(run_ids) == sorted(r.run_id for r in load_sweep(spec).runs), "each run submitted once"
    assert len(manifest.arrays) == 1
    array = manifest.arrays[0].array_job_id
    jobs = queue(tmp_path, since)
    assert [q.split("|")[0] for q in jobs] == [f"{array}_{task}" for task in range(3)], jobs
    assert sum("nothing to submit" in out for out in outputs) == 2, outputs

    cancelled = CliRunner().invoke(main, ["cancel", "concurrent", "--runs-root", str(root)])
    assert cancelled.exit_code == 0 and f"cancelled {array}" in cancelled.output, cancelled.output
    final = wait_for(lambda: (st := sweep_status(root / "concurrent")) and not any(r.active for r in st.runs) and st,
                     30, "the cancelled tasks to end")
    assert {r.state for r in final.runs} <= {"CANCELLED", "COMPLETED"}, [(r.run_id, r.state) for r in final.runs]


@pytest.mark.slurm
@pytest.mark.slow
def test_retry_resubmits_failed_runs_and_the_runs_stuck_behind_them(local_slurm, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = write_spec(tmp_path / "spec.yaml", "flaky", TWO_STAGES, grid={"seed": [0, 1]})
    root = tmp_path / "runs"
    monkeypatch.setenv("ASBATCH_FAULT", "step:3")  # sbatch exports it: every pretrain task dies at step 3
    first = submit(load_sweep(spec), root, executor="slurm", spec_path=spec)
    monkeypatch.delenv("ASBATCH_FAULT")
    stuck = wait_for(lambda: (st := sweep_status(root / "flaky")) and [r.state for r in st.runs] == [
        "FAILED", "FAILED", "PENDING", "PENDING"] and all(r.blocked for r in st.runs[2:]) and st, 90,
        "pretrain to fail and fine_tune to be stuck behind it")
    assert all(r.retryable for r in stuck.runs)

    result = CliRunner().invoke(main, ["retry", "flaky", "--runs-root", str(root)])

    assert result.exit_code == 0, result.output
    manifest = Manifest.load(root / "flaky")
    old, new = first.arrays, manifest.arrays[len(first.arrays):]
    assert [a.stage for a in new] == ["pretrain", "fine_tune"]
    assert new[1].dependency == f"aftercorr:{new[0].array_job_id}", "task i after task i of the new array"
    assert f"resubmitted 2 runs as {new[0].array_job_id}" in result.output
    wait_for_results([Path(s.run_dir) for s in first.submissions], 120)
    wait_for(lambda: {row[1].split()[0] for row in sacct([old[1].array_job_id])} == {"CANCELLED"}, 30,
             "sacct to record the stuck tasks CANCELLED")  # slurmdbd records asynchronously
    again = CliRunner().invoke(main, ["retry", "flaky", "--runs-root", str(root)])
    assert again.exit_code == 0 and "nothing to retry" in again.output


@pytest.mark.slurm
@pytest.mark.slow
def test_requeued_and_usr2_signalled_runs_resume_to_the_results_of_an_uninterrupted_run(local_slurm, tmp_path,
                                                                                         releaser):
    """`scontrol requeue` (SIGTERM: save, Slurm requeues) and `scancel --signal=USR2` (the time-limit
    warning: save, the task requeues itself) of running tasks; both end identical to train() in-process."""
    stages = {"train": {"resources": {"time": 5}}}
    specs = {kind: write_spec(tmp_path / f"{kind}.yaml", kind, stages, defaults={**MEDIUM, **OFFLINE_WANDB})
             for kind in ("requeue", "usr2")}
    manifests = {kind: submit(load_sweep(spec), tmp_path / "runs", executor="slurm", spec_path=spec)
                 for kind, spec in specs.items()}
    jobs = {kind: m.submissions[0].job_id for kind, m in manifests.items()}
    run_dirs = {kind: Path(m.submissions[0].run_dir) for kind, m in manifests.items()}
    releaser.watch(*jobs.values())

    held = set()

    def hold_each_after_2_epochs() -> bool:  # the two train side by side: each is held as soon as it is there
        for kind in jobs.keys() - held:
            if epochs_done(run_dirs[kind]) >= 2:
                hold(jobs[kind], run_dirs[kind])
                held.add(kind)
        return len(held) == len(jobs)

    wait_for(hold_each_after_2_epochs, 90, "both runs to train 2 epochs", every=0.05)
    for kind, action in (("requeue", ["scontrol", "requeue"]), ("usr2", ["scancel", "--signal=USR2"])):
        assert not (run_dirs[kind] / "results.json").exists()
        sh(*action, jobs[kind])  # Slurm continues the held job and delivers it: mid-training
        release(jobs[kind])
    reference = train_reference(load_sweep(specs["requeue"]).runs[0].config, tmp_path / "reference")
    wait_for_results(run_dirs.values(), 120)

    for kind, run_dir in run_dirs.items():
        assert_same_results(run_dir, reference)
        assert_wandb_has_every_epoch_once(run_dir)
        history = job_history(jobs[kind])
        assert history[0] == "REQUEUED" and history[-1] == "COMPLETED", (kind, history)
        log = (run_dir.parent / ".slurm" / jobs[kind] / f"{jobs[kind]}_0_log.out").read_text()
        assert re.search(rf"^{run_dir.name}: .* \| resumed (in|after) epoch ", log, re.M), log
        err = (run_dir.parent / ".slurm" / jobs[kind] / f"{jobs[kind]}_0_log.err").read_text()
        assert "Traceback" not in err and "Exception ignored" not in err, err[-3000:]  # W&B's service died too
    usr2 = json.loads((run_dirs["usr2"] / "requeues.json").read_text())
    assert usr2["count"] == 1, "the USR2'd task requeued itself once"
    assert not (run_dirs["requeue"] / "requeues.json").exists(), "on SIGTERM Slurm requeues, not the task"


@pytest.mark.slurm
@pytest.mark.slow
def test_sigterm_mid_run_saves_stops_cleanly_and_retry_resumes_with_every_wandb_epoch_once(local_slurm, tmp_path):
    """Slurm's SIGTERM (preemption, scancel --signal) also kills W&B's service: the task must still save
    and stop with its own message, and the resumed run must log what W&B lost."""
    spec = write_spec(tmp_path / "spec.yaml", "term", {"train": {"resources": {"time": 5}}},
                      defaults={**MEDIUM, **OFFLINE_WANDB})
    manifest = submit(load_sweep(spec), tmp_path / "runs", executor="slurm", spec_path=spec)
    job, run_dir = manifest.submissions[0].job_id, Path(manifest.submissions[0].run_dir)
    wait_for(lambda: epochs_done(run_dir) >= 3, 90, "3 epochs", every=0.05)
    hold(job, run_dir)
    assert not (run_dir / "results.json").exists()
    sh("scancel", "--signal=TERM", job)  # Slurm continues the held job and delivers it: mid-training
    release(job)
    assert job_history(job, timeout=60)[-1] == "FAILED"
    log = (run_dir.parent / ".slurm" / job / f"{job}_0_log.out").read_text()
    err = (run_dir.parent / ".slurm" / job / f"{job}_0_log.err").read_text()
    assert f"{run_dir.name}: SIGTERM -> checkpoint at step" in log, log
    assert "Traceback" not in err, err[-3000:]
    assert not (run_dir / "results.json").exists()

    result = CliRunner().invoke(main, ["retry", "term", "--runs-root", str(tmp_path / "runs")])
    assert result.exit_code == 0, result.output
    reference = train_reference(load_sweep(spec).runs[0].config, tmp_path / "reference")
    wait_for_results([run_dir], 180)
    assert_same_results(run_dir, reference)
    assert_wandb_has_every_epoch_once(run_dir)


@pytest.mark.slurm
@pytest.mark.slow
def test_usr2_during_the_final_evaluation_requeues_and_the_task_redoes_only_the_evaluation(local_slurm, tmp_path,
                                                                                           releaser):
    long_eval = {**TINY, "data": {**TINY["data"], "test_batch_size": 40}, "eval": {"num_samples": 500}}
    spec = write_spec(tmp_path / "spec.yaml", "eval_usr2", {"train": {"resources": {"time": 5}}}, defaults=long_eval)
    manifest = submit(load_sweep(spec), tmp_path / "runs", executor="slurm", spec_path=spec)
    job, run_dir = manifest.submissions[0].job_id, Path(manifest.submissions[0].run_dir)
    releaser.watch(job)
    wait_for(lambda: "final evaluation: 500 weight samples" in job_log(run_dir, job), 90,
             "the final evaluation to start (~2 s of it)", every=0.05)
    hold(job, run_dir)
    assert not (run_dir / "results.json").exists(), "the evaluation ended before the job was held"
    sh("scancel", "--signal=USR2", job)  # Slurm continues the held job and delivers it: inside the evaluation
    release(job)
    reference = train_reference(load_sweep(spec).runs[0].config, tmp_path / "reference")
    wait_for_results([run_dir], 240)

    assert_same_results(run_dir, reference)
    assert json.loads((run_dir / "requeues.json").read_text())["count"] == 1
    history = job_history(job)
    assert history[0] == "REQUEUED" and history[-1] == "COMPLETED", history
    log = (run_dir.parent / ".slurm" / job / f"{job}_0_log.out").read_text()
    assert "| resumed after all 2 epochs: final evaluation only |" in log, log


@pytest.mark.slurm
@pytest.mark.slow
def test_one_failed_upstream_run_blocks_only_its_own_downstream_runs(local_slurm, tmp_path):
    """2 pretrain runs (lambda collapsed), 4 fine-tune runs, each task after its own upstream task; one
    pretrain run is killed while it trains."""
    stages = {"pretrain": {**TWO_STAGES["pretrain"], "grid_ignore": ["adversarial.lam"]},
              "fine_tune": {**TWO_STAGES["fine_tune"], "config": {}}}
    spec = write_spec(tmp_path / "spec.yaml", "per_task", stages,
                      grid={"seed": [0, 1], "adversarial.lam": [0.0, 0.8]})
    manifest = submit(load_sweep(spec), tmp_path / "runs", executor="slurm", spec_path=spec)
    pre0, pre1, *fine_tunes = manifest.submissions
    mine = [r for r in fine_tunes if r.upstream["pretrain"] == pre0.run_id]
    others = [r for r in fine_tunes if r.upstream["pretrain"] == pre1.run_id]
    wait_for(lambda: "RUNNING" in sh("squeue", "-h", "-j", pre0.job_id, "-o", "%T"), 60, "pretrain run 0 to start",
             every=0.1)
    sh("scancel", pre0.job_id)

    wait_for_results([pre1.run_dir, *(r.run_dir for r in others)], 240)
    status = wait_for(lambda: (st := sweep_status(tmp_path / "runs" / "per_task")) and all(
        r.blocked for r in st.runs if r.run_id in {m.run_id for m in mine}) and st, 60,
        "the fine-tune runs behind the killed pretrain run to be known as never running")
    states = {r.run_id: (r.state, r.reason) for r in status.runs}
    assert states[pre0.run_id][0] == "CANCELLED" and states[pre1.run_id][0] == "COMPLETED"
    assert all(states[r.run_id] == ("COMPLETED", "") for r in others)
    assert all(states[r.run_id] == ("PENDING", f"DependencyNeverSatisfied: upstream {pre0.job_id} failed")
               for r in mine)

    result = CliRunner().invoke(main, ["retry", "per_task", "--runs-root", str(tmp_path / "runs")])
    assert result.exit_code == 0, result.output
    wait_for_results([pre0.run_dir, *(r.run_dir for r in mine)], 240)


@pytest.mark.slurm
@pytest.mark.slow
def test_a_two_node_run_trains_with_a_real_gloo_group(local_slurm, tmp_path):
    spec = write_spec(tmp_path / "spec.yaml", "two_nodes",
                      {"train": {"config": {"adversarial": {"lam": 0.8}}, "resources": {"time": 5, "nodes": 2}}})
    manifest = submit(load_sweep(spec), tmp_path / "runs", executor="slurm", spec_path=spec)
    run_dir = Path(manifest.submissions[0].run_dir)

    wait_for_results([run_dir], 240)

    results = json.loads((run_dir / "results.json").read_text())
    assert results["train"]["world_size"] == 2
    assert results["train"]["ranks_in_sync"] is True
    job = manifest.submissions[0].job_id
    # results.json comes before the job ends, and slurmdbd records the job's nodes asynchronously: wait for them
    record = wait_for(lambda: (rs := sacct([job], "JobID,NNodes,NodeList,State")) and rs[0][3] == "COMPLETED"
                      and rs[0], 60, "sacct to record the finished two-node job", every=0.5)
    assert record[1:3] == ["2", "n[1-2]"], record


@pytest.mark.slurm
@pytest.mark.slow
def test_time_limit_usr2_saves_requeues_and_resumes_to_identical_results(local_slurm, tmp_path, time_limit_run):
    manifest, config, holder = time_limit_run
    run_dir = Path(manifest.submissions[0].run_dir)
    job = manifest.submissions[0].job_id
    holder.join(timeout=240)
    assert not holder.is_alive() and holder.error is None, holder.error

    reference = train_reference(config, tmp_path / "reference")
    wait_for_results([run_dir], 300)

    requeues = json.loads((run_dir / "requeues.json").read_text())
    assert requeues["count"] >= 1, "USR2 before the time limit must have stopped the run at least once"
    history = job_history(job)
    assert history.count("REQUEUED") == requeues["count"] and history[-1] == "COMPLETED", history
    assert "TIMEOUT" not in history
    assert_same_results(run_dir, reference)
    assert_wandb_has_every_epoch_once(run_dir)


# ------------------------------------------------------------------------------------------ without Slurm


def test_resources_become_submitit_parameters(monkeypatch):
    from asbatch.launch.slurm import executor_parameters
    from asbatch.spec import Resources, SweepStage

    monkeypatch.delenv("ASBATCH_SIGNAL_DELAY_S", raising=False)
    resources = Resources.model_validate({
        "partition": "gpu", "account": "proj", "qos": "high", "nodes": 2, "gpus_per_node": 4, "cpus_per_task": 8,
        "mem_gb": 1.5, "time": "02:00:00", "constraint": "[a100|h100]", "array_parallelism": 8,
        "extra": {"exclusive": True, "mail-type": "END"}})
    stage = SweepStage("fine_tune", resources, ["pretrain"], [])

    params = executor_parameters("c100", stage, {"OMP_NUM_THREADS": "8", "NOTE": "a b"}, "afterok:12")

    assert params == {
        "name": "c100:fine_tune", "timeout_min": 120, "nodes": 2, "tasks_per_node": 4, "cpus_per_task": 8,
        "gpus_per_node": 4, "mem_gb": 1.5, "slurm_partition": "gpu", "slurm_account": "proj", "slurm_qos": "high",
        "slurm_constraint": "[a100|h100]", "slurm_signal_delay_s": 90, "slurm_array_parallelism": 8,
        "slurm_srun_args": ["--kill-on-bad-exit=1"],
        "slurm_additional_parameters": {"requeue": True, "exclusive": True, "mail-type": "END",
                                        "dependency": "afterok:12"},
        "slurm_setup": ["export OMP_NUM_THREADS=8", "export NOTE='a b'"]}


def test_job_lines_of_squeue_and_sacct_map_to_array_tasks():
    from asbatch.launch.slurm import parse_job_lines

    table = parse_job_lines(["12_0|COMPLETED", "12_[1-3,5%2]|PENDING|Dependency", "13|CANCELLED by 0", "14|RUNNING"])

    assert table["12_0"] == ["COMPLETED"] and table["12_5"] == ["PENDING", "Dependency"]
    assert [t for t in table if t.startswith("12_")] == ["12_0", "12_1", "12_2", "12_3", "12_5"]
    assert table["13"] == ["CANCELLED"] and table["14"] == ["RUNNING"]


def test_submitit_checkpoint_fallback_counts_requeues_and_stops_at_the_limit(tmp_path):
    from asbatch.launch import MAX_REQUEUES, TrainTask

    task = TrainTask({"sweep": "s"}, tmp_path / "run")
    for _ in range(MAX_REQUEUES):
        assert task.checkpoint().function is task
    assert task.checkpoint() is None
    assert json.loads((tmp_path / "run" / "requeues.json").read_text())["count"] == MAX_REQUEUES



@pytest.mark.slow
def test_the_requeue_limit_is_per_job_so_a_retry_starts_afresh(tmp_path, monkeypatch):
    from asbatch.launch import MAX_REQUEUES
    from asbatch.launch.task import count_requeue

    run_dir = RunDir(tmp_path / "run")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "100")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    for n in range(1, MAX_REQUEUES + 1):
        assert count_requeue(run_dir, n, "scontrol requeue") == n
    assert count_requeue(run_dir, 99, "scontrol requeue") is None, "job 100_3 is at its limit"
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "200")  # `asbatch retry`: a new job
    assert count_requeue(run_dir, 100, "scontrol requeue") == MAX_REQUEUES + 1


def test_a_task_at_its_requeue_limit_records_why_it_stopped(tmp_path, monkeypatch):
    """USR2 with no requeue left: the job ends, and `asbatch status` must say why (a failure record)."""
    from asbatch.launch import MAX_REQUEUES, TrainTask

    monkeypatch.setenv("SLURM_JOB_ID", "555")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    run_dir = RunDir(tmp_path / "run")
    run_dir.write_requeues({"count": MAX_REQUEUES, "events": [{"array_task": "555"}] * MAX_REQUEUES})
    config = {"sweep": "cap", "cpu": True, "data": {"name": "digits", "batch_size": 32}, "model": {"name": "mlp"},
              "schedule": {"epochs": 50}, "tracking": {"wandb": "disabled"}}

    def usr2_once_training() -> None:
        while not run_dir.metrics_file.exists():
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGUSR2)

    threading.Thread(target=usr2_once_training, daemon=True).start()
    with pytest.raises(SystemExit, match=f"requeued {MAX_REQUEUES} times already: not requeued"):
        TrainTask(config, run_dir.path)()
    failure = run_dir.read_failure()
    assert failure.startswith("NotRequeued: stopped at step ") and "`asbatch retry` resumes it" in failure, failure


def test_a_task_whose_run_another_process_trains_waits_and_takes_over(tmp_path, monkeypatch, capsys):
    """A job a killed `submit` left behind (or an `asbatch run`) trains the run: the task stays a RUNNING
    standby instead of failing, and trains (resumes) the run once the other process is gone."""
    from asbatch.launch import TrainTask, task

    monkeypatch.setattr(task, "BUSY_POLL_S", 0.2)
    run_dir = RunDir(tmp_path / "run")
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from asbatch.rundir import RunDir\n"
        "with RunDir(sys.argv[1]).training(0):\n    print('held', flush=True); time.sleep(600)"), str(run_dir.path)],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    threading.Timer(2.0, holder.kill).start()  # the other trainer dies (SIGKILL) after a while
    config = {**TINY, "sweep": "busy", "schedule": {"epochs": 1}, "tracking": {"wandb": "disabled"}}
    start = time.monotonic()
    results = TrainTask(config, run_dir.path)()
    assert time.monotonic() - start >= 2.0, "it waited for the other trainer"
    assert run_dir.is_finished() and results == run_dir.read_results()
    assert "another process is training this run (its process record is not written yet); this task waits" in \
        capsys.readouterr().out


def test_local_executor_returns_at_once_and_trains_the_stages_in_order(tmp_path):
    spec = write_spec(tmp_path / "spec.yaml", "local", TWO_STAGES, grid={"seed": [0, 1]})
    start = time.monotonic()
    manifest = submit(load_sweep(spec), tmp_path / "runs", executor="local", spec_path=spec)
    assert time.monotonic() - start < 5, "submit must not wait for the runs"
    assert len({s.job_id for s in manifest.submissions}) == 1

    wait_for_results([s.run_dir for s in manifest.submissions], 120)

    done = wait_for(lambda: (st := sweep_status(tmp_path / "runs" / "local")) and all(
        r.state == "COMPLETED" for r in st.runs) and st, 10, "COMPLETED states")
    assert [r.stage for r in done.runs] == ["pretrain", "pretrain", "fine_tune", "fine_tune"]
    again = submit(load_sweep(spec), tmp_path / "runs", executor="local", spec_path=spec)
    assert all(not s.run_ids for s in again.submitted)


def test_debug_executor_trains_in_this_process(tmp_path):
    spec = write_spec(tmp_path / "spec.yaml", "debug", defaults={**TINY, "schedule": {"name": "cosine", "epochs": 1}})

    manifest = submit(load_sweep(spec), tmp_path / "runs", executor="debug", spec_path=spec)

    assert (Path(manifest.submissions[0].run_dir) / "results.json").exists()
    assert sweep_status(tmp_path / "runs" / "debug").runs[0].state == "COMPLETED"
