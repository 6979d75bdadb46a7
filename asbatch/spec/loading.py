"""Reading spec and profile files as hostile input: bounded size, nodes and depth, one document, plain values.

A spec is small (a 10,000-run grid is about 60 KB), so anything beyond these limits is refused before it can
cost time or memory: the file size is checked before reading, nesting depth and node count while composing
(before any Python object is built), and the node count *after alias expansion* on the composed graph, each
node visited once, so an alias bomb or a self-referencing alias is reported instead of hanging. Values are
YAML 1.2-like: `12:00:00`, `no`, `off` and dates stay strings; mapping keys are the text as written; only the
core tags (`!!str`, `!!int`, ...) are allowed, so `!!binary` and friends cannot smuggle bytes in.
"""

from __future__ import annotations

import re
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml
from yaml.composer import Composer
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from yaml.resolver import Resolver

from asbatch.spec.errors import SpecError, dotted, show

try:  # libyaml's event parser when it is there (10x faster); composing stays in Python, where it is bounded
    from yaml._yaml import CParser as _Parser
except ImportError:  # pragma: no cover - PyYAML built without libyaml
    from yaml.parser import Parser
    from yaml.reader import Reader
    from yaml.scanner import Scanner

    class _Parser(Reader, Scanner, Parser):  # type: ignore[no-redef]
        def __init__(self, stream: str) -> None:
            Reader.__init__(self, stream)
            Scanner.__init__(self)
            Parser.__init__(self)

MAX_BYTES = 256 * 1024  # a spec of 10,000 runs is about 60 KB
MAX_NODES = 20_000      # YAML nodes after alias expansion (a 10,000-run grid needs ~10,000): what later walks visit
MAX_DEPTH = 40          # nesting levels (a spec needs about 6)
# C0 controls (newline, CR, NUL, tab, escape...), DEL, C1 controls, and the Unicode line / paragraph separators
CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_CORE_TAGS = {f"tag:yaml.org,2002:{t}" for t in ("str", "int", "float", "bool", "null", "seq", "map")}


def is_utf8(text: str) -> bool:
    """Whether `text` can be written as UTF-8: a path's bytes that are not UTF-8 (`\\xff`) reach Python as
    lone surrogates, which no job script, log line or JSON file can hold."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class _Refused(yaml.YAMLError):
    """A limit or rule of ours, raised while composing; carries its message and where it happened."""

    def __init__(self, message: str, node_or_mark: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.mark = getattr(node_or_mark, "start_mark", node_or_mark)


class _Composer(Composer):
    """PyYAML's composer with a depth limit, a node limit and a tag whitelist (checked as nodes are made)."""

    def __init__(self) -> None:
        super().__init__()
        self.depth = 0
        self.nodes = 0

    def get_single_node(self) -> Node | None:
        self.get_event()  # stream start
        document = None if self.check_event(yaml.StreamEndEvent) else self.compose_document()
        if not self.check_event(yaml.StreamEndEvent):
            raise _Refused("holds more than one YAML document (a '---' or '...' line starts another); a spec or "
                           "profile is one document", self.peek_event().start_mark)
        self.get_event()
        return document

    def compose_node(self, parent: Node | None, index: Any) -> Node:
        event = self.peek_event()
        if not isinstance(event, yaml.AliasEvent):
            self.nodes += 1
            if self.nodes > MAX_NODES:
                raise _Refused(f"more than {MAX_NODES} YAML nodes; a spec is far smaller", event.start_mark)
            tag = getattr(event, "tag", None)
            if tag not in (None, "!") and tag not in _CORE_TAGS:
                shown = tag.replace("tag:yaml.org,2002:", "!!")
                raise _Refused(f"the YAML tag {shown!r} is not allowed (only plain values; core tags such as !!str "
                               "are fine)", event.start_mark)
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                raise _Refused(f"nested more than {MAX_DEPTH} levels deep", event.start_mark)
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


