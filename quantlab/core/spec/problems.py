"""What is wrong with a fleet, and how it is said: a `Problem` at FILE:LINE, `FleetInvalid` with all
of them, and the wording every check shares (values clipped, paths dotted, a close match offered).

Values in a fleet may be megabytes long or hold control characters: a message shows them through
these helpers only, so that one problem stays one short line.
"""
from __future__ import annotations

import difflib
import reprlib
from dataclasses import dataclass
from typing import Any

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


def clip(text: str, limit: int = CLIP) -> str:
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} characters)"


_SHORT_REPR = reprlib.Repr()  # for lists and mappings: a few items, a few levels
_SHORT_REPR.maxlevel, _SHORT_REPR.maxlist, _SHORT_REPR.maxdict, _SHORT_REPR.maxstring = 2, 4, 4, 40


def shown(value: Any) -> str:
    """repr(value) for a message, clipped: a value may be megabytes long."""
    if isinstance(value, str):
        return repr(value) if len(value) <= CLIP else f"{value[:CLIP]!r}… ({len(value)} characters)"
    if isinstance(value, (dict, list)):
        return clip(_SHORT_REPR.repr(value))
    return clip(repr(value))


def named_id(written: str) -> str:
    """An id as a message names it: as written, or quoted with escapes when it holds a newline or
    another control character (which would split the problem's line, or pass for another problem)."""
    return clip(written) if written.isprintable() else shown(written)


def dotted(path: list[Any]) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{clip(str(part))}" if out else clip(str(part))
    return out


def did_you_mean(word: str, options: list[str]) -> str:
    if len(word) > CLIP:  # no field name is that long, and comparing a huge value is slow
        return ""
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def type_name(value: Any) -> str:
    names = {bool: "boolean", int: "integer", float: "number", str: "string", list: "list",
             dict: "mapping", type(None): "null"}
    return names.get(type(value), type(value).__name__)
