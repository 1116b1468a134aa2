"""The lease book: every request that may grant a lease is booked before it is sent and settled
after; the bound it keeps per worker only ever covers what a host may honour. Plain data."""
from __future__ import annotations

from quantlab.edges.ledger import LeaseBook


def test_a_booked_request_counts_until_it_is_settled():
    book = LeaseBook()
    book.read_from({"w-1": 1_000})
    request = book.requested({"w-1": 30_000, "w-2": 30_000})
    assert book.leases() == {"w-1": 30_000, "w-2": 30_000}
    book.settle(request, "w-1", 12_000)          # answered: its lease ends by the answer + TTL
    book.settle(request, "w-2", None)            # never reached the host
    assert book.leases() == {"w-1": 12_000}


def test_what_the_state_file_said_is_a_floor_and_grants_only_grow():
    book = LeaseBook()
    book.read_from({"w-1": 50_000})
    first = book.requested({"w-1": 40_000})
    book.settle(first, "w-1", 20_000)
    assert book.leases() == {"w-1": 50_000}      # the file's bound is never lowered here
    second = book.requested({"w-1": 60_000})
    book.settle(second, "w-1", 60_000)           # unknown fate: the whole bound
    third = book.requested({"w-1": 70_000})
    book.settle(third, "w-1", 30_000)            # a later, tighter grant does not undo an earlier one
    assert book.leases() == {"w-1": 60_000}


def test_requests_in_flight_survive_a_reread_of_the_file():
    book = LeaseBook()
    request = book.requested({"w-1": 90_000})
    book.read_from({"w-1": 10_000, "w-3": 5_000})    # another process wrote the state meanwhile
    assert book.leases() == {"w-1": 90_000, "w-3": 5_000}
    book.settle(request, "w-1", 40_000)
    assert book.leases() == {"w-1": 40_000, "w-3": 5_000}


# --- the ledger's group commit, over the real state file ----------------------------------------------

def asked(i: int) -> dict:
    return {"epoch": i, "by": "test", "reason": "test", "at": 0}


def ledger_on(tmp_path):
    from quantlab.edges.clock import Clock
    from quantlab.edges.ledger import Ledger
    from quantlab.edges.store import StateStore
    store = StateStore(tmp_path / "state.json")
    ledger = Ledger(store, Clock())
    ledger.refresh(25.0)
    return ledger, store


def test_changes_made_at_once_are_saved_together_and_each_is_on_disk_when_its_caller_returns(tmp_path):
    import threading

    ledger, store = ledger_on(tmp_path)
    saves = []
    real_save = store.save

    def counted(memory):
        saves.append(memory.serial)
        return real_save(memory)
    store.save = counted
    seen_on_return: dict[int, bool] = {}

    def start(i: int) -> None:
        ledger.update(lambda m: m.retry.__setitem__(f"s{i}", asked(i)))
        seen_on_return[i] = f"s{i}" in store.fresh().load().retry   # what the file says, read anew
    threads = [threading.Thread(target=start, args=(i,)) for i in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert seen_on_return == {i: True for i in range(64)}
    assert store.fresh().load().retry == {f"s{i}": asked(i) for i in range(64)}
    assert len(saves) < 64, f"{len(saves)} saves for 64 changes made at once"


def test_a_save_that_fails_fails_every_change_it_held(tmp_path):
    import threading

    from quantlab.edges.store import StateError

    ledger, store = ledger_on(tmp_path)
    gate, release = threading.Event(), threading.Event()
    real_save = store.save

    def failing(memory):
        gate.set()
        release.wait(10)                 # the others queue their changes meanwhile
        raise StateError("disk full (test)")
    store.save = failing
    outcomes: dict[int, str] = {}

    def change(i: int) -> None:
        try:
            ledger.update(lambda m: m.retry.__setitem__(f"s{i}", asked(i)))
            outcomes[i] = "saved"
        except StateError as exc:
            outcomes[i] = str(exc)
    first = threading.Thread(target=change, args=(0,))
    first.start()
    assert gate.wait(10)
    rest = [threading.Thread(target=change, args=(i,)) for i in range(1, 6)]
    for t in rest:
        t.start()
    release.set()
    for t in [first, *rest]:
        t.join(30)
    # The first save failed alone; the five queued behind it went into the next one, which failed too.
    assert outcomes == {i: "disk full (test)" for i in range(6)}, outcomes
    store.save = real_save
    ledger.update(lambda m: m.retry.__setitem__("after", asked(1)))
    assert store.fresh().load().retry == {"after": asked(1)}
