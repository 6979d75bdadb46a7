"""Cross-field and cross-stage checks of expanded runs: what would otherwise fail hours into a sweep.

- `data.batch_size` fits in the training set (a training epoch needs one full batch) and splits evenly over
  the stage's processes;
- `eval.ood` is another data set with the training set's image shape;
- `model.init_from` names a deterministic run of the same model, width, classes and input channels: an
  upstream run of this sweep (`init_from: <stage>`, or `run:<id>` of an `after` stage), a finished run in
  the runs root, or a run dir / file that exists now (a run dir's config is compared; a bare weights file
  is left to `asbatch.cli`, which can load it).

Each check gets `where(loc)`: the spec field that set the RunConfig value at `loc`, for the message.
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

from asbatch.config import RunConfig
from asbatch.datafiles import FACTS
from asbatch.rundir import RunDir, SweepDir, ref_run_id
from asbatch.spec.errors import SpecError, show, user_path

Where = Callable[[tuple], str]


def check_run(config: RunConfig, where: Where, processes: int = 1) -> None:
    """The checks one run's config allows on its own: batch size against the data and the stage's processes
    (`nodes` x one per GPU: each takes an equal share of every global batch), the OOD set."""
    if config.data.batch_size % processes:
        raise SpecError(f"{where(('data', 'batch_size'))}: {config.data.batch_size} does not split evenly over the "
                        f"{processes} processes of stage {config.stage!r} (nodes x max(1, gpus_per_node))")
    data = FACTS[config.data.name]
    n_train = min(data.train_size, config.data.train_subset or data.train_size)
    if config.data.batch_size > n_train:
        raise SpecError(f"{where(('data', 'batch_size'))}: {config.data.batch_size} is more than the {n_train} "
                        f"training examples of {config.data.name} (an epoch needs one full batch)")
    ood = config.eval.ood
    if ood is None:
        return
    if ood == config.data.name:
        raise SpecError(f"{where(('eval', 'ood'))}: {ood!r} is the training set itself; out-of-distribution data "
                        "must be another data set")
    if FACTS[ood].image_shape != data.image_shape:
        raise SpecError(f"{where(('eval', 'ood'))}: {ood!r} images are {_shape(FACTS[ood].image_shape)}, "
                        f"{config.data.name} images {_shape(data.image_shape)}; the OOD set needs the training "
                        "set's image shape")


def check_init_from(config: RunConfig, where: Where, sweep_runs: Mapping[str, tuple[str, RunConfig]],
                    upstream_stages: list[str], runs_root: Path | None) -> None:
    """`model.init_from` of one run: a run of this sweep in an `after` stage, a finished run under the runs
    root (when known), or a path that exists; whichever it is must fit (see `fits`)."""
    value = config.model.init_from
    if value is None:
        return
    field = where(("model", "init_from"))
    try:
        run_id = ref_run_id(value)
    except ValueError as err:
        raise SpecError(f"{field}: {err}") from None
    try:
        _check_init_source(config, field, value, run_id, sweep_runs, upstream_stages, runs_root)
    except OSError as err:  # a name too long for the file system, a path through a file
        raise SpecError(f"{field}: cannot look at {show(value)}: {err.strerror or err}") from None


def _check_init_source(config: RunConfig, field: str, value: str, run_id: str | None,
                       sweep_runs: Mapping[str, tuple[str, RunConfig]], upstream_stages: list[str],
                       runs_root: Path | None) -> None:
    if run_id is not None and run_id in sweep_runs:
        stage, upstream = sweep_runs[run_id]
        if stage not in upstream_stages:
            raise SpecError(f"{field}: run {run_id} is in stage {stage!r}, which this run's stage does not run "
                            f"after; add {stage!r} to its `after`")
        return fits(config, upstream.to_dict(), f"{field}: upstream run {run_id}")
    if run_id is not None:
        if runs_root is None:
            return  # a run of an earlier submission: checked where the runs root is known
        run_dir = SweepDir.at(runs_root, config.sweep).run(run_id)
        weights = run_dir.model_file
        if not weights.is_file():
            raise SpecError(f"{field}: run {run_id} has no trained model in {run_dir.path.parent} (no such run, or "
                            "it has not finished)")
    else:
        path = user_path(value, field)
        run_dir = RunDir(path if path.is_dir() else path.parent)
        weights = run_dir.model_file if path.is_dir() else path
        if not weights.is_file():
            raise SpecError(f"{field}: no trained model at {show(str(weights))}")
        if not zipfile.is_zipfile(weights):
            raise SpecError(f"{field}: {show(str(weights))} is not a weights file (torch.save writes a zip archive)")
    if weights == run_dir.model_file and run_dir.config_file.is_file():
        try:
            source = run_dir.read_config()
        except (OSError, ValueError, yaml.YAMLError):
            raise SpecError(f"{field}: {run_dir.config_file} cannot be read, so {show(value)} cannot be "
                            "checked") from None
        if not isinstance(source, dict):
            raise SpecError(f"{field}: {run_dir.config_file} is not a run config")
        fits(config, source, f"{field}: {show(value)}")


def fits(config: RunConfig, source: dict[str, Any], what: str) -> None:
    """A run initialised from `source` (a run's config as a dict) needs its deterministic weights of the same
    architecture: model name, width, number of classes and input channels."""
    model, data = source.get("model") or {}, source.get("data") or {}
    if model.get("bayesian", True):
        raise SpecError(f"{what} trains a Bayesian net; init_from needs a deterministic one (model.bayesian: false)")
    mine = _architecture(config.model.name, config.model.width, config.data.name)
    theirs = _architecture(model.get("name"), model.get("width"), data.get("name"))
    for key, value in mine.items():
        if theirs.get(key) != value:
            raise SpecError(f"{what} has {key} {theirs.get(key)!r}, this run {value!r}; init_from needs the same "
                            "architecture")


def _architecture(model: Any, width: Any, dataset: Any) -> dict[str, Any]:
    facts = FACTS.get(dataset)
    return {"model": model, "width": width, "classes": facts and facts.num_classes,
            "input channels": facts and facts.image_shape[0]}


def _shape(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))
