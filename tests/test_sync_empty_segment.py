"""`asbatch sync` with an offline W&B segment that a kill left empty (its `.wandb` file just the 7-byte header,
or less, or torn inside its first record): skipped with one note naming the file, the run's other segments
uploaded, the run counted as synced. The segments are real: a tiny training tracked by W&B offline, plus
empty segments cut from its own `.wandb` file. No W&B server runs here, so `wandb sync` is replaced by a
labelled stand-in that reads each segment it is given with the real reader and takes it as uploaded; an empty
one it hands to the real `wandb sync`, which fails on it (`wandb: ERROR Failed to ...`, exit 0) before
contacting any server (the configured one is a closed local port: nothing leaves this machine)."""

from __future__ import annotations

import json
import shutil
import socket
import sys
from pathlib import Path

import pytest
from cli_helpers import invoke
from tests_support import tiny_digits_config

from asbatch.rundir import RunDir, offline_segments
from asbatch.tracking import sync as tracking_sync
from asbatch.tracking.offline import FILE_HEADER_SIZE, RECORD_HEADER, is_empty_segment, read_segment, records

FAKE_KEY = "0123456789abcdef0123456789abcdef01234567"
REAL_RUN = tracking_sync._run  # runs the real `wandb sync`


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished tiny run tracked by real W&B in offline mode: one segment, read back complete."""
    from unittest import mock

    import torch

    from asbatch.train import train

    config = tiny_digits_config("syncempty", tracking={"wandb": "offline", "project": "asbatch-tests"})
    run_dir = tmp_path_factory.mktemp("runs") / "syncempty" / config.run_id
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with mock.patch.dict("os.environ", {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}):
            results = train(config, run_dir, quiet=True)
    finally:
        torch.set_num_threads(threads)
    return config, run_dir, results


def copy_run(trained, root: Path) -> tuple[Path, Path]:
    """A copy of the trained run dir under `root/<sweep>/`, and its one real `.wandb` file."""
    _, run_dir, _ = trained
    copy = root / run_dir.parent.name / run_dir.name
    shutil.copytree(run_dir, copy, symlinks=True)
    (segment,) = offline_segments(RunDir(copy))
    (real,) = segment.glob("*.wandb")
    return copy, real


def empty_segments(run_dir: Path, real: Path) -> list[Path]:
    """Three segments a kill left empty, cut from the real `.wandb` file, around the real one."""
    data = real.read_bytes()
    first_length = RECORD_HEADER.unpack_from(data, FILE_HEADER_SIZE)[1]
    return [
        add_segment(run_dir, "20000101_000000", data[:FILE_HEADER_SIZE]),  # killed first process: header only
        add_segment(run_dir, "20000101_000001", b""),  # killed before the header was written
        add_segment(run_dir, "99991231_235959",  # a later restart killed inside its first record
                    data[:FILE_HEADER_SIZE + RECORD_HEADER.size + first_length // 2]),
    ]


def add_segment(run_dir: Path, stamp: str, content: bytes) -> Path:
    """A segment dir as W&B names it (`offline-run-<start time>-<id>/run-<id>.wandb`) holding `content`."""
    segment = run_dir / "wandb" / f"offline-run-{stamp}-{run_dir.name}"
    segment.mkdir()
    path = segment / f"run-{run_dir.name}.wandb"
    path.write_bytes(content)
    return path


@pytest.fixture
def offline_wandb(monkeypatch):
    """W&B credentials for a server that cannot be reached (a closed local port), and no WANDB_MODE."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")


@pytest.fixture
def wandb_sync(monkeypatch, offline_wandb):
    """STAND-IN for `wandb sync`'s upload (no W&B server here): records each segment it is given with the
    history steps the real reader finds in it; a segment without records goes to the real `wandb sync`."""
    uploads: list[tuple[str, list[int]]] = []

    def fake_run(cmd, timeout_s):
        segment = Path(cmd[-1])
        if not any(records(p) for p in segment.glob("*.wandb")):
            return REAL_RUN(cmd, timeout_s)
        uploads.append((segment.name, read_segment(segment).history_steps))
        return 0, "wandb: Syncing: done\n"

    monkeypatch.setattr(tracking_sync, "_run", fake_run)
    return uploads


