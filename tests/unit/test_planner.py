"""The planner, table-driven like Nomad's reconciler tests: desired + observed + memory + now in,
exact actions and reasons out. Plain data, a fixed clock, no I/O."""
from __future__ import annotations

import dataclasses

import json

import pytest

from quantlab.core.memory import Launched
from quantlab.core.planner import PlanOptions, UnknownTarget, plan
from tests.fleetkit import JP_PROXY, NOW, fleet, memory, observed, running, strategy, summary, worker

# The seed's fleet: two JP workers (one behind the 8890 proxy), one US.
GRID = strategy("grid-btc-sub1", "bybit", region="JP", proxy=JP_PROXY, account="wjcgm@bbt-sub1",
                params={"symbol": "BTCUSDT"})
JP1 = worker("worker-001", ["bybit", "binance"], 4, region="JP")
JP_PROXIED = worker("worker-003", ["bybit"], 4, region="JP", proxy=JP_PROXY)
JP_PROXIED_2 = worker("worker-004", ["bybit"], 4, region="JP", proxy=JP_PROXY)
US = worker("worker-002", ["bybit", "binance"], 8, region="US", proxy=JP_PROXY)


def test_seed_scenario_1_jp_and_proxy_go_to_the_jp_worker_behind_that_proxy():
    fl = fleet([GRID], [JP1, US, JP_PROXIED])
    result = plan(fl, observed(fl), memory(), NOW)
    assert summary(result) == [("start", "grid-btc-sub1", "worker-003")]
    assert "region JP, proxy http://127.0.0.1:8890" in result.actions[0].reason
    assert result.actions[0].epoch == 1


class TestSeedScenario2JpWorkerOffline:
    """worker-003 (JP, proxy) runs grid-btc-sub1 and stops answering; worker-004 is the other JP one."""

    fl = fleet([GRID], [JP_PROXIED, JP_PROXIED_2, US], ttl=180, offline_after=90)
    inst = {"worker-003": [running(GRID, 7)]}

    def state(self, seconds_silent: float, ttl_granted_ago: float):
        mem = memory({"grid-btc-sub1": ("worker-003", 7)}, specs={GRID.id: GRID},
                     leases={"worker-003": NOW - int(ttl_granted_ago * 1000)},
                     last_seen={"worker-003": NOW - int(seconds_silent * 1000),
                                "worker-004": NOW, "worker-002": NOW})
        return observed(self.fl, down=["worker-003"]), mem

    def test_unreachable_first_nothing_moves(self):
        obs, mem = self.state(seconds_silent=20, ttl_granted_ago=20)
        result = plan(self.fl, obs, mem, NOW)
        assert result.actions == ()
        [wait] = result.waiting
        assert (wait.strategy, wait.worker) == ("grid-btc-sub1", "worker-003")
        assert "unreachable for 20s" in wait.reason

    def test_offline_while_the_lease_may_live_it_waits_with_time_left(self):
        obs, mem = self.state(seconds_silent=100, ttl_granted_ago=100)
        result = plan(self.fl, obs, mem, NOW)
        assert result.actions == ()
        [wait] = result.waiting
        # lease 180 + stop grace 30 + margin (1 + 5% of 180) - 100 already gone
        assert wait.seconds_left == pytest.approx(180 + 30 + 10 - 100)
        assert "offline 1m40s; lease may live 2m00s more" in wait.reason

    def test_after_the_lease_surely_expired_it_moves_to_the_other_jp_worker_never_us(self):
        obs, mem = self.state(seconds_silent=300, ttl_granted_ago=300)
        result = plan(self.fl, obs, mem, NOW)
        assert summary(result) == [("move", "grid-btc-sub1", "worker-003", "worker-004")]
        move = result.actions[0]
        assert move.cause == "worker-offline"
        assert "worker-003 offline 5m00s, lease expired 1m20s ago" in move.reason
        assert move.epoch == 8                     # a new copy gets a new epoch
        assert result.waiting == ()

    def test_no_other_jp_worker_means_queued_not_us(self):
        fl = fleet([GRID], [JP_PROXIED, US])
        mem = memory({"grid-btc-sub1": ("worker-003", 7)}, specs={GRID.id: GRID},
                     leases={"worker-003": NOW - 400_000}, last_seen={"worker-003": NOW - 400_000})
        result = plan(fl, observed(fl, down=["worker-003"]), mem, NOW)
        assert result.actions == ()
        [queued] = result.queued
        assert "worker-003 offline" in queued.reason
        assert "not in region JP: worker-002 (US)" in queued.reason
        assert ("worker-002", "region US") in queued.rejections

    def test_with_fencing_off_it_is_only_reported(self):
        fl = fleet([GRID], [JP_PROXIED, JP_PROXIED_2], ttl=0)
        mem = memory({"grid-btc-sub1": ("worker-003", 7)}, specs={GRID.id: GRID},
                     last_seen={"worker-003": NOW - 10_000_000})
        result = plan(fl, observed(fl, down=["worker-003"]), mem, NOW)
        assert result.actions == ()
        [wait] = result.waiting
        assert wait.seconds_left is None
        assert "fencing is off" in wait.reason

    def test_auto_recover_off_is_only_reported(self):
        fl = fleet([GRID], [JP_PROXIED, JP_PROXIED_2], auto_recover=False)
        mem = memory({"grid-btc-sub1": ("worker-003", 7)}, specs={GRID.id: GRID},
                     last_seen={"worker-003": NOW - 10_000_000})
        result = plan(fl, observed(fl, down=["worker-003"]), mem, NOW)
        assert result.actions == () and "autoRecover is off" in result.waiting[0].reason


