"""Validate a fleet's files into a `Fleet`, or report every problem at once. Pure: the bytes come
from an adapter (quantlab/fleetfiles.py reads the fleet directory or a checkout of a commit).

Two steps, because which strategy files matter is known only from the YAML: `parse_fleet` parses
and checks the YAML files, the adapter reads the strategy files they name, and `build_fleet` checks
the cross-references and builds the models. A document with schema errors still takes part in the
cross-references, from its fields that passed, so that one run reports every problem; models are
built only when there is none.

Fast path: libyaml parses each file and the schemas validate the plain documents. Line marks are
needed only to point at a problem, so a file is composed into marked nodes only when it has one.
Each document is measured (values reached, nesting) before anything expands its aliases.
"""
from __future__ import annotations

import copy
import difflib
import hashlib
import math
import posixpath
import re
import reprlib
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Iterator, Mapping

import yaml

from .models import (
    ChatKind,
    ChatSink,
    Fleet,
    FleetSettings,
    Location,
    MonitorSettings,
    NotifySettings,
    Requirements,
    SchedulingSpec,
    SshSettings,
    StrategySpec,
    WorkerSpec,
    canonical_json,
    default_probe_deadline,
)
from .schemas import api_version, apply_defaults, schema_at, schemas_by_kind, validator_for

YAML_SUFFIXES = (".yaml", ".yml")

# Limits that keep a strange fleet directory from hanging or exhausting the controller.
MAX_FILE_BYTES = 16 * 2**20        # one YAML or strategy file; real ones are a few KiB
# Values one YAML file may expand to, counting a value again each time an alias reaches it (an
# alias bomb expands 9 levels of 9 into 387 million). Real files hold a few thousand; walking a
# million takes a fraction of a second and bounds what the schema check and JSON encoding see.
MAX_VALUES_PER_FILE = 1_000_000
MAX_DEPTH = 64                     # nesting levels in one document; real ones use about 4
# Params reach the runner in one environment variable, and Linux caps one at 128 KiB.
MAX_PARAMS_BYTES = 96 * 1024
CLIP = 80                          # characters of a value echoed in a message
MAX_MESSAGE = 1000                 # characters of a whole message


@dataclass(frozen=True, order=True)
class Problem:
    """One thing wrong with the fleet, at FILE:LINE (line 0: the file or folder as a whole)."""

    file: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.message}" if self.line else f"{self.file}: {self.message}"


class FleetInvalid(Exception):
    def __init__(self, problems: list[Problem]):
        self.problems = sorted(set(problems))
        super().__init__("\n".join(str(p) for p in self.problems))


# --- YAML ----------------------------------------------------------------------------------------

_BaseLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _FleetLoader(_BaseLoader):  # type: ignore[misc, valid-type]
    """SafeLoader that notes duplicate keys (in `duplicates`: line, message) and keeps dates as plain
    strings (JSON has no dates).

    It refuses what JSON cannot hold: non-string keys, NaN/Infinity, binary and set values.
    """


def _load_all(text: str) -> tuple[list[Any], list[tuple[int, str]]]:
    """yaml.load_all, and the duplicate keys it noted on the way."""
    loader = _FleetLoader(text)
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
                f"key {_shown(key_node.value)} reads as {_type_name(key)} {_shown(key)}, not a string: quote it",
                key_node.start_mark)
        if key in seen:
            # Reported, and reading goes on (the last one counts), so that one run shows every
            # problem of the fleet instead of stopping at the first duplicate.
            loader.__dict__.setdefault("duplicates", []).append((key_node.start_mark.line + 1,
                                      f"duplicate key {_shown(key)} (first at line {seen[key].start_mark.line + 1})"))
        seen[key] = key_node
    mapping: dict[str, Any] = yaml.SafeLoader.construct_mapping(loader, node, deep=deep)
    return mapping


_FleetLoader.add_constructor("tag:yaml.org,2002:map", _construct_mapping)
_FleetLoader.add_constructor("tag:yaml.org,2002:timestamp", yaml.SafeLoader.construct_yaml_str)


def _refuse(loader: Any, node: yaml.Node) -> None:
    raise yaml.constructor.ConstructorError(
        None, None, f"{node.tag.rsplit(':', 1)[-1]} values are not JSON data; write a string or a list",
        node.start_mark)


