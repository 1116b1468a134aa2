"""A real PostgreSQL server per test worker (tests/pg_server.py), with a fresh database per test.
When PostgreSQL or psycopg is missing these tests skip loudly, except under CI=true, where they fail."""
from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from tests.pg_server import PgServer, pg_problem
from tests.support import require


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory):
    require(pg_problem())
    server = PgServer(tmp_path_factory.mktemp("pg"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def pg_dsn(pg_server) -> str:
    """A DSN of a database of its own for this test."""
    import psycopg

    name = f"t_{uuid.uuid4().hex[:12]}"
    admin = pg_server.dsn.replace(f"/{pg_server.database}?", "/postgres?")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return pg_server.dsn.replace(f"/{pg_server.database}?", f"/{name}?")


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).resolve().parent
    for item in items:
        if here in Path(str(item.path)).resolve().parents:
            # In the SSH tests' worker, one after the other: starting a server (initdb) is a burst of
            # CPU that must not land on the SSH tests' handshakes and timing bounds.
            item.add_marker(pytest.mark.xdist_group("ssh"))
