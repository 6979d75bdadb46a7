"""Job specs: a YAML file naming a sweep, a grid over RunConfig values and ordered stages, expanded into runs.

Nothing here knows Slurm or torch: the launcher turns a `Sweep` into job arrays (one per `StagePlan`, each
depending on the arrays of its `after` stages) and the `Resources` of a stage into sbatch flags.

    sweep: fine_tune_c100                  # letters, digits, - _ . ; runs live in <runs root>/<sweep>/<run id>
    profile: local                         # optional: resource defaults, slurm/profiles/<name>.yaml or a path
    defaults: {data: {name: cifar100}}     # RunConfig fields (nested), applied to every run
    grid: {model.name: [resnet20, vgg16], seed: [0, 1]}   # cartesian product over dotted RunConfig paths
    stages:                                # optional; absent = one stage named `train`
      pretrain: {config: {...}, grid_ignore: [adversarial.lam], resources: {time: "08:00:00"}}
      fine_tune: {after: pretrain, init_from: pretrain, config: {...}, resources: {...}}

A run's config is defaults < grid point < stage config, then `sweep`, `stage` and (for `init_from`)
`model.init_from` are set by the spec. A stage's `grid_ignore` keys are not applied in that stage at all, so
grid points that differ only there collapse into one run. A run's upstream ("matching") run in an `after`
stage is the one expanded from the same grid point; a stage may only ignore grid keys that its upstream
stages ignore too, so that match is unique.

`init_from: <stage>` sets `model.init_from = "run:<upstream run id>"`, a reference relative to the runs root
that the launcher resolves with `resolve_run_ref` to the upstream run dir `<runs root>/<sweep>/<run id>`.
Since `run_id` hashes the config including that reference, ids are stable across expansions, and a
fine-tune run's id changes whenever its upstream run's config does.

Profiles (`slurm/profiles/*.yaml`, or a directory in $ASBATCH_PROFILES, searched first) are a mapping of
`Resources` fields plus `env: {VAR: value}` exported in every job; a stage's `resources` override them.

Every mistake raises `SpecError` with one message naming the field as a dotted path (`grid.model.name[1]`,
`stages.fine_tune.after`) and the offending value.
"""

from __future__ import annotations

import difflib
import itertools
import math
import os
import re
import types
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, TypeVar, Union, get_args, get_origin

import yaml
from pydantic import (AfterValidator, AliasChoices, BaseModel, ConfigDict, Field, ValidationError,
                      field_validator, model_validator)

from asbatch.config import RunConfig

RUN_REF_PREFIX = "run:"
MAX_RUNS = 10_000
DEFAULT_STAGE = "train"
PROFILES_DIR = Path(__file__).resolve().parents[1] / "slurm" / "profiles"
PROFILES_ENV = "ASBATCH_PROFILES"
# sbatch flags a spec may add verbatim; everything else is either a Resources field or owned by the launcher
ALLOWED_EXTRA_FLAGS = frozenset({"mail-type", "mail-user", "exclusive", "reservation", "licenses", "gres",
                                 "comment", "nice", "requeue"})
_FLAG_FIELDS = {"partition": "partition", "account": "account", "qos": "qos", "nodes": "nodes",
                "gpus-per-node": "gpus_per_node", "gpus": "gpus_per_node", "cpus-per-task": "cpus_per_task",
                "mem": "mem_gb", "time": "time", "constraint": "constraint", "array": "array_parallelism"}
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_SLURM_TOKEN = re.compile(r"[A-Za-z0-9_.,:|&!\[\]*-]+")
_EXTRA_VALUE = re.compile(r"[A-Za-z0-9_.,:|&!\[\]*@%+=/-]*")  # '' = a bare flag such as --exclusive
_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,99}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_TIME = re.compile(r"(?:([0-9]+)-)?([0-9]+):([0-5][0-9]):([0-5][0-9])")
_RESERVED = {"sweep": "the spec's `sweep`", "stage": "the stage name"}

