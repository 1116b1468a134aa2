"""Reading YAML documents, and finding their line numbers when a problem needs one. Pure: the text
comes from the adapter.

libyaml parses each file into plain documents, refusing what JSON cannot hold and noting duplicate
keys; line marks are needed only to point at a problem, so a file is composed into marked nodes
(or scanned for its top-level keys) only when it has one. Each document is measured (values
reached, nesting) before anything expands its aliases.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import yaml

from .problems import shown, type_name

# Values one YAML file may expand to, counting a value again each time an alias reaches it (an
# alias bomb expands 9 levels of 9 into 387 million). Real files hold a few thousand; walking a
# million takes a fraction of a second and bounds what the schema check and JSON encoding see.
MAX_VALUES_PER_FILE = 1_000_000
MAX_DEPTH = 64                     # nesting levels in one document; real ones use about 4

_BaseLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class FleetLoader(_BaseLoader):  # type: ignore[misc, valid-type]
    """SafeLoader that notes duplicate keys (in `duplicates`: line, message) and keeps dates as plain
    strings (JSON has no dates).

    It refuses what JSON cannot hold: non-string keys, NaN/Infinity, binary and set values.
    """


def load_all(text: str) -> tuple[list[Any], list[tuple[int, str]]]:
    """yaml.load_all, and the duplicate keys it noted on the way."""
    loader = FleetLoader(text)
    try:
        documents = []
        while loader.check_data():
            documents.append(loader.get_data())
        return documents, getattr(loader, "duplicates", [])
    finally:
        loader.dispose()


def _construct_mapping(loader: Any, node: yaml.MappingNode, deep: bool = False) -> dict[str, Any]:
    seen: dict[Any, yaml.Node] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue  # `<<: *anchor` is resolved by construct_mapping; explicit keys override it
        if not isinstance(key_node, yaml.ScalarNode):
            # Refused before it is built: building a deeply nested key would recurse.
            raise yaml.constructor.ConstructorError(
                None, None, "a list or mapping cannot be a key", key_node.start_mark)
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, str):
            # JSON (and so the schemas) knows only string keys; `on:`/`no:` are booleans in YAML.
            raise yaml.constructor.ConstructorError(
                None, None,
                f"key {shown(key_node.value)} reads as {type_name(key)} {shown(key)}, not a string: quote it",
                key_node.start_mark)
        if key in seen:
            # Reported, and reading goes on (the last one counts), so that one run shows every
            # problem of the fleet instead of stopping at the first duplicate.
            loader.__dict__.setdefault("duplicates", []).append((key_node.start_mark.line + 1,
                                      f"duplicate key {shown(key)} (first at line {seen[key].start_mark.line + 1})"))
        seen[key] = key_node
    mapping: dict[str, Any] = yaml.SafeLoader.construct_mapping(loader, node, deep=deep)
    return mapping


FleetLoader.add_constructor("tag:yaml.org,2002:map", _construct_mapping)
FleetLoader.add_constructor("tag:yaml.org,2002:timestamp", yaml.SafeLoader.construct_yaml_str)


def _refuse(loader: Any, node: yaml.Node) -> None:
    raise yaml.constructor.ConstructorError(
        None, None, f"{node.tag.rsplit(':', 1)[-1]} values are not JSON data; write a string or a list",
        node.start_mark)


def _construct_float(loader: Any, node: yaml.ScalarNode) -> float:
    value: float = yaml.SafeLoader.construct_yaml_float(loader, node)
    if not math.isfinite(value):  # JSON has no NaN or Infinity, and NaN passes every bound
        raise yaml.constructor.ConstructorError(
            None, None, f"{shown(node.value)} is not a JSON number; write a number or quote it", node.start_mark)
    return value


def _construct_int(loader: Any, node: yaml.ScalarNode) -> int:
    try:
        value: int = yaml.SafeLoader.construct_yaml_int(loader, node)
    except ValueError:  # Python refuses to read an integer of more than 4300 digits
        raise yaml.constructor.ConstructorError(
            None, None, f"integer {shown(node.value)} is too long to read; quote it or shorten it",
            node.start_mark) from None
    return value


FleetLoader.add_constructor("tag:yaml.org,2002:binary", _refuse)
FleetLoader.add_constructor("tag:yaml.org,2002:set", _refuse)
FleetLoader.add_constructor("tag:yaml.org,2002:float", _construct_float)
FleetLoader.add_constructor("tag:yaml.org,2002:int", _construct_int)


def oversized(document: Any, budget: int) -> tuple[int, list[Any], str | None]:
    """Walk one parsed document without recursion, before anything else expands it.

    Every value reached counts against `budget`, also each time an alias reaches a shared one
    again. Returns (budget left, path of the top-level key at fault, why it is refused or None).
    """
    top = document.items() if isinstance(document, dict) else [(None, document)]
    budget -= len(top)
    # (a list or mapping, its nesting level, the top-level key it is under); the document is level 1
    stack = [(value, 1 if key is None else 2, key) for key, value in top if isinstance(value, (dict, list))]
    while stack:
        value, depth, key = stack.pop()
        if depth > MAX_DEPTH:
            return budget, [] if key is None else [key], f"nested deeper than {MAX_DEPTH} levels; flatten it"
        children = value.values() if isinstance(value, dict) else value
        budget -= len(children)
        if budget < 0:
            return budget, [] if key is None else [key], (
                f"expands to more than {MAX_VALUES_PER_FILE:,} values in this file (each use of an alias "
                "repeats everything its anchor holds); use fewer aliases or less data")
        depth += 1
        stack.extend((child, depth, key) for child in children if isinstance(child, (dict, list)))
    return budget, [], None


# --- Line marks ----------------------------------------------------------------------------------

_DOC_START = re.compile(r"^---(\s|$)")
_TOP_KEY = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)\s*:")


def line_of(node: yaml.Node | None, path: list[Any]) -> int:
    """1-based line of the key at `path` in a composed document, or of its nearest parent."""
    if node is None:
        return 1
    line: int = node.start_mark.line + 1
    for part in path:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                if key_node.value == part:
                    node, line = value_node, key_node.start_mark.line + 1
                    break
            else:
                return line
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            return line
    return line


@dataclass
class YamlFile:
    """One YAML file: its text, and its documents' line marks composed only when asked."""

    shown: str
    text: str
    doc_count: int
    _nodes: list[yaml.Node | None] | None = None
    _key_lines: list[dict[str, int]] | None = None

    def nodes(self) -> list[yaml.Node | None]:
        if self._nodes is None:
            try:
                self._nodes = list(yaml.compose_all(self.text, Loader=FleetLoader))
            except (yaml.YAMLError, RecursionError):
                self._nodes = []
        return self._nodes

    def line(self, index: int, path: list[Any]) -> int:
        # Top-level keys are found by a cheap text scan; anything deeper composes the file.
        if len(path) == 1 and isinstance(path[0], str):
            found = self.top_key_lines(index).get(path[0])
            if found:
                return found
        nodes = self.nodes()
        if index < len(nodes):
            return line_of(nodes[index], path)
        return self.doc_start(index)

    def top_key_lines(self, index: int) -> dict[str, int]:
        if self._key_lines is None:
            self._key_lines = self._scan()
        return self._key_lines[index] if index < len(self._key_lines) else {}

    def doc_start(self, index: int) -> int:
        # "" holds the line where the document starts (its '---' or its first key).
        found = self.top_key_lines(index).get("")
        if found:
            return found
        nodes = self.nodes()
        node = nodes[index] if index < len(nodes) else None
        return node.start_mark.line + 1 if node is not None else 1

    def _scan(self) -> list[dict[str, int]]:
        docs: list[dict[str, int]] = []
        current: dict[str, int] | None = None
        for number, content in enumerate(self.text.splitlines(), start=1):
            if _DOC_START.match(content):
                current = {"": number}
                docs.append(current)
                continue
            match = _TOP_KEY.match(content)
            if match:
                if current is None:
                    current = {"": number}
                    docs.append(current)
                current.setdefault(match.group(1), number)
        # Separators the scan cannot line up with the parsed documents: no cheap answer.
        return docs if len(docs) == self.doc_count else []
