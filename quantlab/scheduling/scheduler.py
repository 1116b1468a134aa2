"""The Scheduler: filter every worker for a strategy, then let the policy rank what is left."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..spec import StrategySpec
from . import filters
from .filters import Rejection
from .policies import SchedulePolicy
from .pool import WorkerClass, WorkerPool, WorkerView


@dataclass(frozen=True)
class Decision:
    """Where a strategy goes (worker) and why, or why nowhere (rejections)."""

    worker: str | None
    reason: str
    feasible: int = 0
    rejections: tuple[Rejection, ...] = field(default_factory=tuple)

    @property
    def placed(self) -> bool:
        return self.worker is not None


class Scheduler:
    def __init__(self, pool: WorkerPool):
        self.pool = pool
        self._static_cache: dict[tuple, list[WorkerClass]] = {}

    def feasible_classes(self, s: StrategySpec, policy: SchedulePolicy) -> list[WorkerClass]:
        checks = filters.BASE_STATIC + policy.static_checks
        req = s.requirements
        key = (req.api, req.region, req.proxy, req.account if req.credentials else None, checks)
        found = self._static_cache.get(key)
        if found is None:
            found = [c for c in self.pool.classes if filters.first_rejection(checks, s, c.sample) is None]
            self._static_cache[key] = found
        return found

    def place(self, s: StrategySpec, policy: SchedulePolicy, commit: bool = True) -> Decision:
        """Choose a worker for `s`; with commit, count it there so later placements see the load."""
        classes = self.feasible_classes(s, policy)
        # Workers where strategies keep failing are a last resort.
        tiers = [[c for c in classes if not c.failing], [c for c in classes if c.failing]]
        chosen: WorkerView | None = None
        feasible = 0
        for tier in tiers:
            if s.requirements.min_memory:
                candidates = [w for c in tier for w in c.free_members()
                              if w.id not in policy.excluded and filters.memory(s, w) is None]
                chosen = min(candidates, key=policy.rank_key) if candidates else None
                feasible = len(candidates)
            else:
                chosen = policy.pick(tier)
                feasible = sum(c.free_count() for c in tier) - self._excluded_free(policy, tier)
            if chosen is not None:
                break
        if chosen is None:
            rejections = self.rejections(s, policy)
            return Decision(None, "no worker fits: " + filters.summarize(rejections, s), 0, tuple(rejections))
        reason = policy.explain(chosen, feasible)
        if commit:
            self.pool.take(chosen.id)
            policy.placed(chosen)
        return Decision(chosen.id, reason, feasible)

    def _excluded_free(self, policy: SchedulePolicy, tier: list[WorkerClass]) -> int:
        count = 0
        for wid in policy.excluded:
            worker = self.pool.get(wid)
            if worker is not None and worker.has_room and any(self.pool.class_of(wid) is c for c in tier):
                count += 1
        return count

    def rejections(self, s: StrategySpec, policy: SchedulePolicy) -> list[Rejection]:
        """One reason per worker: the first filter that refuses it."""
        checks = filters.BASE_STATIC + policy.static_checks
        out: list[Rejection] = []
        for cls in self.pool.classes:
            static = filters.first_rejection(checks, s, cls.sample)
            for w in cls.members:
                if static is not None:
                    out.append(Rejection(w.id, static.code, static.detail))
                elif w.id in policy.excluded:
                    out.append(Rejection(w.id, "excluded"))
                else:
                    dynamic = filters.first_rejection(filters.DYNAMIC, s, w)
                    if dynamic is not None:
                        out.append(dynamic)
        return sorted(out, key=lambda r: r.worker)
