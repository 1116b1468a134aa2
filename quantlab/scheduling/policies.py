"""The SchedulePolicy family: how a feasible worker is chosen.

A ranking policy (`RoundRobinPolicy`, `LoadBasedPolicy`) orders feasible workers; wrappers add hard
constraints and compose with either: `RegionAffinityPolicy` (a strategy that names a region or proxy
lands only on a matching worker) and `FailoverPolicy` (a replacement never goes back to the worker
it leaves).
"""
from __future__ import annotations

from ..spec import StrategySpec
from . import filters
from .pool import Candidates, WorkerView


class SchedulePolicy:
    name = "policy"
    static_checks: tuple[filters.Check, ...] = ()   # hard constraints this policy adds, per class
    excluded: frozenset[str] = frozenset()           # workers this policy never picks

    def pick(self, candidates: Candidates) -> WorkerView | None:
        """The best free worker among `candidates` (fast path: their heap and sorted ids)."""
        raise NotImplementedError

    def rank_key(self, worker: WorkerView) -> tuple:
        """Total order over workers, lower is better (slow path, when classes are not enough)."""
        raise NotImplementedError

    def placed(self, worker: WorkerView) -> None:
        """Called once a placement on `worker` is made."""

    def explain(self, worker: WorkerView, feasible: int) -> str:
        raise NotImplementedError


class LoadBasedPolicy(SchedulePolicy):
    """Fewest running strategies relative to capacity, then host cpu load, then most free memory."""

    name = "load-based"

    def pick(self, candidates: Candidates) -> WorkerView | None:
        return candidates.least_loaded(self.excluded)

    def rank_key(self, worker: WorkerView) -> tuple:
        return worker.load_key()

    def explain(self, worker: WorkerView, feasible: int) -> str:
        return f"least loaded of {feasible} feasible (load {worker.used}/{worker.capacity})"


class RoundRobinPolicy(SchedulePolicy):
    """The next feasible worker by id after the one chosen last; the cursor lives in the memory."""

    name = "round-robin"

    def __init__(self, cursor: str | None = None):
        self.cursor = cursor

    def pick(self, candidates: Candidates) -> WorkerView | None:
        # After the cursor, then wrap around.
        return (candidates.first_free_after(self.cursor, self.excluded)
                or candidates.first_free_after(None, self.excluded))

    def rank_key(self, worker: WorkerView) -> tuple:
        wrapped = self.cursor is not None and worker.id <= self.cursor
        return (wrapped, worker.id)

    def placed(self, worker: WorkerView) -> None:
        self.cursor = worker.id

    def explain(self, worker: WorkerView, feasible: int) -> str:
        after = f" after {self.cursor}" if self.cursor else ""
        return f"round-robin: next{after} of {feasible} feasible (load {worker.used}/{worker.capacity})"


class _Wrapper(SchedulePolicy):
    def __init__(self, inner: SchedulePolicy):
        self.inner = inner
        self.static_checks = inner.static_checks
        self.excluded = inner.excluded

    def pick(self, candidates: Candidates) -> WorkerView | None:
        return self.inner.pick(candidates)

    def rank_key(self, worker: WorkerView) -> tuple:
        return self.inner.rank_key(worker)

    def placed(self, worker: WorkerView) -> None:
        self.inner.placed(worker)

    def explain(self, worker: WorkerView, feasible: int) -> str:
        return self.inner.explain(worker, feasible)


class RegionAffinityPolicy(_Wrapper):
    """A strategy that names a region or a proxy only ever lands on a worker that matches it."""

    def __init__(self, inner: SchedulePolicy):
        super().__init__(inner)
        self.name = f"region-affinity({inner.name})"
        self.static_checks = filters.AFFINITY_STATIC + inner.static_checks


class FailoverPolicy(_Wrapper):
    """A replacement for a strategy whose worker is lost (or left): same constraints, never that worker."""

    def __init__(self, inner: SchedulePolicy, lost_worker: str):
        super().__init__(inner)
        self.name = f"failover({inner.name})"
        self.excluded = inner.excluded | {lost_worker}


def fleet_policy(name: str, cursor: str | None) -> SchedulePolicy:
    """The fleet's ranking policy; region and proxy affinity always apply on top of it."""
    ranking: SchedulePolicy = RoundRobinPolicy(cursor) if name == "round-robin" else LoadBasedPolicy()
    return RegionAffinityPolicy(ranking)


__all__ = ["FailoverPolicy", "LoadBasedPolicy", "RegionAffinityPolicy", "RoundRobinPolicy",
           "SchedulePolicy", "StrategySpec", "fleet_policy"]
