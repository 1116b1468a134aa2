"""What every phase of the planner reads — the inputs and what is judged from them once — and the
few values that pass from one phase to the next."""
from __future__ import annotations

from dataclasses import dataclass, field

from .. import health
from ..health import WorkerLiveness, format_duration
from ..memory import Launched, Memory
from ..plan import Cause
from ..observed import Instance, ObservedState
from ..scheduling import WorkerView, filters
from ..spec import Fleet, StrategySpec, WorkerSpec


@dataclass(frozen=True)
class PlanOptions:
    rebalance: bool = False
    max_moves: int = 1
    targets: frozenset[str] = frozenset()
    allow_mass_stop: bool = False
    cooldown: frozenset[str] = frozenset()   # strategies a rebalance must not move (moved by the last one)
    # Set (to the reason) on the loop's first round from a new source: what the fleet files ask to
    # stop, restart or move waits for --allow-source-change (see follow.source_change).
    source_change: str | None = None


@dataclass
class Current:
    """Where a strategy runs now, as far as the controller can tell."""

    worker: str
    epoch: int
    spec_hash: str | None
    paused: bool
    instance: Instance | None       # the observed instance of this placement, when its worker answered
    adopted: bool = False
    launched: Launched | None = None


@dataclass
class ToPlace:
    """A strategy that needs a (new) worker."""

    spec: StrategySpec
    # new | worker-offline | worker-removed (not reachable) | worker-leaving (removed, reachable) | worker-unfit |
    # requirements | drain | rebalance
    cause: Cause
    reason: str                     # why it needs a (new) worker
    current: Current | None = None


class Epochs:
    """Epochs for the copies this plan creates, in the order the phases create them: never one
    that the state or a host has seen."""

    def __init__(self, memory: Memory, observed: ObservedState):
        epochs = [p.epoch for p in memory.placements.values()]
        for state in observed.workers.values():
            epochs.extend(i.epoch for i in state.instances.values())
        self.next = max([memory.next_epoch] + [e + 1 for e in epochs])

    def take(self) -> int:
        epoch = self.next
        self.next += 1
        return epoch


@dataclass
class Context:
    """The plan's inputs, and what is judged from them before any decision: each worker's
    liveness, the failover brake, the workers never heard from."""

    fleet: Fleet
    observed: ObservedState
    memory: Memory
    now: int
    options: PlanOptions
    liveness: dict[str, WorkerLiveness] = field(init=False)
    never_answered: list[str] = field(init=False)
    brake: str | None = field(init=False)

    def __post_init__(self) -> None:
        self.monitor = self.fleet.settings.monitor
        self.liveness = {wid: health.worker_liveness(wid, self.observed, self.memory, self.monitor, self.now)
                         for wid in self.fleet.workers}
        # Workers not answering now that this state has never seen answer (see classify.unaccounted).
        self.never_answered = sorted(wid for wid in self.fleet.workers
                                     if wid not in self.memory.answered and not self.reachable(wid))
        self.brake = health.failover_brake(self.fleet, self.observed)

    def reachable(self, worker_id: str) -> bool:
        state = self.observed.worker(worker_id)
        return worker_id in self.fleet.workers and state is not None and state.reachable

    def targeted(self, strategy: str, *workers: str | None) -> bool:
        """Whether --target (if given) selects this strategy or one of these workers."""
        targets = self.options.targets
        return not targets or strategy in targets or any(w in targets for w in workers if w)

    def misfit(self, spec: StrategySpec, worker: WorkerSpec) -> str | None:
        """Why a worker no longer satisfies a strategy's requirements (not counting load or cordon)."""
        state = self.observed.worker(worker.id)
        view = WorkerView(worker, "online", credentials=state.credentials if state else frozenset())
        for check in (filters.api, filters.region, filters.proxy, filters.credentials):
            rejected = check(spec, view)
            if rejected is not None:
                detail = f" ({rejected.detail})" if rejected.detail else ""
                return filters.describe_group(rejected.code, spec) + detail
        return None

    def seconds_until_movable(self, spec: StrategySpec, cur: Current) -> float:
        """Seconds until no copy of `spec` can still run on its current worker (negative: since)."""
        expiry = health.lease_surely_expired_at(spec.id, cur.worker, self.memory, self.monitor,
                                                spec.scheduling.stop_timeout_s)
        return (expiry - self.now) / 1000


def down_for(live: WorkerLiveness) -> str:
    return "(never answered)" if live.down_for_s is None else format_duration(live.down_for_s)
