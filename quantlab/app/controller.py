"""One controller's work, shared by the CLI and the reconcile loop: load the fleet, hold the state,
renew leases, plan, apply. This is where the edges are wired to the pure core.

`Controller` holds the wiring — the state backend and the ledger, the hosts, the prober, the
notifier, the clock — and the few pieces every use case needs (the fleet, the state as read, a
probe, the events log). What it does is split by use case, one module each, composed here:

    rounds.py    Rounds    renewal rounds, checkpoint copies, alerts, the page's snapshot
    applying.py  Applying  plan and apply (for `apply` and the loop's act rounds)
    holds.py     Holds     suspend, resume, stop-all, retry
    queries.py   Queries   logs, host events, the stored state, the leader
    leader.py    Leading   the fencing token, lead-for-run, what a new term inherits

The use cases call each other through `self` (an act round renews, then applies); each module
imports only the core, the edges and the use cases below it, never this one at run time.

Two kinds of round write state. A renewal round probes every host on the probe lane, renewing the
leases of the current placements and recording what it saw; it runs on its own timer and never
waits for anything but the hosts (each bounded by its deadline). An act round plans from the newest
renewal round and carries the plan out on the act lane. While a run acts, its renewal rounds go on.
"""
from __future__ import annotations

import getpass
import os
import socket
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable

from quantlab.edges.clock import Clock
from quantlab.edges.follow import load_working_tree
from quantlab.edges.gather import Gathered, Prober, gather
from quantlab.edges.hosts import Hosts
from quantlab.edges.ledger import Ledger
from quantlab.core.memory import Memory, remembered_worker
from quantlab.edges.notify import Notifier
from quantlab.core.plan import Plan
from quantlab.edges.snapshot import Counters, SnapshotWriter
from quantlab.core.spec import Fleet, FleetInvalid, FleetSettings
from quantlab.edges.statebackend import CheckpointsPort, EventsPort, StateBackend, StatePort, open_backend
from quantlab.edges.store import StateError

from .applying import Applying
from .holds import Holds
from .leader import Leading
from .queries import Queries
from .rounds import Rounds


def default_fleet_dir() -> Path:
    return Path(os.environ.get("QUANTLAB_FLEET") or "fleet")


def default_state_path(fleet_dir: Path) -> Path:
    return fleet_dir / ".quantlab" / "state.json"


