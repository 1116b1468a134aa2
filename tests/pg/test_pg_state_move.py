"""`quantlab state pull` and `state push`: a running fleet's state moves from the JSON file into
PostgreSQL without restarting anything or losing placements, leases or restart counts; the file
it came from refuses to act afterwards."""
from __future__ import annotations

import json

from tests.integration.harness import quantlab
from tests.pg.test_pg_controller import fleet  # noqa: F401 - the fixture


def state(fl, verb: str, *args: str, check: int | None = 0):
    return quantlab("state", verb, "--fleet", fl.root, *args, check=check)


def test_push_moves_a_running_state_into_postgresql_and_retires_the_file(fleet, pg_dsn):  # noqa: F811
    fleet.worker("w1").strategy("s1").strategy("s2").write()
    fleet.apply()
    fleet.beating("s1", beats=1)
    before = fleet.state()
    pids = {sid: fleet.runner_pid(sid) for sid in ("s1", "s2")}

    pulled = json.loads(state(fleet, "pull").stdout)
    assert pulled["placements"] == before["placements"] and fleet.state()["serial"] == before["serial"], \
        "pull changes nothing"

    state(fleet, "push", pg_dsn)
    moved = json.loads(state(fleet, "pull", "--state", pg_dsn).stdout)
    assert moved["lineage"] == before["lineage"] and moved["placements"] == before["placements"]
    assert moved["leases"] == before["leases"] and moved["restarts"] == before["restarts"]
    assert fleet.state()["migratedTo"].startswith("postgresql://")

    refused = fleet.ql("apply", "--yes", check=1)
    assert "moved to postgresql://" in refused.output, refused.output
    fleet.ql("reconcile", "--once", "--state", pg_dsn)
    assert {sid: fleet.runner_pid(sid) for sid in ("s1", "s2")} == pids, "the move restarted a strategy"
    # The run on the database led in a term above the file's: a controller left behind on the file
    # is refused by the host from now on, whatever it still had in flight.
    fence = json.loads((fleet.workdir("w1") / "agent" / "fence.json").read_text())
    term = json.loads(state(fleet, "pull", "--state", pg_dsn).stdout)["controllerTerm"]
    assert fence == {before["lineage"]: term} and term > before.get("controllerTerm", 0)
    events = fleet.ql("events", "--output", "json", "--state", pg_dsn).json()
    assert any(e.get("event") == "start" and e.get("strategy") == "s1" for e in events), "history moved too"
    assert any(e.get("event") == "state-pushed" for e in events)
    again = state(fleet, "push", pg_dsn, check=1)
    assert "moved to" in again.output or "already holds a state" in again.output


def test_push_of_an_empty_backend_is_refused_and_names_the_fix(fleet, pg_dsn, tmp_path):  # noqa: F811
    """The direction mistaken, as a newcomer easily does: the database holds no state yet."""
    fleet.worker("w1").strategy("s1").write()
    fleet.apply()
    before = fleet.state()
    target = tmp_path / "moved.json"
    refused = state(fleet, "push", str(target), "--state", pg_dsn, check=1)
    assert "holds no state" in refused.output and "--state" in refused.output, refused.output
    assert not target.exists(), "an empty state was written"
    dash = quantlab("state", "push", "-", "--fleet", fleet.root, "--state", pg_dsn, check=1,
                    cwd=tmp_path)
    assert "`-` is not one" in dash.output, dash.output
    assert not (tmp_path / "-").exists(), "a state file named '-' was written"
    # The right direction still works, and the file's state is what arrives.
    state(fleet, "push", pg_dsn)
    assert json.loads(state(fleet, "pull", "--state", pg_dsn).stdout)["placements"] == before["placements"]
