"""Watching and steering runs as a user does, with real processes and real signals: progress lines in a piped
run and a bar on a terminal; Ctrl-C (SIGINT) saves a checkpoint, exits 130 and the re-run resumes to the
results of an uninterrupted run; `asbatch run` and `asbatch submit` give bitwise the same results; the local
executor's per-run logs; status of a sweep made by `asbatch run`; `asbatch wait`."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from cli_helpers import on_terminal

pytestmark = pytest.mark.slow

TIMING_FIELDS = {"images_per_s", "step_time_s"}
DEFAULTS = {"cpu": True, "checkpoint_every": 4,
            "data": {"name": "digits", "batch_size": 64, "test_batch_size": 360, "train_subset": 320},
            "model": {"name": "mlp", "width": 32, "init_sigma": 0.01}, "optim": {"lr": 0.003},
            "schedule": {"name": "cosine", "epochs": 2}, "adversarial": {"steps": 2, "alpha": 0.02},
            "eval": {"num_samples": 3}}


def write_spec(path: Path, sweep: str, epochs: int = 2, lams=(0.0, 0.8)) -> Path:
    spec = {"sweep": sweep, "profile": "local", "defaults": {**DEFAULTS, "schedule": {"name": "cosine",
                                                                                      "epochs": epochs}},
            "grid": {"adversarial.lam": list(lams)}}
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def env(**extra: str) -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "COLUMNS", "ASBATCH_FAULT")}
    return {**out, "WANDB_MODE": "disabled", **extra}


def asbatch(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "asbatch", *map(str, args)], capture_output=True, text=True,
                          timeout=600, env=kw.pop("env", env()), **kw)


def wait_until_held(pid: int, timeout_s: float = 60) -> None:
    """Until the process is stopped (state T in /proc: it held itself at an `ASBATCH_FAULT=hold-...` point)."""
    deadline = time.monotonic() + timeout_s
    while Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "T":
        assert time.monotonic() < deadline, f"process {pid} did not hold itself"
        time.sleep(0.01)


def outcome(run_dir: Path) -> tuple[dict, list]:
    """results.json without its timing block, metrics.jsonl without its timing fields."""
    results = json.loads((run_dir / "results.json").read_text())
    results.pop("timing")
    metrics = [{k: v for k, v in json.loads(line).items() if k not in TIMING_FIELDS}
               for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return results, metrics


def run_dirs(sweep_dir: Path) -> list[Path]:
    return sorted(p for p in sweep_dir.iterdir() if p.name.startswith("train-"))


@pytest.mark.parametrize(("signum", "code", "what"), [(signal.SIGINT, 130, "interrupted"),
                                                      (signal.SIGTERM, 143, "stopped by SIGTERM"),
                                                      (signal.SIGHUP, 129, "stopped by SIGHUP")])
def test_a_piped_run_prints_flushed_lines_and_a_signal_saves_exits_and_the_rerun_resumes_exactly(tmp_path, signum,
                                                                                                 code, what):
    """Ctrl-C, `kill` and a closed terminal all stop after the step with a checkpoint (128 + signal)."""
    spec = write_spec(tmp_path / "spec.yaml", "sigint", epochs=12, lams=(0.8,))
    reference = asbatch("run", spec, "--runs-root", tmp_path / "reference")
    assert reference.returncode == 0, reference.stderr

    cmd = [sys.executable, "-m", "asbatch", "run", str(spec), "--runs-root", str(tmp_path / "runs")]
    # the run holds itself (SIGSTOP) after epoch 1's checkpoint: the signal lands there however fast it trains
    # SIGHUP at its default, whatever the tests were started under (nohup would pass its SIG_IGN on, and a run
    # that starts with SIGHUP ignored keeps ignoring it, as `test_a_run_started_under_nohup...` checks)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env(ASBATCH_FAULT="hold-epoch:1"),
                            preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL))
    lines = []
    for line in proc.stdout:  # a pipe: one line per epoch, each flushed as the epoch ends
        lines.append(line)
        if " epoch 1/12 " in line:
            assert proc.poll() is None, "the first epoch's line must arrive while the run trains"
            wait_until_held(proc.pid)
            proc.send_signal(signum)
            proc.send_signal(signal.SIGCONT)
            break
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == code, err
    (run_dir,) = run_dirs(tmp_path / "runs" / "sigint")
    if signum != signal.SIGHUP:  # after SIGHUP the terminal is gone: nothing more is said, but it saves and exits
        assert re.search(rf"{run_dir.name} {what} at epoch \d+ step \d+ .*; run the same command to resume", err), err
    assert "Traceback" not in err
    assert re.match(rf"{run_dir.name} \(lam=0.8\): Bayesian mlp, [\d,]+ parameters \| cpu fp32, 1 thread \| world size "
                    r"1 \| fresh \| 12 epochs x 5 steps", lines[1]), lines
    assert re.match(rf"{run_dir.name} epoch 1/12  loss [\d.]+  acc [\d.]+%  test [\d.]+%  [\d,]+ img/s  elapsed "
                    r"\d:\d\d:\d\d  ETA \d:\d\d:\d\d$", lines[2].rstrip()), lines
    assert list((run_dir / "checkpoints").glob("step-*")) and not (run_dir / "results.json").exists()
    status = asbatch("status", "sigint", "--runs-root", tmp_path / "runs")
    assert re.search(rf"{run_dir.name} .* INTERRUPTED \*", status.stdout), status.stdout

    again = asbatch("run", spec, "--runs-root", tmp_path / "runs")
    assert again.returncode == 0, again.stderr
    assert re.search(r"\| resumed (in|after) epoch \d+/12", again.stdout), again.stdout
    assert f"{run_dir.name} done: ensemble" in again.stdout
    assert outcome(run_dir) == outcome(run_dirs(tmp_path / "reference" / "sigint")[0])


def test_a_run_started_under_nohup_keeps_ignoring_sighup(tmp_path):
    spec = write_spec(tmp_path / "spec.yaml", "nohup", epochs=3, lams=(0.0,))
    cmd = [sys.executable, "-m", "asbatch", "run", str(spec), "--runs-root", str(tmp_path / "runs")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(),
                            preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))  # as nohup does
    for line in proc.stdout:
        if " epoch 1/3 " in line:
            proc.send_signal(signal.SIGHUP)
            break
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    (run_dir,) = run_dirs(tmp_path / "runs" / "nohup")
    assert (run_dir / "results.json").exists()


def test_a_second_trainer_of_the_same_run_is_refused_and_a_killed_one_leaves_no_lock(tmp_path):
    """Two processes training one run dir would both write its checkpoints and metrics: the second refuses
    in one line naming the first; the lock is the OS's, so a SIGKILLed trainer leaves the run resumable."""
    spec = write_spec(tmp_path / "spec.yaml", "busy", epochs=3, lams=(0.8,))
    killed = asbatch("run", spec, "--runs-root", tmp_path / "runs", env=env(ASBATCH_FAULT="step:7"))
    assert killed.returncode == -signal.SIGKILL, killed.stderr  # a trainer SIGKILLed in epoch 2
    (run_dir,) = run_dirs(tmp_path / "runs" / "busy")
    holder = subprocess.Popen([sys.executable, "-c", (  # another trainer of this run, alive
        "import os, sys, time; from asbatch.rundir import RunDir; r = RunDir(sys.argv[1])\n"
        "with r.training(0):\n"
        "    r.write_process({'pid': os.getpid(), 'host': 'n1', 'started_at': 'now'}); print('held', flush=True)\n"
        "    time.sleep(600)"), str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    second = asbatch("run", spec, "--runs-root", tmp_path / "runs")
    assert second.returncode == 1, second.stderr
    (line,) = second.stderr.strip().splitlines()
    assert line == (f"error: {run_dir}: another process is training this run (pid {holder.pid} on n1 since now); "
                    "wait for it to end or stop it, then run the same command again to resume"), line
    holder.kill()  # SIGKILL: no handler runs, no file is cleaned up
    holder.communicate(timeout=60)
    again = asbatch("run", spec, "--runs-root", tmp_path / "runs")
    assert again.returncode == 0, again.stderr
    assert "| resumed" in again.stdout
    epochs = [json.loads(row)["epoch"] for row in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [0, 1, 2], "every epoch once"


def test_a_second_stop_signal_stops_at_once(tmp_path):
    """Ctrl-C asks for a stop after the current step; a second signal ends the process at once. The process is
    held (SIGSTOP) while both are sent, so they land together inside one step however fast the machine is
    (two SIGINTs would merge into one while held, so the second is a SIGTERM; Python runs SIGINT's handler
    first). A heavy step (seconds) leaves no room for the process to finish a step between the two handlers."""
    config = tmp_path / "heavy.yaml"
    config.write_text(yaml.safe_dump({**DEFAULTS, "sweep": "twice", "model": {"name": "mlp", "width": 2048},
                                      "data": {**DEFAULTS["data"], "batch_size": 1024, "train_subset": 1024},
                                      "adversarial": {"lam": 0.8, "steps": 10}, "schedule": {"epochs": 5}}))
    cmd = [sys.executable, "-m", "asbatch", "run", str(config), "--runs-root", str(tmp_path / "runs")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
    for line in proc.stdout:
        if " fresh " in line:  # the handlers are installed: the run has started
            break
    proc.send_signal(signal.SIGSTOP)
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGCONT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err  # 128 + the first signal
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-2:] == [
        "Ctrl-C: stopping after the current step and saving a checkpoint (Ctrl-C again stops at once)",
        "SIGTERM again: stopped at once; the run resumes from its newest checkpoint"], err
    assert "interrupted at" not in err and "Traceback" not in err


def test_a_terminal_gets_a_bar_per_run_that_stays_and_an_evaluation_bar(tmp_path):
    spec = write_spec(tmp_path / "spec.yaml", "tty", epochs=2, lams=(0.0,))
    code, text, screen = on_terminal(["run", str(spec), "--runs-root", str(tmp_path / "runs")],  # 100 columns
                                     env(COLUMNS="100", TERM="xterm"))
    assert code == 0, text[-2000:]
    bars = [line for line in screen if "━" in line]
    assert any(line.startswith("lam=0 ") and "epoch 2/2  loss" in line for line in bars), text[-2000:]
    assert any(line.startswith("final evaluation") and "3 weight samples" in line for line in bars)
    assert not any(" epoch 1/2  loss" in line and "img/s" in line for line in screen), "no epoch lines on a terminal"
    last_bar = max(i for i, line in enumerate(screen) if "━" in line)
    done = next(i for i, line in enumerate(screen) if " done: ensemble " in line)
    assert done > last_bar, "the bars stay on screen above the final line"


def test_run_and_a_local_submit_give_the_same_results_and_each_run_has_its_own_log(tmp_path):
    spec = write_spec(tmp_path / "spec.yaml", "same")
    ran = asbatch("run", spec, "--runs-root", tmp_path / "run")  # OMP_NUM_THREADS unset: the profile's 1 applies
    assert ran.returncode == 0, ran.stderr
    submitted = asbatch("submit", spec, "--executor", "local", "--runs-root", tmp_path / "sub")
    assert submitted.returncode == 0, submitted.stderr
    waited = asbatch("wait", "same", "--poll", "0.5", "--runs-root", tmp_path / "sub")
    assert waited.returncode == 0, waited.stdout + waited.stderr
    assert "same: all 2 runs completed" in waited.stdout and "same: 2/2 done" in waited.stdout
    assert f"results: asbatch table same --runs-root {tmp_path / 'sub'}" in waited.stdout, "the hint works as given"
    assert f"follow with: asbatch status same --runs-root {tmp_path / 'sub'}" in submitted.stdout

    a, b = run_dirs(tmp_path / "run" / "same"), run_dirs(tmp_path / "sub" / "same")
    assert [d.name for d in a] == [d.name for d in b] and len(a) == 2
    for mine, theirs in zip(a, b, strict=True):
        assert outcome(mine) == outcome(theirs), f"{mine.name}: run and submit differ"
    assert ran.stdout.count(", 1 thread |") == 2

    for run_dir in b:  # `asbatch logs RUN` shows that run's training, and only that run's
        other = next(d.name for d in b if d != run_dir)
        logs = asbatch("logs", run_dir.name, "--runs-root", tmp_path / "sub")
        assert logs.returncode == 0, logs.stderr
        assert ", 1 thread |" in logs.stdout and f"{run_dir.name} epoch 2/2  loss" in logs.stdout
        assert f"{run_dir.name} done: ensemble" in logs.stdout and other not in logs.stdout
    assert sorted(p.name for p in (tmp_path / "sub" / "same" / ".slurm").iterdir()) == ["local"], "no literal %j dir"


def test_status_of_a_sweep_made_by_run_fits_80_and_120_columns(tmp_path):
    spec = write_spec(tmp_path / "spec.yaml", "made")
    ran = asbatch("run", spec, "--runs-root", tmp_path / "runs", env=env(COLUMNS="0"))
    assert ran.returncode == 0 and "made: Bayesian runs" in ran.stdout, ran.stdout  # COLUMNS=0: 40 columns
    assert "the terminal is 40 columns wide" in " ".join(ran.stdout.split()), ran.stdout
    for width in ("0", "1", "x"):  # a width below 40 is 40; one that is not a number is ignored (80)
        out = asbatch("status", "made", "--runs-root", tmp_path / "runs", env=env(COLUMNS=width)).stdout
        assert "2 runs: 2 COMPLETED" in out and max(len(line) for line in out.splitlines()) <= 80, out
        assert len(out.splitlines()) < 15, out
    results = {d.name: json.loads((d / "results.json").read_text()) for d in run_dirs(tmp_path / "runs" / "made")}
    for width in (80, 120):
        out = asbatch("status", "made", "--runs-root", tmp_path / "runs", env=env(COLUMNS=str(width))).stdout
        assert max(len(line) for line in out.splitlines()) <= width, out
        for run_id, r in results.items():
            lam = f"lam={r['config']['adversarial']['lam']:g}"
            acc = f"{100 * r['evaluation']['ensemble_accuracy']:.2f}"
            assert re.search(rf"{run_id} +{lam} +COMPLETED +2/2 +\d:\d\d:\d\d +- +{acc}", out), out
    listing = asbatch("status", "--runs-root", tmp_path / "runs").stdout
    assert re.search(r"made +│ 2 +│ 2 COMPLETED +│ run", listing), listing


def test_wait_exits_1_naming_a_failed_run_and_a_cancelled_local_run_is_cancelled_not_failed(tmp_path):
    spec = tmp_path / "spec.yaml"  # the run with 5 steps fails at step 3; the one with 1 step completes
    spec.write_text(yaml.safe_dump({"sweep": "fails", "profile": "local", "defaults": {
        **DEFAULTS, "schedule": {"name": "cosine", "epochs": 1}}, "grid": {"data.train_subset": [64, 320]}}))
    assert asbatch("submit", spec, "--executor", "local", "--runs-root", tmp_path / "runs",
                   env=env(ASBATCH_FAULT="nan:3")).returncode == 0
    waited = asbatch("wait", "fails", "--poll", "0.5", "--runs-root", tmp_path / "runs")
    assert waited.returncode == 1
    assert re.search(r"train-\w+ \(train_subset=320\) FAILED: NonFiniteLossError: loss is nan", waited.stderr)
    assert waited.stderr.strip().splitlines()[-1].startswith("error: 1 of 2 runs of fails did not complete (FAILED)")

    long = write_spec(tmp_path / "long.yaml", "long", epochs=400, lams=(0.8,))
    assert asbatch("submit", long, "--executor", "local", "--runs-root", tmp_path / "runs").returncode == 0
    timed_out = asbatch("wait", "long", "--poll", "0.5", "--timeout", "3", "--runs-root", tmp_path / "runs")
    assert timed_out.returncode == 1 and "still queued or running after 3 s" in timed_out.stderr
    assert asbatch("cancel", "long", "--runs-root", tmp_path / "runs").returncode == 0
    cancelled = asbatch("wait", "long", "--poll", "0.5", "--timeout", "60", "--runs-root", tmp_path / "runs")
    assert cancelled.returncode == 1 and "did not complete (CANCELLED)" in cancelled.stderr, cancelled.stderr
