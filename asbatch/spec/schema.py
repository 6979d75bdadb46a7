"""A spec file as written, validated and cross-checked: stages, grid keys, dependencies, run count, profile.

    sweep: fine_tune_c100                  # letters, digits, - _ . ; runs live in <runs root>/<sweep>/<run id>
    profile: local                         # optional: resource defaults (asbatch/profiles/<name>.yaml or a path)
    defaults: {data: {name: cifar100}}     # RunConfig fields (nested), applied to every run
    grid: {model.name: [resnet20, vgg16], seed: [0, 1]}   # cartesian product over dotted RunConfig paths
    stages:                                # optional; absent = one stage named `train`
      pretrain: {config: {...}, grid_ignore: [adversarial.lam], resources: {time: "08:00:00"}}
      fine_tune: {after: pretrain, init_from: pretrain, config: {...}, resources: {...}}
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, Field, ValidationError, field_validator

from asbatch.config import RunConfig
from asbatch.spec.errors import SpecError, cut, did_you_mean, dotted, format_validation_error, is_model, show, validate
from asbatch.spec.loading import kind, reject_control_chars
from asbatch.spec.resources import Profile, Resources, SafeName, Strict, load_profile

MAX_RUNS = 10_000
DEFAULT_STAGE = "train"
RESERVED = {"sweep": "the spec's `sweep`", "stage": "the stage name"}  # set by the spec, never by a config
SPEC_KEYS = ("sweep", "profile", "defaults", "grid", "stages")


def _non_empty(values: list[Any]) -> list[Any]:
    if not values:
        raise ValueError("a grid list needs at least one value")
    return values


class StageSpec(Strict):
    """One stage of a spec: config overrides, resources and the stages it runs after."""

    after: list[str] = Field(default_factory=list, description="stage name or list; runs after their runs")
    init_from: str | None = Field(None, description="an `after` stage whose matching run initialises this one")
    config: dict[str, Any] = Field(default_factory=dict, description="RunConfig overrides (nested)")
    grid_ignore: list[str] = Field(default_factory=list, description="grid keys this stage does not vary over")
    resources: Resources = Field(default_factory=Resources)

    @field_validator("after", "grid_ignore", mode="before")
    @classmethod
    def _one_or_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("after")
    @classmethod
    def _dedupe(cls, value: list[str]) -> list[str]:
        return list(dict.fromkeys(value))


class SpecFile(Strict):
    """A job spec file as written (before profile lookup and cross-checks)."""

    sweep: SafeName
    profile: str | None = None
    defaults: dict[str, Any] = Field(default_factory=dict)
    grid: dict[str, Annotated[list[Any], AfterValidator(_non_empty)]] = Field(default_factory=dict)
    stages: dict[SafeName, StageSpec] | None = None

    @field_validator("profile", mode="before")
    @classmethod
    def _named_profile(cls, value: Any) -> Any:
        if value is None or (isinstance(value, str) and not value.strip()):
            raise ValueError("names no profile; name one, or leave `profile` out for none")
        return value

    @field_validator("stages")
    @classmethod
    def _some_stage(cls, stages: dict | None) -> dict | None:
        if stages is not None and not stages:
            raise ValueError(f"needs at least one stage (or leave `stages` out for one stage {DEFAULT_STAGE!r})")
        return stages


@dataclass(frozen=True)
class Spec:
    """A checked spec: stages in dependency (topological) order, resources resolved against the profile."""

    sweep: str
    profile: Profile | None
    defaults: dict[str, Any]
    grid: dict[str, list[Any]]
    stages: dict[str, StageSpec]
    resources: dict[str, Resources]
    source: Path | None = None
    defaults_at: tuple[str, ...] = ("defaults",)  # where run config fields sit in the file: () for a one-run file


def parse_spec(data: Any, base_dir: Path | None = None, source: Path | None = None,
               defaults_at: tuple[str, ...] = ("defaults",)) -> Spec:
    """Validate a spec given as plain data (as from YAML); `base_dir` anchors a profile given as a path.
    `defaults_at` is where messages place the fields of `defaults` (() for a file holding one run's config)."""
    if not isinstance(data, dict):
        raise SpecError(f"the top level must be a mapping ({', '.join(SPEC_KEYS)}), got {kind(data)}")
    reject_control_chars(data)
    doc = validate(SpecFile, data)
    stages = doc.stages if doc.stages is not None else {DEFAULT_STAGE: StageSpec()}
    check_config_keys(doc.defaults, defaults_at)
    _check_grid(doc.grid)
    for name, stage in stages.items():
        _check_stage(name, stage, stages, doc.grid)
    stages = {name: stages[name] for name in _stage_order(stages)}
    _check_upstream_ignores(stages)
    _check_run_count(stages, doc.grid)
    profile = load_profile(doc.profile, base_dir) if doc.profile else None
    base = profile.resources if profile else Resources()
    resources = {name: _stage_resources(name, base, stage.resources) for name, stage in stages.items()}
    return Spec(sweep=doc.sweep, profile=profile, defaults=doc.defaults, grid=doc.grid, stages=stages,
                resources=resources, source=source, defaults_at=defaults_at)


def _config_paths(model: type[BaseModel] = RunConfig, prefix: str = "") -> list[str]:
    """Every dotted RunConfig path, sections included: 'data', 'data.name', ..."""
    paths = []
    for name, info in model.model_fields.items():
        paths.append(prefix + name)
        if is_model(info.annotation):
            paths += _config_paths(info.annotation, f"{prefix}{name}.")
    return paths


CONFIG_PATHS = [p for p in _config_paths() if p not in RESERVED]


def suggest_path(key: str, candidates: Sequence[str]) -> str:
    """A close match at this level, else a RunConfig path ending in this key (`lam` -> 'adversarial.lam')."""
    hint = did_you_mean(key, candidates)
    moved = [p for p in CONFIG_PATHS if p.endswith(f".{key}")]
    return hint or (f"; did you mean {moved[0]!r}?" if moved else "")


def check_config_keys(values: dict, loc: tuple, model: type[BaseModel] = RunConfig) -> None:
    """Unknown keys in a partial, nested RunConfig mapping fail here, before any run is built."""
    for key, value in values.items():
        path = dotted((*loc, str(key)))
        if model is RunConfig and key in RESERVED:
            raise SpecError(f"{path}: set from {RESERVED[key]}, not in a config (got {show(value)})")
        info = model.model_fields.get(str(key))
        if info is None:
            raise SpecError(f"{path}: unknown key{suggest_path(str(key), list(model.model_fields))}")
        if is_model(info.annotation):
            if not isinstance(value, dict):
                raise SpecError(f"{path}: expected a mapping of {key} settings (got {show(value)})")
            check_config_keys(value, (*loc, str(key)), info.annotation)


def _check_grid(grid: dict[str, list[Any]]) -> None:
    for key in grid:
        shown = cut(key)
        if key in RESERVED:
            raise SpecError(f"grid.{shown}: set from {RESERVED[key]}; it cannot be a grid key")
        if key not in CONFIG_PATHS:
            raise SpecError(f"grid.{shown}: not a RunConfig field path{suggest_path(key, CONFIG_PATHS)}")
        overlap = next((other for other in grid if key.startswith(f"{other}.")), None)
        if overlap:
            raise SpecError(f"grid.{shown}: overlaps grid.{overlap}; vary one or the other")


def _check_stage(name: str, stage: StageSpec, stages: dict[str, StageSpec], grid: dict) -> None:
    where = f"stages.{name}"
    check_config_keys(stage.config, ("stages", name, "config"))
    for up in stage.after:
        if up not in stages:
            raise SpecError(f"{where}.after: unknown stage {up!r}{did_you_mean(up, stages)} "
                            f"(stages: {', '.join(stages)})")
    if stage.init_from is not None:
        if stage.init_from not in stage.after:
            raise SpecError(f"{where}.init_from: {stage.init_from!r} must also be listed in {where}.after "
                            f"(got after: {stage.after})")
        if "init_from" in stage.config.get("model", {}):
            raise SpecError(f"{where}.config.model.init_from: conflicts with {where}.init_from; set one")
    for i, key in enumerate(stage.grid_ignore):
        if key not in grid:
            raise SpecError(f"{where}.grid_ignore[{i}]: {key!r} is not a grid key{did_you_mean(key, grid)}")


def _stage_order(stages: dict[str, StageSpec]) -> list[str]:
    """Stages in dependency order (file order where free); a cycle in `after` fails, naming it.

    A depth-first walk with an explicit stack (a chain of thousands of stages cannot exhaust Python's)."""
    order: list[str] = []
    done: set[str] = set()
    for root in stages:
        if root in done:
            continue
        path, on_path, pending = [root], {root}, [iter(stages[root].after)]
        while path:
            up = next(pending[-1], None)
            if up is None:
                done.add(path[-1])
                on_path.discard(path[-1])
                order.append(path.pop())
                pending.pop()
            elif up in on_path:
                raise SpecError(_cycle_message([*path[path.index(up):], up]))
            elif up not in done:
                path.append(up)
                on_path.add(up)
                pending.append(iter(stages[up].after))
    return order


def _cycle_message(cycle: list[str]) -> str:
    shown = cycle if len(cycle) <= 8 else [*cycle[:4], "...", *cycle[-3:]]
    size = f" ({len(cycle) - 1} stages)" if len(cycle) > 8 else ""
    return f"stages.{cycle[0]}.after: dependency cycle {' -> '.join(shown)}{size} (each stage runs after the next)"


def _check_upstream_ignores(stages: dict[str, StageSpec]) -> None:
    # a run collapsed over a key its upstream varies over would match several upstream runs
    for name, stage in stages.items():
        for up in stage.after:
            for key in stage.grid_ignore:
                if key not in stages[up].grid_ignore:
                    raise SpecError(f"stages.{name}.grid_ignore: ignores {key!r}, but upstream stage {up!r} varies "
                                    f"over it, so a {name} run would match several {up} runs")


def kept_keys(grid: dict[str, list[Any]], stage: StageSpec) -> list[str]:
    """The grid keys a stage varies over (all but its grid_ignore)."""
    return [key for key in grid if key not in stage.grid_ignore]


def _check_run_count(stages: dict[str, StageSpec], grid: dict[str, list[Any]]) -> None:
    total = sum(math.prod(len(grid[k]) for k in kept_keys(grid, stage)) for stage in stages.values())
    if total > MAX_RUNS:
        raise SpecError(f"grid: expands to {total} runs over {len(stages)} stage(s), more than the limit of "
                        f"{MAX_RUNS}; split the sweep")


def _stage_resources(name: str, base: Resources, override: Resources) -> Resources:
    try:
        return base.updated(override)
    except ValidationError as err:
        raise SpecError(format_validation_error(err, Resources, lambda loc: dotted(
            ("stages", name, "resources", *loc)))) from None
