"""What a run that writes state remembers from a gather, and what it asks the next probe for.
Plain data, a fixed clock."""
from __future__ import annotations

from quantlab.gather import CHECKPOINT_EVERY_MS, Gathered, checkpoints_due, remember, renewals
from quantlab.observed import ObservedState, WorkerState
from tests.fleetkit import NOW, fleet, memory, running, strategy, worker

A, B, GONE = strategy("a"), strategy("b", desired="stopped"), strategy("gone")
FLEET = fleet([A, B], [worker("w-1"), worker("w-2")])


def test_every_current_placement_keeps_its_lease_until_a_stop_ends_it():
    # Removed ("gone") and desiredState: stopped ("b") too: the plan stops them explicitly, and a
    # mass-stop guard that refuses those stops must not be undone by letting their leases run out.
    mem = memory({"a": ("w-1", 3), "b": ("w-1", 4), "gone": ("w-2", 5)})
    assert renewals(mem) == {"w-1": {"a": 3, "b": 4}, "w-2": {"gone": 5}}


def test_checkpoints_are_asked_for_once_the_copy_is_a_minute_old():
    mem = memory({"a": ("w-1", 3), "b": ("w-2", 4), "gone": ("w-2", 5)})
    assert checkpoints_due(FLEET, mem, NOW) == {"w-1": {"a": 3}, "w-2": {"b": 4}}
    mem.checkpoints = {"a": NOW - CHECKPOINT_EVERY_MS + 1, "b": NOW - CHECKPOINT_EVERY_MS}
    assert checkpoints_due(FLEET, mem, NOW) == {"w-2": {"b": 4}}


def test_remember_records_who_answered_leases_restarts_events_and_checkpoints():
    mem = memory({"a": ("w-1", 3)}, leases={"w-1": NOW - 50_000, "w-2": NOW - 50_000})
    inst = running(A, 3, restarts=2)
    gathered = Gathered(
        ObservedState({"w-1": WorkerState("w-1", True, instances={"a": inst}),
                       "w-2": WorkerState("w-2", False, error="refused")}, NOW),
        answered_at={"w-1": NOW - 10}, renewed={"w-1": ["a"]},
        host_events=[{"t": NOW - 500, "worker": "w-1", "strategy": "a", "event": "restart"}],
        checkpoints={"a": {"files": {}, "t": NOW - 20}})
    after = remember(mem, gathered, {"w-1": {"host": "local"}}, 180, loop_at=NOW)
    assert after.last_seen == {"w-1": NOW - 10}
    # Leases say until when a copy there may live: the grant (an upper bound of when) plus the TTL.
    assert after.leases == {"w-1": NOW - 10 + 180_000, "w-2": NOW - 50_000}   # w-2 did not answer
    assert after.restarts == {"a": 2}
    assert after.host_events == {"w-1": NOW - 500}
    assert after.checkpoints == {"a": NOW}
    assert after.addresses == {"w-1": {"host": "local"}}
    assert after.loop_renewal == NOW
    assert mem.last_seen == {} and mem.checkpoints == {}                  # the input is left as it was


def test_a_renewal_that_may_have_reached_a_host_counts_as_granted():
    """The probe timed out after it was sent: the host may have renewed its leases, so failover must
    wait for that lease too (else two copies could run)."""
    mem = memory({"a": ("w-1", 3)}, leases={"w-1": NOW - 50_000})
    gathered = Gathered(ObservedState({"w-1": WorkerState("w-1", False, error="timed out")}, NOW),
                        maybe_renewed={"w-1": NOW - 5})
    after = remember(mem, gathered, {}, 60)
    assert after.leases == {"w-1": NOW - 5 + 60_000}
    assert after.last_seen == {}                     # it did not answer, so it was not seen
