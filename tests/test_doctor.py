"""`asbatch doctor`: the site facts parsed from canned Slurm output (a GPU site's, no cluster needed), the probe
job's outcomes against a stand-in `ask`, the spec checks, W&B credentials, and the real local cluster once."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from cli_helpers import invoke, rejected

from asbatch.cli.doctor import OK, PROBLEM, Site, data_fact, stage_fact, wandb_credentials, wandb_facts
from asbatch.launch import site
from asbatch.spec import load_sweep

REPO = Path(__file__).resolve().parents[1]

# `scontrol show config` of a GPU site (cut): accounting through slurmdbd, a lowered MaxArraySize
CONFIG = """Configuration data as of 2025-03-01T10:00:00
AccountingStorageHost   = dbd01
AccountingStorageType   = accounting_storage/slurmdbd
ClusterName             = hpc
InteractiveStepOptions  = --interactive --preserve-env --pty $SHELL
MaxArraySize            = 501
MaxJobCount             = 200000
SlurmctldHost[0]        = ctl01(10.0.0.1)
SLURM_VERSION           = 23.11.4

Cgroup Support Configuration:
MaxArraySize            = 7
Slurmctld(primary) at ctl01 is UP
"""
# `sinfo -h -o '%P|%l|%D|%G|%a'`: gpu is listed once per kind of node, cpu is the default
SINFO = """cpu*|2-00:00:00|120|(null)|up
gpu|1-00:00:00|16|gpu:a100:4(S:0-1)|up
gpu|1-00:00:00|8|gpu:h100:8(S:0,1),shard:16|up
short|30:00|4|gpu:2|up
old|infinite|2|(null)|down
"""
ASSOC = """hpc|proj1||normal,long|||||
hpc|proj2|gpu|normal||50|||
"""
QOS = """normal|500|
long|20|4
debug|2|1
"""


def test_scontrol_config_parses_keys_first_wins_and_max_array_size():
    config = site.parse_config(CONFIG)
    assert config["ClusterName"] == "hpc" and config["SlurmctldHost[0]"] == "ctl01(10.0.0.1)"
    assert config["InteractiveStepOptions"] == "--interactive --preserve-env --pty $SHELL"
    assert site.max_array_size(config) == 501  # not the plugin section's later value
    assert site.config_int(config, "MaxJobCount") == 200000 and site.config_int(config, "Nope") is None
    assert site.accounting_storage(config) == "accounting_storage/slurmdbd"
    assert site.accounting_storage({"AccountingStorageType": "accounting_storage/none"}) is None
    assert site.accounting_storage({}) is None
    assert site.parse_version("slurm-wlm 22.05.8\n") == "22.05.8" and site.parse_version("slurm 23.11.4") == "23.11.4"


@pytest.mark.parametrize(("text", "minutes"), [
    ("infinite", None), ("UNLIMITED", None), ("30", 30), ("30:00", 30), ("30:01", 31), ("2:00:00", 120),
    ("1-00:00:00", 1440), ("1-12", 2160), ("1-01:30", 1530), ("7-00:00:30", 10081)])
def test_slurm_time_limits_in_minutes(text, minutes):
    assert site.parse_time_limit(text) == minutes


def test_a_time_limit_that_is_none_of_slurms_forms_is_refused():
    with pytest.raises(ValueError, match="n/a"):
        site.parse_time_limit("n/a")
    assert site.format_minutes(1530) == "1-01:30:00" and site.format_minutes(30) == "00:30:00"


def test_sinfo_partitions_merge_node_kinds_and_count_gpus_per_node():
    parts = {p.name: p for p in site.parse_partitions(SINFO)}
    assert list(parts) == ["cpu", "gpu", "short", "old"]
    assert parts["cpu"].default and not parts["gpu"].default
    assert (parts["cpu"].max_minutes, parts["cpu"].gpus_per_node, parts["cpu"].nodes) == (2880, 0, 120)
    gpu = parts["gpu"]
    assert (gpu.time_limit, gpu.max_minutes, gpu.nodes, gpu.gpus_per_node) == ("1-00:00:00", 1440, 24, 8)
    assert gpu.gpu_types == ("a100", "h100")
    assert (parts["short"].max_minutes, parts["short"].gpus_per_node, parts["short"].gpu_types) == (30, 2, ())
    assert parts["old"].max_minutes is None and not parts["old"].up
    assert site.gres_gpus("gpu:tesla:2,gpu:v100:1(S:0)") == (3, ("tesla", "v100"))
    assert site.gres_gpus("gpu") == (1, ()) and site.gres_gpus("(null)") == (0, ())


def test_sacctmgr_limits_of_the_users_associations_and_their_qos():
    limits = site.parse_submit_limits(ASSOC.replace("hpc|", ""), QOS)  # as asked: without the Cluster column
    assert limits.accounts == ("proj1", "proj2") and limits.qos == ("normal", "long")
    shown = {(lim.key, lim.value, lim.owner) for lim in limits.limits}
    assert shown == {("MaxJobs", 50, "account proj2 partition gpu"), ("MaxSubmitJobsPerUser", 500, "QOS normal"),
                     ("MaxSubmitJobsPerUser", 20, "QOS long"), ("MaxJobsPerUser", 4, "QOS long")}
    assert limits.max_submit == 20  # MaxJobs caps running jobs only; debug's QOS is not the user's
    assert site.parse_submit_limits("root||normal||||\n", "normal|||\n").max_submit is None


class FakeSlurm:
    """A stand-in for site.ask: sbatch answers a job id (or refuses), squeue / sacct a canned line."""

    def __init__(self, squeue: str = "", sbatch_error: str = ""):
        self.squeue, self.sbatch_error, self.calls = squeue, sbatch_error, []

    def __call__(self, cmd, timeout=30):
        self.calls.append(cmd)
        if cmd[0] == "sbatch" and self.sbatch_error:
            raise site.SiteError(f"sbatch: {self.sbatch_error}")
        return {"sbatch": "77\n", "squeue": self.squeue}.get(cmd[0], "")


def test_a_probe_job_that_never_starts_is_cancelled_and_leaves_nothing(tmp_path, monkeypatch):
    fake = FakeSlurm(squeue="PENDING|Priority|\n")
    monkeypatch.setattr(site, "ask", fake)
    probe = site.probe_runs_root(tmp_path / "a" / "runs", timeout_s=0, flags=("--partition=gpu",))
    assert probe.visible is None and "did not run within 0 s (PENDING, Priority; cancelled)" in probe.detail
    sbatch = fake.calls[0]
    assert sbatch[0] == "sbatch" and "--partition=gpu" in sbatch and "--time=1" in sbatch
    assert ["scancel", "77"] in fake.calls
    assert list(tmp_path.iterdir()) == []  # the runs root made for the probe is gone again


def test_a_probe_job_that_ended_without_its_file_here_means_the_runs_root_is_not_shared(tmp_path, monkeypatch):
    monkeypatch.setattr(site, "ask", FakeSlurm(squeue="COMPLETED|None|gpu007\n"))
    probe = site.probe_runs_root(tmp_path, timeout_s=60, grace_s=0)
    assert probe.visible is False
    assert "ended COMPLETED on gpu007" in probe.detail and "not the same directory on the compute nodes" in probe.detail


def test_a_refused_probe_job_says_slurms_reason(tmp_path, monkeypatch):
    monkeypatch.setattr(site, "ask", FakeSlurm(sbatch_error="error: invalid partition specified: gpu"))
    probe = site.probe_runs_root(tmp_path, timeout_s=60)
    assert probe.visible is None and probe.detail == ("the probe job was refused: sbatch: error: invalid partition "
                                                      "specified: gpu")


def gpu_sweep(tmp_path: Path, **stages):
    """A spec on the example GPU profile (partition gpu, 4 GPUs per node, 1 day) with these stages' resources."""
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({
        "sweep": "s", "profile": "example-gpu-cluster", "grid": {"seed": [0, 1, 2]},
        "defaults": {"data": {"name": "digits", "batch_size": 240}, "model": {"name": "mlp", "width": 8}},
        "stages": {name: {"resources": resources} for name, resources in stages.items()}}))
    return load_sweep(path)


