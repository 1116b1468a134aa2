"""The SchedulePolicy family: how a feasible worker is chosen.

A ranking policy (`RoundRobinPolicy`, `LoadBasedPolicy`) orders feasible workers; wrappers add hard
constraints and compose with either: `RegionAffinityPolicy` (a strategy that names a region or proxy
lands only on a matching worker) and `FailoverPolicy` (a replacement never goes back to the worker
it leaves).
"""
from __future__ import annotations

from ..spec import StrategySpec
from . import filters
from .pool import Candidates, Key, WorkerView


class SchedulePolicy:
    name = "policy"
    static_checks: tuple[filters.Check, ...] = ()   # hard constraints this policy adds, per class
    excluded: frozenset[str] = frozenset()           # workers this policy never picks
    keeps_cursor = False                             # round-robin: the state keeps `cursor` across plans

    @property
    def cursor(self) -> str | None:
        """The worker chosen last (round-robin), which the plan records for the next one."""
        return None

    def pick(self, candidates: Candidates) -> WorkerView | None:
        """The best free worker among `candidates` that this policy does not exclude (fast path:
        their heap and sorted ids). It agrees with `min(free, key=rank_key)`, the slow path."""
        return self.choose(candidates, self.excluded)

    def choose(self, candidates: Candidates, excluded: frozenset[str]) -> WorkerView | None:
        """`pick` with the exclusions of the outermost policy (a wrapper adds its own)."""
        raise NotImplementedError

    def rank_key(self, worker: WorkerView) -> Key:
        """Total order over workers, lower is better (slow path, when classes are not enough)."""
        raise NotImplementedError

    def placed(self, worker: WorkerView) -> None:
        """Called once a placement on `worker` is made."""

    def explain(self, worker: WorkerView, feasible: int) -> str:
        raise NotImplementedError


class LoadBasedPolicy(SchedulePolicy):
    """Fewest running strategies relative to capacity, then host cpu load, then most free memory."""

    name = "load-based"

    def choose(self, candidates: Candidates, excluded: frozenset[str]) -> WorkerView | None:
        return candidates.least_loaded(excluded)

    def rank_key(self, worker: WorkerView) -> Key:
        return worker.load_key()

    def explain(self, worker: WorkerView, feasible: int) -> str:
        return f"least loaded of {feasible} feasible (load {worker.used}/{worker.capacity})"


class RoundRobinPolicy(SchedulePolicy):
    """The next feasible worker by id after the one chosen last; the cursor lives in the memory."""

    name = "round-robin"
    keeps_cursor = True

    def __init__(self, cursor: str | None = None):
        self._cursor = cursor

    @property
    def cursor(self) -> str | None:
        return self._cursor

    def choose(self, candidates: Candidates, excluded: frozenset[str]) -> WorkerView | None:
        # After the cursor, then wrap around.
        return (candidates.first_free_after(self._cursor, excluded)
                or candidates.first_free_after(None, excluded))

    def rank_key(self, worker: WorkerView) -> Key:
        wrapped = self._cursor is not None and worker.id <= self._cursor
        return (wrapped, worker.id)

    def placed(self, worker: WorkerView) -> None:
        self._cursor = worker.id

    def explain(self, worker: WorkerView, feasible: int) -> str:
        after = f" after {self.cursor}" if self.cursor else ""
        return f"round-robin: next{after} of {feasible} feasible (load {worker.used}/{worker.capacity})"


class _Wrapper(SchedulePolicy):
    def __init__(self, inner: SchedulePolicy):
        self.inner = inner
        self.static_checks = inner.static_checks
        self.excluded = inner.excluded
        self.keeps_cursor = inner.keeps_cursor

    @property
    def cursor(self) -> str | None:
        return self.inner.cursor

    def choose(self, candidates: Candidates, excluded: frozenset[str]) -> WorkerView | None:
        return self.inner.choose(candidates, excluded)

    def rank_key(self, worker: WorkerView) -> Key:
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
