"""The state in PostgreSQL (psycopg 3): the same `Memory` as the JSON file with the same semantics —
one lineage, a serial that grows only on change, every update one transaction with a
compare-and-swap on the serial — in a versioned schema that quantlab creates and migrates under a
migration lock (an older quantlab refuses a newer schema).

Credentials come from libpq's usual places (PGPASSFILE, service files, the environment): a DSN
that carries a password is refused, since it would show in `ps`, shell history, lock records and
events. TLS settings in the DSN (sslmode and friends) are passed on as they are.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import socket
import sys
import threading
import time
import uuid
from dataclasses import replace
from typing import Any, Iterator

from .snapshot import FORMAT as SNAPSHOT_FORMAT
from quantlab.core.memory import Memory, MemoryFormatError
from .store import LockHeld, StateConflict, StateError
from .eventlog import event_problem

SCHEMA_VERSION = 3
MIGRATION_LOCK = 0x716C6D67          # pg_advisory_xact_lock key: one migration at a time
CONNECT_TIMEOUT_S = 5
# Every wait on the database has a deadline: a statement, a row lock, a transaction left open.
SESSION_OPTIONS = ("-c statement_timeout=10000 -c lock_timeout=10000 -c idle_in_transaction_session_timeout=30000 "
                   # the server drops a dead client's session (and the advisory locks it holds) too
                   "-c tcp_keepalives_idle=5 -c tcp_keepalives_interval=2 -c tcp_keepalives_count=3")
# After a failed connection, calls fail at once for this long (see PgState._connect), per DSN.
UNREACHABLE_S = 10.0
_UNREACHABLE: dict[str, tuple[float, str]] = {}
# ... and so does the link, on this side: a server that stops answering (a partition that drops
# packets) fails the call within about ten seconds instead of hanging it.
LINK_DEADLINES = {"keepalives": 1, "keepalives_idle": 5, "keepalives_interval": 2, "keepalives_count": 2,
                  "tcp_user_timeout": 10000}


def check_dsn(dsn: str) -> dict[str, str]:
    """The DSN's parts; StateError when it cannot be used (it carries a password, or does not parse)."""
    try:
        from psycopg.conninfo import conninfo_to_dict
    except ImportError:
        raise StateError("a postgresql:// state needs psycopg: pip install 'quantlab[postgres]'") from None
    try:
        parts = {k: str(v) for k, v in conninfo_to_dict(dsn).items()}
    except Exception as exc:              # psycopg.ProgrammingError: the DSN does not parse
        # libpq quotes the token it could not read, which may be (part of) a password: not shown.
        said = re.sub(r'"[^"]*"', '"…"', str(exc))
        raise StateError(f"cannot read the state DSN: {said}") from None
    if parts.get("password"):
        raise StateError("the state DSN carries a password, which would show in ps, shell history, lock records "
                         "and events: put it in a PGPASSFILE (~/.pgpass) or a pg_service.conf entry instead")
    return parts


