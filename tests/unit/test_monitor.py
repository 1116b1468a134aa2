"""The Monitor's notices: what is told, and that each alert is told once. Plain data, fixed clock."""
from __future__ import annotations

from quantlab.core.health import alerts_delta, watch
from quantlab.core.observed import ObservedState, WorkerState
from tests.fleetkit import NOW, fleet, memory, strategy, worker

FLEET = fleet([strategy("a")], [worker("w-1"), worker("w-2")], offline_after=90)


def test_supervisor_events_become_notices_and_offline_workers_alerts():
    mem = memory(last_seen={"w-2": NOW - 200_000})
    observed = ObservedState({"w-1": WorkerState("w-1", True),
                              "w-2": WorkerState("w-2", False, error="w-2: connection refused")}, NOW)
    events = [{"t": NOW - 5, "event": "error", "strategy": "a", "worker": "w-1", "detail": "gave up after 5 restarts"},
              {"t": NOW - 4, "event": "restart", "strategy": "a", "worker": "w-1"},
              {"t": NOW - 3, "event": "lease-expired", "strategy": "a", "worker": "w-1", "detail": "lease expired"}]
    notices, raised = watch(FLEET, observed, mem, events, NOW, NOW)
    assert [(n["kind"], n["strategy"]) for n in notices] == [("strategy-error", "a"), ("lease-expired", "a")]
    assert list(raised) == ["offline:w-2"]
    assert raised["offline:w-2"]["kind"] == "worker-offline"
    assert "connection refused" in raised["offline:w-2"]["message"]


def test_an_alert_is_told_when_raised_and_when_cleared_never_in_between():
    raised = {"offline:w-2": {"kind": "worker-offline", "message": "w-2 offline"}}
    told, alerts = alerts_delta({}, raised, "offline:", NOW)
    assert [n["kind"] for n in told] == ["worker-offline"] and alerts == {"offline:w-2": "w-2 offline"}
    told, alerts = alerts_delta(alerts, raised, "offline:", NOW)
    assert told == [] and alerts == {"offline:w-2": "w-2 offline"}
    told, alerts = alerts_delta({**alerts, "guard:mass-stop": "would stop 3"}, {}, "offline:", NOW)
    assert [(n["kind"], n["alert"]) for n in told] == [("resolved", "offline:w-2")]
    assert alerts == {"guard:mass-stop": "would stop 3"}          # other scopes are left alone
