"""Expanding a checked spec into runs: one `RunConfig` (and stable run id) per grid point and stage.

A run's config is defaults < grid point < stage config, then `sweep`, `stage` and (for `init_from`)
`model.init_from` are set by the spec. A stage's `grid_ignore` keys are not applied in that stage at all, so
grid points that differ only there collapse into one run. A run's upstream ("matching") run in an `after`
stage is the one expanded from the same grid point; `init_from: <stage>` sets `model.init_from =
"run:<upstream run id>"`, so a fine-tune run's id changes whenever its upstream run's config does.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from asbatch.config import RunConfig
from asbatch.rundir import run_ref
from asbatch.spec.errors import SpecError, dotted, format_validation_error, in_file
from asbatch.spec.loading import read_yaml
from asbatch.spec.resources import Resources
from asbatch.spec.schema import DEFAULT_STAGE, Spec, kept_keys, parse_spec

Point = dict[str, int]  # grid key -> index into its value list


@dataclass(frozen=True)
class SweepRun:
    """One run of a stage. `upstream`: stage -> id of the matching run this one runs after."""

    config: RunConfig
    run_id: str
    upstream: dict[str, str]
    point: dict[str, Any]  # the grid values applied to this run (its stage's grid_ignore keys left out)


@dataclass(frozen=True)
class SweepStage:
    """One stage, expanded: its runs become one job array after the arrays of `after`."""

    name: str
    resources: Resources
    after: list[str]
    runs: list[SweepRun]
    init_from: str | None = None


@dataclass(frozen=True)
class Sweep:
    """A spec, expanded: stages in dependency order; `env` (from the profile) is exported in every job."""

    name: str
    stages: list[SweepStage]
    env: dict[str, str] = field(default_factory=dict)

    def stage(self, name: str) -> SweepStage:
        return next(s for s in self.stages if s.name == name)

    @property
    def runs(self) -> list[SweepRun]:
        return [run for stage in self.stages for run in stage.runs]

    def select_stages(self, names: Sequence[str] | None) -> list[SweepStage]:
        """The named stages in dependency order (every stage for None or none); unknown names are a SpecError."""
        known = [s.name for s in self.stages]
        unknown = [n for n in names or () if n not in known]
        if unknown:
            raise SpecError(f"--stage {unknown[0]!r} is not a stage of sweep {self.name!r} ({', '.join(known)})")
        return [s for s in self.stages if not names or s.name in names]


def load_spec(path: str | Path) -> Spec:
    """Read, validate and cross-check a spec file; every problem is a SpecError prefixed with the path."""
    path = Path(path)
    with in_file(path):
        return parse_spec(read_yaml(path), base_dir=path.parent, source=path)


def load_sweep(path: str | Path) -> Sweep:
    """Expand a spec file; a file holding one run's config (RunConfig fields at the top level, no
    defaults / grid / stages / profile) is taken as a spec of that single run."""
    path = Path(path)
    with in_file(path):
        data = read_yaml(path)
        if isinstance(data, dict) and not data.keys() & {"defaults", "grid", "stages", "profile"}:
            config = dict(data)
            sweep, stage = config.pop("sweep", "default"), config.pop("stage", DEFAULT_STAGE)
            data = {"sweep": sweep, "defaults": config, "stages": {stage: {}}}
        return expand(parse_spec(data, base_dir=path.parent, source=path))


def expand(spec: Spec) -> Sweep:
    """All runs of every stage; a run that fails RunConfig validation is a SpecError naming its spec field."""
    with in_file(spec.source) if spec.source else contextlib.nullcontext():
        matches: dict[str, dict[tuple, str]] = {}  # stage -> grid point (its kept keys) -> run id
        stages = [_expand_stage(spec, name, matches) for name in spec.stages]
    return Sweep(name=spec.sweep, stages=stages, env=dict(spec.profile.env) if spec.profile else {})


def _expand_stage(spec: Spec, name: str, matches: dict[str, dict[tuple, str]]) -> SweepStage:
    stage = spec.stages[name]
    keys = kept_keys(spec.grid, stage)
    runs, seen, matches[name] = [], {}, {}
    for point in _points(spec.grid, keys):
        upstream = {up: matches[up][_point_key(point, kept_keys(spec.grid, spec.stages[up]))]
                    for up in stage.after}
        config = _run_config(spec, name, point, upstream)
        run_id = config.run_id
        if run_id in seen:
            raise SpecError(_duplicate_message(spec, name, seen[run_id], point, run_id))
        seen[run_id] = point
        matches[name][_point_key(point, keys)] = run_id
        runs.append(SweepRun(config, run_id, upstream, {k: spec.grid[k][i] for k, i in point.items()}))
    return SweepStage(name, spec.resources[name], list(stage.after), runs, stage.init_from)


def _points(grid: dict[str, list[Any]], keys: list[str]) -> Iterator[Point]:
    """Grid points as {key: index into its value list}, in cartesian-product order."""
    for combo in itertools.product(*(range(len(grid[k])) for k in keys)):
        yield dict(zip(keys, combo, strict=True))


def _point_key(point: Point, keys: list[str]) -> tuple[int, ...]:
    return tuple(point[k] for k in keys)


def _run_config(spec: Spec, name: str, point: Point, upstream: dict[str, str]) -> RunConfig:
    """defaults < grid point < stage config, then what the spec owns: sweep, stage, model.init_from."""
    stage = spec.stages[name]
    values = merge(merge(spec.defaults, nest({k: spec.grid[k][i] for k, i in point.items()})), stage.config)
    values.update(sweep=spec.sweep, stage=name)
    if stage.init_from and isinstance(values.get("model", {}), dict):
        values["model"] = {**values.get("model", {}), "init_from": run_ref(upstream[stage.init_from])}
    try:
        return RunConfig.model_validate(values)
    except ValidationError as err:
        message = format_validation_error(err, RunConfig, lambda loc: _origin(spec, name, point, loc))
        if not err.errors()[0]["loc"]:  # a cross-field error: say which run
            message += f" (in the {name} run with {_describe(spec, point)})"
        raise SpecError(message) from None


def merge(base: dict, over: dict) -> dict:
    """Nested dict merge, `over` wins; neither input is modified."""
    out = dict(base)
    for key, value in over.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = merge(out[key], value) if both else value
    return out


def nest(flat: dict[str, Any]) -> dict[str, Any]:
    """{'model.name': 'vgg16'} -> {'model': {'name': 'vgg16'}} (grid keys never overlap)."""
    out: dict[str, Any] = {}
    for path, value in flat.items():
        *parents, leaf = path.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def _sets(values: dict, loc: tuple) -> bool:
    """Whether a (nested) mapping sets the value at `loc` (or the list that holds it)."""
    node: Any = values
    for part in loc:
        if isinstance(part, int):
            return True
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _origin(spec: Spec, name: str, point: Point, loc: tuple) -> str:
    """The spec field that put the value at RunConfig location `loc` there (stage config > grid > defaults)."""
    stage = spec.stages[name]
    if not loc:
        return f"stages.{name}"
    if stage.init_from and loc[:2] == ("model", "init_from"):
        return f"stages.{name}.init_from"
    if _sets(stage.config, loc):
        return dotted(("stages", name, "config", *loc))
    for key, index in point.items():
        parts = tuple(key.split("."))
        if loc[:len(parts)] == parts:
            return dotted(("grid", key, index, *loc[len(parts):]))
    return dotted(("defaults", *loc)) if _sets(spec.defaults, loc) else dotted(loc)


def _describe(spec: Spec, point: Point) -> str:
    return ", ".join(f"{k}={spec.grid[k][i]!r}" for k, i in point.items()) or "no grid values"


def _duplicate_message(spec: Spec, name: str, first: Point, second: Point, run_id: str) -> str:
    differ = [k for k in first if first[k] != second[k]]
    overridden = [k for k in differ if _sets(spec.stages[name].config, tuple(k.split(".")))]
    if overridden:
        key = overridden[0]
        return (f"grid.{key}: stages.{name}.config sets {key}, so its grid values give identical {name} runs; "
                f"add {key!r} to stages.{name}.grid_ignore")
    values = "; ".join(f"[{first[k]}]={spec.grid[k][first[k]]!r} and [{second[k]}]={spec.grid[k][second[k]]!r}"
                       for k in differ)
    lists = ", ".join(f"grid.{k}" for k in differ)
    return f"{lists}: values {values} give the same config in stage {name!r} (run id {run_id}); remove one"