def notes(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


def test_empty_segments_are_skipped_with_one_note_each_the_others_uploaded_and_the_run_synced(
        trained, tmp_path, wandb_sync):
    _, _, results = trained
    run_dir, real = copy_run(trained, tmp_path)
    empty = empty_segments(run_dir, real)
    assert [is_empty_segment(p.parent) for p in empty] == [True] * 3 and not is_empty_segment(real.parent)
    names = [s.name for s in offline_segments(RunDir(run_dir))]
    assert names[2] == real.parent.name and len(names) == 4

    result = invoke("sync", "syncempty", "--runs-root", tmp_path)

    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    lines = notes(result.stderr)
    assert len(lines) == 3, lines
    for line, path in zip(lines, empty, strict=True):
        assert line.startswith(f"note: {path} holds no W&B record") and "skipped" in line, line
    steps = results["train"]["global_steps"]
    assert wandb_sync == [(real.parent.name, [steps, steps + 1])], "only the real segment, with every epoch"
    assert f"{run_dir.name}: segment 1/1 ({real.parent.name})" in result.stdout
    assert result.stdout.strip().endswith("1 offline segment(s) synced"), result.stdout
    state = json.loads((run_dir / "wandb.json").read_text())
    assert state["synced"] == names and state["skipped_empty"] == [p.parent.name for p in empty]
    assert state["finished"] is True

    again = invoke("sync", "syncempty", "--runs-root", tmp_path)
    assert again.exit_code == 0 and notes(again.stderr) == [] and len(wandb_sync) == 1, again.output
    assert again.stdout.strip().endswith("0 offline segment(s) synced")


def test_a_run_whose_only_segment_is_empty_is_synced_with_a_note_and_a_rerun_of_it_uploads_it_all(
        trained, tmp_path, wandb_sync, monkeypatch):
    """W&B's service died before it wrote anything: nothing to upload, one note, exit 0. While the run is
    unfinished the segment may be the live one: not recorded, looked at again. Once the run finished (without
    W&B) it is recorded and the note says how to get the run into W&B: running the finished run again logs
    it into a new segment (nothing is trained), which the next sync uploads."""
    from asbatch.train import train

    config, _, results = trained
    run_dir, real = copy_run(trained, tmp_path)
    first_bytes = real.read_bytes()[:FILE_HEADER_SIZE]
    shutil.rmtree(real.parent)
    header = add_segment(run_dir, "20000101_000000", first_bytes)
    state = json.loads((run_dir / "wandb.json").read_text())
    del state["finished"]
    (run_dir / "wandb.json").write_text(json.dumps(state))

    (run_dir / "results.json").rename(tmp_path / "results.json")  # unfinished: W&B may still write it
    result = invoke("sync", "syncempty", "--runs-root", tmp_path)
    assert result.exit_code == 0 and wandb_sync == [], result.output
    (line,) = notes(result.stderr)
    assert line.startswith(f"note: {header} holds no W&B record") and "a later `asbatch sync` looks" in line
    assert json.loads((run_dir / "wandb.json").read_text()).get("synced", []) == [], "not recorded"

    (tmp_path / "results.json").rename(run_dir / "results.json")
    result = invoke("sync", "syncempty", "--runs-root", tmp_path)
    assert result.exit_code == 0 and wandb_sync == [], result.output
    (line,) = notes(result.stderr)
    assert line.startswith(f"note: {header} holds no W&B record") and "running the run again logs it" in line
    assert json.loads((run_dir / "wandb.json").read_text())["synced"] == [header.parent.name]
    assert result.stdout.strip().endswith("0 offline segment(s) synced"), result.stdout

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    assert train(config, run_dir, quiet=True) == results, "a finished run is not trained again"
    result = invoke("sync", "syncempty", "--runs-root", tmp_path)
    assert result.exit_code == 0 and notes(result.stderr) == [], result.output
    (new,) = [s for s in offline_segments(RunDir(run_dir)) if s != header.parent]
    steps = results["train"]["global_steps"]
    assert wandb_sync == [(new.name, [steps, steps + 1])]
    state = json.loads((run_dir / "wandb.json").read_text())
    assert state["finished"] is True and state["synced"] == [header.parent.name, new.name]


def test_the_real_wandb_sync_fails_on_each_kind_of_empty_segment(trained, tmp_path, offline_wandb):
    """Why they are skipped: the real `wandb sync` fails reading each (exit 0, a `wandb: ERROR Failed to ...`
    line) without reaching a server."""
    run_dir, real = copy_run(trained, tmp_path)
    for path in empty_segments(run_dir, real):
        code, output = REAL_RUN([sys.executable, "-m", "wandb", "sync", "--id", run_dir.name, "-p", "p",
                                 str(path.parent)], 60)
        assert code == 0 and tracking_sync._errors(output)[0].startswith("wandb: ERROR Failed to "), output
