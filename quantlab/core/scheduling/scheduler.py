"""The Scheduler: filter every worker for a strategy, then let the policy rank what is left."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..spec import StrategySpec
from . import filters
from .filters import Rejection
from .policies import SchedulePolicy
from .pool import Candidates, Key, WorkerClass, WorkerPool, WorkerView


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
        self._static_cache: dict[Key, list[Candidates]] = {}

    @staticmethod
    def static_checks(policy: SchedulePolicy) -> tuple[filters.Check, ...]:
        return filters.BASE_STATIC + policy.static_checks + filters.LATE_STATIC

    def feasible_classes(self, s: StrategySpec, policy: SchedulePolicy) -> list[WorkerClass]:
        checks = self.static_checks(policy)
        return [c for c in self.pool.classes if filters.first_rejection(checks, s, c.sample) is None]

    def tiers(self, s: StrategySpec, policy: SchedulePolicy) -> list[Candidates]:
        """Candidate sets that pass the static filters, healthy workers first, then failing ones.
        Strategies with the same requirements share them, so this runs once per kind of strategy."""
        req = s.requirements
        key = (req.api, req.region, req.proxy, req.account if req.credentials else None,
               self.static_checks(policy))
        found = self._static_cache.get(key)
        if found is None:
            classes = self.feasible_classes(s, policy)
            split = ([c for c in classes if not c.failing], [c for c in classes if c.failing])
            found = [self.pool.candidates(tier) for tier in split if tier]
            self._static_cache[key] = found
        return found

    def place(self, s: StrategySpec, policy: SchedulePolicy, commit: bool = True) -> Decision:
        """Choose a worker for `s`; with commit, count it there so later placements see the load."""
        chosen: WorkerView | None = None
        feasible = 0
        for candidates in self.tiers(s, policy):
            if s.requirements.min_memory:
                fits = [w for w in candidates.free_members()
                        if w.id not in policy.excluded and filters.memory(s, w) is None]
                chosen = min(fits, key=policy.rank_key) if fits else None
                feasible = len(fits)
            else:
                chosen = policy.pick(candidates)
                feasible = candidates.free_count() - sum(
                    1 for wid in policy.excluded if wid in candidates and candidates.by_id[wid].has_room)
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

    def rejections(self, s: StrategySpec, policy: SchedulePolicy) -> list[Rejection]:
        """One reason per worker: the first filter that refuses it."""
        checks = self.static_checks(policy)
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