@dataclass
class Controller(Rounds, Applying, Holds, Queries, Leading):
    fleet_dir: Path
    state_path: Path
    clock: Clock = field(default_factory=Clock)
    accept_new_host_keys: bool = False
    state_dsn: str | None = None      # postgresql://…: the state lives there (state_path: local files only)
    log: Callable[[str], None] = field(default=lambda line: print(line, file=sys.stderr))
    backend: StateBackend = field(init=False)
    store: StatePort = field(init=False)
    ledger: Ledger = field(init=False)
    events: EventsPort = field(init=False)
    checkpoints: CheckpointsPort = field(init=False)
    _hosts: Hosts | None = field(default=None, init=False)
    _prober: Prober | None = field(default=None, init=False)
    _notifier: Notifier | None = field(default=None, init=False)
    _lazy_lock: threading.RLock = field(default_factory=threading.RLock, init=False)
    _events_failure_said: str | None = field(default=None, init=False)
    # With PostgreSQL: this process's side of the leadership, while it may lead (the loop, or an
    # apply that leads for its duration). Its term is the fencing token of every command it sends.
    leader: Any = field(default=None, init=False)
    _lineage: str | None = field(default=None, init=False)
    # For the fleet page and /metrics: counts since start, the last rounds, the last plan.
    counters: Counters = field(default_factory=Counters, init=False)
    _rounds: dict[str, dict[str, Any]] = field(default_factory=dict, init=False)
    _last_plan: Plan | None = field(default=None, init=False)
    _snapshots: SnapshotWriter | None = field(default=None, init=False)
    # The last act round that acted: when it ended (mono ms) and what it left each strategy as
    # (snapshot.acted_marks), shown over every observation taken before then.
    _acted: tuple[int, dict[str, dict[str, Any]]] | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.backend = open_backend(self.state_path, self.state_dsn)
        self.store, self.events, self.checkpoints = self.backend.store, self.backend.events, self.backend.checkpoints
        self.ledger = Ledger(self.store, self.clock)
        self.ledger.may_defer = self.defers_writes

    # --- pieces --------------------------------------------------------------------------------

    def load_fleet(self) -> Fleet:
        """The working tree's fleet (plan, apply and the other commands; the loop has its Follower)."""
        return load_working_tree(self.fleet_dir)

    def hosts(self, fleet: Fleet) -> Hosts:
        with self._lazy_lock:             # the renewal and act threads of a daemon both come here
            if self._hosts is None:
                self._hosts = Hosts(fleet, accept_new_host_keys=self.accept_new_host_keys)
                self._hosts.fence = self.fence
            else:
                self._hosts.update(fleet)
            return self._hosts

    def prober(self, fleet: Fleet) -> Prober:
        """The probe lane's prober, kept for the life of this controller (it remembers which host
        still has a probe outstanding, and each host's clock)."""
        hosts = self.hosts(fleet)
        with self._lazy_lock:
            if self._prober is None or self._prober.hosts is not hosts:
                self._prober = Prober(hosts, self.clock)
            return self._prober

    def notifier(self, settings: FleetSettings) -> Notifier:
        with self._lazy_lock:
            if self._notifier is None:
                self._notifier = Notifier(settings.notify, self.log, on_failure=lambda sink: self.counters.add(
                    "notification-failures", sink=sink))
            else:
                self._notifier.update(settings.notify)
            return self._notifier

    def close(self, flush_s: float = 5.0) -> None:
        """Close the connections; deliver what notices are queued for at most `flush_s`."""
        with self._lazy_lock:
            writer, self._snapshots = self._snapshots, None
        if writer is not None:
            writer.close(flush_s)
        if self._notifier is not None:
            self._notifier.close(flush_s)
            self._notifier = None
        if self._hosts is not None:
            self._hosts.close()
            self._hosts = None
            self._prober = None


    def actor(self, command: str) -> str:
        try:
            user = getpass.getuser()
        except (KeyError, OSError):
            user = str(os.getuid())
        return f"{user}@{socket.gethostname()} {command}"

    def addresses(self, fleet: Fleet) -> dict[str, dict[str, Any]]:
        hosts = self.hosts(fleet)
        return {w.id: {"host": w.host, "port": w.port, "user": w.user, "workdir": hosts.workdir(w),
                       "program": w.runner[0]} for w in fleet.workers.values()}

    def fallback_fleet(self, memory: Memory) -> Fleet:
        """While the fleet directory does not validate: the workers as the state file remembers them
        (addresses and the last valid fleet's settings, so cron runs have them too), no strategies.
        Renewing from it keeps what runs running; nothing is planned from it."""
        settings = FleetSettings.from_snapshot(memory.fleet_settings)
        workers = {wid: remembered_worker(wid, a) for wid, a in memory.addresses.items()}
        return Fleet(root=self.fleet_dir, settings=settings, strategies=MappingProxyType({}),
                     workers=MappingProxyType(dict(sorted(workers.items()))), fleet_hash="", files=())


    def fleet_or_fallback(self) -> tuple[Fleet, list[str]]:
        """The working tree's fleet; when it does not validate, the fleet as the state file remembers
        it (see fallback_fleet) and the problems, so that status, logs and events keep working."""
        try:
            return self.load_fleet(), []
        except FleetInvalid as exc:
            return self.fallback_fleet(self.read_memory(None)), [str(p) for p in exc.problems]

    def require_fleet_dir(self) -> None:
        """Nothing is written beside a folder that is not a fleet: a reconcile run by cron from the
        wrong working directory must say so, not start a state of its own there."""
        root = self.fleet_dir
        try:
            os.listdir(root)
        except FileNotFoundError:
            raise StateError(f"{root}: fleet directory not found; pass --fleet DIR or set QUANTLAB_FLEET") from None
        except NotADirectoryError:
            raise StateError(f"{root}: fleet directory is not a directory; pass --fleet DIR or set "
                             "QUANTLAB_FLEET") from None
        except OSError as exc:
            raise StateError(f"{root}: cannot read the fleet directory: {exc.strerror}; fix its permissions") from None
        if os.path.lexists(self.state_path) or self.state_path.parent != root / ".quantlab":
            return
        for _, dirs, files in os.walk(root):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            if any(f.endswith((".yaml", ".yml")) for f in files):
                return
        raise StateError(f"{root} holds no *.yaml fleet files, so no state was created there; pass --fleet DIR "
                         "or set QUANTLAB_FLEET (or run `quantlab init DIR` for a new fleet)")

    # --- reading -------------------------------------------------------------------------------

    def read_memory(self, fleet: Fleet | None) -> Memory:
        """The state as on disk, judged on this process's clock; nothing locked or written."""
        ttl = fleet.settings.monitor.lease_ttl_s if fleet is not None else 0.0
        memory = self.ledger.read(ttl)
        self._lineage = memory.lineage or self._lineage     # what read-only probes ask the hosts about
        return memory

    def observe(self, fleet: Fleet, memory: Memory, *, person: bool = False) -> Gathered:
        """Probe every host without renewing anything (plan, status; `person`: for a person's command,
        with its longer deadline, see FleetSettings.person_probe_deadline_s)."""
        deadline = fleet.settings.person_probe_deadline_s if person else None
        return gather(fleet, memory, self.hosts(fleet), self.clock, deadline_s=deadline)


    def record_event(self, event: dict[str, Any]) -> None:
        """Into the events log; a log that cannot be written is said once, and stops nothing. What
        hosts and strategies said (an error naming the proxy it trades through) goes in without
        credentials."""
        from quantlab.core.redact import redact_json

        if not self.events.append(redact_json(event)) and self.events.failure != self._events_failure_said:
            self.log(f"warning: {self.events.failure}; history is not recorded until it is fixed")
            self._events_failure_said = self.events.failure

