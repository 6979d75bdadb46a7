"""What a stage asks Slurm for (`Resources`) and cluster profiles; every Slurm token rule lives here.

Profiles ship inside the package (`asbatch/profiles/*.yaml`); a directory in $ASBATCH_PROFILES is searched
first, and a ref with '/' or a .yaml suffix is a file path (relative to the spec). A profile is a mapping of
`Resources` fields plus `env: {VAR: value}` exported in every job; a stage's `resources` override it.
"""

from __future__ import annotations

import itertools
import math
import os
import re
from dataclasses import dataclass
from importlib import resources as package_files
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, AliasChoices, BaseModel, ConfigDict, Field, field_validator, model_validator

from asbatch.names import NAME, NAME_RULE
from asbatch.spec.errors import SpecError, did_you_mean, validate
from asbatch.spec.loading import CONTROL, kind, read_yaml, reject_control_chars

PROFILES_ENV = "ASBATCH_PROFILES"
# sbatch flags a spec may add verbatim; everything else is either a Resources field or owned by the launcher
ALLOWED_EXTRA_FLAGS = frozenset({"mail-type", "mail-user", "exclusive", "reservation", "licenses", "gres",
                                 "comment", "nice", "requeue"})
_FLAG_FIELDS = {"partition": "partition", "account": "account", "qos": "qos", "nodes": "nodes",
                "gpus-per-node": "gpus_per_node", "gpus": "gpus_per_node", "cpus-per-task": "cpus_per_task",
                "mem": "mem_gb", "time": "time", "constraint": "constraint", "array": "array_parallelism"}
_SLURM_TOKEN = re.compile(r"[A-Za-z0-9_.,:|&!\[\]*-]+")
_EXTRA_VALUE = re.compile(r"[A-Za-z0-9_.,:|&!\[\]*@%+=/-]*")  # '' = a bare flag such as --exclusive
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_TIME = re.compile(r"(?:([0-9]+)-)?([0-9]+):([0-5][0-9]):([0-5][0-9])")


# ---------------------------------------------------------------------------------------------- tokens

def no_control(value: str) -> str:
    if CONTROL.search(value):
        raise ValueError("control characters (newline, carriage return, NUL) are not allowed")
    return value


def _slurm_token(value: str) -> str:
    no_control(value)
    if not _SLURM_TOKEN.fullmatch(value):
        raise ValueError(r"only letters, digits and _ . , : | & ! [ ] * - are allowed")
    return value


def _safe_name(value: str) -> str:
    no_control(value)
    if not NAME.fullmatch(value):
        raise ValueError(f"must be {NAME_RULE}")
    return value


def _extra_flag(name: str) -> str:
    if name in ALLOWED_EXTRA_FLAGS:
        return name
    as_field = _FLAG_FIELDS.get(name.lstrip("-"))
    hint = f"; use the resources field {as_field!r}" if as_field else did_you_mean(name, ALLOWED_EXTRA_FLAGS)
    raise ValueError(f"sbatch flag not allowed here (allowed: {', '.join(sorted(ALLOWED_EXTRA_FLAGS))}){hint}")


def _extra_value(value: str) -> str:
    no_control(value)
    if not _EXTRA_VALUE.fullmatch(value):
        raise ValueError(r"only letters, digits and _ . , : | & ! [ ] * @ % + = / - are allowed")
    return value


def _env_name(name: str) -> str:
    if not _ENV_NAME.fullmatch(name):
        raise ValueError("environment variable names are letters, digits and '_', not starting with a digit")
    return name


SlurmToken = Annotated[str, AfterValidator(_slurm_token)]
SafeName = Annotated[str, AfterValidator(_safe_name)]
ExtraFlag = Annotated[str, AfterValidator(_extra_flag)]
ExtraValue = Annotated[str, AfterValidator(_extra_value)]
EnvName = Annotated[str, AfterValidator(_env_name)]
EnvValue = Annotated[str, AfterValidator(no_control)]


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


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------------------------------------- resources

class Resources(Strict):
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

class ProfileFile(Resources):
    """A cluster profile file: Resources defaults plus environment variables exported in every job."""

    env: dict[EnvName, EnvValue] = Field(default_factory=dict)

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


def shipped_profiles_dir() -> Path:
    """The profiles that ship inside the package (package data, so a wheel install has them too)."""
    return Path(str(package_files.files("asbatch") / "profiles"))


def profile_dirs() -> list[Path]:
    """Where profile names are looked up: the dirs in $ASBATCH_PROFILES (os.pathsep-separated), then ours."""
    extra = [Path(p).expanduser() for p in os.environ.get(PROFILES_ENV, "").split(os.pathsep) if p]
    return [*extra, shipped_profiles_dir()]


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
    raise SpecError(f"profile: unknown profile {ref!r}{did_you_mean(ref, names)} (available: "
                    f"{', '.join(names) or 'none'}; searched {', '.join(map(str, profile_dirs()))})")


def load_profile(ref: str, base_dir: Path | None = None) -> Profile:
    """Load and validate a cluster profile by name or path."""
    path = find_profile(ref, base_dir)
    try:
        data = read_yaml(path)
        data = {} if data is None else data  # an empty profile is a valid (if useless) one
        if not isinstance(data, dict):
            raise SpecError(f"a profile must be a mapping of resources (and env), got {kind(data)}")
        reject_control_chars(data)
        parsed = validate(ProfileFile, data)
        resources = Resources.model_validate(parsed.model_dump(exclude_unset=True, exclude={"env"}))
    except SpecError as err:
        raise SpecError(f"profile {ref!r} ({path}): {err}") from None
    return Profile(name=path.stem, path=path, resources=resources, env=dict(parsed.env))
