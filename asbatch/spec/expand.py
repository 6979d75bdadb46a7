"""Expanding a checked spec into runs: one `RunConfig` (and stable run id) per grid point and stage.

A run's config is defaults < grid point < stage config, then `sweep`, `stage` and (for `init_from`)
`model.init_from` are set by the spec. A stage's `grid_ignore` keys are not applied in that stage at all, so
grid points that differ only there collapse into one run. A run's upstream ("matching") run in an `after`
stage is the one expanded from the same grid point; `init_from: <stage>` sets `model.init_from =
"run:<upstream run id>"`, so a fine-tune run's id changes whenever its upstream run's config does.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from asbatch.config import RunConfig
from asbatch.rundir import run_ref
from asbatch.spec.checks import check_init_from, check_run
from asbatch.spec.errors import SpecError, dotted, format_validation_error, in_file, show
from asbatch.spec.loading import kind, read_yaml
from asbatch.spec.resources import Resources
from asbatch.spec.schema import CONFIG_PATHS, DEFAULT_STAGE, SPEC_KEYS, Spec, kept_keys, parse_spec, suggest_path

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


def load_spec(path: str | Path, overrides: Mapping[str, Any] | None = None) -> Spec:
    """Read, validate and cross-check a spec file (or a one-run config file, see `load_sweep`); every problem
    is a SpecError prefixed with the path."""
    path = Path(path)
    with in_file(path):
        data, defaults_at = as_spec(apply_overrides(read_yaml(path), overrides or {}))
        return parse_spec(data, base_dir=path.parent, source=path, defaults_at=defaults_at)


def load_sweep(path: str | Path, overrides: Mapping[str, Any] | None = None,
               runs_root: str | Path | None = None) -> Sweep:
    """Expand a spec file; a file holding one run's config (RunConfig fields at the top level, no
    defaults / grid / stages / profile) is taken as a spec of that single run, and its messages name the
    fields as written (`optim.lr`, not `defaults.optim.lr`).

    `overrides` ({dotted path in the file: value}, e.g. {"defaults.optim.lr": 0.1}) are applied to the file's
    data before anything is validated, so they get the same checks and messages. With `runs_root`, a
    `model.init_from: run:<id>` of an earlier submission must have finished there."""
    path = Path(path)
    spec = load_spec(path, overrides)
    return expand(spec, runs_root=Path(runs_root) if runs_root is not None else None)


def apply_overrides(data: Any, overrides: Mapping[str, Any]) -> Any:
    """`data` with each dotted path set to its value (mappings on the way are created, and copied rather than
    changed: YAML aliases may share them). `grid.<key>` takes the rest of the path as one grid key."""
    for dotted_path, value in overrides.items():
        parts = str(dotted_path).split(".")
        if parts[0] == "grid" and len(parts) > 2:
            parts = ["grid", ".".join(parts[1:])]
        if not all(parts):
            raise SpecError(f"{dotted_path}: not a dotted field path")
        data = _set(data, parts, value, dotted_path, ())
    return data


def _set(node: Any, parts: list[str], value: Any, full: str, done: tuple[str, ...]) -> Any:
    if node is None:
        node = {}
    if not isinstance(node, dict):
        raise SpecError(f"{full}: {'.'.join(done) or 'the top level'} is {kind(node)}, not a mapping")
    node = dict(node)
    child = node.get(parts[0])
    node[parts[0]] = value if len(parts) == 1 else _set(child, parts[1:], value, full, (*done, parts[0]))
    return node


def as_spec(data: Any) -> tuple[Any, tuple[str, ...]]:
    """(spec data, where its defaults sit in the file): a one-run config file becomes a one-stage spec."""
    if not isinstance(data, dict) or data.keys() & {"defaults", "grid", "stages", "profile"}:
        return data, ("defaults",)
    config = dict(data)
    sweep, stage = config.pop("sweep", "default"), config.pop("stage", DEFAULT_STAGE)
    if not isinstance(stage, str):
        hint = "; did you mean 'stages'?" if isinstance(stage, dict) else ""
        raise SpecError(f"stage: expected the name of the run's stage (got {show(stage)}){hint}")
    for key in config:
        if key not in CONFIG_PATHS:  # a spec key with a typo ('grids') or a RunConfig field with one
            raise SpecError(f"{key}: unknown key{suggest_path(key, [*SPEC_KEYS, *RunConfig.model_fields])}")
    return {"sweep": sweep, "defaults": config, "stages": {stage: {}}}, ()


def expand(spec: Spec, runs_root: Path | None = None) -> Sweep:
    """All runs of every stage, cross-checked (see `asbatch.spec.checks`); a run that fails RunConfig
    validation is a SpecError naming its spec field."""
    with in_file(spec.source) if spec.source else contextlib.nullcontext():
        matches: dict[str, dict[tuple, str]] = {}  # stage -> grid point (its kept keys) -> run id
        runs: dict[str, tuple[str, RunConfig]] = {}  # run id -> (stage, config), for init_from checks
        stages = [_expand_stage(spec, name, matches, runs, runs_root) for name in spec.stages]
    return Sweep(name=spec.sweep, stages=stages, env=dict(spec.profile.env) if spec.profile else {})


def _expand_stage(spec: Spec, name: str, matches: dict[str, dict[tuple, str]],
                  runs_so_far: dict[str, tuple[str, RunConfig]], runs_root: Path | None) -> SweepStage:
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
        where = functools.partial(_origin, spec, name, point)
        resources = spec.resources[name]
        check_run(config, where, processes=resources.nodes * max(1, resources.gpus_per_node))
        check_init_from(config, where, runs_so_far, stage.after, runs_root)
        runs.append(SweepRun(config, run_id, upstream, {k: spec.grid[k][i] for k, i in point.items()}))
    runs_so_far.update({run.run_id: (name, run.config) for run in runs})
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
    return dotted((*spec.defaults_at, *loc)) if _sets(spec.defaults, loc) else dotted(loc)


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
