"""The shared vocabulary: data-set and model names, the name rule, derived seeds and executors (no torch).

Every module that needs one of these asks here, so a new model or data set is added in one place (and in
the code that builds it: `asbatch.models`, `asbatch.data`).
"""

from __future__ import annotations

import math
import re

# ------------------------------------------------------------------------------------------------ data sets

DATASETS: tuple[str, ...] = ("cifar10", "cifar100", "svhn", "digits", "digits_0to7", "digits_8to9", "synthetic")
OOD_DATASETS: tuple[str, ...] = ("cifar10", "cifar100", "svhn", "digits_8to9", "synthetic")
DOWNLOADABLE: tuple[str, ...] = ("cifar10", "cifar100", "svhn")  # digits ships with scikit-learn
AUGMENTED_BY_DEFAULT: tuple[str, ...] = ("cifar10", "cifar100")  # flips and shifts hurt digit data
_DATASET_TITLES = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "svhn": "SVHN", "digits": "Digits",
                   "digits_0to7": "Digits 0-7", "digits_8to9": "Digits 8-9", "synthetic": "Synthetic"}

# --------------------------------------------------------------------------------------------------- models

RESNET_DEPTHS: tuple[int, ...] = (20, 32, 44, 56, 110)
VGG_NAMES: tuple[str, ...] = ("vgg11", "vgg13", "vgg16", "vgg19")
MODELS: tuple[str, ...] = ("mlp", *(f"resnet{d}" for d in RESNET_DEPTHS), *VGG_NAMES)
MODEL_ORDER: tuple[str, ...] = (*MODELS[1:], "mlp")  # tables and plots: the paper's models first


def dataset_title(name: str) -> str:
    """cifar10 -> CIFAR-10, digits -> Digits; anything else unchanged."""
    return _DATASET_TITLES.get(name, name)


def model_title(name: str) -> str:
    """resnet20 -> ResNet20, vgg16 -> VGG16, mlp -> MLP; anything else unchanged."""
    if name.startswith("resnet"):
        return "ResNet" + name.removeprefix("resnet")
    if name.startswith("vgg"):
        return "VGG" + name.removeprefix("vgg")
    return "MLP" if name == "mlp" else name


def sort_key(kind: str, value: object) -> tuple:
    """Order data sets and models as the paper does, numbers by value, anything else by its text."""
    order = {"data": DATASETS, "model": MODEL_ORDER}.get(kind, ())
    if value in order:
        return (0, order.index(value), "")
    if isinstance(value, bool | int | float):
        return (1, float(value), "")
    return (2, 0, "" if value is None else str(value))


# ---------------------------------------------------------------------------------------------------- names

# Sweep and stage names become directory names, Slurm job names and W&B groups; run ids are `<stage>-<hash>`.
NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}")  # not starting with '-': `asbatch status -x` is an option
NAME_RULE = "1-100 letters, digits, '-', '_' or '.', not starting with '.' or '-'"
# a variable whose name holds one of these (WANDB_API_KEY, HF_TOKEN) has a secret value: shown as ***
SENSITIVE_NAME_PARTS = "KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL"
RUN_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,99}-[0-9a-f]{10}")


def check_name(value: str) -> str:
    """`value` if it is a valid sweep / stage name, else ValueError saying the rule. A name may not start with
    '-' either: `asbatch status -x` would read it as an option (run ids, `<stage>-<hash>`, follow)."""
    if not isinstance(value, str) or not NAME.fullmatch(value):
        raise ValueError(f"must be {NAME_RULE}")
    return value


# ---------------------------------------------------------------------------------------------------- seeds

SEED_STRIDE = 1_000_003  # prime: (seed, index) pairs map to distinct seeds for index < stride
MAX_SEED = 2**31 - 1     # run seeds; derived seeds stay far inside torch's 64-bit range
EPOCH_SAMPLE_STREAM = 10_000  # the per-epoch one-sample test accuracy uses stream 10_000 + epoch


def derived_seed(seed: int, index: int) -> int:
    """The seed of stream `index` of run seed `seed` (epochs, weight samples, ranks, data draws)."""
    return (seed * SEED_STRIDE + index) % 2**63


# ------------------------------------------------------------------------------------------------ executors

EXECUTORS: tuple[str, ...] = ("auto", "slurm", "local", "debug")


# ------------------------------------------------------------------------------------------------ labels

def short_value(value: object) -> str:
    """A config value as a person reads it: 0.8, 1e-05, true, [80, 140]."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(short_value(v) for v in value) + "]"
    return "null" if value is None else str(value)


def point_label(point: dict[str, object]) -> str:
    """A grid point as `lam=0.8 seed=1 model=resnet20`: each dotted key by its last part (`model.name` by
    its section), the full key where two would read the same. '-' for no keys."""
    def short(key: str) -> str:
        parts = key.split(".")
        return parts[-2] if parts[-1] == "name" and len(parts) > 1 else parts[-1]

    names = [short(k) for k in point]
    return " ".join(f"{name if names.count(name) == 1 else key}={short_value(value)}"
                    for name, (key, value) in zip(names, point.items(), strict=True)) or "-"


def duration(seconds: float | None) -> str:
    """Seconds as h:mm:ss ('-' for unknown)."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:  # NaN / inf from a hand-edited file
        return "-"
    s = round(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def count(n: int, noun: str) -> str:
    """'1 run', '3 runs' (regular nouns only)."""
    return f"{n} {noun}{'s' if n != 1 else ''}"


# $WANDB_MODE -> the mode a run uses: every value the installed wandb's Settings.mode accepts; one writer per
# run, so `shared` is online, and `dryrun` / `run` are wandb's old names for offline / online
WANDB_MODES = {"online": "online", "offline": "offline", "disabled": "disabled", "dryrun": "offline",
               "run": "online", "shared": "online"}
