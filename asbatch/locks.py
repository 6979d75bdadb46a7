"""Exclusive file locks that also work where flock does not (NFS without lockd, Lustre mounted without flock).

`exclusive(path)` takes an OS lock (flock) on `path`, as filelock's FileLock does: the kernel (or the NFS lock
manager) releases it when its process dies. Where flock fails with ENOLCK / EOPNOTSUPP / ENOSYS, the file
system is noted (once per process, one warning line on stderr) and a soft lock is used there instead: the
file `<path>.owner`, created atomically (a hard link of a complete record, which NFS and Lustre make atomic)
and holding its owner's host, pid and process create time. A soft lock whose owner is gone cannot release
itself, so it is stale, and taken over, when
- its owner ran on this host and that process is gone (pid not running, or running with another create time);
- its owner ran on another host (which this one cannot ask) and its file has not been refreshed for
  $ASBATCH_LOCK_STALE_S seconds (default 600; the holder refreshes it every 60 s; 0 takes any other host's
  lock over at once: for a holder known to be dead, e.g. after a node failure);
- its file holds no owner record and is older than 10 s (a holder writes its record before it links it).
$ASBATCH_LOCKS=soft uses soft locks everywhere, for file systems whose flock succeeds without excluding other
hosts (Lustre `localflock`, NFS `local_lock=all`). Taking over goes through a short-lived `<path>.owner.break`
file, so two waiters never both remove a stale lock and then one another's.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

MODE_ENV = "ASBATCH_LOCKS"          # "soft": soft locks even where flock works
STALE_ENV = "ASBATCH_LOCK_STALE_S"  # another host's soft lock not refreshed for this long is stale
DEFAULT_STALE_S = 600.0
HEARTBEAT_S = 60.0
RECORDLESS_S = 10.0   # a soft lock file without an owner record is stale past this age
BREAK_STALE_S = 30.0  # a `.break` file left by a process that died while breaking a lock
NO_FLOCK = frozenset({errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS})
BUSY = frozenset({errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES})

_soft_devices: set[int] = set()  # file systems (st_dev) where flock failed in this process
_warned = False


def stale_after_s() -> float:
    value = os.environ.get(STALE_ENV, "")
    try:
        return max(0.0, float(value)) if value else DEFAULT_STALE_S
    except ValueError:
        return DEFAULT_STALE_S


@contextlib.contextmanager
def exclusive(path: str | Path, timeout: float | None = None, poll_s: float = 0.05) -> Iterator[bool]:
    """Hold an exclusive lock on `path` while the block runs: yields True, or False (holding nothing) when
    `timeout` seconds passed first (0: one try; None: wait as long as it takes)."""
    path = Path(path)
    deadline = None if timeout is None else time.monotonic() + timeout
    fd = None if _soft_wanted(path) else _flock(path, deadline, poll_s)
    if fd is not None and fd >= 0:
        try:
            yield True
        finally:
            os.close(fd)  # closing the descriptor releases the flock
        return
    if fd == -1:  # timed out
        yield False
        return
    owner = _soft_acquire(soft_lock_file(path), deadline, poll_s)
    if owner is None:
        yield False
        return
    try:
        yield True
    finally:
        owner.release()


def soft_lock_file(path: Path) -> Path:
    return path.with_name(path.name + ".owner")


def _soft_wanted(path: Path) -> bool:
    if os.environ.get(MODE_ENV, "").lower() == "soft":
        return True
    with contextlib.suppress(OSError):
        return path.parent.stat().st_dev in _soft_devices
    return False


def _flock(path: Path, deadline: float | None, poll_s: float) -> int | None:
    """A descriptor of `path` holding its flock; -1 on timeout; None where flock is unsupported here."""
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except OSError as err:
            if err.errno in NO_FLOCK:
                os.close(fd)
                _no_flock(path, err)
                return None
            if err.errno not in BUSY:
                os.close(fd)
                raise
        if deadline is not None and time.monotonic() >= deadline:
            os.close(fd)
            return -1
        time.sleep(poll_s)


def _no_flock(path: Path, err: OSError) -> None:
    global _warned
    with contextlib.suppress(OSError):
        _soft_devices.add(path.parent.stat().st_dev)
    if not _warned:
        _warned = True
        name = errno.errorcode.get(err.errno or 0, str(err.errno))
        sys.stderr.write(f"asbatch: warning: file locks (flock) fail under {path.parent} ({name}: {err.strerror}); "
                         "using lock files that name their holder's host and pid instead (see the README, "
                         "'Shared file systems')\n")
        sys.stderr.flush()


# ------------------------------------------------------------------------------------------ soft locks

def _create_time(pid: int) -> float | None:
    """When process `pid` of this host started (0.0: it runs, start unknown); None: no such live process."""
    try:
        import psutil
    except ImportError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return 0.0
    try:
        proc = psutil.Process(pid)
        return None if proc.status() == psutil.STATUS_ZOMBIE else proc.create_time()
    except psutil.AccessDenied:
        return 0.0
    except psutil.Error:  # NoSuchProcess, ZombieProcess
        return None


def read_owner(lock_file: Path) -> tuple[dict[str, Any] | None, os.stat_result] | None:
    """The soft lock's owner record (None where it holds none) and the file's stat; None: no such file."""
    try:
        st = lock_file.stat()
        text = lock_file.read_text()
    except FileNotFoundError:
        return None
    try:
        owner = json.loads(text)
        owner = owner if isinstance(owner, dict) and {"host", "pid"} <= owner.keys() else None
    except ValueError:
        owner = None
    return owner, st


def why_stale(owner: dict[str, Any] | None, st: os.stat_result, now: float | None = None) -> str | None:
    """Why a soft lock may be taken over (see the module docstring), or None while its owner holds it."""
    age = (time.time() if now is None else now) - st.st_mtime
    if owner is None:
        return f"it holds no owner record and is {age:.0f} s old" if age > RECORDLESS_S else None
    if owner["host"] == socket.gethostname():
        created = _create_time(int(owner["pid"]))
        recorded = owner.get("create_time")
        if created is None:
            return f"its process {owner['pid']} on this host is gone"
        if isinstance(recorded, int | float) and created and abs(created - recorded) > 1:
            return f"its process {owner['pid']} on this host is gone (the pid runs another process now)"
        return None
    bound = stale_after_s()
    if age > bound:
        return (f"its holder, pid {owner['pid']} on {owner['host']}, has not refreshed it for {age:.0f} s "
                f"(> {bound:g} s)")
    return None


class _SoftOwner:
    """This process's hold of a soft lock: the record it linked, and the thread that refreshes its mtime."""

    def __init__(self, lock_file: Path) -> None:
        self.lock_file = lock_file
        pid = os.getpid()
        self.record = {"host": socket.gethostname(), "pid": pid, "create_time": _create_time(pid),
                       "token": secrets.token_hex(8), "since": time.time()}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def try_link(self) -> bool:
        """Create the lock file holding our record, atomically; False where it exists."""
        tmp = self.lock_file.with_name(f"{self.lock_file.name}.{self.record['token']}")
        tmp.write_text(json.dumps(self.record) + "\n")
        try:
            with contextlib.suppress(FileExistsError):
                os.link(tmp, self.lock_file)
            return tmp.stat().st_nlink == 2  # over NFS a lost reply can make a done link raise EEXIST
        finally:
            tmp.unlink(missing_ok=True)

    def start_heartbeat(self) -> None:
        def beat() -> None:
            while not self._stop.wait(HEARTBEAT_S):
                with contextlib.suppress(OSError):
                    os.utime(self.lock_file)

        self._thread = threading.Thread(target=beat, name=f"lock {self.lock_file.name}", daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        seen = read_owner(self.lock_file)
        if seen and seen[0] and seen[0].get("token") == self.record["token"]:
            self.lock_file.unlink(missing_ok=True)


def _soft_acquire(lock_file: Path, deadline: float | None, poll_s: float) -> _SoftOwner | None:
    owner = _SoftOwner(lock_file)
    while True:
        if owner.try_link():
            owner.start_heartbeat()
            return owner
        seen = read_owner(lock_file)
        if seen is not None and why_stale(*seen) is not None:
            _break(lock_file, seen)
            continue
        if deadline is not None and time.monotonic() >= deadline:
            return None
        time.sleep(poll_s)


def _break(lock_file: Path, seen: tuple[dict[str, Any] | None, os.stat_result]) -> None:
    """Remove the stale lock file we saw, unless someone replaced it meanwhile (one breaker at a time)."""
    guard = lock_file.with_name(lock_file.name + ".break")
    try:
        os.close(os.open(guard, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    except FileExistsError:
        with contextlib.suppress(OSError):
            if time.time() - guard.stat().st_mtime > BREAK_STALE_S:
                guard.unlink()
        time.sleep(0.01)
        return
    try:
        now = read_owner(lock_file)
        if now is not None and _same(now, seen):
            lock_file.unlink(missing_ok=True)
    finally:
        guard.unlink(missing_ok=True)


def _same(a: tuple[dict[str, Any] | None, os.stat_result], b: tuple[dict[str, Any] | None, os.stat_result]) -> bool:
    (owner_a, st_a), (owner_b, st_b) = a, b
    return owner_a == owner_b and (st_a.st_ino, st_a.st_size, st_a.st_mtime_ns) == (
        st_b.st_ino, st_b.st_size, st_b.st_mtime_ns)
