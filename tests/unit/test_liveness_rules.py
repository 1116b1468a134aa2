"""Liveness rules of the pure core: the lease rule `validate` enforces, the failover brake, the
reschedule backoff and leases judged on the controller's own clock. Plain data, a fixed clock."""
from __future__ import annotations

import dataclasses

import pytest

from quantlab.core.health import RESCHEDULE_DELAY_MS, RESCHEDULE_RESET_MS, lease_surely_expired_at
from quantlab.core.planner import plan
from quantlab.edges.fleetfiles import load_fleet
from quantlab.core.spec import FleetInvalid, FleetSettings, MonitorSettings
from tests.fleetkit import NOW, fleet, memory, observed, running, strategy, summary, worker

# --- the lease rule ---------------------------------------------------------------------------------


def settings(interval: float = 5, ttl: float = 25, deadline: float = 5, restart: float = 10,
             cron: float | None = None) -> FleetSettings:
    return FleetSettings(reconcile_interval_s=interval, probe_deadline_s=deadline, cron_period_s=cron,
                         monitor=MonitorSettings(lease_ttl_s=ttl, controller_restart_s=restart))


def test_the_defaults_obey_the_lease_rule_with_room_to_spare():
    defaults = FleetSettings()
    assert defaults.lease_rule_problem() is None
    # max(2 x 5, 10) + 5 + (1 + 5 % of 25) = 17.25 s of the 25 s lease
    assert defaults.lease_floor_s() == pytest.approx(17.25)


@pytest.mark.parametrize("case,problem", [
    (dict(ttl=16.8), "at least 16.9 s"),                            # (10 + 5 + 1) / 0.95
    (dict(interval=10, deadline=5, ttl=26), "2 x reconcile.intervalSeconds (20 s)"),
    (dict(cron=60, ttl=100), "2 x reconcile.cronPeriodSeconds (120 s)"),
    (dict(restart=60, ttl=60), "monitor.controllerRestartSeconds (60 s)"),
    (dict(deadline=6), "probeDeadlineSeconds 6 is longer than reconcile.intervalSeconds 5"),
])
def test_settings_that_break_the_lease_rule_say_which_term_and_what_would_do(case, problem):
    found = settings(**case).lease_rule_problem()
    assert found is not None and problem in found, found


def test_fencing_off_has_no_lease_to_protect():
    assert settings(ttl=0).lease_rule_problem() is None


def test_validate_refuses_a_lease_too_short_at_its_line(tmp_path):
    (tmp_path / "fleet.yaml").write_text(
        "apiVersion: quantlab/v1\nkind: Fleet\nreconcile: {intervalSeconds: 30}\n"
        "monitor:\n  leaseTtlSeconds: 40\n")
    (tmp_path / "w.yaml").write_text("apiVersion: quantlab/v1\nkind: Worker\nid: w1\nhost: local\n"
                                     "capabilities: {maxStrategies: 1, supportedApis: [x]}\n")
    with pytest.raises(FleetInvalid) as info:
        load_fleet(tmp_path)
    [problem] = info.value.problems
    assert (problem.file.endswith("fleet.yaml"), problem.line) == (True, 5), problem
    assert "2 x reconcile.intervalSeconds (60 s)" in problem.message, problem


# --- the failover brake -----------------------------------------------------------------------------

A = strategy("a", region="JP")
B = strategy("b", region="JP")
C = strategy("c")


def lost_workers(down: list[str], brake_share: float = 0.5):
    """Four workers (w-1..w-3 JP, w-4 US) that all ran something; those in `down` went silent long
    ago, so every lease there has surely expired."""
    fl = fleet([A, B, C], [worker("w-1", region="JP"), worker("w-2", region="JP"), worker("w-3", region="JP"),
                           worker("w-4", region="US")], ttl=30, offline_after=10)
    fl = dataclasses.replace(fl, settings=dataclasses.replace(
        fl.settings, monitor=dataclasses.replace(fl.settings.monitor, brake_share=brake_share)))
    placed = {"a": ("w-1", 1), "b": ("w-2", 2), "c": ("w-4", 3)}
    mem = memory(placed, specs={"a": A, "b": B, "c": C}, leases={w: NOW - 600_000 for w in down},
                 last_seen={w: NOW - 600_000 for w in down} | {w: NOW for w in ("w-1", "w-2", "w-3", "w-4")
                                                                if w not in down})
    live = {w: [running(s, e)] for s, (w, e) in zip((A, B, C), placed.values()) if w not in down}
    return fl, observed(fl, live, down=down), mem


def test_one_silent_worker_of_four_fails_over_as_usual():
    fl, obs, mem = lost_workers(["w-1"])
    result = plan(fl, obs, mem, NOW)
    assert summary(result) == [("move", "a", "w-1", "w-3")]
    assert result.blocked == ()


def test_half_of_the_workers_silent_still_fails_over():
    fl, obs, mem = lost_workers(["w-1", "w-2"])
    assert {a.strategy for a in plan(fl, obs, mem, NOW).actions} == {"a", "b"}


