"""The layout holds: small modules with one stated job, imports that point one way, one owner of the run-dir
file names, and a lint that is clean (see ARCHITECTURE in the README)."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "asbatch"
MAX_LINES = 450

# What each part of the package may import from asbatch (a part is its first dotted name under asbatch).
# Arrows point one way: spec -> launch -> train -> run dir -> analysis; the science knows none of them.
BASE = {"asbatch", "names", "fsutil", "config", "rundir", "runshape", "datafiles", "locks"}
SCIENCE = {"bayes", "models", "adversarial", "evaluate", "data"}
ALLOWED = {
    **{part: BASE for part in BASE},
    **{part: BASE | SCIENCE for part in SCIENCE},
    "figures": BASE,
    "tracking": BASE | {"tracking", "figures"},
    "train": BASE | SCIENCE | {"train", "tracking", "figures"},
    "analysis": BASE | {"analysis", "figures", "tracking"},
    "results": BASE | {"analysis"},
    "spec": BASE | {"spec"},
    "launch": BASE | {"launch", "spec", "train"},
    "profiles": set(),
    "opcount": set(),  # counters of aten ops and device reads, used by tests and benchmarks
}
RUN_DIR_NAMES = re.compile(r"results\.json|metrics\.jsonl|manifest\.json|wandb\.json|requeues\.json|model\.pt|"
                           r"config\.yaml|\.submit\.lock|[\"'/]\.slurm\b|[\"']checkpoints[\"']")


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def part_of(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    return {("__init__",): "asbatch", ("__main__",): "cli"}.get(rel.parts, rel.parts[0])


def asbatch_imports(path: Path) -> set[str]:
    """The asbatch parts a module imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            dotted = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module == "asbatch":  # from asbatch import x
            dotted = [f"asbatch.{a.name}" for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            dotted = [node.module or ""]
        else:
            continue
        found.update(name.split(".")[1] if "." in name else name for name in dotted if name.split(".")[0] == "asbatch")
    return found


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_module_is_small_and_says_its_job_in_its_first_line(path):
    lines = path.read_text().splitlines()
    assert len(lines) <= MAX_LINES, f"{len(lines)} lines"
    doc = ast.get_docstring(ast.parse(path.read_text()))
    assert doc and doc.splitlines()[0].strip(), "needs a docstring whose first line states the module's job"


@pytest.mark.parametrize("path", [p for p in modules() if part_of(p) != "cli"], ids=lambda p: str(p.relative_to(REPO)))
def test_imports_point_one_way(path):
    part = part_of(path)
    assert part in ALLOWED, f"{part}: a new part of the package needs its place in ALLOWED"
    wrong = asbatch_imports(path) - ALLOWED[part] - {part}
    assert not wrong, f"asbatch.{part} must not import asbatch.{', asbatch.'.join(sorted(wrong))}"


def test_only_the_run_dir_module_knows_the_run_dir_file_names():
    offenders = [f"{p.relative_to(REPO)}:{i}: {line.strip()}" for p in modules() if p.name != "rundir.py"
                 for i, line in enumerate(p.read_text().splitlines(), 1) if RUN_DIR_NAMES.search(line)]
    assert offenders == []


@pytest.mark.parametrize("module", ["asbatch.spec", "asbatch.rundir", "asbatch.analysis", "asbatch.cli"])
def test_the_login_node_side_does_not_import_torch(module):
    code = f"import sys, {module}; print(sorted({{'torch', 'accelerate'}} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_ruff_is_clean():
    ruff = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    proc = subprocess.run([ruff, "check", "--no-cache", "."], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
