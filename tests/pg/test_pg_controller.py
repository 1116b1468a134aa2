"""quantlab with its state in PostgreSQL (`--state postgresql://…`): real processes on `local`
workers, the real CLI; the state, events and checkpoint copies live in the database, and no state
file is written."""
from __future__ import annotations

import os

import pytest

from tests.integration.harness import FleetDir
from tests.support import kill_all, node_problem, processes, require


@pytest.fixture
def fleet(tmp_path):
    require(node_problem())
    fl = FleetDir(tmp_path / "fleet")
    yield fl
    marker = str(tmp_path) + os.sep
    left = kill_all(marker)
    assert not left and not processes(marker)


def test_apply_status_events_and_the_loop_keep_their_state_in_postgresql(fleet, pg_dsn):
    import psycopg

    fleet.worker("w1").strategy("s1").write()
    fleet.ql("apply", "--yes", "--state", pg_dsn)
    fleet.beating("s1", beats=1)
    assert not (fleet.root / ".quantlab" / "state.json").exists(), "no state file beside the fleet"
    report = fleet.ql("status", "--output", "json", "--state", pg_dsn).json()
    (s1,) = report["strategies"]
    assert s1["status"] == "running" and s1["workerId"] == "w1"
    events = fleet.ql("events", "--output", "json", "--state", pg_dsn).json()
    assert [e["event"] for e in events if e.get("strategy") == "s1"][:1] == ["start"]
    fleet.ql("reconcile", "--once", "--state", pg_dsn)
    with psycopg.connect(pg_dsn) as conn:
        serial, content = conn.execute("SELECT serial, content FROM quantlab_state").fetchone()
        copies = conn.execute("SELECT strategy FROM quantlab_checkpoints").fetchall()
    assert serial >= 2 and content["placements"]["s1"]["worker"] == "w1" and content["loopRenewal"] is not None
    assert copies == [("s1",)], "the round copied the checkpoint into the database"
    # Another run holding the state lock names its holder, as with the file.
    fleet.ql("stop-all", "--yes", "--state", pg_dsn)
    assert fleet.ql("status", "--output", "json", "--state", pg_dsn).json()["suspended"]["*"]["stopAll"] is True


def test_an_unreachable_or_password_carrying_dsn_is_a_clear_error(fleet):
    fleet.worker("w1").strategy("s1").write()
    refused = fleet.ql("status", "--state", "postgresql://ops:secret@127.0.0.1:1/q", check=1)
    assert "PGPASSFILE" in refused.output and "secret" not in refused.output
    down = fleet.ql("status", "--state", "postgresql://ops@127.0.0.1:1/q?connect_timeout=2", check=1)
    assert "cannot reach the state database" in down.output and "Traceback" not in down.output