def _construct_float(loader: Any, node: yaml.ScalarNode) -> float:
    value: float = yaml.SafeLoader.construct_yaml_float(loader, node)
    if not math.isfinite(value):  # JSON has no NaN or Infinity, and NaN passes every bound
        raise yaml.constructor.ConstructorError(
            None, None, f"{_shown(node.value)} is not a JSON number; write a number or quote it", node.start_mark)
    return value


def _construct_int(loader: Any, node: yaml.ScalarNode) -> int:
    try:
        value: int = yaml.SafeLoader.construct_yaml_int(loader, node)
    except ValueError:  # Python refuses to read an integer of more than 4300 digits
        raise yaml.constructor.ConstructorError(
            None, None, f"integer {_shown(node.value)} is too long to read; quote it or shorten it",
            node.start_mark) from None
    return value


_FleetLoader.add_constructor("tag:yaml.org,2002:binary", _refuse)
_FleetLoader.add_constructor("tag:yaml.org,2002:set", _refuse)
_FleetLoader.add_constructor("tag:yaml.org,2002:float", _construct_float)
_FleetLoader.add_constructor("tag:yaml.org,2002:int", _construct_int)

_DOC_START = re.compile(r"^---(\s|$)")
_TOP_KEY = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)\s*:")


def _line_of(node: yaml.Node | None, path: list[Any]) -> int:
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


# --- Messages ------------------------------------------------------------------------------------

def _clip(text: str, limit: int = CLIP) -> str:
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} characters)"


_SHORT_REPR = reprlib.Repr()  # for lists and mappings: a few items, a few levels
_SHORT_REPR.maxlevel, _SHORT_REPR.maxlist, _SHORT_REPR.maxdict, _SHORT_REPR.maxstring = 2, 4, 4, 40


def _shown(value: Any) -> str:
    """repr(value) for a message, clipped: a value may be megabytes long."""
    if isinstance(value, str):
        return repr(value) if len(value) <= CLIP else f"{value[:CLIP]!r}… ({len(value)} characters)"
    if isinstance(value, (dict, list)):
        return _clip(_SHORT_REPR.repr(value))
    return _clip(repr(value))


def _named_id(written: str) -> str:
    """An id as a message names it: as written, or quoted with escapes when it holds a newline or
    another control character (which would split the problem's line, or pass for another problem)."""
    return _clip(written) if written.isprintable() else _shown(written)


def _dotted(path: list[Any]) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{_clip(str(part))}" if out else _clip(str(part))
    return out


