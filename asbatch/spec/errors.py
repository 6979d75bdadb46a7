"""Spec error messages: one line naming the field as a dotted path and the value, with "did you mean"."""

from __future__ import annotations

import contextlib
import difflib
import re
import types
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Annotated, Any, TypeVar, Union, get_args, get_origin

from pydantic import AliasChoices, BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)
Loc = tuple[str | int, ...]


class SpecError(ValueError):
    """A job spec or cluster profile is invalid; the message names the field (dotted path) and the value."""


@contextlib.contextmanager
def in_file(path: str | Path) -> Iterator[None]:
    """Prefix every SpecError raised inside with the file it is about (the one place that does it)."""
    try:
        yield
    except SpecError as err:
        message = str(err)
        raise SpecError(message if message.startswith(f"{path}:") else f"{path}: {message}") from None


def dotted(loc: Sequence[str | int]) -> str:
    """('grid', 'model.name', 1) -> 'grid.model.name[1]'; pydantic's '[key]' marker is dropped."""
    out = ""
    for part in loc:
        if part == "[key]":
            continue
        out += f"[{part}]" if isinstance(part, int) else (f".{cut(part)}" if out else cut(part))
    return out


def cut(key: Any, limit: int = 60) -> str:
    """A key as a message names it: cut at `limit` characters (a key can be any length)."""
    text = str(key)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def show(value: Any) -> str:
    """A value as the message quotes it: repr, cut at 100 characters."""
    text = repr(value)
    return text if len(text) <= 100 else text[:97] + "..."


def user_path(value: str, field: str) -> Path:
    """`value` as a path with `~` / `~user` expanded; a `~user` without a home directory is a SpecError
    naming `field` (Path.expanduser raises a RuntimeError that names neither the field nor the value)."""
    try:
        return Path(value).expanduser()
    except RuntimeError:
        raise SpecError(f"{field}: {show(value)}: {show(value.split('/')[0])} names no user with a home "
                        "directory") from None


def did_you_mean(word: Any, candidates: Sequence[str] | dict) -> str:
    """'; did you mean X?' for a close match, or else for a key the word abbreviates ('gpus' -> 'gpus_per_node')."""
    names = [str(c) for c in candidates]
    if len(str(word)) > 100:  # no field is that long (and difflib's cost grows with it)
        return ""
    match = difflib.get_close_matches(str(word), names, n=1, cutoff=0.6)
    match = match or [n for n in names if str(word) and n.startswith(f"{word}_")]
    return f"; did you mean {match[0]!r}?" if match else ""


def format_validation_error(err: ValidationError, model: type[BaseModel] | None = None,
                            where: Callable[[Loc], str] = dotted, quote: bool = True) -> str:
    """One line for pydantic's first error: '<dotted field>: <problem> (got <value>)'.

    `where` maps pydantic's location to the field's place in the spec; `model` (the validated class) lets an
    unknown key get a "did you mean" from the valid keys of its level.
    """
    errors = err.errors(include_url=False)
    first = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])  # a typo explains a missing key
    loc, kind, value = tuple(first["loc"]), first["type"], first.get("input")
    if kind == "extra_forbidden":
        problem = "unknown key" + did_you_mean(loc[-1], keys_at(model, loc[:-1]))
    elif kind == "missing":
        problem = "required key is missing"
    elif kind == "literal_error":
        allowed = re.findall(r"'([^']*)'", first["ctx"]["expected"])
        problem = f"{value!r} is not one of: {', '.join(allowed)}{did_you_mean(value, allowed)}"
    else:
        problem = first["msg"].removeprefix("Value error, ")
        key, sep, rest = problem.partition(": ")
        if kind == "value_error" and sep and isinstance(value, dict) and key in value:
            loc, value, problem = (*loc, key), value[key], rest  # a mapping's validator named the bad entry
        problem += f" (got {show(value)})" if loc and quote else ""  # a whole-model error's input is everything
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    path = where(loc)
    return f"{path}: {problem}{more}" if path else problem + more


def validate(model: type[M], data: Any, where: Callable[[Loc], str] = dotted, quote: bool = True) -> M:
    """`model.model_validate(data)`, a ValidationError turned into a one-line SpecError."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise SpecError(format_validation_error(err, model, where, quote)) from None


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


def is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def model_keys(model: type[BaseModel]) -> list[str]:
    """The keys a model accepts: field names and their validation aliases (Resources' `time`)."""
    keys = []
    for name, info in model.model_fields.items():
        alias = info.validation_alias
        keys += [c for c in alias.choices if isinstance(c, str)] if isinstance(alias, AliasChoices) else [name]
    return keys


def keys_at(model: Any, loc: Loc) -> list[str]:
    """Valid keys of the mapping at `loc` inside `model`, for suggestions; [] where it is not a model."""
    tp = model
    for part in loc:
        tp = _unwrap(tp)
        if is_model(tp):
            info = tp.model_fields.get(str(part)) or next(
                (i for i in tp.model_fields.values() if isinstance(i.validation_alias, AliasChoices)
                 and part in i.validation_alias.choices), None)
            tp = info.annotation if info else None
        elif get_origin(tp) in (dict, list, tuple):
            tp = get_args(tp)[-1 if get_origin(tp) is dict else 0]
        else:
            return []
    tp = _unwrap(tp)
    return model_keys(tp) if is_model(tp) else []
