"""The SchedulePolicy family: how a feasible worker is chosen.

A ranking policy (`RoundRobinPolicy`, `LoadBasedPolicy`) orders feasible workers; wrappers add hard
constraints and compose with either: `RegionAffinityPolicy` (a strategy that names a region or proxy
lands only on a matching worker) and `FailoverPolicy` (a replacement never goes back to the worker
it leaves).
"""
from __future__ import annotations

from typing import Iterable

from ..spec import StrategySpec
from . import filters
from .pool import WorkerClass, WorkerView


class SchedulePolicy:
    name = "policy"
    static_checks: tuple[filters.Check, ...] = ()   # hard constraints this policy adds, per class
    excluded: frozenset[str] = frozenset()           # workers this policy never picks

    def pick(self, classes: Iterable[WorkerClass]) -> WorkerView | None:
        """The best free worker of `classes` (fast path: class heaps and sorted ids)."""
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

    def pick(self, classes: Iterable[WorkerClass]) -> WorkerView | None:
        best = None
        for cls in classes:
            worker = cls.least_loaded(self.excluded)
            if worker is not None and (best is None or worker.load_key() < best.load_key()):
                best = worker
        return best

    def rank_key(self, worker: WorkerView) -> tuple:
        return worker.load_key()

    def explain(self, worker: WorkerView, feasible: int) -> str:
        return f"least loaded of {feasible} feasible (load {worker.used}/{worker.capacity})"


class RoundRobinPolicy(SchedulePolicy):
    """The next feasible worker by id after the one chosen last; the cursor lives in the memory."""

    name = "round-robin"

    def __init__(self, cursor: str | None = None):
        self.cursor = cursor

    def pick(self, classes: Iterable[WorkerClass]) -> WorkerView | None:
        classes = list(classes)
        for cursor in (self.cursor, None):          # after the cursor, then wrap around
            found = [w for c in classes if (w := c.first_free_after(cursor, self.excluded)) is not None]
            if found:
                return min(found, key=lambda w: w.id)
        return None

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

    def pick(self, classes: Iterable[WorkerClass]) -> WorkerView | None:
        return self.inner.pick(classes)

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
        self.lost_worker = lost_worker
        self.excluded = inner.excluded | {lost_worker}


def fleet_policy(name: str, cursor: str | None) -> SchedulePolicy:
    """The fleet's ranking policy; region and proxy affinity always apply on top of it."""
    ranking: SchedulePolicy = RoundRobinPolicy(cursor) if name == "round-robin" else LoadBasedPolicy()
    return RegionAffinityPolicy(ranking)


__all__ = ["FailoverPolicy", "LoadBasedPolicy", "RegionAffinityPolicy", "RoundRobinPolicy",
           "SchedulePolicy", "StrategySpec", "fleet_policy"]