M = TypeVar("M", bound=BaseModel)
Loc = tuple[str | int, ...]


class SpecError(ValueError):
    """A job spec or cluster profile is invalid; the message names the field (dotted path) and the value."""


# ---------------------------------------------------------------------------------------------- messages

def _dotted(loc: Sequence[str | int]) -> str:
    """('grid', 'model.name', 1) -> 'grid.model.name[1]'; pydantic's '[key]' marker is dropped."""
    out = ""
    for part in loc:
        if part == "[key]":
            continue
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 100 else text[:97] + "..."


def _did_you_mean(word: Any, candidates: Sequence[str] | dict) -> str:
    """'; did you mean X?' for a close match, or else for a key the word abbreviates ('gpus' -> 'gpus_per_node')."""
    names = [str(c) for c in candidates]
    match = difflib.get_close_matches(str(word), names, n=1, cutoff=0.6)
    match = match or [n for n in names if str(word) and n.startswith(f"{word}_")]
    return f"; did you mean {match[0]!r}?" if match else ""


def format_validation_error(err: ValidationError, model: type[BaseModel] | None = None,
                            where: Callable[[Loc], str] = _dotted) -> str:
    """One line for pydantic's first error: '<dotted field>: <problem> (got <value>)'.

    `where` maps pydantic's location to the field's place in the spec; `model` (the validated class) lets an
    unknown key get a "did you mean" from the valid keys of its level.
    """
    errors = err.errors(include_url=False)
    first = errors[0]
    loc, kind, value = tuple(first["loc"]), first["type"], first.get("input")
    if kind == "extra_forbidden":
        problem = "unknown key" + _did_you_mean(loc[-1], _keys_at(model, loc[:-1]))
    elif kind == "missing":
        problem = "required key is missing"
    elif kind == "literal_error":
        allowed = re.findall(r"'([^']*)'", first["ctx"]["expected"])
        problem = f"{value!r} is not one of: {', '.join(allowed)}{_did_you_mean(value, allowed)}"
    else:
        problem = first["msg"].removeprefix("Value error, ")
        problem += f" (got {_show(value)})" if loc else ""  # a whole-model error's input is everything
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    path = where(loc)
    return f"{path}: {problem}{more}" if path else problem + more


def _validate(model: type[M], data: Any, where: Callable[[Loc], str] = _dotted) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise SpecError(format_validation_error(err, model, where)) from None


def _unwrap(tp: Any) -> Any:
    """Strip Annotated[...] and Optional[...] down to the type that has fields / items."""
    while True:
        origin = get_origin(tp)
        if origin is Annotated:
            tp = get_args(tp)[0]
        elif origin in (Union, types.UnionType):
            tp = next((a for a in get_args(tp) if a is not type(None)), None)
        else:
            return tp


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _model_keys(model: type[BaseModel]) -> list[str]:
    """The keys a model accepts: field names and their validation aliases (Resources' `time`)."""
    keys = []
    for name, info in model.model_fields.items():
        alias = info.validation_alias
        keys += [c for c in alias.choices if isinstance(c, str)] if isinstance(alias, AliasChoices) else [name]
    return keys


def _keys_at(model: Any, loc: Loc) -> list[str]:
    """Valid keys of the mapping at `loc` inside `model`, for suggestions; [] where it is not a model."""
    tp = model
    for part in loc:
        tp = _unwrap(tp)
        if _is_model(tp):
            info = tp.model_fields.get(str(part)) or next(
                (i for i in tp.model_fields.values() if isinstance(i.validation_alias, AliasChoices)
                 and part in i.validation_alias.choices), None)
            tp = info.annotation if info else None
        elif get_origin(tp) in (dict, list, tuple):
            tp = get_args(tp)[-1 if get_origin(tp) is dict else 0]
        else:
            return []
    tp = _unwrap(tp)
    return _model_keys(tp) if _is_model(tp) else []


# ---------------------------------------------------------------------------------------------- resources