def test_the_lost_worker_returning_gets_its_stale_copy_stopped_first():
    """After a failover, the old host comes back still reporting the old copy alive."""
    fl = fleet([GRID], [JP_PROXIED, JP_PROXIED_2])
    mem = memory({"grid-btc-sub1": ("worker-004", 8)}, specs={GRID.id: GRID})
    obs = observed(fl, {"worker-003": [running(GRID, 7)], "worker-004": [running(GRID, 8)]})
    result = plan(fl, obs, mem, NOW)
    assert summary(result) == [("stop", "grid-btc-sub1", "worker-003")]
    assert result.actions[0].cause == "stale-copy" and result.actions[0].epoch == 7
    assert result.blocked == ()                   # a stale copy is not a mass stop


def test_unreachable_worker_gets_no_new_placements():
    s = strategy("arb-1", "bybit")
    fl = fleet([s], [worker("w-a", cap=4), worker("w-b", cap=4)])
    mem = memory(last_seen={"w-a": NOW - 5000, "w-b": NOW})
    result = plan(fl, observed(fl, down=["w-a"]), mem, NOW)
    assert summary(result) == [("start", "arb-1", "w-b")]


def test_no_feasible_worker_is_queued_with_every_reason():
    s = strategy("arb-futu-eu", "futu", region="EU", account="acct", credentials=True)
    workers = [
        worker("w-1", ["futu"], 2, region="US"),
        worker("w-2", ["bybit"], 2, region="EU"),
        worker("w-3", ["futu"], 1, region="EU"),
        worker("w-4", ["futu"], 2, region="EU", cordoned=True),
        worker("w-5", ["futu"], 2, region="EU"),
        worker("w-6", ["futu"], 2, region="EU"),
    ]
    other = strategy("filler", "futu", region="EU", account="other")
    fl = fleet([s, other], workers)
    mem = memory({"filler": ("w-3", 1)}, specs={"filler": other}, last_seen={"w-6": NOW - 1_000_000})
    obs = observed(fl, {"w-3": [running(other, 1)]}, down=["w-6"],
                   credentials={"w-3": {"acct"}, "w-5": set()})
    result = plan(fl, obs, mem, NOW)
    assert result.actions == ()
    [queued] = result.queued
    assert dict(queued.rejections) == {
        "w-1": "region US", "w-2": "api", "w-3": "full 1/1", "w-4": "cordoned", "w-5": "credentials",
        "w-6": "offline",
    }
    assert queued.reason.startswith("no worker fits: ")
    for fragment in ("no api futu: w-2", "not in region EU: w-1 (US)", "full: w-3 (1/1)", "cordoned: w-4",
                     "no secrets/acct.env: w-5", "offline: w-6"):
        assert fragment in queued.reason


def test_capacity_is_counted_within_one_plan():
    strategies = [strategy(f"s-{i}", "bybit") for i in range(5)]
    fl = fleet(strategies, [worker("w-a", cap=2), worker("w-b", cap=2)])
    result = plan(fl, observed(fl), memory(), NOW)
    placed = [(a.strategy, a.worker) for a in result.actions]
    assert placed == [("s-0", "w-a"), ("s-1", "w-b"), ("s-2", "w-a"), ("s-3", "w-b")]
    assert [q.strategy for q in result.queued] == ["s-4"]
    assert "full: w-a (2/2), w-b (2/2)" in result.queued[0].reason


def test_credentials_required_only_lands_where_the_secrets_file_is():
    s = strategy("cred", "bybit", account="desk@main", credentials=True)
    fl = fleet([s], [worker("w-a"), worker("w-b")])
    result = plan(fl, observed(fl, credentials={"w-b": {"desk@main"}}), memory(), NOW)
    assert summary(result) == [("start", "cred", "w-b")]


