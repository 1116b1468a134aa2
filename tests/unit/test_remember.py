"""What a run that writes state remembers from a gather, and what it asks the next probe for.
Plain data, a fixed clock."""
from __future__ import annotations

from quantlab.edges.gather import Gathered, not_after, remember_into, renewals
from quantlab.core.memory import HostClock
from quantlab.core.observed import ObservedState, WorkerState
from tests.fleetkit import NOW, fleet, memory, running, strategy, worker

A, B, GONE = strategy("a"), strategy("b", desired="stopped"), strategy("gone")
FLEET = fleet([A, B], [worker("w-1"), worker("w-2")])


def test_every_current_placement_keeps_its_lease_until_a_stop_ends_it():
    # Removed ("gone") and desiredState: stopped ("b") too: the plan stops them explicitly, and a
    # mass-stop guard that refuses those stops must not be undone by letting their leases run out.
    mem = memory({"a": ("w-1", 3), "b": ("w-1", 4), "gone": ("w-2", 5)})
    assert renewals(mem) == {"w-1": {"a": 3, "b": 4}, "w-2": {"gone": 5}}


def test_remember_records_who_answered_restarts_and_events():
    mem = memory({"a": ("w-1", 3)}, leases={"w-1": NOW - 50_000, "w-2": NOW - 50_000})
    inst = running(A, 3, restarts=2)
    clock = HostClock("boot-1", 1234.5, NOW - 10)
    gathered = Gathered(
        ObservedState({"w-1": WorkerState("w-1", True, instances={"a": inst}),
                       "w-2": WorkerState("w-2", False, error="refused")}, NOW),
        answered_at={"w-1": NOW - 10}, seen_wall={"w-1": 1_700_000_000_000}, renewed={"w-1": ["a"]},
        host_clocks={"w-1": clock},
        host_events=[{"t": NOW - 500, "worker": "w-1", "strategy": "a", "event": "restart"}])
    after = mem.copy()
    remember_into(after, gathered, {"w-1": {"host": "local"}}, loop_at=NOW)
    assert after.answered == {"w-1": NOW - 10}                           # judged: the boot-time clock
    assert after.last_seen == {"w-1": 1_700_000_000_000}                 # shown: epoch ms
    assert after.host_clocks == {"w-1": clock}
    # Lease bounds are recorded before a request is sent, never from its answer.
    assert after.leases == mem.leases
    assert after.restarts == {"a": 2}
    assert after.host_events == {"w-1": NOW - 500}
    assert after.addresses == {"w-1": {"host": "local"}}
    assert after.loop_renewal == NOW
    assert mem.last_seen == {} and mem.checkpoints == {}                  # the input is left as it was


def test_a_not_after_never_lies_past_the_controllers_bound():
    """The host read its clock no later than the controller received it, and clock rates may
    differ: the not-after a request carries is at most the bound's instant on the host's clock."""
    clock = HostClock("boot-1", 1000.0, NOW)
    assert not_after(clock, NOW) == {"bootId": "boot-1", "boottime": 1000.0}
    later = not_after(clock, NOW + 60_000)["boottime"]
    assert 1000.0 + 59.9 < later < 1000.0 + 60.0


def test_rebase_takes_every_lease_as_granted_at_this_start_on_another_boot():
    mem = memory({"a": ("w-1", 3), "b": ("w-3", 4)}, leases={"w-1": 10, "w-2": 99_999_999}, last_seen={"w-1": 5})
    mem.clock_boot = "old-boot"
    mem.host_clocks = {"w-1": HostClock("h", 1.0, 5)}
    same = mem.rebase(NOW, "old-boot", 30)
    assert same is mem                                                    # same boot: comparable as is
    other = mem.rebase(NOW, "new-boot", 30)
    assert other.leases == {"w-1": NOW + 30_000, "w-2": NOW + 30_000, "w-3": NOW + 30_000}
    assert other.answered == {"w-1": NOW} and other.last_seen == {"w-1": 5}
    assert other.host_clocks == {} and other.began == NOW and other.clock_boot == "new-boot"