def _did_you_mean(word: str, options: list[str]) -> str:
    if len(word) > CLIP:  # no field name is that long, and comparing a huge value is slow
        return ""
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _type_name(value: Any) -> str:
    names = {bool: "boolean", int: "integer", float: "number", str: "string", list: "list",
             dict: "mapping", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _schema_message(error: Any, schema: dict[str, Any]) -> tuple[list[Any], str]:
    """(path of the offending key, message) for one jsonschema error, worded for people."""
    path = list(error.absolute_path)
    where = _dotted(path) or "document"
    value = error.instance
    description = schema_at(schema, path).get("description")
    hint = f" ({description})" if description else ""
    v = error.validator
    if v == "required":
        missing = error.message.split("'")[1] if "'" in error.message else error.message
        return path, f"missing required field {_dotted(path + [missing])!r}"
    if v == "const":
        return path, f"{where} must be {error.validator_value!r}, got {_shown(value)}"
    if v == "enum":
        options = [str(o) for o in error.validator_value]
        suggestion = "" if isinstance(value, (dict, list)) else _did_you_mean(str(value), options)
        return path, f"{where}: {_shown(value)} is not one of {', '.join(options)}{suggestion}"
    if v == "type":
        expected = error.validator_value
        expected = " or ".join(expected) if isinstance(expected, list) else expected
        note = ""
        if isinstance(value, bool) and "string" in str(expected):
            note = " (YAML reads yes/no/on/off/NO as booleans: quote the value)"
        return path, f"{where}: expected {expected}, got {_type_name(value)} {_shown(value)}{note}"
    if v == "pattern":
        # A regex tells a person little: the schema says in words what the field takes (the key
        # editors show too), and a schema without such words still never shows the regex.
        words = error.schema.get("patternErrorMessage")
        if words:
            return path, f"{where}: {_shown(value)} {words}"
        return path, f"{where}: {_shown(value)} is not in the form this field takes{hint}"
    if v in ("minimum", "exclusiveMinimum"):
        word = "at least" if v == "minimum" else "more than"
        return path, f"{where}: {_shown(value)} is too small (must be {word} {error.validator_value})"
    if v in ("maximum", "exclusiveMaximum"):
        word = "at most" if v == "maximum" else "less than"
        return path, f"{where}: {_shown(value)} is too large (must be {word} {error.validator_value})"
    # jsonschema's own wording quotes the whole value
    return path, f"{where}: {_clip(error.message, 4 * CLIP)}{hint}"


def _schema_messages(error: Any, schema: dict[str, Any]) -> Iterator[tuple[list[Any], str, tuple[Any, ...]]]:
    """Like _schema_message, but one message for each unknown field (jsonschema groups them), and
    with the field each one spoils: a missing field's own path, not its parent's (where it is shown)."""
    if error.validator == "additionalProperties":
        path = list(error.absolute_path)
        allowed = sorted(error.schema.get("properties", {}))
        for key in sorted(k for k in error.instance if k not in allowed):
            yield path + [key], (
                f"unknown field {_dotted(path + [key])!r}{_did_you_mean(key, allowed)}; "
                f"allowed here: {', '.join(allowed)}"
            ), (*path, key)
        return
    path, message = _schema_message(error, schema)
    spoiled = tuple(path)
    if error.validator == "required" and "'" in error.message:
        spoiled += (error.message.split("'")[1],)
    yield path, message, spoiled


@dataclass(frozen=True)
class _Checked:
    """One document against its schema: its problems as (path, message), the fields they spoil, and
    whether the schema could run at all (a mapping of a known apiVersion and kind)."""

    problems: list[tuple[list[Any], str]]
    spoiled: tuple[tuple[Any, ...], ...] = ()
    schema_ran: bool = False


def _check_document(data: Any) -> _Checked:
    """Schema problems of one parsed document; none when valid."""
    if data is None:
        return _Checked([([], "empty document: remove the extra '---' or fill it in")])
    if not isinstance(data, dict):
        return _Checked([([], f"document is a {_type_name(data)}; expected a mapping with apiVersion and kind")])
    kinds = schemas_by_kind()
    version = api_version()
    if data.get("apiVersion") != version:
        # Another version's fields may mean something else: nothing in it is read.
        got = data.get("apiVersion")
        what = "missing apiVersion" if got is None else f"unknown apiVersion {_shown(got)}"
        return _Checked([(["apiVersion"] if got is not None else [], f"{what}; expected {version}")])
    kind = data.get("kind")
    if not isinstance(kind, str) or kind not in kinds:
        if kind is None:
            return _Checked([([], f"missing kind; expected one of {', '.join(kinds)}")])
        suggestion = "" if isinstance(kind, (dict, list)) else _did_you_mean(str(kind), list(kinds))
        return _Checked([(["kind"], f"unknown kind {_shown(kind)}{suggestion}; "
                                    f"expected one of {', '.join(kinds)}")])
    label = f"{kind} {_named_id(data['id'])}: " if isinstance(data.get("id"), str) else f"{kind}: "
    errors = sorted(validator_for(kind).iter_errors(data), key=lambda e: [str(p) for p in e.absolute_path])
    found = [(path, label + message, spoiled)
             for e in errors for path, message, spoiled in _schema_messages(e, kinds[kind])]
    return _Checked([(path, message) for path, message, _ in found], tuple({s: None for _, _, s in found}),
                    schema_ran=True)


def _oversized(document: Any, budget: int) -> tuple[int, list[Any], str | None]:
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


@dataclass
class _File:
    """One YAML file: its text, and its documents' line marks composed only when asked."""

    shown: str
    text: str
    doc_count: int
    _nodes: list[yaml.Node | None] | None = None
    _key_lines: list[dict[str, int]] | None = None

    def nodes(self) -> list[yaml.Node | None]:
        if self._nodes is None:
            try:
                self._nodes = list(yaml.compose_all(self.text, Loader=_FleetLoader))
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
            return _line_of(nodes[index], path)
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


_UNSET = object()


@dataclass
class _Doc:
    """A document of a known kind, schema defaults filled in. `spoiled`: the paths of its fields
    with schema errors (none: the document is valid, and only then is a model built from it). The
    cross-references still read its other fields, so that one run reports every problem."""

    kind: str
    data: dict[str, Any]
    file: _File
    index: int
    spoiled: tuple[tuple[Any, ...], ...] = ()

    @property
    def valid(self) -> bool:
        return not self.spoiled

    def loc(self, *path: Any) -> Location:
        return Location(self.file.shown, self.file.line(self.index, list(path)))

    def usable(self, *path: Any) -> bool:
        """Whether the field at `path` passed the schema: no error on it or on a section around it."""
        return not self.spoiled or not any(path[:len(bad)] == bad for bad in self.spoiled)

    def value(self, *path: Any) -> Any:
        """The field at `path` as written, or its schema default (None without one) where it is
        missing or has a schema error."""
        node: Any = self.data
        if self.usable(*path):
            for part in path:
                if not isinstance(node, dict) or part not in node:
                    node = _UNSET
                    break
                node = node[part]
            if node is not _UNSET:
                return node
        return copy.deepcopy(schema_at(schemas_by_kind()[self.kind], list(path)).get("default"))

    def ident(self) -> str | None:
        """Its id when that passed the schema."""
        return self.data["id"] if self.usable("id") and isinstance(self.data.get("id"), str) else None

    def label(self) -> str:
        """How messages name it: "Strategy s1" (the id as written, also one with a schema error), or
        the kind alone when the id is not a string."""
        written = self.data.get("id")
        return f"{self.kind} {_named_id(written)}" if isinstance(written, str) else self.kind

    def written_strategy_file(self) -> str | None:
        """Its strategyFile when that names a file at all (a path with a wrong extension is still
        checked: a missing file is a second problem, not a consequence of the first)."""
        written = self.data.get("strategyFile") if self.kind == "Strategy" else None
        return written if isinstance(written, str) and written else None


# What a file stored with Git LFS holds when git-lfs did not fetch it: a pointer, not the file.
LFS_POINTER = b"version https://git-lfs.github.com/spec/"


def _lfs_pointer(data: bytes) -> bool:
    return data.startswith(LFS_POINTER) and len(data) < 1024


LFS_MESSAGE = ("is a Git LFS pointer, not the file itself: quantlab reads files as git stores them and never "
               "fetches LFS objects; commit this file without LFS (remove its pattern from .gitattributes)")


@dataclass(frozen=True)
class FleetFile:
    """One YAML file of the fleet, as the adapter that reads the fleet directory found it."""

    rel: str                       # its path below the fleet directory (posix)
    shown: str                     # how messages name it
    data: bytes | None = None
    problem: str | None = None     # why it could not be read (then there is no data)


@dataclass(frozen=True)
class StrategyFile:
    """A strategyFile as written in a Strategy, resolved and read by the adapter."""

    path: Path | None = None       # where its bytes are (what is uploaded to the workers)
    rel: str | None = None         # its canonical path below the fleet directory
    sha256: str | None = None
    problem: str | None = None     # why it cannot be used: the rest of "strategyFile 'x' ..."


def file_problem(data: bytes) -> str | None:
    """What is wrong with a fleet file's bytes whatever its kind (an LFS pointer), or None."""
    return LFS_MESSAGE if _lfs_pointer(data) else None


@dataclass
class ParsedFleet:
    """The fleet's YAML files parsed and checked against the schemas: every document of a known
    kind (valid or with schema errors, see _Doc.spoiled), and every problem found so far.
    `build_fleet` adds the cross-references and the models."""

    root: Path
    problems: list[Problem] = field(default_factory=list)
    docs: list[_Doc] = field(default_factory=list)
    digests: dict[str, str] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)

    def problem(self, where: Location | tuple[str, int], message: str) -> None:
        file, line = (where.file, where.line) if isinstance(where, Location) else where
        self.problems.append(Problem(file, line, _clip(message, MAX_MESSAGE)))

    def by_kind(self) -> dict[str, list[_Doc]]:
        out: dict[str, list[_Doc]] = {"Strategy": [], "Worker": [], "Fleet": []}
        for doc in self.docs:
            out[doc.kind].append(doc)
        return out

    def strategy_files(self) -> list[str]:
        """The strategyFile of every Strategy, those with schema errors too (relative ones: the
        adapter resolves and reads them)."""
        written = (d.written_strategy_file() for d in self.by_kind()["Strategy"])
        return sorted({w for w in written if w is not None and not posixpath.isabs(w)})

    def add_file(self, found: FleetFile) -> None:
        shown = found.shown
        self.files.append(found.rel)
        if found.data is None:
            self.problem((shown, 0), found.problem or "cannot be read")
            return
        raw = found.data
        unusable = file_problem(raw)
        if unusable is not None:
            self.problem((shown, 0), unusable)
            return
        self.digests[found.rel] = hashlib.sha256(raw).hexdigest()
        parsed = self.parse(raw, shown)
        if parsed is None:
            return
        text, documents = parsed
        if not documents:
            self.problem((shown, 1), "empty file: add a document (apiVersion, kind, ...) or remove the file")
            return
        file = _File(shown, text, len(documents))
        if not self.small_enough(file, documents):
            return
        for index, data in enumerate(documents):
            checked = _check_document(data)
            for path, message in checked.problems:
                self.problem((shown, file.line(index, path) if path else file.doc_start(index)), message)
            if checked.schema_ran:
                kind = data["kind"]
                self.docs.append(_Doc(kind, apply_defaults(data, schemas_by_kind()[kind]), file, index,
                                      checked.spoiled))

    def parse(self, raw: bytes, shown: str) -> tuple[str, list[Any]] | None:
        """(text, documents), or None once the reason it cannot be parsed is reported."""
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = raw[: exc.start].count(b"\n") + 1
            self.problem((shown, line), f"not valid UTF-8 (byte 0x{raw[exc.start]:02x}); save the file as UTF-8")
            return None
        try:
            documents, duplicates = _load_all(text)
            for line, message in duplicates:
                self.problem((shown, line), f"YAML: {message}; keep one of them")
            return text, documents
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            what = "; ".join(str(x) for x in (exc.context, exc.problem) if x)
            lines = text.splitlines()
            if mark and mark.line < len(lines) and lines[mark.line][mark.column:mark.column + 1] == "\t":
                # libyaml does not name the character it cannot read
                what += " (a tab character: YAML indents with spaces only)"
            self.problem((shown, mark.line + 1 if mark else 0), f"YAML syntax error: {what}")
        except yaml.reader.ReaderError as exc:  # a control character; libyaml counts bytes
            line = raw[: exc.position].count(b"\n") + 1
            code = ord(exc.character) if isinstance(exc.character, str) else exc.character
            self.problem((shown, line), f"YAML error: unacceptable character #x{code:04x}: {exc.reason}")
        except yaml.YAMLError as exc:
            self.problem((shown, 0), f"YAML error: {exc}")
        except RecursionError:  # the pure-Python parser recurses once per nesting level
            self.problem((shown, 0), f"nested too deeply to read (at most {MAX_DEPTH} levels); flatten it")
        return None

    def small_enough(self, file: _File, documents: list[Any]) -> bool:
        """False once a document that expands too far or nests too deep is reported. The first
        one ends the file: nothing else in it is expanded."""
        budget = MAX_VALUES_PER_FILE
        for index, data in enumerate(documents):
            budget, path, reason = _oversized(data, budget)
            if reason is not None:
                where = file.line(index, path) if path else file.doc_start(index)
                self.problem((file.shown, where), f"{_dotted(path) or 'document'}: {reason}")
                return False
        return True