def test_min_memory_filters_on_free_memory():
    s = strategy("big", "bybit", min_memory=2048)
    fl = fleet([s], [worker("w-a"), worker("w-b")])
    result = plan(fl, observed(fl, mem={"w-a": 1024, "w-b": 8192}), memory(), NOW)
    assert summary(result) == [("start", "big", "w-b")]


def test_placement_is_sticky_even_when_another_worker_is_emptier():
    s = strategy("s-1")
    fl = fleet([s], [worker("w-a", cap=4), worker("w-b", cap=40)])
    mem = memory({"s-1": ("w-a", 3)}, specs={"s-1": s})
    result = plan(fl, observed(fl, {"w-a": [running(s, 3)]}), mem, NOW)
    assert result.actions == () and result.queued == () and result.waiting == ()


def test_params_change_restarts_in_place_with_the_diff_as_reason():
    old = strategy("trend-eth-01", params={"grid": 20, "symbol": "ETHUSDT"})
    new = strategy("trend-eth-01", params={"grid": 24, "symbol": "ETHUSDT"})
    fl = fleet([new], [worker("w-a"), worker("w-b")])
    mem = memory({"trend-eth-01": ("w-a", 4)}, specs={"trend-eth-01": old})
    result = plan(fl, observed(fl, {"w-a": [running(old, 4)]}), mem, NOW)
    assert summary(result) == [("restart", "trend-eth-01", "w-a")]
    action = result.actions[0]
    assert action.reason == "params changed: grid 20 → 24"
    assert action.epoch == 4 and action.spec_hash == new.spec_hash


@pytest.mark.parametrize("change, expected", [
    (dict(code="v2"), "strategies/s.js changed"),
    (dict(heartbeat_ms=5000), "heartbeatMs 60000 → 5000"),
    (dict(stop_timeout=5.0), "scheduling changed: stopTimeoutSeconds 30.0 → 5.0"),
])
def test_each_launch_field_change_is_a_restart(change, expected):
    old, new = strategy("s"), strategy("s", **change)
    fl = fleet([new], [worker("w-a")])
    result = plan(fl, observed(fl, {"w-a": [running(old, 1)]}), memory({"s": ("w-a", 1)}, specs={"s": old}), NOW)
    assert summary(result) == [("restart", "s", "w-a")] and result.actions[0].reason == expected


def test_requirements_change_moves_only_when_the_worker_no_longer_fits():
    old = strategy("s", "bybit")
    fl_ok = fleet([strategy("s", "bybit", min_memory=10)], [worker("w-a", ["bybit", "okx"]), worker("w-b", ["okx"])])
    mem = memory({"s": ("w-a", 1)}, specs={"s": old})
    obs = observed(fl_ok, {"w-a": [running(old, 1)]})
    assert plan(fl_ok, obs, mem, NOW).actions == ()          # still fits: no restart, no move

    fl_move = fleet([strategy("s", "okx")], [worker("w-a", ["bybit"]), worker("w-b", ["okx"])])
    result = plan(fl_move, observed(fl_move, {"w-a": [running(old, 1)]}), mem, NOW)
    assert summary(result) == [("move", "s", "w-a", "w-b")]
    assert result.actions[0].cause == "requirements"
    assert "w-a no longer fits: no api okx" in result.actions[0].reason


def test_requirements_change_with_nowhere_to_go_leaves_it_running_with_a_note():
    old = strategy("s", "bybit")
    fl = fleet([strategy("s", "bybit", region="JP")], [worker("w-a", region="US")])
    result = plan(fl, observed(fl, {"w-a": [running(old, 1)]}), memory({"s": ("w-a", 1)}, specs={"s": old}), NOW)
    assert result.actions == () and result.queued == ()
    assert "no longer fits: not in region JP (US); left running there" in result.notes[0].note


def test_deleted_strategy_is_stopped():
    keep, gone = strategy("keep"), strategy("old-arb")
    fl = fleet([keep], [worker("w-a")])
    mem = memory({"keep": ("w-a", 1), "old-arb": ("w-a", 2)}, specs={"keep": keep, "old-arb": gone})
    result = plan(fl, observed(fl, {"w-a": [running(keep, 1), running(gone, 2)]}), mem, NOW)
    assert summary(result) == [("stop", "old-arb", "w-a")]
    assert result.actions[0].reason == "removed from fleet" and result.blocked == ()


def test_desired_stopped_stops_and_desired_paused_pauses_and_resumes():
    a, b, c = strategy("a", desired="stopped"), strategy("b", desired="paused"), strategy("c")
    fl = fleet([a, b, c], [worker("w-a")])
    mem = memory({"a": ("w-a", 1), "b": ("w-a", 2), "c": ("w-a", 3)}, specs={"a": a, "b": b, "c": c})
    obs = observed(fl, {"w-a": [running(a, 1), running(b, 2), running(c, 3, status="paused")]})
    result = plan(fl, obs, mem, NOW)
    assert summary(result) == [("stop", "a", "w-a"), ("pause", "b", "w-a"), ("resume", "c", "w-a")]


