"""One command's worth of work, shared by the CLI and the reconcile loop: load the fleet and the
memory, gather what runs, plan, apply. This is where the I/O pieces are wired to the pure core."""
from __future__ import annotations

import getpass
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable

from . import health
from .execute import Executor, Outcome, Progress, Recorder, outcome_notices
from .gather import Gathered, checkpoints_due, gather, remember, renewals
from .hosts import Hosts
from .memory import Memory
from .notify import Notifier
from .plan import Plan
from .planner import PlanOptions, plan as make_plan
from .spec import Fleet, FleetSettings, Location, WorkerSpec, load_fleet
from .store import CheckpointStore, EventLog, StateError, StateStore
from .vcs import Revision, fleet_revision


def default_fleet_dir() -> Path:
    return Path(os.environ.get("QUANTLAB_FLEET") or "fleet")


def default_state_path(fleet_dir: Path) -> Path:
    return fleet_dir / ".quantlab" / "state.json"


def now_ms() -> int:
    return int(time.time() * 1000)


class StalePlan(StateError):
    pass


@dataclass
class Controller:
    fleet_dir: Path
    state_path: Path
    clock: Callable[[], int] = now_ms
    accept_new_host_keys: bool = False
    log: Callable[[str], None] = field(default=lambda line: print(line, file=sys.stderr))
    store: StateStore = field(init=False)
    events: EventLog = field(init=False)
    checkpoints: CheckpointStore = field(init=False)
    _hosts: Hosts | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.store = StateStore(self.state_path)
        self.events = EventLog(self.state_path.with_name("events.jsonl"))
        self.checkpoints = CheckpointStore(self.state_path.with_name("checkpoints"))

    # --- pieces --------------------------------------------------------------------------------

    def load_fleet(self) -> Fleet:
        return load_fleet(self.fleet_dir)

    def revision(self) -> Revision:
        return fleet_revision(self.fleet_dir)

    def hosts(self, fleet: Fleet) -> Hosts:
        if self._hosts is None:
            self._hosts = Hosts(fleet, accept_new_host_keys=self.accept_new_host_keys)
        else:
            self._hosts.update(fleet)
        return self._hosts

    def close(self) -> None:
        if self._hosts is not None:
            self._hosts.close()
            self._hosts = None

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

    # --- reading -------------------------------------------------------------------------------

    def observe(self, fleet: Fleet, memory: Memory) -> Gathered:
        """Probe every host without renewing anything (plan, status)."""
        return gather(fleet, memory, self.hosts(fleet), self.clock)

    def plan(self, fleet: Fleet, memory: Memory, gathered: Gathered, options: PlanOptions) -> Plan:
        revision = self.revision()
        result = make_plan(fleet, gathered.observed, memory, self.clock(), options)
        return result.with_provenance(fleet_revision=revision.commit, fleet_dirty=revision.dirty)

    # --- writing (callers hold the state lock) -------------------------------------------------

    def gather_and_remember(self, fleet: Fleet, memory: Memory, *, loop: bool = False) -> tuple[Gathered, Memory]:
        """Probe every host, renew the current placements' leases, and record what was seen."""
        gathered = gather(fleet, memory, self.hosts(fleet), self.clock, renewals(memory),
                          checkpoints_due(fleet, memory, self.clock()))
        for sid, checkpoint in gathered.checkpoints.items():
            if checkpoint is not None:
                self.checkpoints.save(sid, checkpoint)
            elif self.checkpoints.forget(sid):
                # Too large to copy now: an older copy must not be restored as if it were current.
                self.events.append({"t": self.clock(), "event": "checkpoint-dropped", "strategy": sid,
                                    "actor": "monitor", "detail": "checkpoint folder over 1 MiB: not copied; "
                                    "a move will start it without its state"})
        remembered = remember(memory, gathered, self.addresses(fleet), fleet.settings.monitor.lease_ttl_s,
                              self.clock() if loop else None)
        remembered.fleet_settings = fleet.settings.snapshot()
        notices, raised = health.watch(fleet, gathered.observed, remembered, gathered.host_events, self.clock())
        told, remembered.alerts = health.alerts_delta(remembered.alerts, raised, "offline:", self.clock())
        notices += told
        memory = self.store.save(remembered)
        self.record_host_events(gathered)
        self.notify(fleet, notices)
        return gathered, memory

    def notify(self, fleet: Fleet, notices: list[dict[str, Any]]) -> None:
        if not notices:
            return
        for notice in notices:
            self.events.append({**notice, "event": "notify", "actor": "monitor"})
        Notifier(fleet.settings.notify, self.log).send([{**n, "fleet": str(self.fleet_dir)} for n in notices])

    def record_host_events(self, gathered: Gathered) -> None:
        for event in gathered.host_events:
            self.events.append({**event, "actor": f"supervisor@{event['worker']}"})

    def check_plan_file(self, saved: Plan, fleet: Fleet, memory: Memory) -> None:
        """A saved plan applies only to the state and fleet it was made from."""
        changed = []
        if saved.lineage != memory.lineage and saved.lineage is not None:
            changed.append(f"the state file is another one (lineage {memory.lineage}, plan has {saved.lineage})")
        if saved.state_serial != memory.serial:
            changed.append(f"the state changed since (serial {memory.serial}, plan has {saved.state_serial})")
        if saved.fleet_hash != fleet.fleet_hash:
            changed.append("the fleet files changed since")
        if changed:
            raise StalePlan("saved plan is stale: " + "; ".join(changed) + ". Run `quantlab plan --out FILE` again")

    def execute(self, fleet: Fleet, memory: Memory, plan: Plan, command: str,
                progress: Progress | None = None) -> tuple[Memory, list[Outcome]]:
        revision = {"revision": plan.fleet_revision, "dirty": plan.fleet_dirty}
        recorder = Recorder(self.store, memory, self.events, self.actor(command), revision, self.clock,
                            self.checkpoints)
        outcomes = Executor(fleet, self.hosts(fleet), recorder, progress).execute(plan)
        for blocked in plan.blocked:
            recorder.event(event="blocked", guard=blocked.guard, reason=blocked.reason,
                           strategies=[a.strategy for a in blocked.actions])
        notices, raised = outcome_notices(plan, outcomes, self.clock())
        after = recorder.memory.copy()
        for scope in ("failed:", "guard:"):
            told, after.alerts = health.alerts_delta(after.alerts, {k: v for k, v in raised.items()
                                                                    if k.startswith(scope)}, scope, self.clock())
            notices += told
        memory = self.store.save(after)
        self.notify(fleet, notices)
        return memory, outcomes

    def keep_alive(self, memory: Memory) -> tuple[Gathered, Memory]:
        """While the fleet directory does not validate: renew the leases of what runs, as it runs,
        with the addresses and settings remembered from the last good fleet (in the state file, so
        cron runs have them too). Nothing is started or stopped."""
        settings = FleetSettings.from_snapshot(memory.fleet_settings)
        workers = {}
        for wid, a in memory.addresses.items():
            workers[wid] = WorkerSpec(id=wid, host=a["host"], port=a.get("port"), user=a.get("user"),
                                      workdir=a.get("workdir"), runner=(a.get("program") or "node",),
                                      max_strategies=0, supported_apis=frozenset(), source=Location("state", 0))
        fallback = Fleet(root=self.fleet_dir, settings=settings, strategies=MappingProxyType({}),
                         workers=MappingProxyType(dict(sorted(workers.items()))), fleet_hash="", files=())
        gathered = gather(fallback, memory, self.hosts(fallback), self.clock, renewals(memory))
        memory = self.store.save(remember(memory, gathered, {}, settings.monitor.lease_ttl_s, self.clock()))
        self.record_host_events(gathered)
        return gathered, memory
