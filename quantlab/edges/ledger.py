"""The state as one controller process holds it: the memory in the state file, the book of the lease
requests this process sent, and the state lock.

Two locks, for two jobs. The state lock (`hold`) says who may plan and act: one `apply` or act round
at a time, across processes; a process may hold it for several of its rounds at once (counted), and
gives it back between them. Writing the state needs only the short write lock: every change is one
update — read the file again if another process wrote it, apply the change, save — so a daemon's
renewal rounds, which never take the state lock, go on while `apply` acts, and the two processes
never lose each other's changes.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Callable, Iterator

from .clock import Clock
from quantlab.core.memory import Memory
from .statebackend import StatePort
from .store import StateConflict, StateError


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

    def raise_floor(self, bounds: dict[str, int]) -> None:
        with self._lock:
            for worker, until in bounds.items():
                self._floor[worker] = max(self._floor.get(worker, 0), until)

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
    def __init__(self, store: StatePort, clock: Clock):
        self.store = store
        self.clock = clock
        self.leases = LeaseBook()
        self._memory: Memory | None = None
        self._ttl_s = 0.0                        # the fleet's lease TTL, as last told (for rebase)
        self._holders = 0
        self._exit: contextlib.ExitStack | None = None
        self._hold_lock = threading.Lock()       # taking and giving back the state lock
        self._update_lock = threading.RLock()    # one change to the memory at a time
        # Group commit: changes queued while a save is under way are saved together by the next one
        # (each caller still returns only once its change is on disk), so a hundred starts or hosts
        # at once cost a few saves of the whole state, not a hundred.
        self._queue: list[Callable[[Memory], None] | None] = []
        self._queued = 0                         # changes ever queued (each caller's number)
        self._done_through = 0                   # changes saved (or failed) through this number
        self._failed: dict[int, BaseException] = {}   # a failed group's error, for each of its callers
        self._commit_lock = threading.Lock()
        # Whether a change may stay in this process's memory while the store cannot be written (a
        # PostgreSQL leader while the database is away: its renewals go on, see Controller.defer_writes).
        self.may_defer: Callable[[], bool] = lambda: False
        self.deferred: str | None = None          # why changes wait in memory, while they do

    def read(self, ttl_s: float) -> Memory:
        """The state as it is on disk, judged on this process's clock; nothing is locked or written
        (plan, status, events). Read through a store of its own, so that what this process holds
        still knows which version of the file it wrote last."""
        return self.store.fresh().load().rebase(self.clock.mono(), self.clock.boot_id, ttl_s)

    def refresh(self, ttl_s: float) -> Memory:
        """The newest memory: the file read again when another process wrote it since. `ttl_s`: the
        fleet's lease TTL, used when the state comes from another boot (see Memory.rebase)."""
        with self._update_lock:
            self._ttl_s = ttl_s or self._ttl_s
            try:
                self._read()
            except StateError as exc:
                if self._memory is None or not self.may_defer():
                    raise
                self.deferred = str(exc)
            return self.memory

    def _read(self) -> None:
        """Unless the file is still what this process last read or wrote (then the memory it holds,
        with the lease book's tighter settlements, is the newer of the two)."""
        if self._memory is not None and not self.store.changed_since_saved():
            return
        loaded = self.store.load()
        if loaded.migrated_to:
            raise StateError(f"{self.store.path}: this state was moved to {loaded.migrated_to} by `quantlab state "
                             f"push`; no controller acts on it any more: pass --state {loaded.migrated_to}")
        self.leases.read_from(loaded.leases)
        self._memory = loaded
        rebased = loaded.rebase(self.clock.mono(), self.clock.boot_id, self._ttl_s)
        if rebased is not loaded:
            self.leases.read_from(rebased.leases)
            self._memory = self.store.save(rebased)

    @contextlib.contextmanager
    def hold(self, ttl_s: float, timeout: float = 0.0, command: str | None = None) -> Iterator[Memory]:
        """Hold the state lock for one round that plans and acts; yields the memory as of now."""
        with self._hold_lock:
            if self._holders == 0:
                stack = contextlib.ExitStack()
                stack.enter_context(self.store.lock(timeout, command=command))
                try:
                    self.refresh(ttl_s)
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

    @property
    def known(self) -> Memory | None:
        """The memory this process holds, if it read one (never reads)."""
        return self._memory

    def extend_leases(self, bounds: dict[str, int]) -> None:
        """Take leases on these workers as living at least until these bounds (worker -> mono ms),
        and save: a new leader counts every lease the previous term may have granted."""
        with self._update_lock:
            self._read()
            self.leases.raise_floor(bounds)
            self.update()

    @property
    def memory(self) -> Memory:
        """The newest memory this process knows. Callers read it and never change it in place:
        `update` does."""
        if self._memory is None:
            raise StateError("internal error: the state is read before it was loaded")
        return self._memory

    def update(self, change: Callable[[Memory], None] | None = None) -> Memory:
        """Apply `change` to a copy of the newest memory (the file read again if another process
        wrote it) and save it, with the leases as the book has them now. Changes that threads queue
        while another saves go into one save together (see _queue); each returns once its own is on
        disk, or raises what that save raised."""
        with self._commit_lock:
            self._queued += 1
            mine = self._queued
            self._queue.append(change)
        with self._update_lock:
            with self._commit_lock:
                failure = self._failed.pop(mine, None)
                if self._done_through >= mine:
                    if failure is not None:
                        raise failure
                    return self.memory
                group, self._queue = self._queue, []
                first, covers = self._done_through + 1, self._queued
            try:
                self._save_group(group)
            except BaseException as exc:
                with self._commit_lock:
                    self._failed.update({n: exc for n in range(first, covers + 1) if n != mine})
                    self._done_through = covers
                raise
            with self._commit_lock:
                self._done_through = covers
            return self.memory

    def _save_group(self, changes: list[Callable[[Memory], None] | None]) -> None:
        try:
            with self.store.writing():
                self._read()
                self._memory = self.store.save(self._changed(changes))
            self.deferred = None
        except StateError as exc:
            if self._memory is None or not self.may_defer() or isinstance(exc, StateConflict):
                raise
            # Kept here and saved with the next update that gets through: the bounds of the leases
            # this leader grants meanwhile are covered by a takeover's wait (see Controller.took_over).
            self._memory = self._changed(changes)
            self.deferred = str(exc)

    def _changed(self, changes: list[Callable[[Memory], None] | None]) -> Memory:
        memory = self.memory.copy()
        for change in changes:
            if change is not None:
                change(memory)
        memory.leases = self.leases.leases()
        memory.saved_at = self.clock.mono()
        return memory

    def request_leases(self, bounds: dict[str, int], change: Callable[[Memory], None] | None = None) -> int:
        """Book requests that may grant these leases (worker -> bound) and save them (with `change`)
        before they are sent. Returns the booking, to settle each worker with `settle_lease`. Threads
        booking at once share one save (update's group commit): a hundred hosts coming back at once
        cost a few saves, not a hundred."""
        with self._commit_lock:
            booking = self.leases.requested(bounds)
        self.update(change)
        return booking

    def settle_lease(self, booking: int, worker: str, until: int | None) -> None:
        """See LeaseBook.settle; on disk with the next update (until then the file holds the booked
        bound, which is never shorter)."""
        self.leases.settle(booking, worker, until)