def test_mass_stop_guard_blocks_and_the_flag_lifts_it():
    specs = [strategy(f"s-{i}") for i in range(4)]
    fl = fleet(specs[:1], [worker("w-a")])
    mem = memory({s.id: ("w-a", i + 1) for i, s in enumerate(specs)}, specs={s.id: s for s in specs})
    obs = observed(fl, {"w-a": [running(s, i + 1) for i, s in enumerate(specs)]})
    result = plan(fl, obs, mem, NOW)
    assert result.actions == ()
    [blocked] = result.blocked
    assert blocked.guard == "mass-stop"
    assert "would stop 3 of 4 running strategies" in blocked.reason and "--allow-mass-stop" in blocked.reason
    assert [a.strategy for a in blocked.actions] == ["s-1", "s-2", "s-3"]
    assert result.has_changes

    lifted = plan(fl, obs, mem, NOW, PlanOptions(allow_mass_stop=True))
    assert [a.action for a in lifted.actions] == ["stop"] * 3 and lifted.blocked == ()


def test_one_of_one_running_may_be_stopped():
    s = strategy("only")
    fl = fleet([], [worker("w-a")])
    result = plan(fl, observed(fl, {"w-a": [running(s, 1)]}), memory({"only": ("w-a", 1)}, specs={"only": s}), NOW)
    assert summary(result) == [("stop", "only", "w-a")] and result.blocked == ()


def test_a_crashed_copy_on_an_online_worker_is_started_again_there():
    s = strategy("s")
    fl = fleet([s], [worker("w-a"), worker("w-b")])
    dead = running(s, 3, status="stopped", reason="lease expired")
    result = plan(fl, observed(fl, {"w-a": [dead]}), memory({"s": ("w-a", 3)}, specs={"s": s}), NOW)
    assert summary(result) == [("start", "s", "w-a")]
    assert result.actions[0].reason == "not running on w-a (lease expired)"
    assert result.actions[0].epoch == 4


def test_an_instance_in_error_is_reported_not_restarted_until_its_spec_changes():
    s = strategy("s")
    fl = fleet([s], [worker("w-a")])
    failed = running(s, 3, status="error", restarts=5, reason="heartbeat threw 11 times")
    mem = memory({"s": ("w-a", 3)}, specs={"s": s})
    result = plan(fl, observed(fl, {"w-a": [failed]}), mem, NOW)
    assert result.actions == () and "in error after 5 restarts" in result.notes[0].note
    fixed = strategy("s", code="v2")
    result = plan(fleet([fixed], [worker("w-a")]), observed(fl, {"w-a": [failed]}), mem, NOW)
    assert summary(result) == [("start", "s", "w-a")]


def test_a_retry_starts_the_copy_in_error_again_in_place_and_only_that_copy():
    s = strategy("s")
    fl = fleet([s], [worker("w-a"), worker("w-b")])
    failed = running(s, 3, status="error", restarts=5, reason="heartbeat threw 11 times")
    mem = memory({"s": ("w-a", 3)}, specs={"s": s})
    assert "`quantlab retry s`" in plan(fl, observed(fl, {"w-a": [failed]}), mem, NOW).notes[0].note
    mem.retry["s"] = {"epoch": 3, "by": "ops@desk retry", "reason": "exchange was down", "at": NOW}
    result = plan(fl, observed(fl, {"w-a": [failed]}), mem, NOW)
    assert summary(result) == [("start", "s", "w-a")] and result.actions[0].cause == "retry"
    assert result.actions[0].epoch == 4 and "exchange was down" in result.actions[0].reason
    # A request for another copy (an older epoch) starts nothing: the copy in error now was not asked about.
    mem.retry["s"] = {"epoch": 2, "by": "ops@desk retry", "reason": None, "at": NOW}
    assert plan(fl, observed(fl, {"w-a": [failed]}), mem, NOW).actions == ()


def test_a_running_copy_the_memory_does_not_know_is_adopted():
    s = strategy("s")
    fl = fleet([s], [worker("w-a"), worker("w-b")])
    result = plan(fl, observed(fl, {"w-b": [running(s, 12)]}), memory(), NOW)
    assert result.actions == ()
    assert [(a.strategy, a.worker, a.epoch) for a in result.adopt] == [("s", "w-b", 12)]
    assert result.next_epoch == 13