class PgState:
    """One PostgreSQL database holding one fleet's state."""

    def __init__(self, dsn: str):
        self.parts = check_dsn(dsn)
        self.dsn = dsn

    def where(self) -> str:
        p = self.parts
        return f"postgresql://{p.get('user', '')}@{p.get('host', 'localhost')}:{p.get('port', '5432')}/{p.get('dbname', '')}"

    def _connect(self, probe: bool = False) -> Any:
        """A connection. Once one could not be made, the next calls fail at once for a while
        (UNREACHABLE_S) instead of each waiting out the connect timeout: a renewal round makes
        several calls and must not spend its time on a database that is away. Only a `probe` (the
        leadership row's renewal, on its own job) tries meanwhile, and a success closes the breaker."""
        import psycopg

        broken = _UNREACHABLE.get(self.dsn)
        if broken is not None and not probe and time.monotonic() < broken[0]:
            raise StateError(broken[1])
        extra: dict[str, Any] = {k: v for k, v in {"options": SESSION_OPTIONS, **LINK_DEADLINES}.items()
                                 if k not in self.parts}
        try:
            conn = psycopg.connect(self.dsn, connect_timeout=int(self.parts.get("connect_timeout") or CONNECT_TIMEOUT_S),
                                   **extra)
        except psycopg.OperationalError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            message = f"cannot reach the state database {self.where()}: {first}"
            _UNREACHABLE[self.dsn] = (time.monotonic() + UNREACHABLE_S, message)
            raise StateError(message) from None
        _UNREACHABLE.pop(self.dsn, None)
        return conn

    @contextlib.contextmanager
    def session(self, probe: bool = False) -> Iterator[Any]:
        """One connection for one transaction (committed when the block ends without an error); a
        database fault on the way is a StateError naming the database, never a crash."""
        import psycopg

        conn = self._connect(probe)
        try:
            with conn:
                yield conn
        except psycopg.Error as exc:
            text = str(exc).strip()
            raise StateError(f"the state database {self.where()}: "
                             f"{text.splitlines()[0] if text else type(exc).__name__}") from None

    # --- schema --------------------------------------------------------------------------------

    def migrate(self) -> int:
        """Create or upgrade the schema (one process at a time); the schema version now."""
        with self.session() as conn:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            conn.execute("CREATE TABLE IF NOT EXISTS quantlab_schema (version integer NOT NULL)")
            row = conn.execute("SELECT max(version) FROM quantlab_schema").fetchone()
            found = row[0] if row and row[0] is not None else 0
            if found > SCHEMA_VERSION:
                raise StateError(f"the state database {self.where()} has schema version {found}, newer than this "
                                 f"quantlab's ({SCHEMA_VERSION}): use a newer quantlab")
            if found < 1:
                conn.execute("""CREATE TABLE quantlab_state (
                                  id smallint PRIMARY KEY DEFAULT 1 CHECK (id = 1),
                                  lineage text NOT NULL,
                                  serial bigint NOT NULL,
                                  content jsonb NOT NULL,
                                  saved_at timestamptz NOT NULL DEFAULT now())""")
                conn.execute("""CREATE TABLE quantlab_events (
                                  id bigserial PRIMARY KEY, t bigint NOT NULL, body jsonb NOT NULL)""")
                conn.execute("""CREATE TABLE quantlab_checkpoints (
                                  strategy text PRIMARY KEY, hash text, body jsonb NOT NULL,
                                  changed_at timestamptz NOT NULL DEFAULT now(), gone_at timestamptz)""")
                conn.execute("CREATE TABLE quantlab_lock (id smallint PRIMARY KEY DEFAULT 1, holder jsonb)")
                conn.execute("""CREATE TABLE quantlab_leader (
                                  id smallint PRIMARY KEY DEFAULT 1 CHECK (id = 1), holder text,
                                  term bigint NOT NULL, renewals bigint NOT NULL, duration_ms bigint NOT NULL,
                                  since timestamptz NOT NULL DEFAULT now())""")
                conn.execute("INSERT INTO quantlab_schema (version) VALUES (1)")
            if found < 2:
                # 2: a hand-over asked of the leader (`quantlab leader step-down`), and plans handed to
                # the leader by an interactive `apply`.
                conn.execute("ALTER TABLE quantlab_leader ADD COLUMN handover boolean NOT NULL DEFAULT false")
                conn.execute("""CREATE TABLE quantlab_requests (
                                  id bigserial PRIMARY KEY, created_at timestamptz NOT NULL DEFAULT now(),
                                  by text NOT NULL, body jsonb NOT NULL, status text NOT NULL DEFAULT 'pending',
                                  answer jsonb, answered_at timestamptz)""")
                conn.execute("INSERT INTO quantlab_schema (version) VALUES (2)")
            if found < 3:
                # 3: the fleet page's snapshot of the leader's last round (`quantlab serve`).
                conn.execute("""CREATE TABLE quantlab_snapshot (
                                  id smallint PRIMARY KEY DEFAULT 1 CHECK (id = 1), version bigint NOT NULL,
                                  body jsonb NOT NULL)""")
                conn.execute("INSERT INTO quantlab_schema (version) VALUES (3)")
            # When the row was last renewed, on the database's clock, and at which renewal: a standby
            # that has just started can then tell how long the row has stood still without watching it
            # for a whole lease first (leadership.may_take_over). Added without a schema version:
            # earlier releases read and write the row by column name and leave these alone, and a row
            # one of them renewed last has renewed_count ≠ renewals, so its age is not trusted.
            conn.execute("ALTER TABLE quantlab_leader ADD COLUMN IF NOT EXISTS renewed_at timestamptz, "
                         "ADD COLUMN IF NOT EXISTS renewed_count bigint")
            # What kind of controller holds the row (leadership.LeaderKind), and in which term it said
            # so: an earlier release takes the row in a new term without writing these, so a kind
            # whose kind_term is not the row's term is not trusted (leadership.leader_kind).
            conn.execute("ALTER TABLE quantlab_leader ADD COLUMN IF NOT EXISTS holder_kind text, "
                         "ADD COLUMN IF NOT EXISTS kind_term bigint")
            return SCHEMA_VERSION

    # --- the state -----------------------------------------------------------------------------

    def load(self) -> Memory:
        with self.session() as conn:
            row = conn.execute("SELECT lineage, serial, content FROM quantlab_state WHERE id = 1").fetchone()
        if row is None:
            return Memory()
        lineage, serial, content = row
        try:
            return Memory.from_json({**content, "lineage": lineage, "serial": serial})
        except MemoryFormatError as exc:
            raise StateError(f"the state in {self.where()} cannot be read: {exc}") from None

    def save(self, memory: Memory, expected_serial: int) -> Memory:
        """Write `memory` if its content changed, in one transaction that first checks that the
        stored serial is still `expected_serial` (StateConflict otherwise: nothing is written).
        Returns it with the serial (and lineage) it now has."""
        with self.session() as conn:
            row = conn.execute("SELECT lineage, serial, content FROM quantlab_state WHERE id = 1 FOR UPDATE").fetchone()
            if row is None:
                if expected_serial != 0:
                    raise StateConflict(f"the state in {self.where()} is gone (expected serial {expected_serial})")
                lineage = memory.lineage or str(uuid.uuid4())
                saved = replace(memory, lineage=lineage, serial=1, lease_key=memory.lease_key or secrets.token_hex(32))
                conn.execute("INSERT INTO quantlab_state (id, lineage, serial, content) VALUES (1, %s, 1, %s)",
                             (lineage, json.dumps(saved.content_json())))
                return saved
            lineage, serial, content = row
            if serial != expected_serial:
                raise StateConflict(f"another controller changed the state in {self.where()} (serial {serial}, "
                                    f"this one read {expected_serial}); nothing was written: read it again")
            if memory.lineage is not None and memory.lineage != lineage:
                raise StateConflict(f"the state in {self.where()} is another lineage ({lineage}, not {memory.lineage})")
            # The lease key is made once, like the lineage; a memory read before it existed keeps the stored one.
            mine = replace(memory, lineage=lineage,
                           lease_key=memory.lease_key or content.get("leaseKey") or secrets.token_hex(32))
            if mine.content_json() == content:
                return replace(mine, serial=serial)          # nothing changed: the serial stays
            conn.execute("UPDATE quantlab_state SET serial = serial + 1, content = %s, saved_at = now() WHERE id = 1",
                         (json.dumps(mine.content_json()),))
            return replace(mine, serial=serial + 1)


