"""`quantlab explain STRATEGY`: every worker's verdict for one strategy, the ranking of the feasible
ones, and what would change the outcome. Pure: the same inputs as the planner, no I/O, no clock."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from . import health
from .memory import Memory
from .observed import ObservedState
from .plan import Plan
from .planner import build_pool
from .scheduling import filters
from .scheduling.filters import Rejection
from .scheduling.policies import fleet_policy
from .scheduling.scheduler import Scheduler
from .spec import Fleet, StrategySpec


@dataclass(frozen=True)
class Verdict:
    worker: str
    rejections: tuple[Rejection, ...]   # every filter that refuses the worker; empty: it is feasible
    rank: int | None = None             # 1 = the policy's first choice among the feasible workers

    def to_json(self, spec: StrategySpec) -> dict[str, Any]:
        return {"worker": self.worker, "feasible": not self.rejections, "rank": self.rank,
                "refusedBy": [{"filter": r.code, "detail": r.detail} for r in self.rejections],
                "wouldFitIf": [filters.remedy(r, spec) for r in self.rejections]}


def verdicts(fleet: Fleet, observed: ObservedState, memory: Memory, now_ms: int, strategy: str) -> list[Verdict]:
    """Each worker of the fleet for `strategy`, with the load of everything else placed counted and
    every filter asked (not only the first that refuses, as the planner does)."""
    spec = fleet.strategies[strategy]
    liveness = {wid: health.worker_liveness(wid, observed, memory, fleet.settings.monitor, now_ms)
                for wid in fleet.workers}
    staying: dict[str, list[str]] = {}
    for sid, p in memory.placements.items():
        if sid != strategy:
            staying.setdefault(p.worker, []).append(sid)
    pool = build_pool(fleet, observed, liveness, staying)
    policy = fleet_policy(fleet.settings.policy, memory.rr_cursor)
    checks = Scheduler.static_checks(policy) + filters.DYNAMIC
    views = sorted((w for c in pool.classes for w in c.members), key=lambda w: w.id)
    refused = {w.id: tuple(r for check in checks if (r := check(spec, w)) is not None) for w in views}
    # As the scheduler does: workers whose strategies keep failing come after all the others.
    ranked = sorted((w for w in views if not refused[w.id]), key=lambda w: (w.failing, policy.rank_key(w)))
    rank = {w.id: n for n, w in enumerate(ranked, 1)}
    return [Verdict(w.id, refused[w.id], rank.get(w.id)) for w in views]


def outcome(plan: Plan, memory: Memory, strategy: str) -> str:
    """What the plan does with `strategy` now, in words."""
    for a in plan.actions:
        if a.strategy == strategy:
            where = f"{a.source} → {a.target}" if a.action == "move" else a.worker
            return f"{a.action} on {where}: {a.reason}"
    for kind in (plan.queued, plan.waiting):
        for item in kind:
            if item.strategy == strategy:
                return f"{type(item).__name__.lower()}: {item.reason}"
    for b in plan.blocked:
        if any(a.strategy == strategy for a in b.actions):
            return f"blocked ({b.guard}): {b.reason}"
    placed = memory.placements.get(strategy)
    return f"no change: runs on {placed.worker}" if placed else "no change"


__all__ = ["Verdict", "outcome", "verdicts"]