def test_drain_moves_one_strategy_per_plan():
    specs = [strategy(f"s-{i}") for i in range(3)]
    fl = fleet(specs, [worker("w-a", drain=True), worker("w-b")])
    mem = memory({s.id: ("w-a", i + 1) for i, s in enumerate(specs)}, specs={s.id: s for s in specs})
    obs = observed(fl, {"w-a": [running(s, i + 1) for i, s in enumerate(specs)]})
    result = plan(fl, obs, mem, NOW)
    assert summary(result) == [("move", "s-0", "w-a", "w-b")]
    assert "w-a is draining (3 left)" in result.actions[0].reason


def test_a_removed_worker_that_answers_gives_its_strategies_up_like_a_drain():
    """Removed from the fleet but reachable (kept as `leaving` by the controller): one graceful move
    per plan (a stop with the final checkpoint, then a start), never a restart or a start there."""
    specs = [strategy("s-0"), strategy("s-1")]
    leaving = dataclasses.replace(worker("w-gone", ("other",), cap=0), cordoned=True, drain=True, leaving=True)
    fl = fleet(specs, [leaving, worker("w-b")])
    mem = memory({"s-0": ("w-gone", 1), "s-1": ("w-gone", 2)}, specs={s.id: s for s in specs})
    obs = observed(fl, {"w-gone": [running(specs[0], 1), running(specs[1], 2, spec_hash="sha256:old")]})
    result = plan(fl, obs, mem, NOW)
    assert summary(result) == [("move", "s-0", "w-gone", "w-b")]
    assert result.actions[0].cause == "worker-leaving"
    assert "w-gone was removed from the fleet (2 left)" in result.actions[0].reason
    # A copy that is not running there any more is placed elsewhere, never started on it.
    obs = observed(fl, {"w-gone": [running(specs[0], 1, status="stopped")]})
    result = plan(fl, obs, mem, NOW)
    assert summary(result) == [("move", "s-0", "w-gone", "w-b"), ("move", "s-1", "w-gone", "w-b")]
    assert {a.cause for a in result.actions} == {"worker-leaving"}
    assert "not running on w-gone, which was removed from the fleet" in result.actions[0].reason


def _apply(fl, result, mem_placements, specs):
    """What the world looks like after `result` ran: placements moved, instances where they went."""
    placements = dict(mem_placements)
    for a in result.actions:
        if a.action == "move":
            placements[a.strategy] = (a.target, a.epoch)
    instances: dict[str, list] = {}
    for sid, (wid, epoch) in placements.items():
        instances.setdefault(wid, []).append(running(specs[sid], epoch))
    return placements, observed(fl, instances)


def test_rebalance_is_bounded_and_converges_without_ping_pong():
    specs = {f"s-{i}": strategy(f"s-{i}") for i in range(6)}
    fl = fleet(specs.values(), [worker("w-a", cap=8), worker("w-b", cap=8), worker("w-c", cap=8)])
    placements = {sid: ("w-a", i + 1) for i, sid in enumerate(specs)}
    obs = observed(fl, {"w-a": [running(s, i + 1) for i, s in enumerate(specs.values())]})
    assert plan(fl, obs, memory(placements, specs=specs), NOW).actions == ()     # sticky without --rebalance

    moved: list[tuple] = []
    for _ in range(10):
        mem = memory(placements, specs=specs)
        result = plan(fl, obs, mem, NOW, PlanOptions(rebalance=True, max_moves=1))
        assert len(result.actions) <= 1
        if not result.actions:
            break
        moved += [(a.strategy, a.source, a.target) for a in result.actions]
        placements, obs = _apply(fl, result, placements, specs)
    else:
        pytest.fail("rebalance did not converge")
    counts = sorted(sum(1 for w, _ in placements.values() if w == wid) for wid in fl.workers)
    assert counts == [2, 2, 2]
    assert len(moved) == 4
    strategies_moved = [m[0] for m in moved]
    assert len(strategies_moved) == len(set(strategies_moved)), "a strategy moved twice (ping-pong)"


def test_rebalance_never_moves_for_a_difference_of_one():
    specs = {"s-0": strategy("s-0"), "s-1": strategy("s-1"), "s-2": strategy("s-2")}
    fl = fleet(specs.values(), [worker("w-a"), worker("w-b")])
    placements = {"s-0": ("w-a", 1), "s-1": ("w-a", 2), "s-2": ("w-b", 3)}
    _, obs = _apply(fl, plan(fl, observed(fl), memory(), NOW), placements, specs)
    result = plan(fl, obs, memory(placements, specs=specs), NOW, PlanOptions(rebalance=True, max_moves=5))
    assert result.actions == ()


