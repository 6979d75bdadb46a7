"""`FakeSlurm`: fake Slurm commands on PATH with a state the test sets (see fake_slurm.py)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

SCRIPT = Path(__file__).with_name("fake_slurm.py")
COMMANDS = ("sbatch", "squeue", "sacct", "scancel", "scontrol")


class FakeSlurm:
    """Installs the fake commands in `root/bin` (put first on PATH by `activate`) with an empty state."""

    def __init__(self, root: Path, first_id: int = 1000):
        self.bin = root / "bin"
        self.bin.mkdir(parents=True, exist_ok=True)
        self.state_file = root / "state.json"
        self.state_file.write_text(json.dumps({"next_id": first_id, "sacct_down": False, "calls": [], "jobs": {}}))
        for name in COMMANDS:
            exe = self.bin / name
            exe.write_text(f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {str(SCRIPT.parent)!r})\n"
                           f"import fake_slurm\nsys.exit(fake_slurm.main({name!r}))\n")
            exe.chmod(0o755)

    def activate(self, monkeypatch) -> FakeSlurm:
        monkeypatch.setenv("PATH", f"{self.bin}{os.pathsep}{os.environ['PATH']}")
        monkeypatch.setenv("FAKE_SLURM_STATE", str(self.state_file))
        return self

    @property
    def state(self) -> dict:
        return json.loads(self.state_file.read_text())

    def _write(self, state: dict) -> None:
        self.state_file.write_text(json.dumps(state, indent=1))

    def set(self, job: str, squeue: tuple[str, str] | None = None, sacct: str | None = None) -> None:
        """Give a job (task) the state squeue and sacct report; None: that command does not know it."""
        state = self.state
        state["jobs"][job].update(squeue=list(squeue) if squeue else None, sacct=sacct)
        self._write(state)

    def set_max_array_size(self, size: int) -> None:
        state = self.state
        state["max_array_size"] = size
        self._write(state)

    def refuse(self, flag: str, reason: str) -> None:
        """`sbatch --test-only` with `flag` among its arguments fails with `reason`."""
        state = self.state
        state.setdefault("refuse", {})[flag] = reason
        self._write(state)

    def set_sacct_down(self, down: bool = True) -> None:
        state = self.state
        state["sacct_down"] = down
        self._write(state)

    def calls(self, command: str) -> list[list[str]]:
        return [c[1:] for c in self.state["calls"] if c[0] == command]

    def job(self, job: str) -> dict:
        return self.state["jobs"][job]
