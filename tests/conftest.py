"""Fixtures shared by the test folders: a real PostgreSQL server per test worker (tests/pg_server.py),
started on first use, with a fresh database per test. When PostgreSQL or psycopg is missing, the
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