def test_round_robin_is_deterministic_across_runs_through_the_memory():
    fl1 = fleet([strategy("a"), strategy("b")], [worker(f"w-{i}") for i in range(4)], policy="round-robin")
    first = plan(fl1, observed(fl1), memory(), NOW)
    assert [a.worker for a in first.actions] == ["w-0", "w-1"]
    assert first.rr_cursor == "w-1"
    # The next run starts after the remembered cursor, and wraps around.
    fl2 = fleet([strategy("a"), strategy("b"), strategy("c"), strategy("d"), strategy("e")],
                [worker(f"w-{i}") for i in range(4)], policy="round-robin")
    mem = memory({"a": ("w-0", 1), "b": ("w-1", 2)}, specs={s.id: s for s in fl2.strategies.values()},
                 rr_cursor="w-1")
    obs = observed(fl2, {"w-0": [running(fl2.strategies["a"], 1)], "w-1": [running(fl2.strategies["b"], 2)]})
    second = plan(fl2, obs, mem, NOW)
    assert [(a.strategy, a.worker) for a in second.actions] == [("c", "w-2"), ("d", "w-3"), ("e", "w-0")]
    assert second.rr_cursor == "w-0"
    assert plan(fl2, obs, mem, NOW) == second


def test_target_limits_the_plan_to_named_strategies_or_workers():
    strategies = [strategy(f"s-{i}") for i in range(4)]
    fl = fleet(strategies, [worker("w-a"), worker("w-b")])
    only_s2 = plan(fl, observed(fl), memory(), NOW, PlanOptions(targets=frozenset({"s-2"})))
    assert summary(only_s2) == [("start", "s-2", "w-a")]
    only_wb = plan(fl, observed(fl), memory(), NOW, PlanOptions(targets=frozenset({"w-b"})))
    assert summary(only_wb) == [("start", "s-1", "w-b"), ("start", "s-3", "w-b")]


def test_a_target_nothing_knows_is_an_error_naming_it_not_an_empty_plan():
    fl = fleet([strategy("s-1")], [worker("w-a")])
    with pytest.raises(UnknownTarget, match=r"--target s-9, w-z: no strategy or worker"):
        plan(fl, observed(fl), memory(), NOW, PlanOptions(targets=frozenset({"s-1", "s-9", "w-z"})))
    # Known from the state or the hosts only (removed from the fleet, or found running): still a target.
    gone = fleet([], [worker("w-a")])
    assert plan(gone, observed(gone), memory({"s-1": ("w-old", 3)}), NOW,
                PlanOptions(targets=frozenset({"s-1", "w-old"}))) is not None
    found = observed(gone, {"w-a": [running(strategy("s-2"), 4)]})
    assert plan(gone, found, memory(), NOW, PlanOptions(targets=frozenset({"s-2"}))) is not None


def test_suspend_holds_the_actions_of_its_targets_and_says_who_and_why():
    fl = fleet([strategy(f"s-{i}") for i in range(3)], [worker("w-a"), worker("w-b")])
    free = plan(fl, observed(fl), memory(), NOW)
    assert len(free.actions) == 3 and free.blocked == ()

    mem = memory()
    mem.suspended = {"s-1": {"by": "ops@desk suspend", "reason": "exchange maintenance", "at": 0}}
    held = plan(fl, observed(fl), mem, NOW)
    assert sorted(a.strategy for a in held.actions) == ["s-0", "s-2"]
    (block,) = held.blocked
    assert block.guard == "suspended" and [a.strategy for a in block.actions] == ["s-1"]
    assert "s-1 suspended by ops@desk suspend: exchange maintenance" in block.reason
    assert held.refused == () and held.has_changes

    on_worker = {a.strategy: a.worker for a in free.actions if a.worker == "w-b"}
    mem.suspended = {"w-b": {"by": "ops", "reason": None, "at": 0}}
    assert {a.strategy for a in plan(fl, observed(fl), mem, NOW).blocked[0].actions} == set(on_worker)
    mem.suspended = {"*": {"by": "ops", "reason": None, "at": 0}}
    everything = plan(fl, observed(fl), mem, NOW)
    assert everything.actions == () and "everything suspended by ops" in everything.blocked[0].reason


def test_stop_all_renews_no_lease_until_resume():
    from quantlab.edges.gather import renewals
    mem = memory({"s-1": ("w-a", 1), "s-2": ("w-b", 2)})
    assert renewals(mem) == {"w-a": {"s-1": 1}, "w-b": {"s-2": 2}}
    mem.suspended = {"*": {"by": "ops", "reason": "incident", "at": 0}}
    assert renewals(mem) == {"w-a": {"s-1": 1}, "w-b": {"s-2": 2}}     # a plain suspend renews
    mem.suspended["*"]["stopAll"] = True
    assert renewals(mem) == {}


