"""Phase 3: a worker for each strategy that needs one (the Scheduler, by the fleet's policy), one
move off each draining (or leaving) worker, and with --rebalance moves toward even load."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..health import WorkerLiveness
from ..observed import ObservedState
from ..plan import Action, Note, Queued
from ..redact import redact_url
from ..scheduling import (
    Decision,
    FailoverPolicy,
    LoadBasedPolicy,
    RegionAffinityPolicy,
    Scheduler,
    SchedulePolicy,
    WorkerPool,
    WorkerView,
    fleet_policy,
)
from ..spec import Fleet, StrategySpec
from .context import Context, Epochs, ToPlace
from .locate import Located

# A worker is placed on last once its instances have restarted this often in total.
FAILING_RESTARTS = 3
# Who goes first: failovers, then moves off workers that no longer fit or left, then new strategies.
ORDER = {"worker-offline": 0, "worker-removed": 0, "worker-leaving": 1, "worker-unfit": 1, "requirements": 1, "new": 2}


@dataclass
class Placed:
    actions: list[Action] = field(default_factory=list)
    queued: list[Queued] = field(default_factory=list)
    notes: list[Note] = field(default_factory=list)
    policy: SchedulePolicy | None = None     # the fleet's policy after placing (its round-robin cursor)


def build_pool(fleet: Fleet, observed: ObservedState, liveness: dict[str, WorkerLiveness],
               staying: dict[str, list[str]]) -> WorkerPool:
    """Every worker of the fleet as the scheduler sees it, with `staying` (worker -> strategies)
    counted as its load."""
    views = []
    for wid, spec in fleet.workers.items():
        state = observed.worker(wid)
        failing = False
        cpu: float = 0.0
        mem: int | None = None
        creds: frozenset[str] = frozenset()
        runtime_error: str | None = None
        if state is not None and state.reachable:
            cpu, mem, creds, runtime_error = state.cpu or 0.0, state.mem_free_mb, state.credentials, state.error
            restarts = sum(i.restarts for i in state.instances.values())
            failing = restarts >= FAILING_RESTARTS or any(i.status == "error" for i in state.instances.values())
        reported = state if state is not None and state.reachable else None
        views.append(WorkerView(spec, liveness[wid].status, used=len(staying.get(wid, [])), cpu=cpu,
                                mem_free_mb=mem, credentials=creds, failing=failing, runtime_error=runtime_error,
                                disk_free_mb=reported.disk_free_mb if reported else None,
                                disk_low=reported is not None and reported.disk_low))
    return WorkerPool(views)


class _Placement:
    """One run of this phase: the pool counts what it places, `staying` follows the moves."""

    def __init__(self, ctx: Context, located: Located, staying: dict[str, list[str]], epochs: Epochs,
                 earlier: list[Action]):
        self.ctx, self.located, self.staying, self.epochs = ctx, located, staying, epochs
        self.earlier = earlier                 # the actions of the phases before (a busy strategy stays put)
        self.pool = build_pool(ctx.fleet, ctx.observed, ctx.liveness, staying)
        self.scheduler = Scheduler(self.pool)
        self.out = Placed(policy=fleet_policy(ctx.fleet.settings.policy, ctx.memory.rr_cursor))

    def place(self, item: ToPlace) -> None:
        spec, cur = item.spec, item.current
        policy = self.out.policy
        assert policy is not None
        use = policy if cur is None else FailoverPolicy(policy, cur.worker)
        decision = self.scheduler.place(spec, use)
        if not decision.placed:
            if item.cause == "requirements" and cur is not None and cur.instance is not None and cur.instance.alive:
                self.out.notes.append(Note(spec.id, cur.worker, f"{item.reason}; left running there because "
                                           f"{decision.reason}"))
                return
            prefix = "" if item.cause == "new" else item.reason + "; "
            self.out.queued.append(Queued(spec.id, prefix + decision.reason,
                                          tuple((r.worker, r.code + (f" {r.detail}" if r.detail else ""))
                                                for r in decision.rejections)))
            return
        assert decision.worker is not None
        epoch = self.epochs.take()
        paused = spec.desired_state == "paused"
        if cur is None:
            self.out.actions.append(Action("start", spec.id, f"{item.reason}; {where(spec)}{decision.reason}",
                                           "new", worker=decision.worker, epoch=epoch,
                                           spec_hash=spec.spec_hash, paused=paused))
            return
        if item.cause == "requirements" and cur.worker in self.staying and spec.id in self.staying[cur.worker]:
            self.staying[cur.worker].remove(spec.id)
            if cur.worker in self.pool:
                self.pool.release(cur.worker)
        self.out.actions.append(Action("move", spec.id, f"{item.reason}; to {decision.reason}", item.cause,
                                       source=cur.worker, target=decision.worker, epoch=epoch,
                                       spec_hash=spec.spec_hash, paused=paused))

    def movable(self, sid: str, wid: str) -> bool:
        """Running healthy where it is, with no other action in this plan."""
        cur = self.located.current.get(sid)
        busy = {a.strategy for a in self.earlier} | {a.strategy for a in self.out.actions}
        held = any(k in self.ctx.memory.suspended for k in ("*", sid, wid))   # a held move would free its slot
        return (cur is not None and cur.worker == wid and cur.instance is not None and cur.instance.alive
                and sid not in busy and not held)

    def drain(self) -> None:
        """A draining worker gives up one strategy per plan, so a drain never empties a worker at once."""
        policy = fleet_policy(self.ctx.fleet.settings.policy, None)
        for wid, worker in self.ctx.fleet.workers.items():
            if not worker.drain or self.ctx.liveness[wid].status != "online":
                continue
            left = [sid for sid in sorted(self.staying.get(wid, [])) if self.movable(sid, wid)]
            if not left:
                continue
            sid = left[0]
            spec = self.ctx.fleet.strategies[sid]
            decision = self.scheduler.place(spec, FailoverPolicy(policy, wid))
            if not decision.placed:
                self.out.notes.append(Note(sid, wid, f"{wid} is draining but {decision.reason}"))
                continue
            self.staying[wid].remove(sid)
            self.pool.release(wid)
            why = f"{wid} was removed from the fleet" if worker.leaving else f"{wid} is draining"
            self.out.actions.append(Action("move", sid, f"{why} ({len(left)} left); to {decision.reason}",
                                           "worker-leaving" if worker.leaving else "drain", source=wid,
                                           target=decision.worker, epoch=self.epochs.take(),
                                           spec_hash=spec.spec_hash, paused=spec.desired_state == "paused"))

    def rebalance(self) -> None:
        """Up to max_moves moves from the most to the least loaded feasible worker, each only when it
        narrows the gap by at least one strategy (load difference >= 2), so moves never ping-pong."""
        pool, staying = self.pool, self.staying
        for _ in range(max(0, self.ctx.options.max_moves)):
            best: tuple[int, str, str, str, Decision] | None = None
            for src in sorted(pool.views.values(), key=lambda w: (-w.used, w.id)):
                if src.liveness != "online":
                    continue
                for sid in sorted(staying.get(src.id, [])):
                    if not self.movable(sid, src.id) or sid in self.ctx.options.cooldown:
                        continue
                    spec = self.ctx.fleet.strategies[sid]
                    use = FailoverPolicy(RegionAffinityPolicy(LoadBasedPolicy()), src.id)
                    decision = self.scheduler.place(spec, use, commit=False)
                    if decision.worker is None:
                        continue
                    target = pool.views[decision.worker]
                    gap = src.used - target.used
                    if gap >= 2 and (best is None or (gap, ) > (best[0], )):
                        best = (gap, src.id, sid, target.id, decision)
                if best is not None:
                    break        # the most loaded worker that can shed a strategy
            if best is None:
                return
            gap, src_id, sid, target_id, decision = best
            spec = self.ctx.fleet.strategies[sid]
            staying[src_id].remove(sid)
            staying.setdefault(target_id, []).append(sid)
            pool.release(src_id)
            pool.take(target_id)
            self.out.actions.append(Action(
                "move", sid, f"rebalance: {src_id} runs {gap} more than {target_id}", "rebalance",
                source=src_id, target=target_id, epoch=self.epochs.take(), spec_hash=spec.spec_hash,
                paused=spec.desired_state == "paused"))


def place(ctx: Context, located: Located, to_place: list[ToPlace], staying: dict[str, list[str]],
          epochs: Epochs, earlier: list[Action]) -> Placed:
    """Place `to_place` (failovers first), then drain, then rebalance (when asked). `staying`:
    worker -> strategies that stay there (their slots are taken)."""
    run = _Placement(ctx, located, {wid: list(sids) for wid, sids in staying.items()}, epochs, earlier)
    for item in sorted(to_place, key=lambda t: (ORDER[t.cause], t.spec.id)):
        run.place(item)
    run.drain()
    if ctx.options.rebalance:
        run.rebalance()
    return run.out


def where(spec: StrategySpec) -> str:
    req = spec.requirements
    parts = [p for p in (f"region {req.region}" if req.region else "",
                         f"proxy {redact_url(req.proxy)}" if req.proxy else "") if p]
    return (", ".join(parts) + "; ") if parts else ""
