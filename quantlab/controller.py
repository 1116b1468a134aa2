"""One command's worth of work, shared by the CLI and the reconcile loop: load the fleet and the
memory, gather what runs, plan, and (in execute.py) apply. Everything with I/O is wired here."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import observed as observed_mod
from .memory import Memory
from .observed import ObservedState
from .plan import Plan
from .planner import PlanOptions, plan as make_plan
from .spec import Fleet, load_fleet
from .store import EventLog, StateStore
from .vcs import Revision, fleet_revision


def default_fleet_dir() -> Path:
    return Path(os.environ.get("QUANTLAB_FLEET") or "fleet")


def default_state_path(fleet_dir: Path) -> Path:
    return fleet_dir / ".quantlab" / "state.json"


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class Controller:
    fleet_dir: Path
    state_path: Path
    clock: Callable[[], int] = now_ms
    store: StateStore = field(init=False)
    events: EventLog = field(init=False)

    def __post_init__(self) -> None:
        self.store = StateStore(self.state_path)
        self.events = EventLog(self.state_path.with_name("events.jsonl"))

    def load_fleet(self) -> Fleet:
        return load_fleet(self.fleet_dir)

    def revision(self) -> Revision:
        return fleet_revision(self.fleet_dir)

    def observe(self, fleet: Fleet, memory: Memory) -> ObservedState:
        return observed_mod.from_memory(list(fleet.workers), memory.placements, self.clock())

    def plan(self, fleet: Fleet, memory: Memory, observed: ObservedState, options: PlanOptions) -> Plan:
        revision = self.revision()
        result = make_plan(fleet, observed, memory, self.clock(), options)
        return result.with_provenance(fleet_revision=revision.commit, fleet_dirty=revision.dirty)