# --- the Ledger's store, the events log and the checkpoint copies, on PostgreSQL -------------------

def _release(conn: Any, key: int) -> None:
    """Unlock, then close: closing alone frees an advisory lock only once the server has ended the
    session, after the call returns, so the next holder could still be refused for a moment."""
    try:
        conn.execute("SELECT pg_advisory_unlock(%s)", (key,))
    except Exception:                         # noqa: BLE001 - a broken connection: closing frees it anyway
        pass
    finally:
        conn.close()


WRITE_LOCK = 0x716C7772              # held for one read-change-write of the state (milliseconds)
STATE_LOCK = 0x716C6C6B              # held by the one run that plans and acts (`apply`, an act round)
LOCK_POLL_S = 0.05


class PgStore:
    """What the Ledger needs of a state store (see store.StateStore), kept in PostgreSQL. A save is
    a compare-and-swap on the serial this store last read or wrote; the write and state locks are
    advisory locks held by a connection of their own for as long as the lock is held."""

    def __init__(self, dsn: str):
        self.db = PgState(dsn)
        self.db.migrate()
        self.path = self.db.where()          # how messages name the state
        self._serial = 0
        self._write_mutex = threading.RLock()
        self._writing: Any = None            # the connection holding the write lock

    def fresh(self) -> "PgStore":
        return PgStore(self.db.dsn)

    def load(self) -> Memory:
        memory = self.db.load()
        self._serial = memory.serial
        return memory

    def changed_since_saved(self) -> bool:
        try:
            with self.db.session() as conn:
                row = conn.execute("SELECT serial FROM quantlab_state WHERE id = 1").fetchone()
        except StateError:
            return True
        return (row[0] if row else 0) != self._serial

    def save(self, memory: Memory) -> Memory:
        saved = self.db.save(memory, self._serial)
        self._serial = saved.serial
        return saved

    def _advisory(self, key: int, timeout: float) -> Any:
        """A connection holding advisory lock `key`, or None once `timeout` passed."""
        conn = self.db._connect()
        conn.autocommit = True
        deadline = time.monotonic() + timeout
        while True:
            if conn.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()[0]:
                return conn
            if time.monotonic() >= deadline:
                conn.close()
                return None
            time.sleep(LOCK_POLL_S)

    @contextlib.contextmanager
    def writing(self, timeout: float = 10.0) -> Iterator[None]:
        with self._write_mutex:
            if self._writing is not None:
                yield
                return
            conn = self._advisory(WRITE_LOCK, timeout)
            if conn is None:
                raise StateError(f"{self.path}: another process held the state's write lock for more than "
                                 f"{timeout:g}s; is a quantlab process stuck?")
            self._writing = conn
            try:
                yield
            finally:
                self._writing = None
                _release(conn, WRITE_LOCK)

    @contextlib.contextmanager
    def lock(self, timeout: float = 0.0, command: str | None = None) -> Iterator[None]:
        conn = self._advisory(STATE_LOCK, timeout)
        if conn is None:
            raise LockHeld(self._held_message(timeout))
        try:
            holder = {"pid": os.getpid(), "host": socket.gethostname(),
                      "command": command or " ".join(["quantlab"] + sys.argv[1:]),
                      "startedAt": int(time.time() * 1000)}
            conn.execute("INSERT INTO quantlab_lock (id, holder) VALUES (1, %s) ON CONFLICT (id) DO UPDATE "
                         "SET holder = excluded.holder", (json.dumps(holder),))
            yield
        finally:
            _release(conn, STATE_LOCK)

    def break_locks(self) -> int:
        """End every other session that holds the state or write lock (a new leader's first act):
        a leader that died, froze or was cut off may still hold them on the server for as long as its
        connection looks alive there, and it does not lead any more. How many were ended."""
        with self.db.session() as conn:
            rows = conn.execute("SELECT DISTINCT pid FROM pg_locks WHERE locktype = 'advisory' AND granted AND "
                                "pid <> pg_backend_pid() AND ((classid::bigint << 32) | objid::bigint) = ANY(%s)",
                                ([STATE_LOCK, WRITE_LOCK],)).fetchall()
            return sum(1 for (pid,) in rows if conn.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone()[0])

    def holder(self) -> dict[str, Any] | None:
        try:
            with self.db.session() as conn:
                row = conn.execute("SELECT holder FROM quantlab_lock WHERE id = 1").fetchone()
        except Exception:                     # no table yet, or no answer: nobody to name
            return None
        return row[0] if row else None

    def _held_message(self, waited: float) -> str:
        info = self.holder()
        waited_words = f" after waiting {waited:g}s" if waited else ""
        who = "another process" if info is None else \
            f"pid {info.get('pid')} on {info.get('host')} ({info.get('command')})"
        return f"{self.path}: state is locked by {who}{waited_words}; wait for it to finish or pass --lock-timeout SECONDS"