def _no_control(value: str) -> str:
    if _CONTROL.search(value):
        raise ValueError("control characters (newline, carriage return, NUL) are not allowed")
    return value


def _slurm_token(value: str) -> str:
    _no_control(value)
    if not _SLURM_TOKEN.fullmatch(value):
        raise ValueError(r"only letters, digits and _ . , : | & ! [ ] * - are allowed")
    return value


def _safe_name(value: str) -> str:
    _no_control(value)
    if not _NAME.fullmatch(value):
        raise ValueError("must be 1-100 letters, digits, '-', '_' or '.', not starting with '.'")
    return value


def _extra_flag(name: str) -> str:
    if name in ALLOWED_EXTRA_FLAGS:
        return name
    as_field = _FLAG_FIELDS.get(name.lstrip("-"))
    hint = f"; use the resources field {as_field!r}" if as_field else _did_you_mean(name, ALLOWED_EXTRA_FLAGS)
    raise ValueError(f"sbatch flag not allowed here (allowed: {', '.join(sorted(ALLOWED_EXTRA_FLAGS))}){hint}")


def _extra_value(value: str) -> str:
    _no_control(value)
    if not _EXTRA_VALUE.fullmatch(value):
        raise ValueError(r"only letters, digits and _ . , : | & ! [ ] * @ % + = / - are allowed")
    return value


SlurmToken = Annotated[str, AfterValidator(_slurm_token)]
SafeName = Annotated[str, AfterValidator(_safe_name)]
ExtraFlag = Annotated[str, AfterValidator(_extra_flag)]
ExtraValue = Annotated[str, AfterValidator(_extra_value)]


def parse_time(value: int | str) -> int:
    """A Slurm time limit as whole minutes: an int of minutes, 'HH:MM:SS' or 'D-HH:MM:SS' (seconds round up)."""
    if isinstance(value, str) and re.fullmatch(r"[0-9]+", value.strip()):
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        minutes = value
    elif isinstance(value, str) and (match := _TIME.fullmatch(value.strip())):
        days, hours, mins, secs = (int(g or 0) for g in match.groups())
        if match.group(1) is not None and hours >= 24:
            raise ValueError("hours must be below 24 in 'D-HH:MM:SS'")
        minutes = days * 1440 + hours * 60 + mins + math.ceil(secs / 60)
    else:
        raise ValueError("time must be whole minutes (int), 'HH:MM:SS' or 'D-HH:MM:SS'")
    if minutes <= 0:
        raise ValueError("time must be positive")
    return minutes


def _scalars_to_str(value: Any) -> Any:
    """YAML `nice: 10` / `exclusive: true` / `OMP_NUM_THREADS: 1` -> '10' / '' (bare flag) / '1'."""
    if not isinstance(value, dict):
        return value
    return {k: _scalar_to_str(v) for k, v in value.items()}


def _scalar_to_str(value: Any) -> Any:
    if value is True:
        return ""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return value  # False and anything else: left for pydantic to reject as "not a string"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Resources(_Strict):
    """What each array task asks Slurm for. `time` (alias of `timeout_min`) is stored as whole minutes."""

    partition: SlurmToken | None = None
    account: SlurmToken | None = None
    qos: SlurmToken | None = None
    nodes: int = Field(1, ge=1)
    gpus_per_node: int = Field(0, ge=0, le=16)
    cpus_per_task: int = Field(1, ge=1)
    mem_gb: float | None = Field(None, gt=0)
    timeout_min: int = Field(60, validation_alias=AliasChoices("time", "timeout_min"),
                             description="'HH:MM:SS', 'D-HH:MM:SS' or minutes")
    constraint: SlurmToken | None = None
    array_parallelism: int = Field(64, ge=1, description="at most this many tasks of an array run at once")
    extra: dict[ExtraFlag, ExtraValue] = Field(default_factory=dict, description="allow-listed sbatch flags")

    @field_validator("timeout_min", mode="before")
    @classmethod
    def _minutes(cls, value: Any) -> int:
        return parse_time(value)

    @field_validator("extra", mode="before")
    @classmethod
    def _extra_as_str(cls, value: Any) -> Any:
        return _scalars_to_str(value)

    @model_validator(mode="after")
    def _one_way_to_ask_for_gpus(self) -> Resources:
        if self.gpus_per_node and "gpu" in self.extra.get("gres", ""):
            raise ValueError("ask for GPUs with gpus_per_node or with extra.gres, not both")
        return self

    def updated(self, other: Resources) -> Resources:
        """These resources with `other`'s explicitly set fields on top; `extra` flags merge key by key."""
        values = {**self.model_dump(exclude_unset=True), **other.model_dump(exclude_unset=True)}
        if self.extra and other.extra:
            values["extra"] = {**self.extra, **other.extra}
        return Resources.model_validate(values)


