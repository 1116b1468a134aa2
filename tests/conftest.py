"""Fixtures shared by the test folders: a real PostgreSQL server per test worker (tests/pg_server.py),
started on first use, with a fresh database per test — a copy of a template database migrated once
per run (`pg_empty_dsn`: one with no schema at all, for the migrations themselves). When PostgreSQL or psycopg is missing, the
tests that use it skip loudly, except under CI=true, where they fail."""
from __future__ import annotations

import sys
import uuid
from pathlib import Path

import pytest

_REPO_ROOT = str(Path(__file__).resolve().parents[1])
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from tests.pg_server import PgServer, pg_problem  # noqa: E402
from tests.support import require  # noqa: E402


def pytest_configure(config):
    """The tests start the CLI, the daemon and the agent hundreds of times: each would compile
    quantlab's source again where bytecode is not written (PYTHONDONTWRITEBYTECODE), so it is
    compiled once here (each process only reads it)."""
    import compileall
    compileall.compile_dir(str(Path(_REPO_ROOT) / "quantlab"), quiet=2)


TEMPLATE = "quantlab_migrated"


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory):
    require(pg_problem())
    server = PgServer(tmp_path_factory.mktemp("pg"))
    server.start()
    # Every test's database is a copy of one migrated here once (PgState keeps no connection open,
    # so the template is free to copy from).
    from quantlab.edges.pgstate import PgState

    PgState(_new_database(server, TEMPLATE)).migrate()
    yield server
    server.stop()


def _new_database(server: PgServer, name: str | None = None, template: str | None = None) -> str:
    """Create a database (a copy of `template`, or empty) and return its DSN."""
    import psycopg

    name = name or f"t_{uuid.uuid4().hex[:12]}"
    admin = server.dsn.replace(f"/{server.database}?", "/postgres?")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else ""))
    return server.dsn.replace(f"/{server.database}?", f"/{name}?")


@pytest.fixture
def pg_dsn(pg_server) -> str:
    """A DSN of a database of its own for this test, its schema in place."""
    return _new_database(pg_server, template=TEMPLATE)


@pytest.fixture
def pg_empty_dsn(pg_server) -> str:
    """A DSN of an empty database of its own for this test (no schema: the migrations run on it)."""
    return _new_database(pg_server)
