"""Step one of validating a fleet: its YAML files parsed and each document checked against its
schema, into a `ParsedFleet` that gathers the documents of a known kind and every problem found.

A file that cannot be used (unreadable, an LFS pointer, not UTF-8, broken YAML, too large once its
aliases expand) is reported and skipped; the other files go on, so that one run reports every
problem. Step two (kinds.py, crossrefs.py, in loader.build_fleet) reads the documents gathered here.
"""
from __future__ import annotations

import hashlib
import posixpath
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .documents import Document, check_document
from .inputs import FleetFile, file_problem
from .models import Location
from .problems import MAX_MESSAGE, Problem, clip, dotted
from .schemas import apply_defaults, schemas_by_kind
from .yamldocs import MAX_DEPTH, MAX_VALUES_PER_FILE, YamlFile, load_all, oversized


@dataclass
class ParsedFleet:
    """The fleet's YAML files parsed and checked against the schemas: every document of a known
    kind (valid or with schema errors, see Document.spoiled), and every problem found so far.
    `build_fleet` adds the cross-references and the models."""

    root: Path
    problems: list[Problem] = field(default_factory=list)
    docs: list[Document] = field(default_factory=list)
    digests: dict[str, str] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)

    def problem(self, where: Location | tuple[str, int], message: str) -> None:
        file, line = (where.file, where.line) if isinstance(where, Location) else where
        self.problems.append(Problem(file, line, clip(message, MAX_MESSAGE)))

    def by_kind(self) -> dict[str, list[Document]]:
        out: dict[str, list[Document]] = {"Strategy": [], "Worker": [], "Fleet": []}
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
        file = YamlFile(shown, text, len(documents))
        if not self.small_enough(file, documents):
            return
        for index, data in enumerate(documents):
            checked = check_document(data)
            for path, message in checked.problems:
                self.problem((shown, file.line(index, path) if path else file.doc_start(index)), message)
            if checked.schema_ran:
                kind = data["kind"]
                self.docs.append(Document(kind, apply_defaults(data, schemas_by_kind()[kind]), file, index,
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
            documents, duplicates = load_all(text)
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

    def small_enough(self, file: YamlFile, documents: list[Any]) -> bool:
        """False once a document that expands too far or nests too deep is reported. The first
        one ends the file: nothing else in it is expanded."""
        budget = MAX_VALUES_PER_FILE
        for index, data in enumerate(documents):
            budget, path, reason = oversized(data, budget)
            if reason is not None:
                where = file.line(index, path) if path else file.doc_start(index)
                self.problem((file.shown, where), f"{dotted(path) or 'document'}: {reason}")
                return False
        return True
