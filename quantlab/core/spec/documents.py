"""One document against its schema: the schema errors worded for people, and the `Document` a
document of a known kind becomes, schema defaults filled in.

A document with schema errors is kept, with the paths of the fields they spoil: the cross-references
still read its other fields, so that one run reports every problem of the fleet.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Iterator

from .models import Location
from .problems import CLIP, clip, did_you_mean, dotted, named_id, shown, type_name
from .schemas import api_version, schema_at, schemas_by_kind, validator_for
from .yamldocs import YamlFile


def schema_message(error: Any, schema: dict[str, Any]) -> tuple[list[Any], str]:
    """(path of the offending key, message) for one jsonschema error, worded for people."""
    path = list(error.absolute_path)
    where = dotted(path) or "document"
    value = error.instance
    description = schema_at(schema, path).get("description")
    hint = f" ({description})" if description else ""
    v = error.validator
    if v == "required":
        missing = error.message.split("'")[1] if "'" in error.message else error.message
        return path, f"missing required field {dotted(path + [missing])!r}"
    if v == "const":
        return path, f"{where} must be {error.validator_value!r}, got {shown(value)}"
    if v == "enum":
        options = [str(o) for o in error.validator_value]
        suggestion = "" if isinstance(value, (dict, list)) else did_you_mean(str(value), options)
        return path, f"{where}: {shown(value)} is not one of {', '.join(options)}{suggestion}"
    if v == "type":
        expected = error.validator_value
        expected = " or ".join(expected) if isinstance(expected, list) else expected
        note = ""
        if isinstance(value, bool) and "string" in str(expected):
            note = " (YAML reads yes/no/on/off/NO as booleans: quote the value)"
        return path, f"{where}: expected {expected}, got {type_name(value)} {shown(value)}{note}"
    if v == "pattern":
        # A regex tells a person little: the schema says in words what the field takes (the key
        # editors show too), and a schema without such words still never shows the regex.
        words = error.schema.get("patternErrorMessage")
        if words:
            return path, f"{where}: {shown(value)} {words}"
        return path, f"{where}: {shown(value)} is not in the form this field takes{hint}"
    if v in ("minimum", "exclusiveMinimum"):
        word = "at least" if v == "minimum" else "more than"
        return path, f"{where}: {shown(value)} is too small (must be {word} {error.validator_value})"
    if v in ("maximum", "exclusiveMaximum"):
        word = "at most" if v == "maximum" else "less than"
        return path, f"{where}: {shown(value)} is too large (must be {word} {error.validator_value})"
    # jsonschema's own wording quotes the whole value
    return path, f"{where}: {clip(error.message, 4 * CLIP)}{hint}"


def schema_messages(error: Any, schema: dict[str, Any]) -> Iterator[tuple[list[Any], str, tuple[Any, ...]]]:
    """Like schema_message, but one message for each unknown field (jsonschema groups them), and
    with the field each one spoils: a missing field's own path, not its parent's (where it is shown)."""
    if error.validator == "additionalProperties":
        path = list(error.absolute_path)
        allowed = sorted(error.schema.get("properties", {}))
        for key in sorted(k for k in error.instance if k not in allowed):
            yield path + [key], (
                f"unknown field {dotted(path + [key])!r}{did_you_mean(key, allowed)}; "
                f"allowed here: {', '.join(allowed)}"
            ), (*path, key)
        return
    path, message = schema_message(error, schema)
    spoiled = tuple(path)
    if error.validator == "required" and "'" in error.message:
        spoiled += (error.message.split("'")[1],)
    yield path, message, spoiled


@dataclass(frozen=True)
class Checked:
    """One document against its schema: its problems as (path, message), the fields they spoil, and
    whether the schema could run at all (a mapping of a known apiVersion and kind)."""

    problems: list[tuple[list[Any], str]]
    spoiled: tuple[tuple[Any, ...], ...] = ()
    schema_ran: bool = False


def check_document(data: Any) -> Checked:
    """Schema problems of one parsed document; none when valid."""
    if data is None:
        return Checked([([], "empty document: remove the extra '---' or fill it in")])
    if not isinstance(data, dict):
        return Checked([([], f"document is a {type_name(data)}; expected a mapping with apiVersion and kind")])
    kinds = schemas_by_kind()
    version = api_version()
    if data.get("apiVersion") != version:
        # Another version's fields may mean something else: nothing in it is read.
        got = data.get("apiVersion")
        what = "missing apiVersion" if got is None else f"unknown apiVersion {shown(got)}"
        return Checked([(["apiVersion"] if got is not None else [], f"{what}; expected {version}")])
    kind = data.get("kind")
    if not isinstance(kind, str) or kind not in kinds:
        if kind is None:
            return Checked([([], f"missing kind; expected one of {', '.join(kinds)}")])
        suggestion = "" if isinstance(kind, (dict, list)) else did_you_mean(str(kind), list(kinds))
        return Checked([(["kind"], f"unknown kind {shown(kind)}{suggestion}; "
                                   f"expected one of {', '.join(kinds)}")])
    label = f"{kind} {named_id(data['id'])}: " if isinstance(data.get("id"), str) else f"{kind}: "
    errors = sorted(validator_for(kind).iter_errors(data), key=lambda e: [str(p) for p in e.absolute_path])
    found = [(path, label + message, spoiled)
             for e in errors for path, message, spoiled in schema_messages(e, kinds[kind])]
    return Checked([(path, message) for path, message, _ in found], tuple({s: None for _, _, s in found}),
                   schema_ran=True)


_UNSET = object()


@dataclass
class Document:
    """A document of a known kind, schema defaults filled in. `spoiled`: the paths of its fields
    with schema errors (none: the document is valid, and only then is a model built from it). The
    cross-references still read its other fields, so that one run reports every problem."""

    kind: str
    data: dict[str, Any]
    file: YamlFile
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
        return f"{self.kind} {named_id(written)}" if isinstance(written, str) else self.kind

    def written_strategy_file(self) -> str | None:
        """Its strategyFile when that names a file at all (a path with a wrong extension is still
        checked: a missing file is a second problem, not a consequence of the first)."""
        written = self.data.get("strategyFile") if self.kind == "Strategy" else None
        return written if isinstance(written, str) and written else None
