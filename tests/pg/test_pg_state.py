"""The state in a real PostgreSQL server: the JSON file's semantics (lineage, a serial that grows
only on change, compare-and-swap updates), a versioned schema, and no password in a DSN."""
from __future__ import annotations

import threading

import pytest

from quantlab.core.memory import Memory, Placement
from quantlab.edges.pgstate import SCHEMA_VERSION, PgState, StateConflict, check_dsn
from quantlab.edges.store import StateError


def placed(serial_hint: int = 1) -> Memory:
    return Memory(placements={"s1": Placement("s1", "w1", serial_hint, "sha256:aa", placed_at=1)},
                  leases={"w1": 1_000}, next_epoch=serial_hint + 1)


def test_a_state_round_trips_and_its_serial_grows_only_on_change(pg_empty_dsn):
    db = PgState(pg_empty_dsn)
    assert db.migrate() == SCHEMA_VERSION and db.migrate() == SCHEMA_VERSION      # idempotent
    assert db.load() == Memory()
    first = db.save(placed(), expected_serial=0)
    assert first.serial == 1 and first.lineage
    loaded = db.load()
    assert loaded.placements == first.placements and loaded.lineage == first.lineage and loaded.serial == 1
    assert db.save(loaded, expected_serial=1).serial == 1, "an unchanged state is not written again"
    second = db.save(placed(2), expected_serial=1)
    assert second.serial == 2 and db.load().placements["s1"].epoch == 2


def test_an_update_from_a_stale_read_is_refused_and_changes_nothing(pg_dsn):
    db = PgState(pg_dsn)
    db.migrate()
    db.save(placed(), expected_serial=0)
    db.save(placed(2), expected_serial=1)
    with pytest.raises(StateConflict, match="serial 2, this one read 1"):
        db.save(placed(3), expected_serial=1)
    assert db.load().placements["s1"].epoch == 2


def test_concurrent_writers_from_one_read_one_wins(pg_dsn):
    db = PgState(pg_dsn)
    db.migrate()
    db.save(placed(), expected_serial=0)
    results: list[object] = []

    def write(epoch: int) -> None:
        try:
            results.append(PgState(pg_dsn).save(placed(epoch), expected_serial=1).serial)
        except StateConflict as exc:
            results.append(exc)
    threads = [threading.Thread(target=write, args=(e,)) for e in (5, 6, 7, 8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(r for r in results if isinstance(r, int)) == [2]
    assert sum(isinstance(r, StateConflict) for r in results) == 3


def test_a_newer_schema_is_refused(pg_dsn):
    import psycopg

    db = PgState(pg_dsn)
    db.migrate()
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO quantlab_schema (version) VALUES (%s)", (SCHEMA_VERSION + 1,))
    with pytest.raises(StateError, match="newer than this quantlab"):
        db.migrate()


def test_a_dsn_with_a_password_is_refused_and_an_unreachable_server_is_an_error():
    with pytest.raises(StateError, match="PGPASSFILE"):
        check_dsn("postgresql://ops:s3cret@db.internal/quantlab?sslmode=verify-full")
    assert check_dsn("postgresql://ops@db.internal/quantlab?sslmode=verify-full")["sslmode"] == "verify-full"
    with pytest.raises(StateError, match="cannot reach the state database"):
        PgState("postgresql://nobody@127.0.0.1:1/none?connect_timeout=2").load()
