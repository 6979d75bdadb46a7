"""What a stage asks Slurm for (`Resources`) and cluster profiles; the Slurm token rules live here, those of
`extra` flags and job-script lines in `asbatch.spec.sbatch`.

Profiles ship inside the package (`asbatch/profiles/*.yaml`); a directory in $ASBATCH_PROFILES is searched
first, and a ref with '/' or a .yaml suffix is a file path (relative to the spec). A profile is a mapping of
`Resources` fields plus `env: {VAR: value}` exported in every job; a stage's `resources` override it.
`setup` (shell lines the Slurm job script runs before Python) and `python` (the interpreter command) are
`Resources` fields too, so every stage of a Slurm submission gets the profile's.
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

from asbatch.names import check_name
from asbatch.spec.errors import SpecError, did_you_mean, model_keys, show, user_path, validate
from asbatch.spec.loading import kind, read_yaml, reject_control_chars
from asbatch.spec.sbatch import ALLOWED_EXTRA_FLAGS as ALLOWED_EXTRA_FLAGS  # re-exported
from asbatch.spec.sbatch import (
    MAX_MEM_GB,
    MAX_SETUP_LINES,
    MIN_MEM_MB,
    ExtraFlag,
    ExtraValue,
    PythonCommand,
    ShellLine,
    check_extra_value,
    no_control,
    token,
)

PROFILES_ENV = "ASBATCH_PROFILES"
_SLURM_TOKEN = re.compile(r"[A-Za-z0-9_.,:|&!\[\]*-]+")
_PLAIN_OR = re.compile(r"\|(?![^\[]*\])")  # a '|' outside [...] (Slurm's matching OR)
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,40}")
_TIME = re.compile(r"(?:([0-9]+)-)?([0-9]+):([0-5][0-9]):([0-5][0-9])")
MAX_ENV_VALUE = 4096   # characters of one environment value
MAX_TIME_MIN = 365 * 1440  # a year; Slurm's own limits are set per partition
# the launcher owns these variables in a job, or they change how the job script itself runs: not settable
RESERVED_ENV = frozenset({"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                          "IFS", "BASH_ENV", "ENV", "SHELLOPTS", "BASHOPTS", "PS4", "PROMPT_COMMAND"})
RESERVED_ENV_PREFIXES = ("SLURM_", "SBATCH_", "SRUN_", "SUBMITIT_", "BASH_FUNC_")


# ---------------------------------------------------------------------------------------------- tokens

def _slurm_token(value: str) -> str:
    return token(value, _SLURM_TOKEN, "_ . , : | & ! [ ] * -")


def _safe_name(value: str) -> str:
    no_control(value)
    return check_name(value)  # the one rule for sweep and stage names (a leading '-' would read as an option)


def _env_name(name: str) -> str:
    if not _ENV_NAME.fullmatch(name):
        raise ValueError("environment variable names are 1-128 letters, digits and '_', not starting with a digit")
    if name in RESERVED_ENV or name.startswith(RESERVED_ENV_PREFIXES):
        raise ValueError("set by Slurm or asbatch's launcher in every job, or changes how the job script runs; a "
                         "profile cannot set it")
    return name


def _env_value(value: str) -> str:
    no_control(value)
    if len(value) > MAX_ENV_VALUE:
        raise ValueError(f"at most {MAX_ENV_VALUE} characters")
    return value


SlurmToken = Annotated[str, AfterValidator(_slurm_token)]
SafeName = Annotated[str, AfterValidator(_safe_name)]
EnvName = Annotated[str, AfterValidator(_env_name)]
EnvValue = Annotated[str, AfterValidator(_env_value)]


def parse_time(value: int | str) -> int:
    """A Slurm time limit as whole minutes: an int of minutes, 'HH:MM:SS' or 'D-HH:MM:SS' (seconds round up)."""
    if isinstance(value, str) and re.fullmatch(r"[0-9]{1,12}", value.strip()):
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        minutes = value
    elif isinstance(value, str) and len(value) < 40 and (match := _TIME.fullmatch(value.strip())):
        days, hours, mins, secs = (int(g or 0) for g in match.groups())
        if match.group(1) is not None and hours >= 24:
            raise ValueError("hours must be below 24 in 'D-HH:MM:SS'")
        minutes = days * 1440 + hours * 60 + mins + math.ceil(secs / 60)
    else:
        raise ValueError("time must be whole minutes (int), 'HH:MM:SS' or 'D-HH:MM:SS'")
    if minutes <= 0:
        raise ValueError("time must be positive")
    if minutes > MAX_TIME_MIN:
        raise ValueError(f"time must be at most 365 days ({MAX_TIME_MIN} minutes)")
    return minutes


def _scalars_to_str(value: Any) -> Any:
    """YAML `nice: 10` / `exclusive: true` -> '10' / '' (bare flag); False / null say how to leave a flag out."""
    if not isinstance(value, dict):
        return value
    return {k: _scalar_to_str(k, v) for k, v in value.items()}


def _scalar_to_str(flag: Any, value: Any) -> Any:
    if value is True:
        return ""
    if value is False or value is None:
        raise ValueError(f"{flag}: {value} is not a value; leave the flag out instead (or write it as a string)")
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return value  # anything else: left for pydantic to reject as "not a string"


def _no_bool(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("expected a number, not true / false")
    return value


def _whole_mb(mem_gb: float) -> float:
    """Round up to whole MB (Slurm's unit), at least MIN_MEM_MB: a tiny value must never become --mem=0, which
    Slurm reads as all of a node's memory."""
    mb = math.ceil(mem_gb * 1024 - 1e-9)
    if mb < MIN_MEM_MB:
        raise ValueError(f"at least {MIN_MEM_MB} MB ({MIN_MEM_MB / 1024:g} GB) for a training process; a tiny value "
                         "would round to --mem=0, which Slurm reads as all of a node's memory")
    return mb / 1024


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


# ---------------------------------------------------------------------------------------------- resources

class Resources(Strict):
    """What each array task asks Slurm for. `time` (alias of `timeout_min`) is stored as whole minutes, `mem_gb`
    as whole MB (rounded up)."""

    partition: SlurmToken | None = None
    account: SlurmToken | None = None
    qos: SlurmToken | None = None
    nodes: int = Field(1, ge=1, le=1024)
    gpus_per_node: int = Field(0, ge=0, le=16)
    cpus_per_task: int = Field(1, ge=1, le=1024)
    mem_gb: float | None = Field(None, gt=0, le=MAX_MEM_GB)
    timeout_min: int = Field(60, validation_alias=AliasChoices("time", "timeout_min"),
                             description="'HH:MM:SS', 'D-HH:MM:SS' or minutes")
    constraint: SlurmToken | None = None
    array_parallelism: int = Field(64, ge=1, le=10_000, description="at most this many tasks of an array run at once")
    runs_per_task: int = Field(1, ge=1, le=64, description="runs packed into one array task, trained at once")
    mps: bool = Field(False, description="a job-private CUDA MPS daemon for the runs packed onto a GPU")
    extra: dict[ExtraFlag, ExtraValue] = Field(default_factory=dict, description="allow-listed sbatch flags")
    setup: list[ShellLine] = Field(default_factory=list, max_length=MAX_SETUP_LINES,
                                   description="shell lines a Slurm job runs before Python (module load, source, ...)")
    python: PythonCommand | None = Field(None, description="the interpreter command of Slurm jobs (e.g. apptainer exec "
                                         "--nv img.sif python3); default: this Python")

    @field_validator("nodes", "gpus_per_node", "cpus_per_task", "mem_gb", "array_parallelism", "runs_per_task",
                     mode="before")
    @classmethod
    def _numbers_only(cls, value: Any) -> Any:
        return _no_bool(value)

    @field_validator("mem_gb")
    @classmethod
    def _mem_in_mb(cls, value: float | None) -> float | None:
        return None if value is None else _whole_mb(value)

    @field_validator("timeout_min", mode="before")
    @classmethod
    def _minutes(cls, value: Any) -> int:
        return parse_time(value)

    @field_validator("extra", mode="before")
    @classmethod
    def _extra_as_str(cls, value: Any) -> Any:
        return _scalars_to_str(value)

    @field_validator("extra")
    @classmethod
    def _extra_values(cls, value: dict[str, str]) -> dict[str, str]:
        for flag, text in value.items():
            try:
                check_extra_value(flag, text)
            except ValueError as err:
                raise ValueError(f"{flag}: {err}") from None
        return value

    @model_validator(mode="after")
    def _gpus_that_are_used(self) -> Resources:
        gres = self.extra.get("gres", "")
        if any(item.split(":")[0] == "gpu" for item in gres.split(",") if item):
            raise ValueError(f"extra.gres asks for GPUs ({gres!r}): ask with gpus_per_node, which also starts one "
                             "training process per GPU (a GPU gres gives one task that uses one of them)")
        mems = [f"extra.{f}" for f in ("mem-per-gpu", "mem-per-cpu") if f in self.extra]
        if mems and (self.mem_gb is not None or len(mems) > 1):
            both = " and ".join([*mems, *([f"mem_gb {self.mem_gb:g}"] if self.mem_gb is not None else [])])
            raise ValueError(f"{both}: Slurm takes only one of --mem, --mem-per-cpu and --mem-per-gpu (leave mem_gb "
                             "out with `mem_gb: null` in a stage whose profile sets it)")
        if self.nodes > 1 and self.constraint and _PLAIN_OR.search(self.constraint):
            raise ValueError(f"constraint {self.constraint!r}: a plain OR lets the {self.nodes} nodes of one run "
                             f"have different features (GPU models); write [{self.constraint}] so that all get "
                             "the same one")
        return self._packing()

    def _packing(self) -> Resources:
        """Packed runs share one node's task: not a multi-node run, not a multi-GPU DDP run."""
        k = self.runs_per_task
        if k > 1 and self.nodes > 1:
            raise ValueError(f"runs_per_task {k} with nodes {self.nodes}: packed runs share one node's task; a "
                             "multi-node DDP run is not packed (set runs_per_task: 1, or nodes: 1)")
        if k > 1 and self.gpus_per_node not in (0, 1, k):
            raise ValueError(f"runs_per_task {k} with gpus_per_node {self.gpus_per_node}: packed runs share one GPU "
                             f"(gpus_per_node: 1) or get one each (gpus_per_node: {k}); a multi-GPU DDP run is not "
                             "packed")
        if self.mps and (self.gpus_per_node == 0 or k == 1):
            raise ValueError("mps: true needs GPUs (gpus_per_node >= 1) and packed runs (runs_per_task > 1): MPS lets "
                             "the processes of several runs share a GPU at once")
        return self

    def updated(self, other: Resources) -> Resources:
        """These resources with `other`'s explicitly set fields on top; `extra` flags merge key by key."""
        values = {**self.model_dump(exclude_unset=True), **other.model_dump(exclude_unset=True)}
        if self.extra and other.extra:
            values["extra"] = {**self.extra, **other.extra}
        return Resources.model_validate(values)


# ---------------------------------------------------------------------------------------------- profiles

class ProfileFile(Resources):
    """A cluster profile file: Resources defaults (`setup` and `python` among them) plus environment variables
    exported in every job."""

    env: dict[EnvName, EnvValue] = Field(default_factory=dict)

    @field_validator("env", mode="before")
    @classmethod
    def _env_as_str(cls, value: Any) -> Any:
        """Values are read from the file as written (`true` stays 'true', `0x10` stays '0x10'); from plain data a
        bool is refused (how it was written is lost) and a missing value is an error, not 'None'."""
        if not isinstance(value, dict):
            return value
        out = {}
        for name, item in value.items():
            if item is None:
                raise ValueError(f"{name}: no value (write {name}: '' for an empty one)")
            if isinstance(item, bool):
                raise ValueError(f"{name}: write true / false as a string ('true') to export it as written")
            out[name] = str(item) if isinstance(item, int | float) else item
        return out


def _known_keys(data: dict) -> None:
    """A file that is a mapping but no profile (a password file, a netrc) is refused without repeating its keys,
    which may be secrets; an unknown key that looks like a name is left to the validation's "did you mean"."""
    names = model_keys(ProfileFile)
    unknown = [key for key in data if key not in names]
    if unknown and len(unknown) == len(data):
        # a misspelt field (`partiton`) is named with its "did you mean", as a spec key is; only a key that
        # looks like a field name and is close to one, so a secret is never repeated
        typo = next((key for key in unknown if isinstance(key, str) and _PLAIN_KEY.fullmatch(key)
                     and did_you_mean(key, names)), None)
        if typo is not None:
            raise SpecError(f"{typo}: unknown key{did_you_mean(typo, names)}")
        raise SpecError(f"not a profile: none of its {len(data)} keys is a profile field ({', '.join(names)})")
    if any(not _PLAIN_KEY.fullmatch(key) for key in unknown):
        raise SpecError("a key that is not a profile field (not repeated: it does not look like a field name)")


@dataclass(frozen=True)
class Profile:
    """A loaded cluster profile: `resources` holds only the fields the file sets (for `Resources.updated`)."""

    name: str
    path: Path
    resources: Resources
    env: dict[str, str]

    @property
    def setup(self) -> list[str]:
        return self.resources.setup

    @property
    def python(self) -> str | None:
        return self.resources.python


def shipped_profiles_dir() -> Path:
    """The profiles that ship inside the package (package data, so a wheel install has them too)."""
    return Path(str(package_files.files("asbatch") / "profiles"))


def profile_dirs() -> list[Path]:
    """Where profile names are looked up: the dirs in $ASBATCH_PROFILES (os.pathsep-separated), then ours."""
    extra = [user_path(p, f"${PROFILES_ENV}") for p in os.environ.get(PROFILES_ENV, "").split(os.pathsep) if p]
    return [*extra, shipped_profiles_dir()]


def available_profiles() -> list[str]:
    return sorted({p.stem for d in profile_dirs() if d.is_dir() for p in [*d.glob("*.yaml"), *d.glob("*.yml")]})


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # a name too long for the file system, a path through a file: no such profile
        return False


def _is_path(ref: str) -> bool:
    return "/" in ref or ref.endswith((".yaml", ".yml"))


def find_profile(ref: str, base_dir: Path | None = None) -> Path:
    """A profile name -> its file; a ref with '/' or a .yaml suffix is a path (relative to `base_dir`)."""
    if _is_path(ref):
        path = user_path(ref, "profile")
        path = path if path.is_absolute() or base_dir is None else base_dir / path
        if not _is_file(path):
            raise SpecError(f"profile: no profile file at {show(str(path))}")
        return path
    for folder, suffix in itertools.product(profile_dirs(), (".yaml", ".yml")):
        if _is_file(folder / f"{ref}{suffix}"):
            return folder / f"{ref}{suffix}"
    names = available_profiles()
    raise SpecError(f"profile: unknown profile {show(ref)}{did_you_mean(ref, names)} (available: "
                    f"{', '.join(names) or 'none'}; searched {', '.join(map(str, profile_dirs()))})")


def load_profile(ref: str, base_dir: Path | None = None) -> Profile:
    """Load and validate a cluster profile by name or path. A profile may be any file a user points at, so
    messages never repeat its content beyond the field that is wrong."""
    path = find_profile(ref, base_dir)
    try:
        data = read_yaml(path, quote=False, as_written="env")
        data = {} if data is None else data  # an empty profile is a valid (if useless) one
        if not isinstance(data, dict):
            raise SpecError(f"not a profile: a profile is a YAML mapping of resources (and env), this file holds "
                            f"{kind(data, quote=False)}")
        _known_keys(data)
        reject_control_chars(data, quote=False)  # values may be secrets (an API key in env): never repeated
        parsed = validate(ProfileFile, data, quote=False)
        resources = Resources.model_validate(parsed.model_dump(exclude_unset=True, exclude={"env"}))
    except SpecError as err:
        raise SpecError(f"profile {ref!r}{'' if _is_path(ref) else f' ({path})'}: {err}") from None
    return Profile(name=path.stem, path=path, resources=resources, env=dict(parsed.env))