# --- Cross-references and models -----------------------------------------------------------------

class _Builder:
    """The cross-references. They read every document of a known kind, also one with schema errors
    (from its fields that passed), so that one run reports every problem; models are built from
    valid documents only."""

    def __init__(self, parsed: ParsedFleet, strategy_files: Mapping[str, StrategyFile]):
        self.r = parsed
        self.strategy_files = strategy_files

    def strategy_file(self, doc: _Doc) -> tuple[Path, str] | None:
        written = doc.written_strategy_file()
        if written is None:
            return None  # missing or not a string: the schema check said so
        where = doc.loc("strategyFile")
        label = f"{doc.label()}: strategyFile {_shown(written)}"
        if posixpath.isabs(written):
            self.r.problem(where, f"{label} must be relative to the fleet directory")
            return None
        found = self.strategy_files.get(written) or StrategyFile(problem="was not read")
        if found.problem is not None or found.path is None or found.sha256 is None or found.rel is None:
            self.r.problem(where, f"{label} {found.problem}")
            return None
        self.r.digests[found.rel] = found.sha256
        return found.path, found.sha256

    def chats(self, doc: _Doc) -> tuple[ChatSink, ...]:
        """The chats to tell. A secret's file must be absolute and outside the fleet directory: that
        directory is a git repository, and a token in it is one commit away from being shared."""
        out = []
        sinks: tuple[tuple[ChatKind, str, str], ...] = (("telegram", "botTokenFile", "botTokenEnv"),
                                                        ("slack", "webhookUrlFile", "webhookUrlEnv"),
                                                        ("discord", "webhookUrlFile", "webhookUrlEnv"))
        for kind, file_key, env_key in sinks:
            if not doc.value("notify", kind):
                continue
            secret_file = doc.value("notify", kind, file_key)
            if secret_file is not None:
                path = posixpath.normpath(secret_file)
                root = posixpath.normpath(str(self.r.root))
                if not posixpath.isabs(path):
                    self.r.problem(doc.loc("notify", kind, file_key), f"Fleet: notify.{kind}.{file_key} must be an "
                                   "absolute path (outside the fleet directory, which git tracks)")
                    continue
                if path == root or path.startswith(root.rstrip("/") + "/"):
                    self.r.problem(doc.loc("notify", kind, file_key), f"Fleet: notify.{kind}.{file_key} is inside the "
                                   "fleet directory, which git tracks: keep the secret outside it (e.g. /etc/quantlab/"
                                   f"{kind}) or in an environment variable ({env_key})")
                    continue
            chat = doc.value("notify", kind, "chatId")
            out.append(ChatSink(kind, secret_file, doc.value("notify", kind, env_key),
                                str(chat) if chat is not None else None,
                                doc.value("notify", kind, "apiUrl") or "https://api.telegram.org"))
        return tuple(out)

    def params_json(self, doc: _Doc) -> str | None:
        if not doc.usable("params"):
            return None  # not a mapping: the schema check said so
        encoded = canonical_json(doc.data["params"])
        size = len(encoded.encode("utf-8"))
        if size > MAX_PARAMS_BYTES:
            self.r.problem(doc.loc("params"), (
                f"{doc.label()}: params are {size:,} bytes as JSON, more than "
                f"{MAX_PARAMS_BYTES // 1024} KiB: they reach the strategy in one environment variable and "
                "Linux caps one at 128 KiB; keep bulky data in a file beside the strategy and read it from there"))
            return None
        return encoded

    def strategy(self, doc: _Doc) -> StrategySpec | None:
        """The spec of a valid Strategy whose file and params are fine; the file and the params of
        any Strategy are checked."""
        params_json = self.params_json(doc)
        found = self.strategy_file(doc)
        if found is None or params_json is None or not doc.valid:
            return None
        d = doc.data
        path, sha = found
        req, sch = d["requirements"], d["scheduling"]
        return StrategySpec(
            id=d["id"],
            name=d.get("name", d["id"]),
            strategy_file=d["strategyFile"],
            strategy_path=path,
            file_sha256=sha,
            params_json=params_json,
            desired_state=d["desiredState"],
            heartbeat_ms=d["heartbeatMs"],
            requirements=Requirements(
                api=req["api"], account=req.get("account"), region=req.get("region"),
                proxy=req.get("proxy"), min_memory=req.get("minMemory"), credentials=req["credentials"],
            ),
            scheduling=SchedulingSpec(
                auto_restart=sch["autoRestart"], max_restarts=sch["maxRestarts"],
                restart_delay_ms=sch["restartDelay"], max_errors=sch["maxErrors"],
                stop_timeout_s=float(sch["stopTimeoutSeconds"]),
                init_timeout_s=float(sch["initTimeoutSeconds"]), share_account=sch["shareAccount"],
            ),
            source=doc.loc("id"),
        )

    @staticmethod
    def worker(doc: _Doc) -> WorkerSpec:
        d = doc.data
        caps, meta = d["capabilities"], d["metadata"]
        return WorkerSpec(
            id=d["id"], host=d["host"], port=d.get("port"), user=d.get("user"),
            max_strategies=caps["maxStrategies"], supported_apis=frozenset(caps["supportedApis"]),
            region=meta.get("region"), proxy=meta.get("proxy"), workdir=d.get("workdir"),
            runner=tuple(d["runner"]), cordoned=d["cordoned"], drain=d["drain"], source=doc.loc("id"),
        )

    def settings(self, doc: _Doc | None) -> FleetSettings:
        """The settings of the Fleet document; where a field has a schema error, its default (what
        the lease rule is then checked with, see lease_rule)."""
        if doc is None:
            return FleetSettings()
        v = doc.value
        command = v("notify", "command")
        interval = float(v("reconcile", "intervalSeconds"))
        deadline = v("reconcile", "probeDeadlineSeconds")
        cron = v("reconcile", "cronPeriodSeconds")
        rebalance = v("reconcile", "rebalance", "intervalSeconds")
        leader = v("reconcile", "leaderLeaseSeconds")
        return FleetSettings(
            name=v("name"),
            policy=v("policy"),
            reconcile_interval_s=interval,
            probe_deadline_s=float(deadline) if deadline is not None else default_probe_deadline(interval),
            cron_period_s=float(cron) if cron is not None else None,
            rebalance_every_s=float(rebalance) if rebalance is not None else None,
            rebalance_max_moves=int(v("reconcile", "rebalance", "maxMoves")),
            leader_lease_s=float(leader) if leader is not None else None,
            monitor=MonitorSettings(
                worker_offline_after_s=float(v("monitor", "workerOfflineAfterSeconds")),
                lease_ttl_s=float(v("monitor", "leaseTtlSeconds")), auto_recover=v("monitor", "autoRecover"),
                controller_restart_s=float(v("monitor", "controllerRestartSeconds")),
                brake_share=float(v("monitor", "failoverBrakeShare")),
            ),
            notify=NotifySettings(
                webhook=v("notify", "webhook"),
                command=(command,) if isinstance(command, str) else (tuple(command) if command else None),
                chats=self.chats(doc), chat_per_minute=int(v("notify", "chatPerMinute")),
            ),
            ssh=SshSettings(
                parallelism=v("ssh", "parallelism"), connect_timeout_s=float(v("ssh", "connectTimeoutSeconds")),
                command_timeout_s=float(v("ssh", "commandTimeoutSeconds")), config=v("ssh", "config"),
                known_hosts=v("ssh", "knownHosts"),
            ),
            source=doc.loc("kind"),
        )

    def lease_rule(self, doc: _Doc, settings: FleetSettings) -> None:
        """The lease rule of the Fleet document `doc`, whose settings are `settings`. A break that
        rests on a default put in for a field with a schema error is not reported: that field's
        problem is, and the rule is judged again once it has a value."""
        broken = settings.lease_rule_break()
        if broken is None or any(_replaced(doc, field) for field in broken.reads):
            return
        self.r.problem(doc.loc(*broken.field.split(".")), f"Fleet: {broken.message}")

    def unique(self, docs: list[_Doc], kind: str) -> list[_Doc]:
        """`docs` less those that repeat an earlier id (each reported). A document whose id failed
        the schema cannot be compared, and stays."""
        first: dict[str, _Doc] = {}
        out = []
        for doc in docs:
            ident = doc.ident()
            if ident is not None and ident in first:
                other = first[ident].loc("id")
                self.r.problem(doc.loc("id"), f"duplicate {kind} id {ident!r}: also defined at {other}; ids must be unique")
                continue
            if ident is not None:
                first[ident] = doc
            out.append(doc)
        return out

    def shared_accounts(self, docs: list[_Doc]) -> None:
        """Two strategies must not trade one account+symbol unless both say shareAccount. A Strategy
        takes part when its account, params and shareAccount passed the schema."""
        seen: dict[tuple[str, str], _Doc] = {}
        for doc in docs:
            needed = (("requirements", "account"), ("params",), ("scheduling", "shareAccount"))
            if not all(doc.usable(*f) for f in needed):
                continue
            account = doc.value("requirements", "account")
            params = doc.value("params")
            symbol = params.get("symbol") if isinstance(params, dict) else None
            if account is None or not isinstance(symbol, str):
                continue
            key = (account, symbol)
            if key in seen:
                other = seen[key]
                if not (doc.value("scheduling", "shareAccount") and other.value("scheduling", "shareAccount")):
                    self.r.problem(
                        doc.loc("requirements", "account"),
                        f"{doc.label()}: account {account} already trades {symbol} in {_named(other, 'strategy')} "
                        f"({other.loc('requirements', 'account')}); set scheduling.shareAccount: true on both "
                        "if they may share it",
                    )
                continue
            seen[key] = doc

    def workdirs(self, docs: list[_Doc]) -> None:
        """Two workers must not share a workdir on one host. A Worker takes part when its host, port,
        user and workdir passed the schema."""
        seen: dict[tuple[str, int | None, str | None, str], _Doc] = {}
        for doc in docs:
            if not all(doc.usable(f) for f in ("host", "port", "user", "workdir")):
                continue
            workdir, host = doc.value("workdir"), doc.value("host")
            if workdir is None:
                continue
            key = (host, doc.value("port"), doc.value("user"), workdir.rstrip("/"))
            if key in seen:
                self.r.problem(doc.loc("workdir"), f"{doc.label()}: workdir {workdir} on host {host} is "
                               f"also used by {_named(seen[key], 'worker')}; give each worker its own workdir")
                continue
            seen[key] = doc