def test_same_input_gives_byte_identical_plan_json():
    strategies = [strategy(f"s-{i}", "bybit" if i % 2 else "okx", region="JP" if i % 3 == 0 else None)
                  for i in range(30)]
    workers = [worker(f"w-{i}", ["bybit", "okx"], 3, region="JP" if i % 2 else "US") for i in range(8)]
    fl = fleet(strategies, workers)
    texts = {json.dumps(plan(fl, observed(fl), memory(), NOW).to_json(), sort_keys=True) for _ in range(3)}
    assert len(texts) == 1


def test_down_ranks_a_worker_where_strategies_keep_failing():
    s, flaky = strategy("new"), strategy("flaky")
    fl = fleet([s, flaky], [worker("w-a", cap=8), worker("w-b", cap=2)])
    mem = memory({"flaky": ("w-a", 1)}, specs={"flaky": flaky})
    obs = observed(fl, {"w-a": [running(flaky, 1, restarts=4)]})
    result = plan(fl, obs, mem, NOW)
    assert summary(result) == [("start", "new", "w-b")]


def test_a_worker_without_the_runner_program_gets_no_placements():
    from quantlab.core.observed import ObservedState, WorkerState
    s = strategy("s")
    fl = fleet([s], [worker("w-a"), worker("w-b")])
    obs = observed(fl)
    workers = dict(obs.workers)
    workers["w-a"] = WorkerState("w-a", True, error="node not found on the host's PATH")
    result = plan(fl, ObservedState(workers, NOW), memory(), NOW)
    assert summary(result) == [("start", "s", "w-b")]
    only_a = fleet([s], [worker("w-a")])
    result = plan(only_a, ObservedState({"w-a": workers["w-a"]}, NOW), memory(), NOW)
    assert "runner program missing on the host: w-a" in result.queued[0].reason


def test_an_orphaned_runner_is_replaced_under_a_new_supervisor():
    s = strategy("s")
    fl = fleet([s], [worker("w-a")])
    orphan = running(s, 2, status="orphaned", reason="the supervisor is gone but the runner still runs")
    result = plan(fl, observed(fl, {"w-a": [orphan]}), memory({"s": ("w-a", 2)}, specs={"s": s}), NOW)
    assert summary(result) == [("start", "s", "w-a")] and result.actions[0].epoch == 3


def test_stopping_a_dead_copy_is_clean_up_not_a_mass_stop():
    specs = [strategy(f"s-{i}") for i in range(3)]
    fl = fleet([], [worker("w-a")])
    mem = memory({s.id: ("w-a", i + 1) for i, s in enumerate(specs)}, specs={s.id: s for s in specs})
    dead = running(specs[0], 1, status="error", reason="gave up")
    obs = observed(fl, {"w-a": [dead, running(specs[1], 2), running(specs[2], 3)]})
    result = plan(fl, obs, mem, NOW)
    assert summary(result) == [("stop", "s-0", "w-a")]           # the dead one's clean-up goes ahead
    [blocked] = result.blocked
    assert "would stop 2 of 2 running strategies" in blocked.reason
    assert [a.strategy for a in blocked.actions] == ["s-1", "s-2"]


def test_an_instance_the_agent_could_not_read_is_left_alone():
    s = strategy("s")
    fl = fleet([s], [worker("w-a"), worker("w-b")])
    unread = running(s, 0, status="unknown", reason="the agent could not read it: No space left on device")
    result = plan(fl, observed(fl, {"w-a": [unread]}), memory({"s": ("w-a", 4)}, specs={"s": s}), NOW)
    assert result.actions == () and result.queued == ()
    assert "No space left on device" in result.notes[0].note


def test_a_worker_proxy_change_restarts_what_runs_there():
    from dataclasses import replace as _replace
    from quantlab.core.memory import Placement
    from quantlab.core.spec import worker_launch
    s = strategy("s")
    old_worker = worker("w-a", proxy="http://127.0.0.1:8890")
    new_worker = _replace(old_worker, proxy="http://127.0.0.1:8891")
    fl = fleet([s], [new_worker])
    mem = memory({"s": ("w-a", 2)}, specs={"s": s})
    mem.placements["s"] = Placement("s", "w-a", 2, s.spec_hash, launched=Launched.from_json(
        {**s.launch_fields(), "worker": worker_launch(old_worker)}))
    result = plan(fl, observed(fl, {"w-a": [running(s, 2)]}), mem, NOW)
    assert summary(result) == [("restart", "s", "w-a")]
    assert result.actions[0].reason == "worker w-a changed: proxy http://127.0.0.1:8890 → http://127.0.0.1:8891"
    assert result.actions[0].epoch == 2


