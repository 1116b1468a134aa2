"""The state in PostgreSQL (psycopg 3): the same `Memory` as the JSON file with the same semantics —
one lineage, a serial that grows only on change, every update one transaction with a
compare-and-swap on the serial — in a versioned schema that quantlab creates and migrates under a
migration lock (an older quantlab refuses a newer schema).

Credentials come from libpq's usual places (PGPASSFILE, service files, the environment): a DSN
that carries a password is refused, since it would show in `ps`, shell history, lock records and
events. TLS settings in the DSN (sslmode and friends) are passed on as they are.
"""
from __future__ import annotations

import json
import uuid
from dataclasses import replace
from typing import Any

from .memory import Memory, MemoryFormatError
from .store import StateError

SCHEMA_VERSION = 1
MIGRATION_LOCK = 0x716C6D67          # pg_advisory_xact_lock key: one migration at a time
CONNECT_TIMEOUT_S = 5


class StateConflict(StateError):
    """Another controller changed the state since this one read it; nothing was written."""


def check_dsn(dsn: str) -> dict[str, str]:
    """The DSN's parts; StateError when it cannot be used (it carries a password, or does not parse)."""
    try:
        from psycopg.conninfo import conninfo_to_dict
    except ImportError:
        raise StateError("a postgresql:// state needs psycopg: pip install 'quantlab[postgres]'") from None
    try:
        parts = {k: str(v) for k, v in conninfo_to_dict(dsn).items()}
    except Exception as exc:              # psycopg.ProgrammingError: the DSN does not parse
        raise StateError(f"cannot read the state DSN: {exc}") from None
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

    def _connect(self) -> Any:
        import psycopg

        try:
            return psycopg.connect(self.dsn, connect_timeout=int(self.parts.get("connect_timeout") or CONNECT_TIMEOUT_S))
        except psycopg.OperationalError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise StateError(f"cannot reach the state database {self.where()}: {first}") from None

    # --- schema --------------------------------------------------------------------------------

    def migrate(self) -> int:
        """Create or upgrade the schema (one process at a time); the schema version now."""
        with self._connect() as conn:
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
                                  changed_at timestamptz NOT NULL DEFAULT now())""")
                conn.execute("INSERT INTO quantlab_schema (version) VALUES (1)")
            return SCHEMA_VERSION

    # --- the state -----------------------------------------------------------------------------

    def load(self) -> Memory:
        with self._connect() as conn:
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
        with self._connect() as conn:
            row = conn.execute("SELECT lineage, serial, content FROM quantlab_state WHERE id = 1 FOR UPDATE").fetchone()
            if row is None:
                if expected_serial != 0:
                    raise StateConflict(f"the state in {self.where()} is gone (expected serial {expected_serial})")
                lineage = memory.lineage or str(uuid.uuid4())
                saved = replace(memory, lineage=lineage, serial=1)
                conn.execute("INSERT INTO quantlab_state (id, lineage, serial, content) VALUES (1, %s, 1, %s)",
                             (lineage, json.dumps(saved.content_json())))
                return saved
            lineage, serial, content = row
            if serial != expected_serial:
                raise StateConflict(f"another controller changed the state in {self.where()} (serial {serial}, "
                                    f"this one read {expected_serial}); nothing was written: read it again")
            if memory.lineage is not None and memory.lineage != lineage:
                raise StateConflict(f"the state in {self.where()} is another lineage ({lineage}, not {memory.lineage})")
            mine = replace(memory, lineage=lineage)
            if mine.content_json() == content:
                return replace(mine, serial=serial)          # nothing changed: the serial stays
            conn.execute("UPDATE quantlab_state SET serial = serial + 1, content = %s, saved_at = now() WHERE id = 1",
                         (json.dumps(mine.content_json()),))
            return replace(mine, serial=serial + 1)