# ---------------------------------------------------------------------------------------------- profiles

def _env_name(name: str) -> str:
    if not _ENV_NAME.fullmatch(name):
        raise ValueError("environment variable names are letters, digits and '_', not starting with a digit")
    return name


class ProfileFile(Resources):
    """A cluster profile file: Resources defaults plus environment variables exported in every job."""

    env: dict[Annotated[str, AfterValidator(_env_name)], Annotated[str, AfterValidator(_no_control)]] = \
        Field(default_factory=dict)

    @field_validator("env", mode="before")
    @classmethod
    def _env_as_str(cls, value: Any) -> Any:
        return _scalars_to_str(value)


@dataclass(frozen=True)
class Profile:
    """A loaded cluster profile: `resources` holds only the fields the file sets (for `Resources.updated`)."""

    name: str
    path: Path
    resources: Resources
    env: dict[str, str]


def profile_dirs() -> list[Path]:
    """Where profile names are looked up: the dirs in $ASBATCH_PROFILES (os.pathsep-separated), then ours."""
    extra = [Path(p).expanduser() for p in os.environ.get(PROFILES_ENV, "").split(os.pathsep) if p]
    return [*extra, PROFILES_DIR]


def available_profiles() -> list[str]:
    return sorted({p.stem for d in profile_dirs() if d.is_dir() for p in [*d.glob("*.yaml"), *d.glob("*.yml")]})


def find_profile(ref: str, base_dir: Path | None = None) -> Path:
    """A profile name -> its file; a ref with '/' or a .yaml suffix is a path (relative to `base_dir`)."""
    if "/" in ref or ref.endswith((".yaml", ".yml")):
        path = Path(ref).expanduser()
        path = path if path.is_absolute() or base_dir is None else base_dir / path
        if not path.is_file():
            raise SpecError(f"profile: no profile file at {str(path)!r}")
        return path
    for folder, suffix in itertools.product(profile_dirs(), (".yaml", ".yml")):
        if (folder / f"{ref}{suffix}").is_file():
            return folder / f"{ref}{suffix}"
    names = available_profiles()
    raise SpecError(f"profile: unknown profile {ref!r}{_did_you_mean(ref, names)} (available: "
                    f"{', '.join(names) or 'none'}; searched {', '.join(map(str, profile_dirs()))})")


def load_profile(ref: str, base_dir: Path | None = None) -> Profile:
    """Load and validate a cluster profile by name or path."""
    path = find_profile(ref, base_dir)
    try:
        data = _read_yaml(path)
        data = {} if data is None else data  # an empty profile is a valid (if useless) one
        if not isinstance(data, dict):
            raise SpecError(f"a profile must be a mapping of resources (and env), got {_kind(data)}")
        _reject_control_chars(data, ())
        parsed = _validate(ProfileFile, data)
        resources = Resources.model_validate(parsed.model_dump(exclude_unset=True, exclude={"env"}))
    except SpecError as err:
        raise SpecError(f"profile {ref!r} ({path}): {err}") from None
    return Profile(name=path.stem, path=path, resources=resources, env=dict(parsed.env))


# ---------------------------------------------------------------------------------------------- YAML

