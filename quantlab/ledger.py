"""The state as one controller process holds it: the state file's lock, the memory in it, and the
book of the lease requests this process sent.

A process may run several rounds at once — the renewal round on its own timer beside an act round
that plans and carries out a plan — so the file lock is counted: the first round to start takes it
(and reads the file afresh, since another process may have written it meanwhile), the last to end
gives it back. Between rounds the lock is free, so `apply` can run beside a reconcile daemon.

Every change is one small update — copy, change, save — under a thread lock, so the two rounds'
records never overwrite each other, and each is on disk before the request it prepares is sent.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Callable, Iterator

from .clock import Clock
from .memory import Memory
from .store import StateError, StateStore


class LeaseBook:
    """Until when a lease granted on each worker may live, from the requests that may grant one.

    A request is booked, with its bound (its not-after + TTL), before it is sent, and the bound is
    on disk before it leaves. Once its fate is known it is settled: granted — the lease ends no later
    than the answer's arrival + TTL, which is usually sooner than the bound; never reached the host —
    nothing; unknown (the answer was lost) — the whole bound. What the state file said when it was
    read is a floor that nothing here lowers. Thread-safe."""

    def __init__(self) -> None:
        self._floor: dict[str, int] = {}
        self._granted: dict[str, int] = {}
        self._pending: dict[int, dict[str, int]] = {}      # request -> worker -> bound
        self._next = 0
        self._lock = threading.Lock()

    def read_from(self, leases: dict[str, int]) -> None:
        """The state file was (re)read: its leases are the floor. Requests still in flight stay booked."""
        with self._lock:
            self._floor = dict(leases)

    def requested(self, bounds: dict[str, int]) -> int:
        with self._lock:
            self._next += 1
            self._pending[self._next] = dict(bounds)
            return self._next

    def settle(self, request: int, worker: str, until: int | None) -> None:
        """`until`: when the lease this request granted on `worker` ends at the latest (None: none)."""
        with self._lock:
            bounds = self._pending.get(request, {})
            bounds.pop(worker, None)
            if not bounds:
                self._pending.pop(request, None)
            if until is not None:
                self._granted[worker] = max(self._granted.get(worker, 0), until)

    def leases(self) -> dict[str, int]:
        with self._lock:
            out = dict(self._floor)
            for book in [self._granted, *self._pending.values()]:
                for worker, until in book.items():
                    out[worker] = max(out.get(worker, 0), until)
            return out


class Ledger:
    def __init__(self, store: StateStore, clock: Clock):
        self.store = store
        self.clock = clock
        self.leases = LeaseBook()
        self._memory: Memory | None = None
        self._holders = 0
        self._exit: contextlib.ExitStack | None = None
        self._hold_lock = threading.Lock()       # taking and giving back the file lock
        self._update_lock = threading.RLock()    # one change to the memory at a time

    def read(self, ttl_s: float) -> Memory:
        """The state as it is on disk, judged on this process's clock; nothing is locked or written
        (plan, status, events). Read through a store of its own, so that what this process holds
        still knows which version of the file it wrote last."""
        return StateStore(self.store.path).load().rebase(self.clock.mono(), self.clock.boot_id, ttl_s)

    @contextlib.contextmanager
    def hold(self, ttl_s: float, timeout: float = 0.0, command: str | None = None) -> Iterator[Memory]:
        """Hold the state lock for one round; yields the memory as of now. `ttl_s` is the fleet's
        lease TTL, used when the state comes from another boot (see Memory.rebase)."""
        with self._hold_lock:
            if self._holders == 0:
                stack = contextlib.ExitStack()
                stack.enter_context(self.store.lock(timeout, command=command))
                try:
                    self._read(ttl_s)
                except BaseException:
                    stack.close()
                    raise
                self._exit = stack
            self._holders += 1
        try:
            yield self.memory
        finally:
            with self._hold_lock:
                self._holders -= 1
                if self._holders == 0 and self._exit is not None:
                    self._exit.close()
                    self._exit = None

    def _read(self, ttl_s: float) -> None:
        """The memory as on disk, unless the file is still what this process last wrote (then the
        memory it holds, with the lease book's tighter settlements, is the newer of the two)."""
        if self._memory is not None and not self.store.changed_since_saved():
            return
        loaded = self.store.load()
        self.leases.read_from(loaded.leases)
        self._memory = loaded
        rebased = loaded.rebase(self.clock.mono(), self.clock.boot_id, ttl_s)
        if rebased is not loaded:
            self.leases.read_from(rebased.leases)
            self._memory = self.store.save(rebased)

    @property
    def held(self) -> bool:
        return self._holders > 0

    @property
    def memory(self) -> Memory:
        """The newest memory. Callers read it and never change it in place: `update` does."""
        if self._memory is None:
            raise StateError("internal error: the state is read before its lock is held")
        return self._memory

    def update(self, change: Callable[[Memory], None] | None = None) -> Memory:
        """Apply `change` to a copy of the newest memory and save it, with the leases as the book
        has them now."""
        with self._update_lock:
            memory = self.memory.copy()
            if change is not None:
                change(memory)
            memory.leases = self.leases.leases()
            self._memory = self.store.save(memory)
            return self._memory

    def settle_lease(self, booking: int, worker: str, until: int | None) -> None:
        """See LeaseBook.settle; saved with the next update (the file holds the looser bound until then)."""
        self.leases.settle(booking, worker, until)

    def request_leases(self, bounds: dict[str, int], change: Callable[[Memory], None] | None = None) -> int:
        """Book requests that may grant these leases (worker -> bound), and save them (with `change`)
        before they are sent. Returns the booking, to settle each worker with `leases.settle`."""
        with self._update_lock:
            booking = self.leases.requested(bounds)
            self.update(change)
            return booking
