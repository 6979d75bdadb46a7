"""Run-dir and sweep-dir locks where flock fails (NFS without lockd, Lustre without flock: ENOLCK, EOPNOTSUPP,
ENOSYS): soft lock files naming their holder still make two processes exclude each other, a dead holder's
lock is taken over, another host's lock is held until it is older than the bound (or the override says so),
and each process says so once. Processes whose `fcntl.flock` raises ENOLCK stand in for such a file system.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from asbatch import locks
from asbatch.rundir import RunDir, SweepDir

REPO = Path(__file__).resolve().parents[1]
WARNING = "asbatch: warning: file locks (flock) fail under"
NO_FLOCK = """
import errno, fcntl, os, signal, sys, time
from pathlib import Path

def no_flock(fd, operation):
    raise OSError(errno.ENOLCK, "No locks available")

fcntl.flock = no_flock
from asbatch.rundir import RunDir, SweepDir

def log(line):
    with open(os.environ["LOG"], "a") as f:
        f.write(line + "\\n")

def wait_for(text):
    while text not in Path(os.environ["LOG"]).read_text():
        time.sleep(0.02)
"""


def start(tmp_path: Path, code: str) -> subprocess.Popen:
    env = {**os.environ, "LOG": str(tmp_path / "log"), "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", NO_FLOCK + textwrap.dedent(code), str(tmp_path / "sweep")],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, code: int = 0) -> tuple[str, str]:
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    return out, err


def wait_for(path: Path, text: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not (path.exists() and text in path.read_text()):
        assert time.monotonic() < deadline, f"no {text!r} in {path}"
        time.sleep(0.02)


def test_two_processes_exclude_each_other_through_the_soft_lock_and_each_warns_once(tmp_path):
    (tmp_path / "log").write_text("")
    a = start(tmp_path, """
        sweep = SweepDir(sys.argv[1])
        with sweep.lock():  # a first hold, released: the warning is not repeated below
            pass
        with sweep.lock():
            log("A in")
            wait_for("B waiting")
            time.sleep(0.5)  # B is blocked in lock() meanwhile: were it not, it would log 'B in' now
            log("A out")
    """)
    wait_for(tmp_path / "log", "A in")
    owner = json.loads((tmp_path / "sweep" / ".submit.lock.owner").read_text())
    assert (owner["host"], owner["pid"]) == (socket.gethostname(), a.pid)
    assert owner["create_time"] == pytest.approx(psutil.Process(a.pid).create_time())
    b = start(tmp_path, """
        log("B waiting")
        with SweepDir(sys.argv[1]).lock():
            log("B in")
    """)

    (_, a_err), (_, b_err) = finish(a), finish(b)

    assert (tmp_path / "log").read_text().splitlines() == ["A in", "B waiting", "A out", "B in"]
    for err in (a_err, b_err):
        assert [line for line in err.splitlines() if line] == [
            f"{WARNING} {tmp_path / 'sweep'} (ENOLCK: No locks available); using lock files that name their "
            "holder's host and pid instead (see the README, 'Shared file systems')"]
    assert not (tmp_path / "sweep" / ".submit.lock.owner").exists(), "released: the lock file is gone"


def test_a_live_holders_training_lock_excludes_and_a_killed_holders_lock_is_taken_over(tmp_path):
    (tmp_path / "log").write_text("")
    holder = start(tmp_path, """
        with RunDir(Path(sys.argv[1]) / "run-0").training(0) as mine:
            log(f"A holds {mine}")
            wait_for("B tried")
            os.kill(os.getpid(), signal.SIGKILL)  # dies holding it: nothing releases the soft lock
    """)
    wait_for(tmp_path / "log", "A holds True")
    try_ = """
        with RunDir(Path(sys.argv[1]) / "run-0").training(0) as mine:
            print(mine)
        log("B tried")
    """
    assert finish(start(tmp_path, try_))[0] == "False\n"
    finish(holder, -9)
    assert (tmp_path / "sweep" / "run-0" / ".train.rank0.lock.owner").exists()

    out, err = finish(start(tmp_path, try_))

    assert out == "True\n" and err.count(WARNING) == 1


@pytest.fixture
def no_flock(monkeypatch, tmp_path):
    """This process's flock fails with ENOLCK; the once-per-process state starts afresh."""
    def fail(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", fail)
    monkeypatch.setattr(locks, "_soft_devices", set())
    monkeypatch.setattr(locks, "_warned", False)
    monkeypatch.delenv(locks.STALE_ENV, raising=False)
    return RunDir(tmp_path / "run")


def plant(run: RunDir, host: str, age_s: float = 0.0, pid: int = 1) -> Path:
    """A soft training lock left by pid `pid` on `host`, last refreshed `age_s` ago."""
    marker = run.path / ".train.rank0.lock.owner"
    run.path.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"host": host, "pid": pid, "create_time": 1.0, "token": "x"}) + "\n")
    os.utime(marker, (time.time() - age_s, time.time() - age_s))
    return marker