class _SpecLoader(yaml.SafeLoader):
    """yaml.safe_load with YAML 1.2-like scalars and unique keys.

    PyYAML (YAML 1.1) reads `12:00:00` as the base-60 int 43200 and `no`/`off` as False (`precision: no`);
    both stay strings here. A repeated key would silently replace the first; here it is an error.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set[str] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                if key_node.value in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key_node.value!r} (keys must be unique)", key_node.start_mark)
                seen.add(key_node.value)
        return super().construct_mapping(node, deep=deep)


_SpecLoader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
for _chars, _pattern in (("yYnNoO", r"^(?:yes|Yes|YES|no|No|NO|on|On|ON|off|Off|OFF)$"),
                         ("-+0123456789", r"^[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+(?:\.[0-9_]*)?$")):
    for _ch in _chars:  # checked before PyYAML's own bool / int / float resolvers
        _SpecLoader.yaml_implicit_resolvers.setdefault(_ch, []).insert(0, ("tag:yaml.org,2002:str",
                                                                           re.compile(_pattern)))


def _read_yaml(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise SpecError(f"cannot read the file: {err}") from None
    try:
        return yaml.load(text, Loader=_SpecLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise SpecError(f"YAML syntax error{where}: {getattr(err, 'problem', None) or err}") from None


def _kind(value: Any) -> str:
    return "an empty document" if value is None else f"a {type(value).__name__} ({_show(value)})"


def _reject_control_chars(value: Any, loc: Loc) -> None:
    """No newline, CR or NUL anywhere in a spec: its strings end up in #SBATCH lines, paths and job names."""
    if isinstance(value, str) and _CONTROL.search(value):
        raise SpecError(f"{_dotted(loc) or 'top level'}: control characters (newline, carriage return, NUL) "
                        f"are not allowed (got {_show(value)})")
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        _reject_control_chars(key, loc)
        _reject_control_chars(item, (*loc, key))


# ---------------------------------------------------------------------------------------------- the spec

def _non_empty(values: list[Any]) -> list[Any]:
    if not values:
        raise ValueError("a grid list needs at least one value")
    return values


class StageSpec(_Strict):
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


class SpecFile(_Strict):
    """A job spec file as written (before profile lookup and cross-checks)."""

    sweep: SafeName
    profile: str | None = None
    defaults: dict[str, Any] = Field(default_factory=dict)
    grid: dict[str, Annotated[list[Any], AfterValidator(_non_empty)]] = Field(default_factory=dict)
    stages: dict[SafeName, StageSpec] | None = None

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


def load_spec(path: str | Path) -> Spec:
    """Read, validate and cross-check a spec file; every problem is a SpecError prefixed with the path."""
    path = Path(path)
    try:
        return parse_spec(_read_yaml(path), base_dir=path.parent, source=path)
    except SpecError as err:
        raise SpecError(f"{path}: {err}") from None


def load_plan(path: str | Path) -> Sweep:
    """Expand a spec file; a file holding one run's config (RunConfig fields at the top level, no
    defaults / grid / stages / profile) is taken as a spec of that single run."""
    path = Path(path)
    data = _read_yaml(path)
    if isinstance(data, dict) and not data.keys() & {"defaults", "grid", "stages", "profile"}:
        config = dict(data)
        sweep, stage = config.pop("sweep", "default"), config.pop("stage", DEFAULT_STAGE)
        data = {"sweep": sweep, "defaults": config, "stages": {stage: {}}}
    try:
        return expand(parse_spec(data, base_dir=path.parent, source=path))
    except SpecError as err:
        message = str(err)
        raise SpecError(message if message.startswith(f"{path}:") else f"{path}: {message}") from None


def parse_spec(data: Any, base_dir: Path | None = None, source: Path | None = None) -> Spec:
    """Validate a spec given as plain data (as from YAML); `base_dir` anchors a profile given as a path."""
    if not isinstance(data, dict):
        raise SpecError(f"the top level must be a mapping (sweep, profile, defaults, grid, stages), "
                        f"got {_kind(data)}")
    _reject_control_chars(data, ())
    doc = _validate(SpecFile, data)
    stages = doc.stages if doc.stages is not None else {DEFAULT_STAGE: StageSpec()}
    _check_config_keys(doc.defaults, ("defaults",))
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
                resources=resources, source=source)


