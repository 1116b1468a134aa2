"""The state store's contract, held against both backends — the JSON file and PostgreSQL — through
the Ledger each controller process uses: a lineage set once, a serial that grows only on change,
two processes that never lose each other's changes, the state lock naming its holder, the events
log and the checkpoint copies."""
from __future__ import annotations

import pytest

from quantlab.edges.clock import Clock
from quantlab.app.controller import Controller
from quantlab.core.memory import Placement
from quantlab.edges.snapshot import FORMAT
from quantlab.edges.statebackend import NotShared
from quantlab.edges.store import LockHeld, StateError


@pytest.fixture(params=["file", "postgresql"])
def backend(request, tmp_path):
    """A function that opens another controller on the same state (as another process would)."""
    fleet = tmp_path / "fleet"
    fleet.mkdir()
    (fleet / "fleet.yaml").write_text("apiVersion: quantlab/v1\nkind: Fleet\n")
    dsn = request.getfixturevalue("pg_dsn") if request.param == "postgresql" else None

    def open_one() -> Controller:
        return Controller(fleet, fleet / ".quantlab" / "state.json", state_dsn=dsn,
                          clock=Clock(wall=lambda: 1_000, mono=lambda: 5_000, boot_id="boot"))
    return open_one


def test_a_lineage_once_and_a_serial_that_grows_only_on_change(backend):
    ctl = backend()
    assert backend().read_memory(None).serial == 0, "reading writes nothing"
    begun = ctl.ledger.refresh(25.0)
    assert begun.serial == 1 and begun.lineage, "a new state begins on this controller's clock, saved once"
    first = ctl.ledger.update(lambda m: m.placements.update({"s1": Placement("s1", "w1", 1, "h")}))
    assert first.serial == 2 and first.lineage == begun.lineage
    assert ctl.ledger.update().serial == 2, "nothing changed: the serial stays"
    second = ctl.ledger.update(lambda m: setattr(m, "next_epoch", 5))
    assert second.serial == 3 and second.lineage == begun.lineage
    again = backend().read_memory(None)
    assert (again.serial, again.lineage, again.next_epoch, set(again.placements)) == (3, begun.lineage, 5, {"s1"})


def test_two_processes_never_lose_each_others_changes(backend):
    a, b = backend(), backend()
    base = a.ledger.refresh(25.0).serial
    b.ledger.refresh(25.0)
    for i in range(3):
        a.ledger.update(lambda m, i=i: m.placements.update({f"a{i}": Placement(f"a{i}", "w1", i + 1, "h")}))
        b.ledger.update(lambda m, i=i: m.suspended.update({f"b{i}": {"by": "ops"}}))
    final = backend().read_memory(None)
    assert set(final.placements) == {"a0", "a1", "a2"} and set(final.suspended) == {"b0", "b1", "b2"}
    assert final.serial == base + 6


def test_the_state_lock_is_held_by_one_and_names_its_holder(backend):
    a, b = backend(), backend()
    with a.ledger.hold(25.0, command="quantlab apply"):
        with pytest.raises(LockHeld, match=r"state is locked by pid \d+ on .*quantlab apply"):
            with b.ledger.hold(25.0, command="quantlab reconcile"):
                pass
        b.ledger.update(lambda m: setattr(m, "rr_cursor", "w9"))      # writing needs only the write lock
    with b.ledger.hold(25.0, command="quantlab reconcile"):
        assert b.ledger.memory.rr_cursor == "w9"


def test_events_and_checkpoint_copies(backend):
    ctl = backend()
    assert ctl.events.append({"t": 1, "event": "start", "strategy": "s1", "actor": "test"})
    assert ctl.events.append({"t": 2, "event": "stop", "strategy": "s1", "actor": "test"})
    assert [e["event"] for e in backend().events.read()] == ["start", "stop"]
    copy = {"hash": "abc", "files": {"state.json": "eJw="}}
    ctl.checkpoints.save("s1", copy)
    other = backend()
    assert other.checkpoints.load("s1") == copy and other.checkpoints.hash_of("s1") == "abc"
    assert other.checkpoints.names() == ["s1"]
    assert other.checkpoints.forget("s1") and backend().checkpoints.load("s1") is None


def test_a_migrated_state_refuses_to_be_acted_on(backend):
    ctl = backend()
    ctl.ledger.update(lambda m: setattr(m, "migrated_to", "postgresql://elsewhere/db"))
    with pytest.raises(StateError, match="moved to postgresql://elsewhere/db"):
        backend().ledger.refresh(25.0)


def test_the_fleet_pages_snapshot_and_what_only_a_shared_state_has(backend):
    ctl = backend()
    snapshots = ctl.backend.snapshots()
    assert snapshots.read() is None and snapshots.version() is None
    snapshots.write({"format": FORMAT, "round": 1})
    first = backend().backend.snapshots()
    assert first.read() == {"format": FORMAT, "round": 1} and first.version() is not None
    version = first.version()
    snapshots.write({"format": FORMAT, "round": 2})
    assert first.read() == {"format": FORMAT, "round": 2} and first.version() != version
    snapshots.write({"format": FORMAT + 1, "round": 3})
    assert first.read() is None, "a snapshot of another format is not shown as if it were this one's"
    assert ctl.backend.break_locks() == 0, "no deposed leader holds anything"
    if ctl.backend.shared:
        assert ctl.backend.leadership("test pid 1 on here").read() is None
        assert ctl.backend.plan_requests().take() is None
    else:
        with pytest.raises(NotShared, match="leadership needs a PostgreSQL state"):
            ctl.backend.leadership("test pid 1 on here")
        with pytest.raises(NotShared):
            ctl.backend.plan_requests()