def test_most_workers_silent_at_once_holds_every_failover_and_says_why():
    fl, obs, mem = lost_workers(["w-1", "w-2", "w-4"])
    result = plan(fl, obs, mem, NOW)
    assert result.actions == ()
    assert {w.strategy for w in result.waiting} == {"a", "b", "c"}
    assert all("failover held" in w.reason and "3 of 4 workers are silent" in w.reason for w in result.waiting)
    [brake] = result.blocked
    assert brake.guard == "failover-brake" and "controller's own network" in brake.reason
    assert "held: a, b, c" in brake.reason


def test_the_brake_share_is_a_setting():
    fl, obs, mem = lost_workers(["w-1", "w-2", "w-4"], brake_share=1.0)      # 1: never brake
    assert len(plan(fl, obs, mem, NOW).actions) == 3


# --- the reschedule backoff -------------------------------------------------------------------------

def test_a_strategy_that_failed_over_recently_waits_longer_each_time():
    fl, obs, mem = lost_workers(["w-1"])
    mem.reschedules = {"a": (1, NOW - 10_000)}            # moved 10 s ago: the second move waits 30 s
    [wait] = plan(fl, obs, mem, NOW).waiting
    assert "failed over 1 time(s) within the hour" in wait.reason and "reschedule backoff" in wait.reason
    assert wait.seconds_left == pytest.approx(RESCHEDULE_DELAY_MS / 1000 - 10)
    mem.reschedules = {"a": (3, NOW - 100_000)}           # third: 120 s after the last
    assert plan(fl, obs, mem, NOW).waiting[0].seconds_left == pytest.approx(20)
    mem.reschedules = {"a": (3, NOW - 130_000)}
    assert summary(plan(fl, obs, mem, NOW)) == [("move", "a", "w-1", "w-3")]
    mem.reschedules = {"a": (9, NOW - RESCHEDULE_RESET_MS)}   # an hour without a move: forgotten
    assert summary(plan(fl, obs, mem, NOW)) == [("move", "a", "w-1", "w-3")]


# --- leases on the controller's clock ---------------------------------------------------------------

def test_a_lease_is_judged_by_the_bound_recorded_before_its_request_was_sent():
    """Recorded bound (deadline + TTL), then the stop timeout the copy was started with (30 s here,
    though 10 s is asked now), then the margin; the last answer there plus the TTL is the floor, for
    a copy this state adopted."""
    fl = fleet([A], [worker("w-1", region="JP")], ttl=30)
    mem = memory({"a": ("w-1", 1)}, specs={"a": A}, leases={"w-1": NOW + 5_000}, last_seen={"w-1": NOW - 40_000})
    margin = fl.settings.monitor.failover_margin_s
    assert lease_surely_expired_at("a", "w-1", mem, fl.settings.monitor, 10) == NOW + 5_000 + int((30 + margin) * 1000)
    mem = memory({"a": ("w-1", 1)}, specs={"a": A}, leases={}, last_seen={"w-1": NOW})
    assert lease_surely_expired_at("a", "w-1", mem, fl.settings.monitor, 10) == NOW + 30_000 + int((30 + margin) * 1000)


# --- what a running copy was started with ---------------------------------------------------------

def test_a_copy_whose_lease_ttl_is_not_the_fleets_is_restarted():
    """Its supervisor enforces the lease it was started with, whatever a renewal asks for: fencing
    turned on must reach copies started without it, and a longer lease the ones started shorter."""
    fl = fleet([A], [worker("w-1", region="JP")], ttl=60)
    mem = memory({"a": ("w-1", 4)}, specs={"a": A}, last_seen={"w-1": NOW})
    started_short = dataclasses.replace(running(A, 4), lease_ttl_s=25.0)
    result = plan(fl, observed(fl, {"w-1": [started_short]}), mem, NOW)
    assert summary(result) == [("restart", "a", "w-1")]
    assert result.actions[0].cause == "lease-changed" and "leaseTtlSeconds 25 → 60" in result.actions[0].reason
    assert result.actions[0].epoch == 4                             # the same copy, started again
    unknown = dataclasses.replace(running(A, 4), lease_ttl_s=None)  # not reported: left alone
    assert plan(fl, observed(fl, {"w-1": [unknown]}), mem, NOW).actions == ()


# --- the state read on another boot ------------------------------------------------------------------

def test_another_boot_keeps_what_each_lease_had_left_when_the_state_was_written():
    """How long the controller was away is unknown (maybe no time at all): a start still in flight,
    booked far ahead, keeps its whole remainder; a lease shorter than the TTL is taken as granted now."""
    mem = memory({"a": ("w-1", 1)}, leases={"w-1": 500_000, "w-2": 110_000})
    mem.clock_boot, mem.saved_at = "old-boot", 100_000
    mem.fleet_settings = {"monitor": {"lease_ttl_s": 25.0}}
    rebased = mem.rebase(NOW, "new-boot", 0.0)                     # fleet unknown: the recorded TTL
    assert rebased.leases == {"w-1": NOW + 400_000, "w-2": NOW + 25_000}
    assert rebased.saved_at == NOW and rebased.clock_boot == "new-boot"