def held(run: RunDir) -> bool:
    with run.training(0) as mine:
        return not mine


def test_another_hosts_lock_is_held_until_it_is_older_than_the_bound_or_the_override_says(no_flock, monkeypatch):
    run = no_flock
    plant(run, "other-node", age_s=locks.DEFAULT_STALE_S - 60)
    assert held(run), "another host's process cannot be asked: its fresh lock stands"
    plant(run, "other-node", age_s=locks.DEFAULT_STALE_S + 60)
    assert not held(run), "not refreshed for longer than the bound: its holder is gone"
    plant(run, "other-node")
    monkeypatch.setenv(locks.STALE_ENV, "0")  # the user knows that node is dead
    assert not held(run)
    assert not (run.path / ".train.rank0.lock.owner").exists()


def test_on_this_host_a_reused_pid_does_not_hold_the_lock(no_flock):
    run = no_flock
    plant(run, socket.gethostname(), pid=os.getpid())  # our pid, with another create time: a reused pid
    assert not held(run)
    me = psutil.Process()
    marker = plant(run, socket.gethostname(), pid=me.pid)
    marker.write_text(json.dumps({"host": socket.gethostname(), "pid": me.pid, "create_time": me.create_time()}))
    assert held(run), "a live holder (this very process, e.g. another thread) holds it"


@pytest.mark.parametrize("code", [errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS])
def test_each_flock_error_of_a_shared_file_system_falls_back_once_and_says_so_once(code, monkeypatch, tmp_path,
                                                                                    capfd):
    calls = []

    def fail(fd, operation):
        calls.append(operation)
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(fcntl, "flock", fail)
    monkeypatch.setattr(locks, "_soft_devices", set())
    monkeypatch.setattr(locks, "_warned", False)
    sweep = SweepDir(tmp_path / "sweep")
    for _ in range(3):
        with sweep.lock():
            assert (tmp_path / "sweep" / ".submit.lock.owner").exists()

    assert len(calls) == 1, "flock is tried once per file system, then the soft lock is used directly"
    assert capfd.readouterr().err.count(WARNING) == 1


def test_where_flock_works_it_is_used_without_a_word(tmp_path, capfd, monkeypatch):
    monkeypatch.delenv(locks.MODE_ENV, raising=False)
    run = RunDir(tmp_path / "run")
    with run.training(0) as mine, run.training(0) as again:
        assert (mine, again) == (True, False)
        assert not (run.path / ".train.rank0.lock.owner").exists()
    assert capfd.readouterr().err == ""


def test_asbatch_locks_soft_uses_soft_locks_where_flock_would_work(tmp_path, capfd, monkeypatch):
    monkeypatch.setenv(locks.MODE_ENV, "soft")  # Lustre `localflock`: flock succeeds, but per node only
    run = RunDir(tmp_path / "run")
    with run.training(0) as mine:
        assert mine and (run.path / ".train.rank0.lock.owner").exists()
        assert held(run)
    assert not held(run) and capfd.readouterr().err == ""