def test_stages_are_checked_against_their_partitions_time_gpus_nodes_and_limits(tmp_path):
    sweep = gpu_sweep(tmp_path, fits={}, long={"time": "2-00:00:00", "gpus_per_node": 8, "nodes": 30},
                      nowhere={"partition": "a100"}, default={"partition": None, "gpus_per_node": 0})
    facts = {s.name: stage_fact(s, Site(site.parse_partitions(SINFO), 1001, None)) for s in sweep.stages}
    assert facts["fits"].status == OK
    assert facts["fits"].detail == "3 runs on partition gpu: time 1-00:00:00 within 1-00:00:00, 1 node, 4 GPUs per node"
    assert facts["long"].status == PROBLEM and facts["long"].detail == (  # 8 GPUs: the h100 nodes have them
        "time 2-00:00:00 is longer than partition gpu's limit 1-00:00:00; 30 nodes, but partition gpu has 24")
    assert facts["nowhere"].detail == "partition 'a100' does not exist (partitions: cpu, gpu, short, old)"
    assert facts["default"].status == OK and "on partition cpu" in facts["default"].detail
    small = stage_fact(sweep.stage("fits"), Site(site.parse_partitions(SINFO), 2, 1))
    assert small.status == PROBLEM and small.detail == ("3 array tasks, more than the 1 jobs you may have queued "
                                                        "(pack several runs per task: resources.runs_per_task)")
    split = stage_fact(sweep.stage("fits"), Site(site.parse_partitions(SINFO), 2, None))
    assert split.status == OK and split.detail.endswith("; split into 2 arrays (MaxArraySize 2)"), split.detail