def _config_paths(model: type[BaseModel] = RunConfig, prefix: str = "") -> list[str]:
    """Every dotted RunConfig path, sections included: 'data', 'data.name', ..."""
    paths = []
    for name, info in model.model_fields.items():
        paths.append(prefix + name)
        if _is_model(info.annotation):
            paths += _config_paths(info.annotation, f"{prefix}{name}.")
    return paths


_CONFIG_PATHS = [p for p in _config_paths() if p not in _RESERVED]


def _suggest_path(key: str, candidates: Sequence[str]) -> str:
    """A close match at this level, else a RunConfig path ending in this key (`lam` -> 'adversarial.lam')."""
    hint = _did_you_mean(key, candidates)
    moved = [p for p in _CONFIG_PATHS if p.endswith(f".{key}")]
    return hint or (f"; did you mean {moved[0]!r}?" if moved else "")


def _check_config_keys(values: dict, loc: Loc, model: type[BaseModel] = RunConfig) -> None:
    """Unknown keys in a partial, nested RunConfig mapping fail here, before any run is built."""
    for key, value in values.items():
        path = _dotted((*loc, str(key)))
        if model is RunConfig and key in _RESERVED:
            raise SpecError(f"{path}: set from {_RESERVED[key]}, not in a config (got {_show(value)})")
        info = model.model_fields.get(str(key))
        if info is None:
            raise SpecError(f"{path}: unknown key{_suggest_path(str(key), list(model.model_fields))}")
        if _is_model(info.annotation):
            if not isinstance(value, dict):
                raise SpecError(f"{path}: expected a mapping of {key} settings (got {_show(value)})")
            _check_config_keys(value, (*loc, str(key)), info.annotation)


def _check_grid(grid: dict[str, list[Any]]) -> None:
    for key in grid:
        if key in _RESERVED:
            raise SpecError(f"grid.{key}: set from {_RESERVED[key]}; it cannot be a grid key")
        if key not in _CONFIG_PATHS:
            raise SpecError(f"grid.{key}: not a RunConfig field path{_suggest_path(key, _CONFIG_PATHS)}")
        overlap = next((other for other in grid if key.startswith(f"{other}.")), None)
        if overlap:
            raise SpecError(f"grid.{key}: overlaps grid.{overlap}; vary one or the other")


def _check_stage(name: str, stage: StageSpec, stages: dict[str, StageSpec], grid: dict) -> None:
    where = f"stages.{name}"
    _check_config_keys(stage.config, ("stages", name, "config"))
    for up in stage.after:
        if up not in stages:
            raise SpecError(f"{where}.after: unknown stage {up!r}{_did_you_mean(up, stages)} "
                            f"(stages: {', '.join(stages)})")
    if stage.init_from is not None:
        if stage.init_from not in stage.after:
            raise SpecError(f"{where}.init_from: {stage.init_from!r} must also be listed in {where}.after "
                            f"(got after: {stage.after})")
        if "init_from" in stage.config.get("model", {}):
            raise SpecError(f"{where}.config.model.init_from: conflicts with {where}.init_from; set one")
    for i, key in enumerate(stage.grid_ignore):
        if key not in grid:
            raise SpecError(f"{where}.grid_ignore[{i}]: {key!r} is not a grid key{_did_you_mean(key, grid)}")


def _stage_order(stages: dict[str, StageSpec]) -> list[str]:
    """Stages in dependency order (file order where free); a cycle in `after` fails, naming it."""
    order: list[str] = []

    def visit(name: str, trail: list[str]) -> None:
        if name in trail:
            cycle = [*trail[trail.index(name):], name]
            raise SpecError(f"stages.{cycle[0]}.after: dependency cycle {' -> '.join(cycle)} "
                            f"(each stage runs after the next)")
        if name not in order:
            for up in stages[name].after:
                visit(up, [*trail, name])
            order.append(name)

    for name in stages:
        visit(name, [])
    return order


