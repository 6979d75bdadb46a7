"""W&B tracking in real offline mode (WANDB_MODE=offline): one W&B run per training run, id = run id, kept
across a kill + resume, history never logged twice, and no secret written anywhere."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from asbatch import tracking
from asbatch.rundir import RunDir, offline_segments
from asbatch.tracking import sync as tracking_sync
from asbatch.tracking.offline import read_finished_segment

CONFIG = {
    "sweep": "tracked", "cpu": True, "checkpoint_every": 4,
    "data": {"name": "digits", "batch_size": 64, "test_batch_size": 360, "train_subset": 256},
    "model": {"name": "mlp", "width": 16, "init_sigma": 0.01}, "schedule": {"name": "cosine", "epochs": 2},
    "adversarial": {"lam": 0.8}, "eval": {"num_samples": 2},
    "tracking": {"wandb": "offline", "project": "asbatch-tests", "tags": ["test"]},
}
FAKE_KEY = "0123456789abcdef0123456789abcdef01234567"  # shaped like a W&B key; must never reach a file


def run(tmp_path: Path, fault: str = "", config: dict | None = None, runs: Path | None = None) -> int:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config or CONFIG))
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_API_KEY": FAKE_KEY, "ASBATCH_FAULT": fault,
           "WANDB_SILENT": "true"}
    proc = subprocess.run([sys.executable, "-m", "asbatch", "run", str(path), "--runs-root",
                           str(runs or tmp_path / "runs")], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode in (0, -signal.SIGKILL), proc.stderr[-3000:]
    return proc.returncode


def history(run_dir: Path) -> list[int]:
    """Every history step the run's offline W&B segments hold, read back from their files, in order."""
    return [step for seg in offline_segments(RunDir(run_dir)) for step in read_finished_segment(seg).history_steps]


def summaries(run_dir: Path) -> set[str]:
    return {key for seg in offline_segments(RunDir(run_dir)) for key in read_finished_segment(seg).summary_keys}


@pytest.mark.slow
def test_offline_run_keeps_its_id_across_a_kill_logs_every_epoch_once_and_writes_no_secret(tmp_path):
    assert run(tmp_path, "step:5") == -signal.SIGKILL  # 4 steps per epoch: killed in epoch 2
    assert run(tmp_path) == 0
    (run_dir,) = (tmp_path / "runs" / "tracked").iterdir()
    run_id = run_dir.name
    segments = offline_segments(RunDir(run_dir))
    assert len(segments) == 2, "one offline segment per process"
    assert all(s.name.endswith(f"-{run_id}") for s in segments), [s.name for s in segments]
    state = json.loads((run_dir / "wandb.json").read_text())
    results = json.loads((run_dir / "results.json").read_text())
    assert state["id"] == run_id and state["mode"] == "offline" and state["finished"] is True
    # the killed segment's W&B service wrote nothing; the next segment logged epoch 1 (step 4) again
    assert history(run_dir) == [4, 8, 9] and results["train"]["global_steps"] == 8
    assert "evaluation/ensemble_accuracy" in summaries(run_dir)
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert FAKE_KEY.encode() not in path.read_bytes(), f"API key written to {path}"


@pytest.mark.slow
def test_a_dead_wandb_service_never_changes_training_and_a_restart_completes_wandb(tmp_path):
    import psutil

    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({**CONFIG, "schedule": {"name": "cosine", "epochs": 4}}))
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    cmd = [sys.executable, "-m", "asbatch", "run", str(path), "--runs-root", str(tmp_path / "runs")]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "runs" / "tracked"
    deadline = time.monotonic() + 120
    while not any(len(p.read_text().splitlines()) >= 1 for p in metrics.glob("*/metrics.jsonl")):
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    services = [c for c in psutil.Process(proc.pid).children(recursive=True) if "wandb" in " ".join(c.cmdline())]
    assert services, "W&B runs a service process next to training"
    for child in services:
        child.kill()
    _, err = proc.communicate(timeout=300)

    assert proc.returncode == 0, err[-3000:]
    (run_dir,) = metrics.iterdir()
    assert (run_dir / "results.json").exists() and "Traceback" not in err
    assert err.count("[asbatch] W&B failed") <= 1
    assert json.loads((run_dir / "wandb.json").read_text()).get("finished") is not True
    assert run(tmp_path.joinpath("again"), config={**CONFIG, "schedule": {"name": "cosine", "epochs": 4}},
               runs=tmp_path / "runs") == 0  # a finished run: W&B is completed, nothing is trained
    assert history(run_dir)[:4] == [4, 8, 12, 16] and sorted(history(run_dir)) == [4, 8, 12, 16, 17]
    assert "evaluation/ensemble_accuracy" in summaries(run_dir)
    assert json.loads((run_dir / "wandb.json").read_text())["finished"] is True


