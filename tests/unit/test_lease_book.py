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