def _named(doc: _Doc, noun: str) -> str:
    """"strategy s1" in a message about another document; "another strategy" when its id is not a string."""
    written = doc.data.get("id")
    return f"{noun} {_named_id(written)}" if isinstance(written, str) else f"another {noun}"


def _replaced(doc: _Doc, field: str) -> bool:
    """Whether the Fleet document's `field` (dotted) holds a default put in for a schema error."""
    path = tuple(field.split("."))
    if not doc.usable(*path):
        return True
    # A probe deadline not written follows the interval.
    return (path == ("reconcile", "probeDeadlineSeconds") and doc.value(*path) is None
            and not doc.usable("reconcile", "intervalSeconds"))


def parse_fleet(root: Path, files: list[FleetFile], problems: list[Problem]) -> ParsedFleet:
    """The YAML files of the fleet directory at `root` (as shown in messages) parsed and checked;
    `problems`: what the adapter could not read (folders, a checkout), reported with the rest."""
    parsed = ParsedFleet(root)
    for problem in problems:
        parsed.problem((problem.file, problem.line), problem.message)
    for found in files:
        parsed.add_file(found)
    return parsed


def build_fleet(parsed: ParsedFleet, strategy_files: Mapping[str, StrategyFile]) -> Fleet:
    """The validated Fleet, or FleetInvalid with every problem. `strategy_files`: what the adapter
    found for each of `parsed.strategy_files()`."""
    builder = _Builder(parsed, strategy_files)
    by_kind = parsed.by_kind()
    fleet_docs = by_kind["Fleet"]
    for extra in fleet_docs[1:]:
        parsed.problem(extra.loc("kind"), f"more than one Fleet document: the first is at {fleet_docs[0].loc('kind')}")
    settings = builder.settings(fleet_docs[0] if fleet_docs else None)
    if fleet_docs:
        builder.lease_rule(fleet_docs[0], settings)

    worker_docs = builder.unique(by_kind["Worker"], "Worker")
    builder.workdirs(worker_docs)
    workers = [(d, builder.worker(d)) for d in worker_docs if d.valid]
    first_of_id = {id(d) for d in builder.unique(by_kind["Strategy"], "Strategy")}
    strategies = []
    for doc in by_kind["Strategy"]:
        # Every Strategy's file and params are checked, a repeated id's too; specs only of the first.
        spec = builder.strategy(doc)
        if spec is not None and id(doc) in first_of_id:
            strategies.append((doc, spec))
    builder.shared_accounts([d for d in by_kind["Strategy"] if id(d) in first_of_id])

    root = parsed.root
    if not parsed.files and not parsed.problems:
        parsed.problem((str(root), 0), "no *.yaml or *.yml files found; run `quantlab init` to start one")
    if parsed.problems:
        raise FleetInvalid(parsed.problems)

    digest = hashlib.sha256()
    for rel in sorted(parsed.digests):
        digest.update(f"{rel}\0{parsed.digests[rel]}\n".encode())
    return Fleet(
        root=root,
        settings=settings,
        strategies=MappingProxyType({s.id: s for _, s in sorted(strategies, key=lambda p: p[1].id)}),
        workers=MappingProxyType({w.id: w for _, w in sorted(workers, key=lambda p: p[1].id)}),
        fleet_hash="sha256:" + digest.hexdigest(),
        files=tuple(parsed.files),
    )
