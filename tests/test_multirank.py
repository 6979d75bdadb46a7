"""Multi-rank and GPU correctness, proven without a GPU: srun gives DDP, a failure on one rank stops every
rank at once, the device a task trains on comes from what it sees, determinism is a setting, and profiles
that would waste GPUs are refused. Real gloo ranks (local processes and the local Slurm cluster)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from asbatch.launch.task import export_distributed_env
from asbatch.spec import load_profile, parse_spec
from asbatch.spec.errors import SpecError
from asbatch.train.setup import cuda_index

CONFIG = {"sweep": "ranks", "cpu": True, "checkpoint_every": 50,
          "data": {"name": "digits", "batch_size": 64, "test_batch_size": 360, "train_subset": 512},
          "model": {"name": "mlp", "width": 32, "init_sigma": 0.01}, "optim": {"lr": 0.003},
          "schedule": {"name": "cosine", "epochs": 2}, "adversarial": {"lam": 0.8, "steps": 2},
          "eval": {"num_samples": 2}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------- device


def test_the_device_comes_from_what_the_task_sees():
    assert cuda_index(visible=4, local_rank=2) == 2          # all of a node's GPUs visible: cuda:LOCAL_RANK
    assert cuda_index(visible=1, local_rank=3) == 0          # one GPU bound per task: it is cuda:0
    assert cuda_index(visible=0, local_rank=1) is None       # none: the CPU
    with pytest.raises(RuntimeError, match="LOCAL_RANK 2 but only 2 GPUs are visible"):
        cuda_index(visible=2, local_rank=2)


def test_deterministic_is_a_setting_and_changes_nothing_on_the_cpu(tmp_path):
    import torch

    from asbatch.config import RunConfig
    from asbatch.train import train

    try:
        det = train(RunConfig.model_validate({**CONFIG, "deterministic": True}), tmp_path / "det")
        assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
        plain = train(RunConfig.model_validate(CONFIG), tmp_path / "plain")
        assert not torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)
    assert det["evaluation"] == plain["evaluation"]


# ------------------------------------------------------------------------------------------ distributed env


@pytest.fixture
def own_environ(monkeypatch):
    """A copy of the environment that the test may change freely (export_distributed_env writes into it)."""
    monkeypatch.setattr(os, "environ", dict(os.environ))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        os.environ.pop(name, None)


def test_the_distributed_env_comes_from_a_multi_task_slurm_step(monkeypatch, own_environ):
    step = {"SLURM_JOB_ID": "1234", "SLURM_STEP_ID": "2", "SLURM_STEP_NUM_TASKS": "4", "SLURM_STEP_NUM_NODES": "2",
            "SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_STEP_NODELIST": "localhost"}
    for name, value in step.items():
        monkeypatch.setenv(name, value)

    assert export_distributed_env() is True

    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("3", "4", "1")
    assert os.environ["LOCAL_WORLD_SIZE"] == "2" and os.environ["MASTER_PORT"] == str(20000 + (1234 + 2018) % 10000)
    assert os.environ["MASTER_ADDR"]


def test_a_batch_script_outside_srun_and_a_torchrun_process_are_left_alone(monkeypatch, own_environ):
    monkeypatch.delenv("SLURM_STEP_NUM_TASKS", raising=False)
    monkeypatch.setenv("SLURM_NTASKS", "4")  # what a batch script with --ntasks=4 sees, one process
    assert export_distributed_env() is False and "RANK" not in os.environ
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "4")
    monkeypatch.setenv("RANK", "1")  # torchrun set it
    assert export_distributed_env() is False and os.environ["RANK"] == "1"


# ------------------------------------------------------------------------------------------ agreed failure


@pytest.mark.slow
def test_a_nan_on_one_rank_stops_both_ranks_at_once_with_the_same_message(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(CONFIG))
    port = free_port()
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
               "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "ASBATCH_FAULT": "nan:3:1"}
        procs.append(subprocess.Popen([sys.executable, "-m", "asbatch", "run", str(path), "--runs-root",
                                       str(tmp_path / "runs")], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    start = time.monotonic()
    outputs = [p.communicate(timeout=300) for p in procs]
    took = time.monotonic() - start

    assert [p.returncode for p in procs] == [1, 1], outputs
    lines = [next(line for line in err.splitlines() if line.startswith("error:")) for _, err in outputs]
    assert lines[0] == lines[1], lines
    assert "loss is nan or inf on rank 1 of 2 at global step 3 (epoch 1)" in lines[0]
    assert took < 120, f"both ranks must stop within seconds of the NaN, not at a collective timeout ({took:.0f} s)"


# ------------------------------------------------------------------------------------------ on the cluster


@pytest.mark.slurm
@pytest.mark.slow
def test_a_bare_srun_of_asbatch_run_trains_one_ddp_run(local_slurm, tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(CONFIG))
    proc = subprocess.run(["srun", "-N2", "-n2", "-p", "debug", "-t", "5", "--mem=1G", sys.executable, "-m",
                           "asbatch", "run", str(path), "--runs-root", str(tmp_path / "runs")],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs" / "ranks").iterdir()
    results = json.loads((run_dir / "results.json").read_text())
    assert results["train"]["world_size"] == 2 and results["train"]["ranks_in_sync"] is True


@pytest.mark.slurm
@pytest.mark.slow
def test_a_nan_on_one_rank_of_a_two_node_job_fails_the_job_cleanly(local_slurm, tmp_path, monkeypatch):
    from asbatch.launch import submit, sweep_status
    from asbatch.spec import load_sweep

    spec = tmp_path / "spec.yaml"
    defaults = {k: v for k, v in CONFIG.items() if k != "sweep"}
    spec.write_text(yaml.safe_dump({"sweep": "nan2", "profile": "local", "defaults": defaults,
                                    "stages": {"train": {"resources": {"time": 5, "nodes": 2}}}}))
    monkeypatch.setenv("ASBATCH_FAULT", "nan:3:1")  # sbatch exports it to both tasks
    manifest = submit(load_sweep(spec), tmp_path / "runs", executor="slurm", spec_path=spec)
    monkeypatch.delenv("ASBATCH_FAULT")
    job = manifest.submissions[0].job_id

    deadline = time.monotonic() + 240
    while (state := sweep_status(tmp_path / "runs" / "nan2").runs[0]).state in ("PENDING", "RUNNING", "UNKNOWN"):
        assert time.monotonic() < deadline, state
        time.sleep(1)
    assert state.state == "FAILED" and "on rank 1 of 2 at global step 3" in state.reason, (state.state, state.reason)
    elapsed = subprocess.run(["sacct", "-n", "-P", "-X", "-j", job, "-o", "ElapsedRaw"], capture_output=True,
                             text=True, check=True).stdout.split()
    assert elapsed and int(elapsed[0]) < 120, elapsed
    logs = Path(tmp_path / "runs" / "nan2" / ".slurm" / job)
    for rank in (0, 1):
        assert "loss is nan or inf on rank 1 of 2" in (logs / f"{job}_{rank}_log.err").read_text()


# ------------------------------------------------------------------------------------------ GPU profiles


def test_profiles_cannot_waste_gpus(tmp_path):
    example = load_profile("example-gpu-cluster")
    assert example.resources.constraint == "[a100|h100]"
    two_nodes = parse_spec({"sweep": "s", "profile": "example-gpu-cluster",
                            "stages": {"train": {"resources": {"nodes": 2}}}})
    assert two_nodes.resources["train"].nodes == 2, "the shipped example passes the rules of user profiles"
    (tmp_path / "plain_or.yaml").write_text("gpus_per_node: 4\nnodes: 2\nconstraint: 'a100|h100'\n")
    with pytest.raises(SpecError, match=r"a plain OR lets the 2 nodes .* write \[a100\|h100\]"):
        load_profile(str(tmp_path / "plain_or.yaml"))
    (tmp_path / "gres.yaml").write_text("extra: {gres: 'gpu:4'}\n")
    with pytest.raises(SpecError, match=r"extra.gres asks for GPUs .* ask with gpus_per_node"):
        load_profile(str(tmp_path / "gres.yaml"))


# ------------------------------------------------------------------------------------------ leaving a rank

_FINISHED_TASK = """
import atexit, sys
import torch.distributed  # a multi-rank task has it loaded
from asbatch.launch import task
atexit.register(lambda: print("teardown ran", flush=True))  # registered first: runs only after a normal exit
atexit.register(task._leave_if_done)  # what TrainTask registers once training returned
print("result saved", flush=True)
if sys.argv[1] == "fail":
    raise RuntimeError("submitit could not save the result")
"""


@pytest.mark.parametrize("how", ["done", "fail"])
def test_a_finished_rank_leaves_without_the_teardown_unless_it_is_failing(how):
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "1"}
    proc = subprocess.run([sys.executable, "-c", _FINISHED_TASK, how], env=env, capture_output=True, text=True,
                          timeout=120)
    assert "result saved" in proc.stdout  # flushed before the early exit
    if how == "done":  # ends at once with 0: the interpreter's teardown (where gloo aborted) never runs
        assert proc.returncode == 0 and "teardown ran" not in proc.stdout, proc.stderr
    else:  # a failure keeps its exit code and traceback
        assert proc.returncode == 1 and "teardown ran" in proc.stdout, proc.stderr
        assert "submitit could not save the result" in proc.stderr
