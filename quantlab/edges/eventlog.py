"""The events log: one JSON object per line, appended and read back, each record checked
(event_problem) before it is shown, since a host and a strategy put text in it.
"""
from __future__ import annotations

import json
import os
import stat
import threading
from pathlib import Path
from typing import Any, Iterator

from .atomicfile import NotARegularFile
from .store import StateError, open_regular

# The last instant a date can show (9999-12-31T23:59:59.999Z), in epoch ms.
LAST_EVENT_T = 253402300799999
# Fields that name something (a strategy, a worker, who acted...): text or null when present.
EVENT_NAME_FIELDS = ("event", "strategy", "worker", "from", "to", "actor", "outcome", "kind", "revision")


def event_problem(event: Any) -> str | None:
    """Why `event` (one parsed events log line, or an event a host reported) is not an event that
    can be read, filtered, sorted and shown; None when it is: an object whose time `t`, when it has
    one, is epoch ms, and whose fields that name something hold text (or null). Free text fields
    (detail, reason, error, message) may hold anything: they are shown as text."""
    if not isinstance(event, dict):
        return f"a JSON {_json_kind(event)}, not an event object"
    t = event.get("t", 0)
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 <= t <= LAST_EVENT_T:
        return f"its time t is {str(t)[:40]!r}, not epoch milliseconds"
    for key in EVENT_NAME_FIELDS:
        if event.get(key) is not None and not isinstance(event[key], str):
            return f"its {key} is a JSON {_json_kind(event[key])}, not text"
    return None


def _json_kind(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean",
            type(None): "null"}.get(type(value), type(value).__name__)


class EventLog:
    """History as JSON Lines beside the state file, rotated by size so it cannot fill the disk."""

    def __init__(self, path: str | Path, max_bytes: int = 5 * 1024 * 1024, keep: int = 3):
        self.path = Path(path)
        self.max_bytes, self.keep = max_bytes, keep
        self.failure: str | None = None       # why an append failed, if one did (kept: a run reports it)
        self._lock = threading.Lock()          # apply records outcomes from one thread per host
        # Of the last read: how many lines were skipped, and the first of them as "FILE:LINE: why".
        self.skipped = 0
        self.first_skipped: str | None = None

    def append(self, event: dict[str, Any]) -> bool:
        """Add one event; False (and `failure` says why) when it could not be written. History is
        best effort: a full disk or a FIFO in the log's place must never stop what it records."""
        with self._lock:
            try:
                self._append(event)
            except OSError as exc:
                self.failure = f"{self.path}: cannot write the events log: {exc}"
                return False
            return True

    def _append(self, event: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        line = (json.dumps(event, sort_keys=True, ensure_ascii=False) + "\n").encode()
        try:
            size = self.path.stat().st_size
            if size and size + len(line) > self.max_bytes:     # never rotate an empty file
                self._rotate()
        except FileNotFoundError:
            pass
        # O_NONBLOCK: a FIFO put in the log's place fails the open instead of hanging it.
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK | os.O_CLOEXEC, 0o600)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise NotARegularFile(f"{self.path} is not a regular file")
            os.write(fd, line)
        finally:
            os.close(fd)

    def _rotate(self) -> None:
        for n in range(self.keep - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{n}")
            if older.exists():
                os.replace(older, self.path.with_name(f"{self.path.name}.{n + 1}"))
        os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))

    def read(self) -> Iterator[dict[str, Any]]:
        """Every recorded event, oldest first. A line that is not an event (bad JSON, a cut line, or
        odd types: see event_problem) is skipped and counted in `skipped`, the first one named in
        `first_skipped`: one bad line must never hide the rest of the history."""
        self.skipped, self.first_skipped = 0, None
        files = [self.path.with_name(f"{self.path.name}.{n}") for n in range(self.keep, 0, -1)] + [self.path]
        for file in files:
            try:
                with open_regular(file) as handle:
                    for number, raw in enumerate(handle, 1):
                        if not raw.strip():
                            continue
                        try:
                            event = json.loads(raw)
                            why = event_problem(event)
                        except ValueError:          # bad JSON, or bytes that are not UTF-8
                            why = "not a line of JSON"
                        except RecursionError:      # nested too deep to parse
                            why = "nested too deep"
                        if why is None:
                            yield event
                            continue
                        self.skipped += 1
                        if self.first_skipped is None:
                            self.first_skipped = f"{file}:{number}: {why}"
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise StateError(f"cannot read the events log: {exc}; move it away") from None
