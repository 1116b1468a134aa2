"""The state port: where a fleet's state lives, with its events, checkpoint copies and the fleet
page's snapshot — a local folder (one controller at a time, under the state file's lock) or
PostgreSQL (several controllers, one leading, plans handed to the leader). The controller and the
commands see StateBackend only; the two adapters are the only code that knows which it is.

What stays on this machine whatever the backend (checkouts of commits, the pull mirror) is not the
state's, and lives in the local state folder."""
from __future__ import annotations

from pathlib import Path
from typing import Any, ContextManager, Iterator, Protocol

from quantlab.core.memory import Memory
from .snapshot import SnapshotFile
from quantlab.core.leadership import LeaderKind
from .checkpointstore import CheckpointStore
from .eventlog import EventLog
from .store import StateError, StateStore
from .pgleader import Leadership, PlanRequests
from .pgstate import PgCheckpointStore, PgEventLog, PgSnapshot, PgStore


class StatePort(Protocol):
    """The state itself, as the Ledger reads and writes it (store.StateStore, pgstate.PgStore)."""

    path: Any                         # how messages name the state: a file's path, or the database's place

    def fresh(self) -> "StatePort": ...
    def load(self) -> Memory: ...
    def changed_since_saved(self) -> bool: ...
    def save(self, memory: Memory) -> Memory: ...
    def writing(self, timeout: float = ...) -> ContextManager[None]: ...
    def lock(self, timeout: float = 0.0, command: str | None = None) -> ContextManager[None]: ...
    def holder(self) -> dict[str, Any] | None: ...


class EventsPort(Protocol):
    failure: str | None               # why an append failed, if one did (a run reports it)
    skipped: int                      # of the last read: entries that are not events,
    first_skipped: str | None         # and the first of them, named

    def append(self, event: dict[str, Any]) -> bool: ...
    def read(self) -> Iterator[dict[str, Any]]: ...


class CheckpointsPort(Protocol):
    folder: Any                       # where the copies are, for messages

    def save(self, strategy: str, checkpoint: dict[str, Any]) -> None: ...
    def save_many(self, copies: dict[str, dict[str, Any]]) -> None: ...
    def names(self) -> list[str]: ...
    def hash_of(self, strategy: str) -> str | None: ...
    def forget(self, strategy: str) -> bool: ...
    def prune(self, keep: set[str], now_s: float, retention_s: float) -> list[str]: ...
    def load(self, strategy: str) -> dict[str, Any] | None: ...


class SnapshotsPort(Protocol):
    def write(self, snapshot: dict[str, Any]) -> None: ...
    def read(self) -> dict[str, Any] | None: ...
    def version(self) -> str | None: ...


class NotShared(StateError):
    """What only a shared (PostgreSQL) state has was asked of the state file."""


class StateBackend(Protocol):
    # Several controllers may run on it, one leading at a time (PostgreSQL); else one at a time,
    # under the state file's lock.
    shared: bool

    @property
    def store(self) -> StatePort: ...
    @property
    def events(self) -> EventsPort: ...
    @property
    def checkpoints(self) -> CheckpointsPort: ...

    def snapshots(self) -> SnapshotsPort:
        """Where the snapshot of the last writing round is kept, for the fleet page."""
        ...

    def leadership(self, holder: str, kind: LeaderKind = "run") -> Any:
        """The leadership row, seen by `holder`, which takes it as `kind` (pgleader.Leadership);
        NotShared for the file."""
        ...

    def plan_requests(self) -> Any:
        """Plans handed to the leading daemon (pgleader.PlanRequests); NotShared for the file."""
        ...

    def break_locks(self) -> int:
        """End the sessions of a deposed leader that still hold the state's locks; how many."""
        ...


class FileBackend:
    """The state file and what sits beside it in its folder."""

    shared = False

    def __init__(self, state_path: Path):
        self.state_path = state_path
        self.store: StatePort = StateStore(state_path)
        self.events: EventsPort = EventLog(state_path.with_name("events.jsonl"))
        self.checkpoints: CheckpointsPort = CheckpointStore(state_path.with_name("checkpoints"))

    def snapshots(self) -> SnapshotsPort:
        return SnapshotFile(self.state_path.with_name("snapshot.json"))

    def leadership(self, holder: str, kind: LeaderKind = "run") -> Any:
        raise NotShared("leadership needs a PostgreSQL state (--state postgresql://… or QUANTLAB_STATE): with the "
                        "state file, the one reconcile loop that holds its lock leads")

    def plan_requests(self) -> Any:
        raise NotShared("plans are handed to a leader only with a PostgreSQL state")

    def break_locks(self) -> int:
        return 0                  # a process that dies lets go of its flock; there is no one else's to end


def open_backend(state_path: Path, dsn: str | None) -> StateBackend:
    """The backend of `dsn` (postgresql://…) when given, else of the state file `state_path`."""
    if dsn is None:
        return FileBackend(state_path)
    return PgBackend(dsn)


class PgBackend:
    """The state port on PostgreSQL (pgstate.py, pgleader.py): the state, events, checkpoint
    copies, snapshot, leadership row and handed plans, all in one database."""

    shared = True

    def __init__(self, dsn: str):
        self.store = PgStore(dsn)
        self.db = self.store.db
        self.events = PgEventLog(self.db)
        self.checkpoints = PgCheckpointStore(self.db)

    def snapshots(self) -> PgSnapshot:
        return PgSnapshot(self.db)

    def leadership(self, holder: str, kind: LeaderKind = "run") -> Leadership:
        return Leadership(self.db, holder, kind)

    def plan_requests(self) -> PlanRequests:
        return PlanRequests(self.db)

    def break_locks(self) -> int:
        return self.store.break_locks()
