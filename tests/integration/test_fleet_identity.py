"""A state belongs to one fleet. Planned against another fleet's state, every placement in it would
look deleted and be stopped on that fleet's hosts (its addresses are in the state): `plan`, `apply`
and `reconcile --once` refuse, name the state and the fleet, and stop or start nothing — while the
leases the state granted are still renewed, so that a fleet renamed by a commit stops nothing either.
With names on both sides the names decide; an unnamed fleet's state is recognised by its placements
naming none of the fleet's strategies, workers and worker addresses."""
from __future__ import annotations

import json

from harness import FleetDir, wait_for
from tests.support import hold_for


def _two_fleets(tmp_path, name_a=None, name_b=None) -> tuple[FleetDir, FleetDir]:
    """Fleet B runs b1 on worker wb; fleet A (worker wa, strategy a1) has no state of its own yet."""
    a = FleetDir(tmp_path / "a").worker("wa").strategy("a1")
    b = FleetDir(tmp_path / "b").worker("wb").strategy("b1")
    for fl, name in ((a, name_a), (b, name_b)):
        if name:
            fl.settings["name"] = name
        fl.write()
    b.apply()
    b.beating("b1")
    return a, b


def _refused_everywhere(a: FleetDir, b: FleetDir, *fragments: str) -> None:
    before = b.state()["placements"]
    pid = b.runner_pid("b1")
    for args in (("plan",), ("apply", "--yes"), ("reconcile", "--once")):
        run = a.ql(*args[:1], *args[1:], "--state", b.state_path, check=1)
        assert "does not belong to the fleet" in run.output, run.describe()
        assert "Traceback" not in run.output, run.describe()
        for fragment in fragments:
            assert fragment in run.output, run.describe()
    assert b.state()["placements"] == before, "the other fleet's placements changed"
    assert b.runner_pid("b1") == pid, "the other fleet's strategy was stopped or restarted"
    assert a.runner_counts() == b.runner_counts(), "something of fleet A was started"


def test_another_unnamed_fleets_state_is_refused_and_nothing_changes(node, reaper, tmp_path):
    a, b = _two_fleets(tmp_path)
    _refused_everywhere(a, b, str(b.state_path), "b1", "name no strategy, no worker and no worker address of this fleet")


def test_a_named_fleet_refuses_a_state_made_for_another_name(node, reaper, tmp_path):
    a, b = _two_fleets(tmp_path, name_a="alpha", name_b="beta")
    assert b.state()["fleet"] == "beta"
    _refused_everywhere(a, b, "belongs to the fleet named 'beta', not 'alpha'")


def test_a_renamed_fleet_is_told_how_to_go_back(node, reaper, tmp_path):
    _, b = _two_fleets(tmp_path, name_b="beta")
    b.settings["name"] = "gamma"
    b.write()
    run = b.ql("plan", check=1)
    assert "put `name: beta` back in" in run.output and "fleet.yaml" in run.output, run.describe()
    b.settings["name"] = "beta"
    b.write()
    assert b.plan()["actions"] == []


def test_a_daemon_whose_fleet_is_renamed_keeps_renewing_and_acts_on_nothing(node, reaper, tmp_path):
    """A rename committed by mistake: the daemon's act rounds refuse (and say so once, as an alert),
    and its renewal rounds go on from the state, so the strategy outlives its lease many times over."""
    b = FleetDir(tmp_path / "b").short_lease(3.0).worker("wb").strategy("b1")
    b.settings["name"] = "beta"
    b.write().apply()
    b.beating("b1")
    pid = b.runner_pid("b1")
    b.settings["name"] = "gamma"
    b.strategy("b2").write()                             # a change it must not act on
    log = tmp_path / "daemon.log"
    b.spawn("reconcile", log=log)
    wait_for(lambda: "does not belong to the fleet" in log.read_text(), 20, what="the refusal in the log")
    hold_for(7.0, lambda: b.runner_pid("b1") == pid, "b1 to keep running past two of its 3 s leases")
    assert b.placement("b2") is None, "a strategy was started from another fleet's state"
    alerts = [e for e in b.events() if e.get("kind") == "foreign-state"]
    assert len(alerts) == 1 and "put `name: beta` back" in alerts[0]["message"], alerts


def test_a_state_from_before_names_adopts_the_fleets_name_and_keeps_its_strategies(node, reaper, tmp_path):
    """An upgrade: a state without a name (as the previous release wrote it) takes the fleet's name
    at the next round; nothing restarts."""
    _, b = _two_fleets(tmp_path)
    assert "fleet" not in b.state()
    pid = b.runner_pid("b1")
    b.settings["name"] = "beta"
    b.write()
    b.ql("reconcile", "--once")
    assert b.state()["fleet"] == "beta"
    assert b.runner_pid("b1") == pid
    assert json.loads(b.ql("plan", "--output", "json").stdout)["actions"] == []