def test_a_new_state_holds_first_starts_while_a_fitting_worker_has_never_answered():
    """A lost or fresh state file: a worker that never answered may still run copies an earlier
    state placed there, so strategies that could run there wait for such a lease to run out."""
    jp, us = strategy("jp-grid", region="JP"), strategy("us-trend", region="US")
    fl = fleet([jp, us], [worker("w-jp-1", region="JP"), worker("w-jp-2", region="JP"), worker("w-us", region="US")],
               ttl=60)
    obs = observed(fl, down=["w-jp-1"])
    fresh = memory()
    fresh.began = NOW - 10_000
    result = plan(fl, obs, fresh, NOW)
    assert summary(result) == [("start", "us-trend", "w-us")]          # no silent worker fits it
    [wait] = result.waiting
    assert (wait.strategy, wait.worker) == ("jp-grid", "w-jp-1")
    assert wait.seconds_left == pytest.approx(60 + 30 + 1 + 3 - 10)
    fresh.began = NOW - 200_000                                        # long enough ago
    assert summary(plan(fl, obs, fresh, NOW)) == [("start", "jp-grid", "w-jp-2"), ("start", "us-trend", "w-us")]


def test_a_renamed_worker_keeps_its_running_copy():
    """worker-old renamed to worker-new (same host and workdir): the copy it runs is adopted under
    the new id, not stopped as stale and not left to fence itself."""
    s = strategy("s")
    fl = fleet([s], [worker("worker-new"), worker("w-other")])
    mem = memory({"s": ("worker-old", 7)}, specs={"s": s})
    result = plan(fl, observed(fl, {"worker-new": [running(s, 7)]}), mem, NOW)
    assert result.actions == () and result.waiting == ()
    assert [(a.strategy, a.worker, a.epoch) for a in result.adopt] == [("s", "worker-new", 7)]


def test_the_loops_rebalance_runs_on_its_interval_and_never_moves_a_strategy_twice_in_a_row():
    from quantlab.app.loop import rebalance_options
    from quantlab.core.spec import FleetSettings
    every = FleetSettings(rebalance_every_s=600, rebalance_max_moves=2)
    mem = memory()
    assert rebalance_options(FleetSettings(), mem, NOW) == PlanOptions()              # off by default
    assert rebalance_options(every, mem, NOW) == PlanOptions(rebalance=True, max_moves=2)
    mem.rebalanced_at, mem.rebalanced = NOW, ["s-0"]
    assert rebalance_options(every, mem, NOW + 599_000) == PlanOptions()
    due = rebalance_options(every, mem, NOW + 600_000)
    assert due.rebalance and due.cooldown == frozenset({"s-0"})

    # The strategy the last rebalance moved stays where it is; another one moves instead.
    specs = {f"s-{i}": strategy(f"s-{i}") for i in range(4)}
    fl = fleet(specs.values(), [worker("w-a", cap=8), worker("w-b", cap=8)])
    placements = {sid: ("w-a", i + 1) for i, sid in enumerate(specs)}
    obs = observed(fl, {"w-a": [running(s, i + 1) for i, s in enumerate(specs.values())]})
    first = plan(fl, obs, memory(placements, specs=specs), NOW, PlanOptions(rebalance=True, max_moves=1))
    (move,) = first.actions
    again = plan(fl, obs, memory(placements, specs=specs), NOW,
                 PlanOptions(rebalance=True, max_moves=1, cooldown=frozenset({move.strategy})))
    assert [a.strategy for a in again.actions] != [move.strategy] and len(again.actions) == 1


def test_a_suspension_never_holds_a_stale_copys_stop_and_a_held_stop_keeps_its_slot():
    sa = strategy("s-a")
    fl = fleet([sa], [worker("w-1"), worker("w-2")])
    mem = memory({"s-a": ("w-1", 5)}, specs={"s-a": sa})
    mem.suspended = {"s-a": {"by": "ops", "reason": None, "at": 0}}
    obs = observed(fl, {"w-1": [running(sa, 5)], "w-2": [running(sa, 3)]})
    result = plan(fl, obs, mem, NOW)
    assert [(a.action, a.worker, a.cause) for a in result.actions] == [("stop", "w-2", "stale-copy")]
    assert result.blocked == ()

    # w-1 has room for one; s-a (removed from the fleet) holds it while its stop is suspended.
    sb = strategy("s-b")
    fl = fleet([sb], [worker("w-1", cap=1)])
    mem = memory({"s-a": ("w-1", 5)}, specs={"s-a": sa})
    mem.suspended = {"s-a": {"by": "ops", "reason": None, "at": 0}}
    result = plan(fl, observed(fl, {"w-1": [running(sa, 5)]}), mem, NOW)
    assert result.actions == () and [q.strategy for q in result.queued] == ["s-b"]
    assert [a.action for a in result.blocked[0].actions] == ["stop"]
