"""Property: no malformed spec ever gets past the door as a traceback. Hypothesis mutates a valid spec (any
field set to a hostile value: control characters, non-finite and huge numbers, wrong types, new keys) and
writes random text and bytes; through `asbatch submit --dry-run` the answer is always exit 0 (still valid)
or exit 2 with exactly one `error:` line naming the file, and nothing is written."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import yaml
from cli_helpers import invoke
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

BASE = {
    "sweep": "prop",
    "profile": "local",
    "defaults": {"cpu": True, "data": {"name": "digits", "batch_size": 64, "train_subset": 256},
                 "model": {"name": "mlp", "width": 8, "bayesian": False},
                 "optim": {"lr": 0.01}, "schedule": {"name": "cosine", "epochs": 1},
                 "adversarial": {"lam": 0.0}, "eval": {"num_samples": 2},
                 "tracking": {"tags": ["x"]}},
    "grid": {"seed": [0, 1], "optim.lr": [0.1, 0.01]},
    "stages": {"pre": {"resources": {"time": "00:10:00", "mem_gb": 1, "extra": {"mail-type": "END"}}},
               "post": {"after": "pre", "init_from": "pre", "config": {"model": {"bayesian": True}},
                        "grid_ignore": []}},
}
HOSTILE = st.one_of(
    st.text(max_size=12),  # includes control characters, surrogates excluded by hypothesis' default alphabet
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.booleans(),
    st.none(),
    st.lists(st.one_of(st.integers(-3, 3), st.text(max_size=3)), max_size=3),
    st.dictionaries(st.text(max_size=6), st.integers(-2, 2), max_size=2),
    st.sampled_from(["resnet21", "cifar11", "1-24:00:00", "../x", "run:../../x", "", "\n#SBATCH --qos=x", "%j",
                     ".inf", "pre", "post", "svhn", "gpu:2", "true", "sgd", "fp16", "0.0001", "run:pre-0123456789"]),
)


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(node, dict):
        for key, value in node.items():
            out += _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            out += _paths(value, (*prefix, i))
    return out


PATHS = _paths(BASE)[1:]


def _mutated(base: dict, path: tuple, value: Any, new_key: str | None) -> dict:
    spec = yaml.safe_load(yaml.safe_dump(base))  # a deep copy
    node = spec
    for part in path[:-1]:
        node = node[part]
    if new_key is not None and isinstance(node, dict):
        node[new_key] = value
    else:
        node[path[-1]] = value
    return spec


def _check(text: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / "spec.yaml"
        spec.write_bytes(text)
        result = invoke("submit", spec, "--dry-run", "--runs-root", Path(tmp) / "runs")
        assert "Traceback" not in result.output, result.output
        assert result.exception is None or isinstance(result.exception, SystemExit), result.output
        assert result.exit_code in (0, 2), result.output
        if result.exit_code == 2:
            lines = result.output.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith(f"error: {spec}: "), result.output
        assert not (Path(tmp) / "runs").exists()


FAST = settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


MUTATION = st.tuples(st.sampled_from(PATHS), HOSTILE, st.one_of(st.none(), st.text(max_size=8)))


@FAST
@given(mutations=st.lists(MUTATION, min_size=1, max_size=3))
def test_a_mutated_spec_is_accepted_or_one_line(mutations):
    spec = BASE
    for path, value, new_key in mutations:
        try:
            spec = _mutated(spec, path, value, new_key)
        except (KeyError, IndexError, TypeError):  # an earlier mutation replaced what this one points into
            continue
    _check(yaml.safe_dump(spec, allow_unicode=True).encode("utf-8", "surrogatepass"))


@FAST
@given(text=st.one_of(st.binary(max_size=200), st.text(max_size=200).map(lambda t: t.encode("utf-8", "replace"))))
def test_random_bytes_are_one_line(text):
    _check(text)
