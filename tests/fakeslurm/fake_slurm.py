"""A stand-in for sbatch / squeue / sacct / scancel / scontrol, for testing asbatch's Slurm logic without a
cluster (as submitit fakes them in its own unit tests). Installed by `FakeSlurm` as executables on PATH;
every command reads and writes one JSON state file ($FAKE_SLURM_STATE):

    {"next_id": 1000, "sacct_down": false, "calls": [[argv...], ...],
     "jobs": {"1000_0": {"array": "1000", "name": "s:train", "dependency": null, "script": "...",
                         "squeue": ["PENDING", "Priority"] | null, "sacct": "PENDING" | null}}}

`squeue` null: squeue has forgotten the job (after MinJobAge); `sacct` null: not in the accounting DB.
Tests change states with `FakeSlurm.set(...)`; nothing here schedules or runs anything.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path


def _load() -> dict:
    return json.loads(Path(os.environ["FAKE_SLURM_STATE"]).read_text())


def _save(state: dict) -> None:
    Path(os.environ["FAKE_SLURM_STATE"]).write_text(json.dumps(state, indent=1))


def _ids(argv: list[str]) -> list[str]:
    return argv[argv.index("-j") + 1].split(",") if "-j" in argv else []


def _matches(job: str, info: dict, wanted: list[str]) -> bool:
    return job in wanted or info["array"] in wanted


def sbatch(state: dict, argv: list[str]) -> int:
    script = Path(argv[-1]).read_text()
    flags = dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(.*))?$", script, re.MULTILINE))
    job = str(state["next_id"])
    state["next_id"] += 1
    array = re.fullmatch(r"0-(\d+)(?:%\d+)?", flags.get("array", "") or "")
    tasks = [f"{job}_{i}" for i in range(int(array.group(1)) + 1)] if array else [job]
    dependency = flags.get("dependency")
    for task in tasks:
        state["jobs"][task] = {"array": job, "name": flags.get("job-name"), "dependency": dependency,
                               "script": argv[-1], "squeue": ["PENDING", "Dependency" if dependency else "Priority"],
                               "sacct": "PENDING"}
    print(f"Submitted batch job {job}")
    return 0


def squeue(state: dict, argv: list[str]) -> int:
    wanted = _ids(argv)
    known = {j: i for j, i in state["jobs"].items() if _matches(j, i, wanted)}
    if wanted and not known:
        print("slurm_load_jobs error: Invalid job id specified", file=sys.stderr)
        return 1
    for job, info in known.items():
        if info["squeue"]:
            print(f"{job}|{info['squeue'][0]}|{info['squeue'][1] or 'None'}")
    return 0


def sacct(state: dict, argv: list[str]) -> int:
    if state.get("sacct_down"):
        print("sacct: error: Slurm accounting storage is disabled", file=sys.stderr)
        return 1
    for job, info in state["jobs"].items():
        if _matches(job, info, _ids(argv)) and info["sacct"]:
            print(f"{job}|{info['sacct']}")
    return 0


def scancel(state: dict, argv: list[str]) -> int:
    wanted = [a for a in argv[1:] if not a.startswith("-")]
    for job, info in state["jobs"].items():
        if _matches(job, info, wanted) and (info["squeue"] or ["COMPLETED"])[0] in ("PENDING", "RUNNING"):
            info["squeue"], info["sacct"] = ["CANCELLED", None], "CANCELLED by 0"
    return 0


def scontrol(state: dict, argv: list[str]) -> int:
    if argv[1:3] == ["show", "config"] and state.get("max_array_size"):
        print(f"MaxArraySize            = {state['max_array_size']}")
    elif argv[1:3] == ["show", "node"]:
        print(f"NodeName={argv[3]} NodeAddr=127.0.0.1")
    elif argv[1] == "update":  # JobId=<array>_[i,j] or <array>_<i>, Dependency=<spec>
        fields = dict(a.split("=", 1) for a in argv[2:])
        array, _, tasks = fields["JobId"].partition("_")
        for task in tasks.strip("[]").split(","):
            state["jobs"][f"{array}_{task}"]["dependency"] = fields["Dependency"] or None
    return 0


def test_only(state: dict, argv: list[str]) -> int:
    """`sbatch --test-only ...`: accepts what the state does not refuse (`refuse`: a flag -> Slurm's reason)."""
    for flag, reason in state.get("refuse", {}).items():
        if flag in argv:
            print(f"sbatch: error: {reason}", file=sys.stderr)
            return 1
    print("sbatch: Job 1 to start at 2026-12-06T12:00:00 using 1 processors on nodes n1 in partition debug",
          file=sys.stderr)
    return 0


def main(command: str) -> int:
    state = _load()
    if command == "sbatch" and "--test-only" in sys.argv:  # counted apart: it queues nothing
        command = "sbatch-test-only"
    state["calls"].append([command, *sys.argv[1:]])
    commands = {"sbatch": sbatch, "sbatch-test-only": test_only, "squeue": squeue, "sacct": sacct,
                "scancel": scancel, "scontrol": scontrol}
    code = commands[command](state, [command, *sys.argv[1:]])
    _save(state)
    return code


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[0]).name))
