"""The state as one controller process holds it: the state file's lock and the memory in it.

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


class Ledger:
    def __init__(self, store: StateStore, clock: Clock):
        self.store = store
        self.clock = clock
        self._memory: Memory | None = None
        self._holders = 0
        self._exit: contextlib.ExitStack | None = None
        self._hold_lock = threading.Lock()       # taking and giving back the file lock
        self._update_lock = threading.RLock()    # one change to the memory at a time

    def read(self, ttl_s: float) -> Memory:
        """The state as it is on disk, judged on this process's clock; nothing is locked or written
        (plan, status, events)."""
        return self.store.load().rebase(self.clock.mono(), self.clock.boot_id, ttl_s)

    @contextlib.contextmanager
    def hold(self, ttl_s: float, timeout: float = 0.0, command: str | None = None) -> Iterator[Memory]:
        """Hold the state lock for one round; yields the memory as of now. `ttl_s` is the fleet's
        lease TTL, used when the state comes from another boot (see Memory.rebase)."""
        with self._hold_lock:
            if self._holders == 0:
                stack = contextlib.ExitStack()
                stack.enter_context(self.store.lock(timeout, command=command))
                try:
                    loaded = self.store.load()
                except BaseException:
                    stack.close()
                    raise
                self._exit = stack
                self._memory = loaded
                rebased = loaded.rebase(self.clock.mono(), self.clock.boot_id, ttl_s)
                if rebased is not loaded:
                    self._memory = self.store.save(rebased)
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
    def held(self) -> bool:
        return self._holders > 0

    @property
    def memory(self) -> Memory:
        """The newest memory. Callers read it and never change it in place: `update` does."""
        if self._memory is None:
            raise StateError("internal error: the state is read before its lock is held")
        return self._memory

    def update(self, change: Callable[[Memory], None]) -> Memory:
        with self._update_lock:
            memory = self.memory.copy()
            change(memory)
            self._memory = self.store.save(memory)
            return self._memory

    def bound_leases(self, bounds: dict[str, int]) -> None:
        """Recorded (and on disk) before the requests that may grant these leases are sent."""
        def change(m: Memory) -> None:
            for worker, until in bounds.items():
                m.bound_lease(worker, until)
        self.update(change)
