"""Which configs are one experiment: a run's resolved config minus its seed and the keys that do not change the science.

Runs are seeds of one experiment exactly when their `experiment_config`s are equal; tables, plots and the
per-run frame all group by it, so runs of different configs are never averaged as seeds. The keys left out
are listed once, in `NOT_SCIENCE`, each with the reason. A fine-tune's `model.init_from: run:<id>` differs
per seed (it names the seed's own upstream run), so it is replaced by the upstream run's experiment config
under `model.init_from.<key>`: fine-tunes of the same pretraining recipe pool, of different recipes do not.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from asbatch.rundir import RUN_REF_PREFIX, ref_run_id

# Config keys (dotted; a section name covers all its keys) that are not part of the experiment.
NOT_SCIENCE: dict[str, str] = {
    "seed": "what n counts: runs that differ only in it are the seeds of one experiment",
    "sweep": "a name; only runs of the sweep are read anyway",
    "stage": "a name; what a stage trains is in the rest of the config",
    "tracking": "W&B bookkeeping (the run id leaves it out too)",
    "speed.poll_every": "how often the loop reads the device: never changes a number (the run id leaves it out "
                        "too; speed.compile, which changes rounding, is kept)",
    "checkpoint_every": "exact resume: how often a run checkpoints does not change what it learns",
    "keep_checkpoints": "how many checkpoints are kept on disk",
    "cpu": "which device ran it (the precision, which does change the numbers, is kept)",
    "data.root": "where the data lives, not what it is",
    "data.test_batch_size": "evaluation batching: the model is in eval mode, the metrics do not depend on it",
}
INIT_FROM = "model.init_from"

Upstream = Callable[[str], Mapping[str, Any] | None]  # run id -> that run's flat config, None if unknown


def _plain(value: Any) -> Any:
    """Lists (JSON, W&B) as tuples, so that config values can be compared and hashed."""
    return tuple(_plain(v) for v in value) if isinstance(value, list | tuple) else value


def flatten_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config dict as {dotted key: value} (`schedule.epochs`); lists become tuples. Flat input (dotted
    keys already) comes back unchanged."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            flat.update(flatten_config(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = _plain(value)
    return flat


@functools.cache  # a handful of distinct keys, asked for every run
def is_science(key: str) -> bool:
    """Is the dotted config key part of the experiment (not in `NOT_SCIENCE`, nor under a section there)?"""
    return not any(key == k or key.startswith(k + ".") for k in NOT_SCIENCE)


def experiment_config(flat: Mapping[str, Any], upstream: Upstream = lambda _: None, depth: int = 0) -> dict[str, Any]:
    """The experiment a run belongs to: its flat config without the `NOT_SCIENCE` keys, `model.init_from:
    run:<id>` replaced by that run's experiment config (`model.init_from.<key>`, via `upstream`), or by
    `run:<stage>` when the upstream run is not among the runs read."""
    science = {k: v for k, v in flat.items() if is_science(k)}
    ref = science.get(INIT_FROM)
    try:
        run_id = ref_run_id(ref) if isinstance(ref, str) else None
    except ValueError:  # a malformed reference: keep it as it is
        run_id = None
    if run_id is None:
        return science
    del science[INIT_FROM]
    parent = upstream(run_id) if depth < 8 else None  # chains of fine-tunes, never a cycle
    if parent is None:
        science[INIT_FROM] = RUN_REF_PREFIX + run_id.rsplit("-", 1)[0]
    else:
        science.update({f"{INIT_FROM}.{k}": v for k, v in experiment_config(parent, upstream, depth + 1).items()})
    return science


def experiment_id(experiment: Mapping[str, Any]) -> str:
    """A short stable name of an experiment config ("exp-" + 8 hex digits): equal exactly for equal configs."""
    blob = repr(sorted((k, repr(v)) for k, v in experiment.items()))
    return "exp-" + hashlib.sha256(blob.encode()).hexdigest()[:8]


def differing_keys(configs: Iterable[Mapping[str, Any]], shown: Iterable[str] = ()) -> list[str]:
    """The keys whose values are not the same in all `configs` (a missing key counts as a value), sorted,
    leaving out the `shown` ones (which the reader sees elsewhere, e.g. lambda in the row label)."""
    configs = list(configs)
    keys = sorted({k for c in configs for k in c} - set(shown))
    return [k for k in keys if len({repr(c.get(k, MISSING)) for c in configs}) > 1]


MISSING = "unset"  # the value shown for a key a config does not have (written by an older asbatch)


def show_value(value: Any) -> str:
    """A config value as the tables and figures name it: 8, 0.001, cosine, None, (80, 140)."""
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return "(" + ", ".join(map(show_value, value)) + ")"
    return str(value)
