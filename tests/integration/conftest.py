"""Fixtures for the end-to-end tests (helpers live in harness.py beside this file).

`reaper`: at teardown, SIGKILLs the process group of every process whose command line contains the
test's tmp dir (supervisors, runners, controllers, agents) and fails the test if any is left.
`fleet`: an empty FleetDir in tmp_path/fleet (workers and strategies are added by the test), with
the reaper behind it. `node`: Node.js 18+ must be installed (a skip locally, a failure under CI).
"""
from __future__ import annotations

import os

import pytest

from harness import FleetDir, kill_all, processes
from tests.support import node_problem, require


@pytest.fixture(scope="session")
def node() -> None:
    require(node_problem())


@pytest.fixture
def reaper(tmp_path):
    """Kill everything this test started (found by its tmp dir in /proc/*/cmdline); assert none remain."""
    marker = str(tmp_path) + os.sep
    yield marker
    left = kill_all(marker)
    assert not left, "processes survived the teardown: " + "; ".join(f"{p.pid} {p.cmdline}" for p in left)
    assert not processes(marker)


@pytest.fixture
def fleet(node, reaper, tmp_path):
    fl = FleetDir(tmp_path / "fleet")
    yield fl
    fl.stop_daemons()