def test_data_missing_is_a_problem_and_built_in_data_is_fine(tmp_path, monkeypatch):
    monkeypatch.setenv("ASBATCH_DATA", str(tmp_path / "data"))
    cifar = load_sweep(REPO / "tests" / "specs" / "good" / "fine_tune_c100.yaml")
    fact = data_fact(cifar)
    assert fact.status == PROBLEM and f"missing {tmp_path / 'data'}/cifar-100-python/train" in fact.detail
    assert data_fact(load_sweep(REPO / "jobs" / "quickstart.yaml")).detail == \
        "digits_0to7, digits_8to9 built in (no files)"


def test_wandb_credentials_from_the_key_or_the_netrc_entry_of_its_host(tmp_path):
    home = {"HOME": str(tmp_path)}
    assert wandb_credentials({**home, "WANDB_API_KEY": "x"}) == ("WANDB_API_KEY is set", "")
    assert wandb_credentials(home) == ("", f"no WANDB_API_KEY, no {tmp_path / '.netrc'}")
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password k3y\n")
    assert wandb_credentials(home) == (f"{tmp_path / '.netrc'} has an entry for api.wandb.ai", "")
    local = {**home, "WANDB_BASE_URL": "https://wandb.example.org"}
    assert wandb_credentials(local) == ("", f"no WANDB_API_KEY, no wandb.example.org entry in {tmp_path / '.netrc'}")
    offline = wandb_facts({**home, "WANDB_MODE": "offline"}, None)[0]
    assert offline.status == OK and offline.detail.startswith("WANDB_MODE=offline (from the environment)")