class _Constructor(SafeConstructor):
    """Mapping keys are the text as written (`true:` is the key 'true'), unique, and never lists or mappings."""

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict:
        seen: set[str] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                if key_node.value in seen:
                    raise _Refused(f"duplicate key {key_node.value!r} (keys must be unique)", key_node)
                seen.add(key_node.value)
        self.flatten_mapping(node)  # `<<: *anchor` merge keys
        mapping: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, ScalarNode):
                raise _Refused("a mapping key must be a plain name, not a list or mapping", key_node)
            mapping[key_node.value] = self.construct_object(value_node, deep=deep)
        return mapping


_Constructor.add_constructor("tag:yaml.org,2002:map", _Constructor.construct_yaml_map)


class _Resolver(Resolver):
    """YAML 1.1 scalars minus the surprises: base-60 numbers, yes/no/on/off, dates and `=` stay strings."""


_Resolver.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in ("tag:yaml.org,2002:timestamp",
                                                                        "tag:yaml.org,2002:value")]
    for first, resolvers in Resolver.yaml_implicit_resolvers.items()}
for _chars, _pattern in (("yYnNoO", r"^(?:yes|Yes|YES|no|No|NO|on|On|ON|off|Off|OFF)$"),
                         ("-+0123456789", r"^[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+(?:\.[0-9_]*)?$")):
    for _ch in _chars:  # checked before PyYAML's own bool / int / float resolvers
        _Resolver.yaml_implicit_resolvers.setdefault(_ch, []).insert(0, ("tag:yaml.org,2002:str", re.compile(_pattern)))


class _Loader(_Composer, _Parser, _Constructor, _Resolver):  # our composer before the parser's
    def __init__(self, text: str) -> None:
        _Parser.__init__(self, text)
        _Composer.__init__(self)
        _Constructor.__init__(self)
        _Resolver.__init__(self)


def _children(node: Node) -> Iterable[Node]:
    if isinstance(node, SequenceNode):
        return node.value
    if isinstance(node, MappingNode):
        return [n for pair in node.value for n in pair]
    return ()