def test_auto_mode_is_offline_without_a_key_and_env_overrides(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    assert tracking.resolve_mode("auto") == "offline"
    assert tracking.resolve_mode("online") == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert tracking.resolve_mode("online") == "disabled"
    monkeypatch.setenv("WANDB_MODE", "dryrun")  # wandb's old name for offline: the CLI accepts it, so it counts
    assert tracking.resolve_mode("online") == "offline"


def test_auto_mode_with_a_key_but_an_unreachable_server_is_offline():
    # The configured server is a local port nobody listens on (bound for a free number, then closed): the real
    # connection attempt is refused, whatever network this machine has; nothing is mocked.
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    assert tracking.can_reach("127.0.0.1", port, timeout=1.0) is False
    assert _auto_mode(WANDB_BASE_URL=f"http://127.0.0.1:{port}", WANDB_API_KEY=FAKE_KEY) == "offline"


def test_credentials_are_found_by_wandbs_own_lookup(monkeypatch, tmp_path):
    from wandb.sdk.lib import wbauth

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / ".netrc"))
    assert not tracking.has_api_key()
    host = tracking.wandb_run._wandb_host().url  # what `wandb login` writes now (not api.wandb.ai)
    wbauth.write_netrc_auth(host=host, api_key=FAKE_KEY)
    assert "api.wandb.ai" not in (tmp_path / ".netrc").read_text()
    assert tracking.has_api_key()
    (tmp_path / ".netrc").write_text(f"machine api.wandb.ai\n  login user\n  password {FAKE_KEY}\n")
    assert tracking.has_api_key(), "an older `wandb login` entry is still found by wandb"
    (tmp_path / ".netrc").write_text(f"machine example.org\n  login user\n  password {FAKE_KEY}\n")
    assert not tracking.has_api_key()
    (tmp_path / ".netrc").write_text(f"machine {host.split('//')[1]}\n  login user\n  password x\n")
    assert not tracking.has_api_key(), "a key W&B would refuse does not make `auto` online"
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    assert tracking.has_api_key()


def _auto_mode(**env: str) -> str:
    code = "from asbatch.tracking import resolve_mode; print(resolve_mode('auto'))"
    clean = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    return subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True,
                          check=True, timeout=60).stdout.strip()


def test_auto_mode_is_online_with_credentials_and_a_reachable_configured_server(tmp_path):
    import socket

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        url = f"http://127.0.0.1:{port}"
        netrc = tmp_path / ".netrc"
        netrc.write_text(f"machine 127.0.0.1:{port}\n  login user\n  password {FAKE_KEY}\n")
        assert _auto_mode(WANDB_BASE_URL=url, WANDB_API_KEY=FAKE_KEY) == "online"
        assert _auto_mode(WANDB_BASE_URL=url, NETRC=str(netrc)) == "online"
        assert _auto_mode(WANDB_BASE_URL=url, NETRC=str(tmp_path / "none")) == "offline"
    assert _auto_mode(WANDB_BASE_URL=url, WANDB_API_KEY=FAKE_KEY) == "offline", "the server is gone"


def test_sync_uploads_segments_in_order_into_one_id_and_records_them(tmp_path, monkeypatch):
    """Stand-in for the W&B server (none can run here): `wandb sync` is replaced by a recorder, so this
    checks the commands we issue and the bookkeeping, not the upload itself (the real `wandb sync` runs in
    the failure tests below)."""
    run_dir = tmp_path / "run"
    for name in ("offline-run-20261125_100000-train-abc", "offline-run-20261125_090000-train-abc"):
        (run_dir / "wandb" / name).mkdir(parents=True)
    (run_dir / "wandb.json").write_text(json.dumps({"id": "train-abc", "project": "p", "entity": None,
                                                    "last_step": 8}))
    calls = []
    monkeypatch.setattr(tracking_sync, "_run", lambda cmd, timeout_s: calls.append(cmd) or (0, "wandb: done"))

    assert tracking.sync_run(run_dir) == ["offline-run-20261125_090000-train-abc",
                                          "offline-run-20261125_100000-train-abc"]
    assert [c[-1].rsplit("/", 1)[-1] for c in calls] == ["offline-run-20261125_090000-train-abc",
                                                         "offline-run-20261125_100000-train-abc"]
    assert not any("--append" in c for c in calls), "wandb 0.31 has no --append: `--id` continues the run"
    assert all(c[c.index("--id") + 1] == "train-abc" for c in calls)
    assert tracking.sync_run(run_dir) == [], "synced segments are not uploaded twice"


