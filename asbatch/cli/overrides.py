"""Command-line overrides (`asbatch run / submit / show SPEC key=value ...`) as dotted paths of the spec file.

A key is a RunConfig path (`schedule.epochs=2`, `optim.lr=0.01`, `seed=3`): in a spec it sets
`defaults.<path>`, unless `<path>` is a grid axis, which the value then replaces (a list: the axis' values,
one value: an axis of one). A list for a field that is not a list (`adversarial.lam=[0,0.5,0.8]`) makes
or replaces a grid axis. Keys that start with a spec key (`defaults.`, `grid.`, `stages.`, `profile`,
`sweep`) are taken as written. In a file holding one run's config, a key is that file's path. Values are
YAML (`2`, `0.5`, `[0, 0.8]`, `true`, `null`) read with the spec's own rules, and the overrides are applied
to the file's data before anything is validated: the same checks, the same messages, and part of the runs'
configs (so of their run ids).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, get_args, get_origin

from asbatch.cli.app import BadInput

SPEC_ONLY = ("profile", "defaults", "grid", "stages")  # top-level keys that make a file a spec


def _is_sequence_field(path: str) -> bool:
    """Whether the RunConfig field at `path` holds a list (`schedule.milestones`, `tracking.tags`)."""
    from pydantic import BaseModel

    from asbatch.config import RunConfig

    model: Any = RunConfig
    for part in path.split("."):
        info = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if info is None:
            return False
        model = info.annotation
    kinds = [model, *get_args(model)]
    return any(get_origin(k) in (tuple, list) or k in (tuple, list) for k in kinds)


def _as_typed(arg: str) -> str:
    """An argument as a message quotes it after `set on the command line:`: unquoted, escaped, cut at 100."""
    text = repr(arg)[1:-1]
    return text if len(text) <= 100 else text[:97] + "..."


def parse_pairs(args: Sequence[str]) -> list[tuple[str, str, Any]]:
    """`key=value` arguments -> (argument, key, YAML value); a malformed one is bad input."""
    from asbatch.spec import SpecError, parse_yaml
    from asbatch.spec.errors import show

    pairs = []
    for arg in args:
        key, sep, text = arg.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise BadInput(f"override {show(arg)}: expected KEY=VALUE with a dotted key (e.g. schedule.epochs=2)")
        try:
            value = parse_yaml(text) if text.strip() else None
        except SpecError as err:  # cut: the reason must not drown behind a 20,000-value argument
            raise BadInput(f"override {show(arg)}: the value is not plain YAML ({show(str(err))[1:-1]})") from None
        pairs.append((arg, key, value))
    return pairs


def spec_overrides(path: Path, args: Sequence[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """({path in the file: value} for `asbatch.spec.load_sweep`, {path in the file: the argument it came
    from}). The file is read here only to see whether it is a spec and which keys are grid axes; a file that
    cannot be read is left to `load_sweep` to report."""
    from asbatch.spec import SpecError
    from asbatch.spec.loading import read_yaml

    pairs = parse_pairs(args)
    if not pairs:
        return {}, {}
    try:
        data = read_yaml(path)
    except (SpecError, OSError):
        data = None
    is_spec = isinstance(data, dict) and bool(data.keys() & set(SPEC_ONLY))
    grid = data.get("grid") if is_spec and isinstance(data.get("grid"), dict) else {}
    out: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for arg, key, value in pairs:
        head = key.split(".")[0]
        if isinstance(data, dict) and not is_spec and head in SPEC_ONLY:  # it would turn the file into a spec
            raise BadInput(f"{path}: {head}: unknown key (a file holding one run's config takes its own paths, "
                           f"e.g. {key.partition('.')[2] or 'seed'}=...) (set on the command line: {_as_typed(arg)})")
        if not is_spec or head in (*SPEC_ONLY, "sweep"):
            target = key
        elif key in grid or (isinstance(value, list) and not _is_sequence_field(key)):
            target, value = f"grid.{key}", value if isinstance(value, list) else [value]
        else:
            target = f"defaults.{key}"
        if target in out:
            raise BadInput(f"override {arg!r}: {origin[target]!r} sets the same field")
        out[target], origin[target] = value, arg
    return out, origin


def name_the_argument(message: str, origin: dict[str, str]) -> str:
    """A spec message about an overridden field, with the command-line argument that set it: the message
    names the field or, for an unknown key, the first part of its path that is unknown (`defaults.foo:` for
    `foo.bar=1`)."""
    def names(target: str) -> bool:
        parts = target.split(".")
        return target in message or any(re.search(rf"(?<![\w.]){re.escape('.'.join(parts[:n]))}:", message)
                                        for n in range(len(parts) - 1, 0, -1))

    hits = [arg for target, arg in origin.items() if names(target)]
    return f"{message} (set on the command line: {_as_typed(hits[0])})" if hits else message
