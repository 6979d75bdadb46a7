"""Reading spec and profile files: YAML with YAML 1.2-like scalars, unique keys, and no control characters."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from asbatch.spec.errors import SpecError, dotted, show

CONTROL = re.compile(r"[\x00-\x1f\x7f]")


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


def read_yaml(path: Path) -> Any:
    """The plain data of a YAML file; unreadable files and syntax errors are SpecErrors."""
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


def kind(value: Any) -> str:
    """What a value is, for messages: 'an empty document' or 'a list ([1, 2])'."""
    return "an empty document" if value is None else f"a {type(value).__name__} ({show(value)})"


def reject_control_chars(value: Any, loc: tuple = ()) -> None:
    """No newline, CR or NUL anywhere in a spec: its strings end up in #SBATCH lines, paths and job names."""
    if isinstance(value, str) and CONTROL.search(value):
        raise SpecError(f"{dotted(loc) or 'top level'}: control characters (newline, carriage return, NUL) "
                        f"are not allowed (got {show(value)})")
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        reject_control_chars(key, loc)
        reject_control_chars(item, (*loc, key))