def _check_upstream_ignores(stages: dict[str, StageSpec]) -> None:
    # a run collapsed over a key its upstream varies over would match several upstream runs
    for name, stage in stages.items():
        for up in stage.after:
            for key in stage.grid_ignore:
                if key not in stages[up].grid_ignore:
                    raise SpecError(f"stages.{name}.grid_ignore: ignores {key!r}, but upstream stage {up!r} varies "
                                    f"over it, so a {name} run would match several {up} runs")


def _kept_keys(grid: dict[str, list[Any]], stage: StageSpec) -> list[str]:
    return [key for key in grid if key not in stage.grid_ignore]


def _check_run_count(stages: dict[str, StageSpec], grid: dict[str, list[Any]]) -> None:
    total = sum(math.prod(len(grid[k]) for k in _kept_keys(grid, stage)) for stage in stages.values())
    if total > MAX_RUNS:
        raise SpecError(f"grid: expands to {total} runs over {len(stages)} stage(s), more than the limit of "
                        f"{MAX_RUNS}; split the sweep")


def _stage_resources(name: str, base: Resources, override: Resources) -> Resources:
    try:
        return base.updated(override)
    except ValidationError as err:
        raise SpecError(format_validation_error(err, Resources, lambda loc: _dotted(
            ("stages", name, "resources", *loc)))) from None


# ---------------------------------------------------------------------------------------------- expansion

@dataclass(frozen=True)
class PlannedRun:
    """One run of a stage. `upstream`: stage -> id of the matching run this one runs after."""

    config: RunConfig
    run_id: str
    upstream: dict[str, str]
    point: dict[str, Any]  # the grid values applied to this run (its stage's grid_ignore keys left out)


@dataclass(frozen=True)
class StagePlan:
    """One stage, expanded: becomes one job array that depends on the arrays of `after`."""

    name: str
    resources: Resources
    after: list[str]
    runs: list[PlannedRun]
    init_from: str | None = None


@dataclass(frozen=True)
class Sweep:
    """A spec, expanded: stages in dependency order; `env` (from the profile) is exported in every job."""

    name: str
    stages: list[StagePlan]
    env: dict[str, str] = field(default_factory=dict)

    def stage(self, name: str) -> StagePlan:
        return next(s for s in self.stages if s.name == name)

    @property
    def runs(self) -> list[PlannedRun]:
        return [run for stage in self.stages for run in stage.runs]


def expand(spec: Spec) -> Sweep:
    """All runs of every stage; a run that fails RunConfig validation is a SpecError naming its spec field."""
    try:
        matches: dict[str, dict[tuple, str]] = {}  # stage -> grid point (its kept keys) -> run id
        plans = [_expand_stage(spec, name, matches) for name in spec.stages]
    except SpecError as err:
        raise SpecError(f"{spec.source}: {err}" if spec.source else str(err)) from None
    return Sweep(name=spec.sweep, stages=plans, env=dict(spec.profile.env) if spec.profile else {})


def _expand_stage(spec: Spec, name: str, matches: dict[str, dict[tuple, str]]) -> StagePlan:
    stage = spec.stages[name]
    keys = _kept_keys(spec.grid, stage)
    runs, seen, matches[name] = [], {}, {}
    for point in _points(spec.grid, keys):
        upstream = {up: matches[up][_point_key(point, _kept_keys(spec.grid, spec.stages[up]))]
                    for up in stage.after}
        config = _run_config(spec, name, point, upstream)
        run_id = config.run_id
        if run_id in seen:
            raise SpecError(_duplicate_message(spec, name, seen[run_id], point, run_id))
        seen[run_id] = point
        matches[name][_point_key(point, keys)] = run_id
        runs.append(PlannedRun(config, run_id, upstream, {k: spec.grid[k][i] for k, i in point.items()}))
    return StagePlan(name, spec.resources[name], list(stage.after), runs, stage.init_from)