def test_without_sbatch_the_local_executor_and_still_wandb_and_the_spec(tmp_path):
    env = {"PATH": str(tmp_path), "HOME": str(tmp_path), "WANDB_API_KEY": None, "WANDB_MODE": None}
    result = invoke("doctor", REPO / "jobs" / "quickstart.yaml", "--runs-root", tmp_path / "runs", env=env)
    assert result.exit_code == 0, result.output
    facts = report(result.output)
    assert list(facts) == ["Slurm", "W&B", "spec", "data"] and {status for status, _ in facts.values()} == {OK}
    assert facts["Slurm"][1].startswith("no Slurm here (no sbatch on PATH): the local executor")
    assert result.output.splitlines()[-1] == "no problems"
    bad = invoke("doctor", REPO / "tests" / "specs" / "bad" / "after_cycle.yaml", env=env)
    rejected(bad, "after_cycle.yaml")
    rejected(invoke("doctor", "--runs-root", tmp_path, env={**env, "WANDB_MODE": "loud"}), "WANDB_MODE='loud'")


def report(output: str) -> dict[str, tuple[str, str]]:
    """The report's lines as {name: (status, detail)} (the name column ends at two spaces), the summary left out."""
    rows = [re.fullmatch(r"(\w+) +(.+?)  +(.*)", line) for line in output.splitlines()[:-1]]
    assert all(rows), output
    return {m.group(2): (m.group(1), m.group(3)) for m in rows}


@pytest.mark.slurm
def test_doctor_on_the_local_cluster_reads_its_real_facts_and_probes_the_runs_root(local_slurm, tmp_path):
    env = {"HOME": str(tmp_path), "WANDB_API_KEY": None, "WANDB_MODE": None, "NETRC": None,
           "ASBATCH_DATA": str(tmp_path / "data")}
    runs = tmp_path / "runs"
    result = invoke("doctor", "--runs-root", runs, env=env)
    assert result.exit_code == 0, result.output
    facts = report(result.output)
    assert re.fullmatch(r"version \d+\.\d+\.\d+", facts["Slurm"][1]) and facts["Slurm"][0] == OK
    assert facts["MaxArraySize"] == (OK, "1001 (array task ids 0-1000: at most 1001 runs per array)")
    assert facts["partition debug (default)"] == (OK, "time limit infinite, 2 nodes, no GPUs, up")
    assert facts["accounting"] == (OK, "on (accounting_storage/slurmdbd; sacct answers)")
    assert facts["submit limits"][0] == OK and re.fullmatch(r"none set \(account \w+, QOS normal\)",
                                                            facts["submit limits"][1])
    assert facts["runs root"][0] == OK and re.fullmatch(
        rf"{runs}: probe job \d+ on n[12] wrote a file there, read back here", facts["runs root"][1])
    assert facts["W&B"][0] == "warning"
    assert result.output.splitlines()[-1] == "no problems (1 warning: W&B)"
    assert not runs.exists()  # the probe's file and the runs root it made are gone

    gpu_spec = invoke("doctor", REPO / "tests" / "specs" / "good" / "fine_tune_c100.yaml", "--runs-root", runs,
                      "--no-probe", env=env)
    assert gpu_spec.exit_code == 1, gpu_spec.output
    lines, facts = gpu_spec.output.splitlines(), report(gpu_spec.output)
    assert facts["runs root"] == ("skipped", f"{runs}: not checked from a compute node (--no-probe)")
    assert facts["stage pretrain"] == (PROBLEM, "1 GPU per node, but partition debug has no GPUs")
    assert facts["data"][0] == PROBLEM and facts["data"][1].startswith("cifar100: missing ")
    assert lines[-1] == "3 problems: stage pretrain, stage fine_tune, data (1 warning: W&B)"

    gpu_profile = invoke("doctor", REPO / "jobs" / "quickstart.yaml", "profile=example-gpu-cluster", "--runs-root",
                         runs, "--no-probe", env=env)
    assert gpu_profile.exit_code == 1, gpu_profile.output
    assert report(gpu_profile.output)["stage train"] == (PROBLEM, "partition 'gpu' does not exist (partitions: debug)")
    assert gpu_profile.output.splitlines()[-1] == "1 problem: stage train"