def test_a_resumed_segment_logs_only_the_steps_earlier_segments_did_not_persist(tmp_path, monkeypatch):
    """Real offline W&B: a first segment persists epoch 1 (step 4); the next one is given the rows of
    epochs 1 and 2 and logs step 8 only."""
    from asbatch.config import RunConfig

    monkeypatch.setenv("WANDB_SILENT", "true")
    config = RunConfig.model_validate(CONFIG)
    with tracking.Tracker(config, tmp_path) as first:
        first.log_epoch({"epoch": 0, "train_loss": 1.0}, step=4)
    assert history(tmp_path) == [4] and tracking.persisted_steps(RunDir(tmp_path)) == {4}

    with tracking.Tracker(config, tmp_path) as second:
        assert second.has(4) and not second.has(8)
        second.catch_up([{"epoch": 0, "global_step": 4}, {"epoch": 1, "global_step": 8}])
    assert history(tmp_path) == [4, 8]


def test_a_segment_file_is_read_back_record_by_record(tmp_path):
    from asbatch.tracking.offline import BLOCK_SIZE, records

    header = b":W&B\xe1\xbe\x00"
    big = bytes(range(256)) * 200  # spans two blocks: a FIRST and a LAST fragment
    first = BLOCK_SIZE - len(header) - 7
    body = (b"\0\0\0\0" + len(b"abc").to_bytes(2, "little") + b"\x01abc"
            + b"\0\0\0\0" + (first - 10).to_bytes(2, "little") + b"\x02" + big[:first - 10])
    rest = big[first - 10:]
    path = tmp_path / "run.wandb"
    path.write_bytes(header + body + b"\0\0\0\0" + len(rest).to_bytes(2, "little") + b"\x04" + rest)
    assert records(path) == [b"abc", big]
    path.write_bytes(header)  # a segment whose service was killed before writing anything
    assert records(path) == []


class _Server:
    """A local stand-in for the W&B server: `blackhole` accepts connections and never answers; otherwise
    every request gets HTTP 401 (a key the server does not know)."""

    def __init__(self, blackhole: bool):
        import http.server
        import socket
        import threading

        if blackhole:
            self.sock = socket.socket()
            self.sock.bind(("127.0.0.1", 0))
            self.sock.listen(64)
            self.port, self.close = self.sock.getsockname()[1], self.sock.close
            return

        class Refuse(http.server.BaseHTTPRequestHandler):
            def answer(self):
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                body = b'{"errors": [{"message": "user is not logged in"}]}'
                self.send_response(401)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_PUT = answer

            def log_message(self, *args):
                pass

        self.http = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refuse)
        threading.Thread(target=self.http.serve_forever, daemon=True).start()
        self.port = self.http.server_address[1]
        self.close = lambda: (self.http.shutdown(), self.http.server_close())


@pytest.mark.slow
def test_sync_fails_in_one_line_on_a_refused_upload_and_on_a_server_that_never_answers(tmp_path):
    assert run(tmp_path) == 0
    (run_dir,) = (tmp_path / "runs" / "tracked").iterdir()
    for blackhole in (False, True):
        server = _Server(blackhole)
        try:
            env = {**{k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}, "WANDB_API_KEY": FAKE_KEY,
                   "WANDB_BASE_URL": f"http://127.0.0.1:{server.port}"}
            proc = subprocess.run([sys.executable, "-m", "asbatch", "sync", "tracked", "--timeout", "10", "--runs-root",
                                   str(tmp_path / "runs")], env=env, capture_output=True, text=True, timeout=120)
        finally:
            server.close()
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert proc.stdout.startswith(f"[1/1] {run_dir.name}: segment 1/1 (offline-run-"), proc.stdout
        (line,) = proc.stderr.strip().splitlines()
        why = "did not finish within 10 s" if blackhole else "failed (exit 0): wandb: ERROR Failed to get resume status"
        assert line.startswith("error: wandb sync of ") and why in line and "asbatch sync tracked` again" in line
        assert FAKE_KEY not in proc.stdout + proc.stderr
        assert json.loads((run_dir / "wandb.json").read_text()).get("synced", []) == [], "nothing was synced"