def check_expansion(root: Node) -> None:
    """Refuse a node graph whose tree (aliases expanded) exceeds MAX_NODES, or that refers to itself.

    Iterative, each node visited once: a node's expanded size is 1 + its children's, memoised by identity."""
    sizes: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[Node, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        key = id(node)
        if finished:
            on_path.discard(key)
            sizes[key] = 1 + sum(sizes[id(child)] for child in _children(node))
            if sizes[key] > MAX_NODES:
                raise _Refused(f"expands to more than {MAX_NODES} values through aliases ('*name'); a spec is "
                               "far smaller", node)
        elif key in on_path:
            raise _Refused("an alias refers to the mapping or list that contains it (a recursive structure)", node)
        elif key not in sizes:
            on_path.add(key)
            stack.append((node, True))
            stack.extend((child, False) for child in _children(node) if id(child) not in sizes)


def read_text(path: Path, max_bytes: int = MAX_BYTES) -> str:
    """A small UTF-8 text file's content; size, type and encoding are checked before anything is parsed."""
    try:
        info = path.stat()
        if stat.S_ISDIR(info.st_mode):
            raise SpecError("is a directory, not a YAML file")
        if not stat.S_ISREG(info.st_mode):
            raise SpecError("is not a regular file (a device, pipe or socket)")
        if info.st_size > max_bytes:
            raise SpecError(f"the file has {info.st_size} bytes, more than the limit of {max_bytes}")
        with path.open("rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as err:
        raise SpecError(f"cannot read the file: {err.strerror or err}") from None
    if len(data) > max_bytes:
        raise SpecError(f"the file has more than {max_bytes} bytes, the limit")
    nul = data.find(b"\x00")
    if nul >= 0:
        raise SpecError(f"a binary file (NUL byte at offset {nul}), not YAML text")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise SpecError(f"not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start})") from None


def _line(text: str, number: int) -> str:
    lines = text.split("\n")
    return lines[number] if 0 <= number < len(lines) else ""


def _where(mark: Any) -> str:
    return f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""


def _read_as_written(root: Node, key: str) -> None:
    """The scalar values of the top-level mapping `key` become strings as written (an env's `true` -> 'true')."""
    if not isinstance(root, MappingNode):
        return
    for key_node, value in root.value:
        if isinstance(key_node, ScalarNode) and key_node.value == key and isinstance(value, MappingNode):
            for _, item in value.value:
                if isinstance(item, ScalarNode) and item.tag != "tag:yaml.org,2002:null":  # null stays (refused)
                    item.tag = "tag:yaml.org,2002:str"


def parse_yaml(text: str, quote: bool = True, as_written: str | None = None) -> Any:
    """The plain data of one YAML document under the limits above; every problem is a one-line SpecError.

    `quote=False` (profiles, which may be any file a user points at) never repeats the file's content;
    `as_written` names a top-level mapping whose scalar values are kept as the text written (a profile's env)."""
    loader = _Loader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            return None
        check_expansion(root)
        if as_written:
            _read_as_written(root, as_written)
        return loader.construct_document(root)
    except _Refused as err:
        raise SpecError(f"{err.message}{_where(err.mark)}") from None
    except RecursionError:
        raise SpecError(f"nested too deeply (more than {MAX_DEPTH} levels)") from None
    except yaml.reader.ReaderError as err:  # a character YAML does not allow (a raw control character)
        line = text.count("\n", 0, err.position) + 1
        raise SpecError(f"YAML syntax error at line {line}: character 0x{err.character:02x} is not allowed "
                        f"({err.reason})") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        if mark is not None and "\t" in _line(text, mark.line)[:mark.column + 1]:
            raise SpecError(f"YAML syntax error{_where(mark)}: a tab character; YAML indents with spaces") from None
        problem = getattr(err, "problem", None) or "cannot be parsed"
        if not quote:
            raise SpecError(f"not valid YAML{_where(mark)}") from None
        raise SpecError(f"YAML syntax error{_where(mark)}: {problem}") from None
    finally:
        loader.dispose()


def read_yaml(path: Path, quote: bool = True, as_written: str | None = None) -> Any:
    """The plain data of a YAML file (see `parse_yaml`); unreadable, huge, binary or non-UTF-8 files are
    SpecErrors that do not repeat the content."""
    return parse_yaml(read_text(Path(path)), quote=quote, as_written=as_written)


def kind(value: Any, quote: bool = True) -> str:
    """What a value is, for messages: 'an empty document' or 'a list ([1, 2])' (without the value if not quote)."""
    if value is None:
        return "an empty document"
    return f"a {type(value).__name__} ({show(value)})" if quote else f"a {type(value).__name__}"


def reject_control_chars(value: Any, loc: tuple = (), quote: bool = True) -> None:
    """No control character (newline, CR, NUL, tab, escape, C1, U+2028/9) in any key or string: they end up in
    #SBATCH lines, paths and job names. Iterative; each list or mapping is visited once."""
    seen: set[int] = set()
    stack: list[tuple[Any, tuple]] = [(value, loc)]
    while stack:
        item, where = stack.pop()
        if isinstance(item, str):
            if CONTROL.search(item):
                got = f" (got {show(item)})" if quote else ""
                raise SpecError(f"{dotted(where) or 'top level'}: control characters (newline, carriage return, NUL, "
                                f"tab, escape) are not allowed{got}")
        elif isinstance(item, dict | list) and id(item) not in seen:
            seen.add(id(item))
            pairs = item.items() if isinstance(item, dict) else enumerate(item)
            for key, child in reversed(list(pairs)):  # reversed: report the first offender in file order
                stack.append((child, (*where, key)))
                if isinstance(key, str):
                    stack.append((key, where))