class PgEventLog:
    """The events log as a table; like the file's, an append that fails is said, never fatal."""

    def __init__(self, db: PgState):
        self.db = db
        self.failure: str | None = None
        # Of the last read, as with the file: rows that are not events, and the first one named.
        self.skipped = 0
        self.first_skipped: str | None = None

    def append(self, event: dict[str, Any]) -> bool:
        try:
            with self.db.session() as conn:
                conn.execute("INSERT INTO quantlab_events (t, body) VALUES (%s, %s)",
                             (int(event.get("t") or 0), json.dumps(event)))
        except Exception as exc:              # noqa: BLE001 - history is best effort
            self.failure = f"cannot write the events to {self.db.where()}: {exc}"
            return False
        self.failure = None
        return True

    def read(self) -> Iterator[dict[str, Any]]:
        self.skipped, self.first_skipped = 0, None
        with self.db.session() as conn:
            rows = conn.execute("SELECT id, body FROM quantlab_events ORDER BY id").fetchall()
        for row_id, body in rows:
            why = event_problem(body)
            if why is None:
                yield body
                continue
            self.skipped += 1
            if self.first_skipped is None:
                self.first_skipped = f"{self.db.where()} quantlab_events row {row_id}: {why}"


class PgCheckpointStore:
    """The controller's checkpoint copies as rows; only changed ones are written."""

    def __init__(self, db: PgState):
        self.db = db
        self.folder = db.where()
        # strategy -> its copy's hash, read in one query and then kept as this process writes: the
        # checkpoint call asks for every placement's hash each round
        self._hashes: dict[str, str | None] | None = None
        self._lock = threading.Lock()

    def save(self, strategy: str, checkpoint: dict[str, Any]) -> None:
        self.save_many({strategy: checkpoint})

    def save_many(self, copies: dict[str, dict[str, Any]]) -> None:
        if not copies:
            return
        with self.db.session() as conn:
            for strategy, checkpoint in sorted(copies.items()):
                conn.execute("INSERT INTO quantlab_checkpoints (strategy, hash, body) VALUES (%s, %s, %s) "
                             "ON CONFLICT (strategy) DO UPDATE SET hash = excluded.hash, body = excluded.body, "
                             "changed_at = now()", (strategy, checkpoint.get("hash"), json.dumps(checkpoint)))
        with self._lock:
            if self._hashes is not None:
                self._hashes.update({sid: c.get("hash") for sid, c in copies.items()})

    def names(self) -> list[str]:
        with self.db.session() as conn:
            return sorted(r[0] for r in conn.execute("SELECT strategy FROM quantlab_checkpoints").fetchall())

    def hash_of(self, strategy: str) -> str | None:
        with self._lock:
            if self._hashes is None:
                with self.db.session() as conn:
                    self._hashes = dict(conn.execute("SELECT strategy, hash FROM quantlab_checkpoints").fetchall())
            return self._hashes.get(strategy)

    def forget(self, strategy: str) -> bool:
        with self._lock:
            if self._hashes is not None:
                self._hashes.pop(strategy, None)
        with self.db.session() as conn:
            return conn.execute("DELETE FROM quantlab_checkpoints WHERE strategy = %s", (strategy,)).rowcount > 0

    def load(self, strategy: str) -> dict[str, Any] | None:
        with self.db.session() as conn:
            row = conn.execute("SELECT body FROM quantlab_checkpoints WHERE strategy = %s", (strategy,)).fetchone()
        return row[0] if row and isinstance(row[0], dict) else None

    def prune(self, keep: set[str], now_s: float, retention_s: float) -> list[str]:
        """Remove the copies of strategies not in `keep` `retention_s` after a run first found them
        gone (gone_at); one that comes back loses its mark. The ids removed."""
        names = sorted(keep)
        with self.db.session() as conn:
            conn.execute("UPDATE quantlab_checkpoints SET gone_at = NULL WHERE strategy = ANY(%s)", (names,))
            conn.execute("UPDATE quantlab_checkpoints SET gone_at = now() WHERE gone_at IS NULL AND "
                         "NOT (strategy = ANY(%s))", (names,))
            rows = conn.execute("DELETE FROM quantlab_checkpoints WHERE gone_at < now() - make_interval(secs => %s) "
                                "RETURNING strategy", (retention_s,)).fetchall()
        with self._lock:
            for (sid,) in rows:
                (self._hashes or {}).pop(sid, None)
        return sorted(r[0] for r in rows)


# --- the fleet page's snapshot --------------------------------------------------------------------------

class PgSnapshot:
    """The snapshot of the leader's last round (see snapshot.py), one row."""

    def __init__(self, db: PgState):
        self.db = db

    def write(self, snapshot: dict[str, Any]) -> None:
        with self.db.session() as conn:
            conn.execute("INSERT INTO quantlab_snapshot (id, version, body) VALUES (1, 1, %s) ON CONFLICT (id) DO "
                         "UPDATE SET version = quantlab_snapshot.version + 1, body = excluded.body",
                         (json.dumps(snapshot, separators=(",", ":")),))

    def read(self) -> dict[str, Any] | None:
        with self.db.session() as conn:
            row = conn.execute("SELECT body FROM quantlab_snapshot WHERE id = 1").fetchone()
        body = row[0] if row else None
        return body if isinstance(body, dict) and body.get("format") == SNAPSHOT_FORMAT else None

    def version(self) -> str | None:
        with self.db.session() as conn:
            row = conn.execute("SELECT version FROM quantlab_snapshot WHERE id = 1").fetchone()
        return str(row[0]) if row else None
