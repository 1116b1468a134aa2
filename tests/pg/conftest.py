"""The PostgreSQL tests (the server and database fixtures are in tests/conftest.py)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.integration.harness import FleetDir
from tests.support import kill_all, node_problem, processes, require


@pytest.fixture
def daemon_fleet(tmp_path):
    """A fleet of `local` workers for reconcile daemons on one database: interval 1 s, leadership lease
    3 s, strategy lease 10 s (which covers a takeover). Every process it started is gone at the end."""
    require(node_problem())
    fl = FleetDir(tmp_path / "fleet", interval=1).short_lease(10)
    fl.settings["reconcile"]["leaderLeaseSeconds"] = 3
    yield fl
    fl.stop_daemons()
    marker = str(tmp_path) + os.sep
    left = kill_all(marker)
    assert not left and not processes(marker)


# tryfirst: xdist's own hook turns the group marker into the test's id suffix (what --dist loadgroup
# distributes by), so the marker must be there before it runs.
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    here = Path(__file__).resolve().parent
    for item in items:
        if here in Path(str(item.path)).resolve().parents:
            # In the SSH tests' worker, one after the other: a burst of CPU (a server's initdb, a
            # browser) must not land on their handshakes and timing bounds — and on 2 cores the suite
            # is CPU-bound, so running these beside the SSH tests made it slower, not faster
            # (12:05 against 10:52, measured back to back).
            item.add_marker(pytest.mark.xdist_group("ssh"))