def _points(grid: dict[str, list[Any]], keys: list[str]) -> Iterator[dict[str, int]]:
    """Grid points as {key: index into its value list}, in cartesian-product order."""
    for combo in itertools.product(*(range(len(grid[k])) for k in keys)):
        yield dict(zip(keys, combo, strict=True))


def _point_key(point: dict[str, int], keys: list[str]) -> tuple[int, ...]:
    return tuple(point[k] for k in keys)


def _run_config(spec: Spec, name: str, point: dict[str, int], upstream: dict[str, str]) -> RunConfig:
    """defaults < grid point < stage config, then what the spec owns: sweep, stage, model.init_from."""
    stage = spec.stages[name]
    values = _merge(_merge(spec.defaults, _nest({k: spec.grid[k][i] for k, i in point.items()})), stage.config)
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


def _merge(base: dict, over: dict) -> dict:
    """Nested dict merge, `over` wins; neither input is modified."""
    out = dict(base)
    for key, value in over.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = _merge(out[key], value) if both else value
    return out


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    """{'model.name': 'vgg16'} -> {'model': {'name': 'vgg16'}} (grid keys never overlap)."""
    out: dict[str, Any] = {}
    for path, value in flat.items():
        *parents, leaf = path.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def _sets(values: dict, loc: Loc) -> bool:
    """Whether a (nested) mapping sets the value at `loc` (or the list that holds it)."""
    node: Any = values
    for part in loc:
        if isinstance(part, int):
            return True
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _origin(spec: Spec, name: str, point: dict[str, int], loc: Loc) -> str:
    """The spec field that put the value at RunConfig location `loc` there (stage config > grid > defaults)."""
    stage = spec.stages[name]
    if not loc:
        return f"stages.{name}"
    if stage.init_from and loc[:2] == ("model", "init_from"):
        return f"stages.{name}.init_from"
    if _sets(stage.config, loc):
        return _dotted(("stages", name, "config", *loc))
    for key, index in point.items():
        parts = tuple(key.split("."))
        if loc[:len(parts)] == parts:
            return _dotted(("grid", key, index, *loc[len(parts):]))
    return _dotted(("defaults", *loc)) if _sets(spec.defaults, loc) else _dotted(loc)


def _describe(spec: Spec, point: dict[str, int]) -> str:
    return ", ".join(f"{k}={spec.grid[k][i]!r}" for k, i in point.items()) or "no grid values"


def _duplicate_message(spec: Spec, name: str, first: dict[str, int], second: dict[str, int], run_id: str) -> str:
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


def run_ref(run_id: str) -> str:
    """The `model.init_from` value that points at run `run_id` of the same sweep: 'run:<run id>'."""
    return f"{RUN_REF_PREFIX}{run_id}"


def resolve_run_ref(init_from: str, runs_root: str | Path, sweep: str) -> Path:
    """'run:<run id>' -> <runs_root>/<sweep>/<run id>; any other `model.init_from` value is a path as is."""
    if not init_from.startswith(RUN_REF_PREFIX):
        return Path(init_from)
    run_id = init_from.removeprefix(RUN_REF_PREFIX)
    if not _NAME.fullmatch(run_id):  # never let a reference climb out of the runs root
        raise ValueError(f"bad run reference {init_from!r}")
    return Path(runs_root) / sweep / run_id


__all__ = ["ALLOWED_EXTRA_FLAGS", "MAX_RUNS", "PROFILES_DIR", "PROFILES_ENV", "RUN_REF_PREFIX", "PlannedRun",
           "Profile", "ProfileFile", "Resources", "Spec", "SpecError", "SpecFile", "StagePlan", "StageSpec",
           "Sweep", "available_profiles", "expand", "find_profile", "format_validation_error", "load_profile",
           "load_plan", "load_spec", "parse_spec", "parse_time", "profile_dirs", "resolve_run_ref", "run_ref"]
