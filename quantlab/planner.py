"""The StrategyPool diffed against reality: (desired fleet, observed state, memory, now) -> Plan.

A pure function. It decides; it does not act. Every action carries its reason, and every desired
strategy ends up exactly one of: placed (running or about to), queued (no worker fits) or waiting
(its worker is not online and it cannot be moved yet).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from . import health
from .health import WorkerLiveness, format_duration
from .memory import Memory
from .observed import Instance, ObservedState
from .plan import DESIRED_CAUSES, SOURCE_CHANGE, SUSPENDED, Action, Adopt, Blocked, Note, Plan, Queued, Waiting
from .scheduling import (
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
from .scheduling import filters
from .spec import Fleet, StrategySpec, WorkerSpec, worker_launch

# A worker is placed on last once its instances have restarted this often in total.
FAILING_RESTARTS = 3


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
class _Current:
    """Where a strategy runs now, as far as the controller can tell."""

    worker: str
    epoch: int
    spec_hash: str | None
    paused: bool
    instance: Instance | None       # the observed instance of this placement, when its worker answered
    adopted: bool = False
    launched: dict | None = None


@dataclass
class _ToPlace:
    spec: StrategySpec
    # new | worker-offline | worker-removed (not reachable) | worker-leaving (removed, reachable) |
    # requirements | drain | rebalance
    cause: str
    reason: str                     # why it needs a (new) worker
    current: _Current | None = None


@dataclass
class _Work:
    actions: list[Action] = field(default_factory=list)
    queued: list[Queued] = field(default_factory=list)
    waiting: list[Waiting] = field(default_factory=list)
    notes: list[Note] = field(default_factory=list)
    adopt: list[Adopt] = field(default_factory=list)


class UnknownTarget(ValueError):
    """A --target names no strategy or worker that the fleet, the state or the hosts know."""


def plan(fleet: Fleet, observed: ObservedState, memory: Memory, now_ms: int,
         options: PlanOptions = PlanOptions()) -> Plan:
    unknown = unknown_targets(fleet, observed, memory, options.targets)
    if unknown:
        # A typo must not pass for "nothing to do": the operator would believe the target converged.
        raise UnknownTarget(f"--target {', '.join(unknown)}: no strategy or worker has this id in the fleet, "
                            f"the state or on the hosts; `quantlab status` lists them")
    return _Planner(fleet, observed, memory, now_ms, options).run()


def unknown_targets(fleet: Fleet, observed: ObservedState, memory: Memory, targets: frozenset[str]) -> list[str]:
    known = set(fleet.strategies) | set(fleet.workers) | set(memory.placements)
    known |= {p.worker for p in memory.placements.values()}
    known |= {i.strategy for w in observed.workers.values() for i in w.instances.values()}
    return sorted(set(targets) - known)


def build_pool(fleet: Fleet, observed: ObservedState, liveness: dict[str, WorkerLiveness],
               staying: dict[str, list[str]]) -> WorkerPool:
    """Every worker of the fleet as the scheduler sees it, with `staying` (worker -> strategies)
    counted as its load."""
    views = []
    for wid, spec in fleet.workers.items():
        state = observed.worker(wid)
        failing = False
        cpu, mem, creds, runtime_error = 0.0, None, frozenset(), None
        if state is not None and state.reachable:
            cpu, mem, creds, runtime_error = state.cpu or 0.0, state.mem_free_mb, state.credentials, state.error
            restarts = sum(i.restarts for i in state.instances.values())
            failing = restarts >= FAILING_RESTARTS or any(i.status == "error" for i in state.instances.values())
        views.append(WorkerView(spec, liveness[wid].status, used=len(staying.get(wid, [])), cpu=cpu,
                                mem_free_mb=mem, credentials=creds, failing=failing, runtime_error=runtime_error))
    return WorkerPool(views)


class _Planner:
    def __init__(self, fleet: Fleet, observed: ObservedState, memory: Memory, now_ms: int, options: PlanOptions):
        self.fleet, self.observed, self.memory, self.now, self.options = fleet, observed, memory, now_ms, options
        self.monitor = fleet.settings.monitor
        self.liveness: dict[str, WorkerLiveness] = {
            wid: health.worker_liveness(wid, observed, memory, self.monitor, now_ms) for wid in fleet.workers
        }
        self.work = _Work()
        self.current: dict[str, _Current] = {}
        self.stale: list[tuple[str, Instance]] = []          # (worker, instance) copies to stop
        self.next_epoch = self._first_free_epoch()
        # Workers not answering now that this state has never seen answer (see unaccounted_worker).
        self.never_answered = sorted(wid for wid in fleet.workers
                                     if wid not in memory.answered and not self._reachable(wid))
        self.brake = health.failover_brake(fleet, observed)
        self.braked: list[str] = []                          # strategies whose failover the brake holds

    # --- where things are ----------------------------------------------------------------------

    def _first_free_epoch(self) -> int:
        epochs = [p.epoch for p in self.memory.placements.values()]
        for state in self.observed.workers.values():
            epochs.extend(i.epoch for i in state.instances.values())
        return max([self.memory.next_epoch] + [e + 1 for e in epochs])

    def _take_epoch(self) -> int:
        epoch = self.next_epoch
        self.next_epoch += 1
        return epoch

    def _reachable(self, worker_id: str) -> bool:
        state = self.observed.worker(worker_id)
        return worker_id in self.fleet.workers and state is not None and state.reachable

    def locate(self) -> None:
        """Current placement per strategy (memory, or the newest live copy it does not know),
        and every other live copy, which is stale and will be stopped."""
        alive: dict[str, list[tuple[str, Instance]]] = {}
        for wid, state in sorted(self.observed.workers.items()):
            if not self._reachable(wid):
                continue
            for inst in state.instances.values():
                if inst.alive and inst.status != "unknown":
                    alive.setdefault(inst.strategy, []).append((wid, inst))
        for sid in sorted(set(self.memory.placements) | set(alive)):
            copies = alive.get(sid, [])
            newest = max(copies, key=lambda c: (c[1].epoch, c[0]), default=None)
            placed = self.memory.placements.get(sid)
            if placed is not None and placed.worker not in self.fleet.workers:
                # A renamed worker (same host and workdir): its copy is the placement, under a new id.
                same = [c for c in copies if c[1].epoch == placed.epoch]
                if same:
                    newest = same[0]
                    placed = None
            if placed is not None and (newest is None or newest[1].epoch <= placed.epoch):
                inst = None
                if self._reachable(placed.worker):
                    inst = self.observed.workers[placed.worker].instances.get(sid)
                    if inst is not None and inst.epoch != placed.epoch and inst.status != "unknown":
                        inst = None     # an older copy sits in the folder: the start will replace it
                cur = _Current(placed.worker, placed.epoch, placed.spec_hash, placed.paused, inst,
                               launched=placed.launched)
            else:
                assert newest is not None
                wid, inst = newest
                cur = _Current(wid, inst.epoch, inst.spec_hash, inst.paused, inst, adopted=True)
                self.work.adopt.append(Adopt(sid, wid, inst.epoch, inst.spec_hash))
            self.current[sid] = cur
            for wid, inst in copies:
                # Epochs are unique per placement: a copy with the current one is that copy.
                if wid != cur.worker and inst.epoch != cur.epoch:
                    self.stale.append((wid, inst))

    # --- per strategy --------------------------------------------------------------------------

    def run(self) -> Plan:
        self.locate()
        to_place: list[_ToPlace] = []
        staying: dict[str, list[str]] = {}     # worker -> strategies that stay there
        for sid, spec in self.fleet.strategies.items():
            cur = self.current.get(sid)
            if spec.desired_state == "stopped":
                if cur is not None:
                    self.stop_or_wait(sid, cur, "desired-stopped", "desiredState: stopped")
                continue
            if cur is None:
                if self.unaccounted_worker(spec):
                    continue
                note = "; starts paused" if spec.desired_state == "paused" else ""
                to_place.append(_ToPlace(spec, "new", "new" + note))
                continue
            need = self.judge(spec, cur)
            if need is not None:
                to_place.append(need)
            if need is None or need.cause in ("requirements",):
                staying.setdefault(cur.worker, []).append(sid)
        for sid, cur in self.current.items():
            if sid not in self.fleet.strategies:
                self.stop_or_wait(sid, cur, "removed", "removed from fleet")
        # Stops the mass-stop guard will refuse do not free their slots: nothing is placed in them.
        for a in self.refused_stops([a for a in self.work.actions if self.targeted(a.strategy, *a.workers)]):
            staying.setdefault(a.worker, []).append(a.strategy)
        # Nor do stops a suspension holds.
        for a in self.work.actions:
            if a.action == "stop" and self.suspended_by(a) and a.strategy not in staying.get(a.worker, []):
                staying.setdefault(a.worker, []).append(a.strategy)

        pool = self.build_pool(staying)
        scheduler = Scheduler(pool)
        policy = fleet_policy(self.fleet.settings.policy, self.memory.rr_cursor)
        order = {"worker-offline": 0, "worker-removed": 0, "worker-leaving": 1, "requirements": 1, "new": 2}
        for item in sorted(to_place, key=lambda t: (order[t.cause], t.spec.id)):
            self.place(item, scheduler, policy, pool, staying)
        self.drain(scheduler, pool, staying)
        if self.options.rebalance:
            self.rebalance(scheduler, pool, staying)
        for wid, inst in self.stale:
            self.work.actions.append(Action("stop", inst.strategy, f"stale copy (epoch {inst.epoch}); "
                                            f"the current one is on {self.current[inst.strategy].worker}",
                                            "stale-copy", worker=wid, epoch=inst.epoch))
        return self.finish(policy)

    def judge(self, spec: StrategySpec, cur: _Current) -> _ToPlace | None:
        """What a placed strategy needs: an action where it is (added here), a new worker
        (returned), or nothing yet (waiting, added here)."""
        sid, wid = spec.id, cur.worker
        worker = self.fleet.workers.get(wid)
        if worker is None:
            return self.lost(spec, cur, "worker-removed", f"{wid} removed from fleet")
        live = self.liveness[wid]
        if live.status == "unreachable":
            self.wait_unreachable(spec, cur, live)
            return None
        if live.status == "offline":
            return self.lost(spec, cur, "worker-offline", f"{wid} offline {self._down(live)}")
        misfit = self.misfit(spec, worker)
        inst = cur.instance
        if inst is not None and inst.status == "unknown":
            # The agent could not read the instance (disk full?): acting blind could run it twice.
            self.work.notes.append(Note(sid, wid, f"left alone: {inst.reason}"))
            return None
        if worker.leaving:
            if inst is None or not inst.alive:
                return _ToPlace(spec, "worker-leaving", f"not running on {wid}, which was removed from the fleet", cur)
            return None                        # the drain moves it off, one per plan
        if inst is not None and inst.status == "orphaned":
            # The supervisor is gone but the runner runs on: start replaces it under a new supervisor.
            epoch = self._take_epoch()
            self.work.actions.append(Action("start", sid, f"{inst.reason} on {wid}", "orphaned", worker=wid,
                                            epoch=epoch, spec_hash=spec.spec_hash,
                                            paused=spec.desired_state == "paused"))
            return None
        if inst is None or not inst.alive:
            if inst is not None and inst.status == "error" and inst.spec_hash == spec.spec_hash:
                self.work.notes.append(Note(sid, wid, f"in error after {inst.restarts} restarts: "
                                            f"{inst.reason or inst.last_error or 'unhealthy'}; "
                                            "change the strategy or its params to start it again"))
                return None
            why = f"not running on {wid} ({inst.reason or inst.status})" if inst else f"not running on {wid}"
            if misfit:
                return _ToPlace(spec, "requirements", f"{why}, which no longer fits: {misfit}", cur)
            epoch = self._take_epoch()
            self.work.actions.append(Action("start", sid, why, "not-running", worker=wid, epoch=epoch,
                                            spec_hash=spec.spec_hash, paused=spec.desired_state == "paused"))
            return None
        if misfit:
            return _ToPlace(spec, "requirements", f"{wid} no longer fits: {misfit}", cur)
        want_paused = spec.desired_state == "paused"
        started_on = (cur.launched or {}).get("worker")
        if inst.spec_hash != spec.spec_hash:
            self.work.actions.append(Action("restart", sid, self.changes(spec, cur), "spec-changed", worker=wid,
                                            epoch=cur.epoch, spec_hash=spec.spec_hash, paused=want_paused))
        elif started_on is not None and started_on != worker_launch(worker):
            now_on = worker_launch(worker)
            what = ", ".join(f"{k} {started_on.get(k)} → {now_on[k]}" for k in sorted(now_on)
                             if started_on.get(k) != now_on[k])
            self.work.actions.append(Action("restart", sid, f"worker {wid} changed: {what}", "worker-changed",
                                            worker=wid, epoch=cur.epoch, spec_hash=spec.spec_hash,
                                            paused=want_paused))
        elif inst.lease_ttl_s is not None and inst.lease_ttl_s != self.monitor.lease_ttl_s:
            # Its supervisor enforces the lease it was started with, whatever a renewal asks for.
            self.work.actions.append(Action("restart", sid, f"leaseTtlSeconds {inst.lease_ttl_s:g} → "
                                            f"{self.monitor.lease_ttl_s:g}", "lease-changed", worker=wid,
                                            epoch=cur.epoch, spec_hash=spec.spec_hash, paused=want_paused))
        elif want_paused and not inst.paused:
            self.work.actions.append(Action("pause", sid, "desiredState: paused", "desired-paused",
                                            worker=wid, epoch=cur.epoch))
        elif not want_paused and inst.paused:
            self.work.actions.append(Action("resume", sid, "desiredState: running", "desired-running",
                                            worker=wid, epoch=cur.epoch))
        return None

    def unaccounted_worker(self, spec: StrategySpec) -> bool:
        """A worker that could run `spec` has not answered once since this state began: a copy that
        an earlier (lost) state file placed there may still hold a lease. Hold the first start (as
        waiting) until such a lease has surely run out. True when held."""
        if self.memory.placements.get(spec.id) is not None:
            return False
        silent = [wid for wid in self.never_answered if self.misfit(spec, self.fleet.workers[wid]) is None]
        if not silent:
            return False
        began = self.memory.began or self.now
        extra = self.monitor.lease_ttl_s + spec.scheduling.stop_timeout_s + self.monitor.failover_margin_s
        left = (began + extra * 1000 - self.now) / 1000
        if self.monitor.fencing and left <= 0:
            return False
        why = (f"{silent[0]} has not answered since this state file began; a copy placed there before "
               "may still run")
        if not self.monitor.fencing:
            self.work.waiting.append(Waiting(spec.id, silent[0], f"{why} (fencing is off): not started "
                                             "until it answers", None))
        else:
            self.work.waiting.append(Waiting(spec.id, silent[0], f"{why}; started elsewhere once its lease "
                                             f"has surely run out, in {format_duration(left)}", left))
        return True

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

    def lost(self, spec: StrategySpec, cur: _Current, cause: str, what: str) -> _ToPlace | None:
        """A strategy whose worker is gone: wait while a copy may still run there, then fail over."""
        left = self.seconds_until_movable(spec, cur)
        if not self.monitor.fencing:
            self.work.waiting.append(Waiting(spec.id, cur.worker, f"{what}; fencing is off (leaseTtlSeconds: 0), "
                                             "so it is never started elsewhere automatically", None))
            return None
        if not self.monitor.auto_recover:
            self.work.waiting.append(Waiting(spec.id, cur.worker, f"{what}; monitor.autoRecover is off", None))
            return None
        if left > 0:
            self.work.waiting.append(Waiting(spec.id, cur.worker, f"{what}; lease may live "
                                             f"{format_duration(left)} more — not moved yet", left))
            return None
        if self.brake and cause == "worker-offline":
            self.braked.append(spec.id)
            self.work.waiting.append(Waiting(spec.id, cur.worker, f"{what}; failover held: {self.brake}", None))
            return None
        again = health.next_failover_at(spec.id, self.memory, self.now)
        if again is not None:
            count = self.memory.reschedules[spec.id][0]
            wait_s = (again - self.now) / 1000
            self.work.waiting.append(Waiting(spec.id, cur.worker, f"{what}; failed over {count} time(s) within the "
                                             f"hour, so the next move waits {format_duration(wait_s)} more "
                                             "(reschedule backoff)", wait_s))
            return None
        return _ToPlace(spec, cause, f"{what}, lease expired {format_duration(-left)} ago", cur)

    def seconds_until_movable(self, spec: StrategySpec, cur: _Current) -> float:
        """Seconds until no copy of `spec` can still run on its current worker (negative: since)."""
        expiry = health.lease_surely_expired_at(spec.id, cur.worker, self.memory, self.monitor,
                                                spec.scheduling.stop_timeout_s)
        return (expiry - self.now) / 1000

    def wait_unreachable(self, spec: StrategySpec, cur: _Current, live: WorkerLiveness) -> None:
        down = live.down_for_s or 0.0
        offline_in = self.monitor.worker_offline_after_s - down
        left = None
        if self.monitor.fencing and self.monitor.auto_recover:
            left = max(offline_in, self.seconds_until_movable(spec, cur))
        self.work.waiting.append(Waiting(spec.id, cur.worker, f"{cur.worker} unreachable for {format_duration(down)}; "
                                         f"offline after {format_duration(self.monitor.worker_offline_after_s)}", left))

    def stop_or_wait(self, sid: str, cur: _Current, cause: str, why: str) -> None:
        # On a change of source a stop the fleet files ask for is listed (and held) even while its
        # worker is silent, so that the change is never confirmed with a stop still pending.
        if self._reachable(cur.worker) or self.options.source_change:
            self.work.actions.append(Action("stop", sid, why, cause, worker=cur.worker, epoch=cur.epoch))
        else:
            self.work.waiting.append(Waiting(sid, cur.worker, f"{why}; {cur.worker} is not answering: it is "
                                             "stopped when seen again (its lease runs out meanwhile)",
                                             None))

    def changes(self, spec: StrategySpec, cur: _Current) -> str:
        """Words for what changed since the running copy was started."""
        old = cur.launched
        new = spec.launch_fields()
        if not old:
            return f"spec changed ({cur.spec_hash} → {spec.spec_hash})"
        parts = []
        if old.get("file") != new["file"]:
            parts.append(f"{spec.strategy_file} changed")
        for key, label in (("params", "params changed"), ("scheduling", "scheduling changed")):
            before, after = old.get(key) or {}, new[key]
            diffs = [f"{k} {before.get(k, '∅')} → {after.get(k, '∅')}"
                     for k in sorted(set(before) | set(after)) if before.get(k) != after.get(k)]
            if diffs:
                more = f" (+{len(diffs) - 3} more)" if len(diffs) > 3 else ""
                parts.append(f"{label}: {', '.join(diffs[:3])}{more}")
        if old.get("heartbeatMs") != new["heartbeatMs"]:
            parts.append(f"heartbeatMs {old.get('heartbeatMs')} → {new['heartbeatMs']}")
        return "; ".join(parts) or "spec changed"

    @staticmethod
    def _down(live: WorkerLiveness) -> str:
        return "(never answered)" if live.down_for_s is None else format_duration(live.down_for_s)

    # --- placement -----------------------------------------------------------------------------

    def build_pool(self, staying: dict[str, list[str]]) -> WorkerPool:
        return build_pool(self.fleet, self.observed, self.liveness, staying)

    def place(self, item: _ToPlace, scheduler: Scheduler, policy: SchedulePolicy, pool: WorkerPool,
              staying: dict[str, list[str]]) -> None:
        spec, cur = item.spec, item.current
        use = policy if cur is None else FailoverPolicy(policy, cur.worker)
        decision = scheduler.place(spec, use)
        if not decision.placed:
            if item.cause == "requirements" and cur is not None and cur.instance is not None and cur.instance.alive:
                self.work.notes.append(Note(spec.id, cur.worker, f"{item.reason}; left running there because "
                                            f"{decision.reason}"))
                return
            prefix = "" if item.cause == "new" else item.reason + "; "
            self.work.queued.append(Queued(spec.id, prefix + decision.reason,
                                           tuple((r.worker, r.code + (f" {r.detail}" if r.detail else ""))
                                                 for r in decision.rejections)))
            return
        assert decision.worker is not None
        epoch = self._take_epoch()
        paused = spec.desired_state == "paused"
        if cur is None:
            self.work.actions.append(Action("start", spec.id, f"{item.reason}; {self.where(spec)}{decision.reason}",
                                            "new", worker=decision.worker, epoch=epoch,
                                            spec_hash=spec.spec_hash, paused=paused))
            return
        if item.cause == "requirements" and cur.worker in staying and spec.id in staying[cur.worker]:
            staying[cur.worker].remove(spec.id)
            if cur.worker in pool:
                pool.release(cur.worker)
        self.work.actions.append(Action("move", spec.id, f"{item.reason}; to {decision.reason}", item.cause,
                                        source=cur.worker, target=decision.worker, epoch=epoch,
                                        spec_hash=spec.spec_hash, paused=paused))

    @staticmethod
    def where(spec: StrategySpec) -> str:
        req = spec.requirements
        parts = [p for p in (f"region {req.region}" if req.region else "",
                             f"proxy {req.proxy}" if req.proxy else "") if p]
        return (", ".join(parts) + "; ") if parts else ""

    def _movable(self, sid: str, wid: str) -> bool:
        """Running healthy where it is, with no other action in this plan."""
        cur = self.current.get(sid)
        busy = {a.strategy for a in self.work.actions}
        held = any(k in self.memory.suspended for k in ("*", sid, wid))   # a held move would free its slot
        return (cur is not None and cur.worker == wid and cur.instance is not None and cur.instance.alive
                and sid not in busy and not held)

    def drain(self, scheduler: Scheduler, pool: WorkerPool, staying: dict[str, list[str]]) -> None:
        """A draining worker gives up one strategy per plan, so a drain never empties a worker at once."""
        policy = fleet_policy(self.fleet.settings.policy, None)
        for wid, worker in self.fleet.workers.items():
            if not worker.drain or self.liveness[wid].status != "online":
                continue
            left = [sid for sid in sorted(staying.get(wid, [])) if self._movable(sid, wid)]
            if not left:
                continue
            sid = left[0]
            spec = self.fleet.strategies[sid]
            decision = scheduler.place(spec, FailoverPolicy(policy, wid))
            if not decision.placed:
                self.work.notes.append(Note(sid, wid, f"{wid} is draining but {decision.reason}"))
                continue
            staying[wid].remove(sid)
            pool.release(wid)
            why = f"{wid} was removed from the fleet" if worker.leaving else f"{wid} is draining"
            self.work.actions.append(Action("move", sid, f"{why} ({len(left)} left); to {decision.reason}",
                                            "worker-leaving" if worker.leaving else "drain", source=wid, target=decision.worker, epoch=self._take_epoch(),
                                            spec_hash=spec.spec_hash, paused=spec.desired_state == "paused"))

    def rebalance(self, scheduler: Scheduler, pool: WorkerPool, staying: dict[str, list[str]]) -> None:
        """Up to max_moves moves from the most to the least loaded feasible worker, each only when it
        narrows the gap by at least one strategy (load difference >= 2), so moves never ping-pong."""
        for _ in range(max(0, self.options.max_moves)):
            best: tuple | None = None
            for src in sorted(pool.views.values(), key=lambda w: (-w.used, w.id)):
                if src.liveness != "online":
                    continue
                for sid in sorted(staying.get(src.id, [])):
                    if not self._movable(sid, src.id) or sid in self.options.cooldown:
                        continue
                    spec = self.fleet.strategies[sid]
                    use = FailoverPolicy(RegionAffinityPolicy(LoadBasedPolicy()), src.id)
                    decision = scheduler.place(spec, use, commit=False)
                    if not decision.placed:
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
            spec = self.fleet.strategies[sid]
            staying[src_id].remove(sid)
            staying.setdefault(target_id, []).append(sid)
            pool.release(src_id)
            pool.take(target_id)
            self.work.actions.append(Action(
                "move", sid, f"rebalance: {src_id} runs {gap} more than {target_id}", "rebalance",
                source=src_id, target=target_id, epoch=self._take_epoch(), spec_hash=spec.spec_hash,
                paused=spec.desired_state == "paused"))

    # --- the result ----------------------------------------------------------------------------

    def finish(self, policy: SchedulePolicy) -> Plan:
        work = self.work
        actions = sorted(work.actions, key=lambda a: (a.strategy, a.action, a.workers))
        queued, waiting, notes, adopt = work.queued, work.waiting, work.notes, work.adopt
        cursor = policy.cursor if policy.keeps_cursor else self.memory.rr_cursor
        targets = self.options.targets
        if targets:
            keep = self.targeted
            actions = [a for a in actions if keep(a.strategy, *a.workers)]
            queued = [q for q in queued if keep(q.strategy)]
            waiting = [w for w in waiting if keep(w.strategy, w.worker)]
            notes = [n for n in notes if keep(n.strategy, n.worker)]
            adopt = [a for a in adopt if keep(a.strategy, a.worker)]
            placed = [a.target or a.worker for a in actions if a.action in ("start", "move")]
            cursor = placed[-1] if placed and policy.keeps_cursor else self.memory.rr_cursor
        actions, changed = self.hold_source_change(actions)
        actions, suspended = self.hold_suspended(actions)
        actions, blocked = self.guard(actions)
        blocked = changed + suspended + blocked
        if self.braked and any(self.targeted(sid) for sid in self.braked):
            blocked.append(Blocked("failover-brake", f"{self.brake}; held: {', '.join(sorted(self.braked))}"))
        return Plan(
            actions=tuple(actions), queued=tuple(sorted(queued, key=lambda q: q.strategy)),
            waiting=tuple(sorted(waiting, key=lambda w: w.strategy)), blocked=tuple(blocked),
            notes=tuple(sorted(notes, key=lambda n: n.strategy)), adopt=tuple(adopt),
            fleet_hash=self.fleet.fleet_hash, lineage=self.memory.lineage, state_serial=self.memory.serial,
            rr_cursor=cursor, next_epoch=self.next_epoch, policy=policy.name,
        )

    def targeted(self, strategy: str, *workers: str | None) -> bool:
        """Whether --target (if given) selects this strategy or one of these workers."""
        targets = self.options.targets
        return not targets or strategy in targets or any(w in targets for w in workers if w)

    def _running(self, strategy: str) -> bool:
        """Runs (or, on a worker not answering, is believed to run) as far as the controller knows."""
        cur = self.current.get(strategy)
        return cur is not None and (cur.instance is None or cur.instance.alive)

    def refused_stops(self, actions: list[Action]) -> list[Action]:
        """The stops of running strategies that the mass-stop guard refuses (all of them, or none).
        Stopping a copy that is already dead (in error, say) is clean-up and never refused."""
        stops = [a for a in actions if a.action == "stop" and a.cause in ("removed", "desired-stopped")
                 and self._running(a.strategy)]
        running = sum(1 for sid in self.current if self._running(sid))
        if self.options.allow_mass_stop or running <= 1 or 2 * len(stops) <= running:
            return []
        return stops

    def suspended_by(self, a: Action) -> str | None:
        """The suspension that holds `a` ("*", its strategy or one of its workers), or None. A stale
        copy's stop is never held: that copy is a second one, and must go."""
        holds = self.memory.suspended
        if not holds or a.cause == "stale-copy":
            return None
        # `apply --target X` acts by hand on a suspended X (the loop leaves it alone meanwhile);
        # a suspension of anything else it touches still holds.
        return next((k for k in ("*", a.strategy, *a.workers) if k and k in holds and k not in self.options.targets),
                    None)

    def hold_suspended(self, actions: list[Action]) -> tuple[list[Action], list[Blocked]]:
        """`quantlab suspend`: nothing starts, stops or moves for a suspended strategy or worker (or
        at all, for "*") until `quantlab resume`; renewals are not actions and go on."""
        holds = self.memory.suspended
        held_by = self.suspended_by
        held = [a for a in actions if held_by(a)]
        if not held:
            return actions, []
        why = "; ".join(f"{'everything' if k == '*' else k} suspended by {holds[k].get('by')}"
                        f"{': ' + holds[k]['reason'] if holds[k].get('reason') else ''}"
                        for k in sorted({held_by(a) for a in held}))
        return ([a for a in actions if not held_by(a)],
                [Blocked(SUSPENDED, f"{why}; `quantlab resume` lifts it", tuple(held))])

    def hold_source_change(self, actions: list[Action]) -> tuple[list[Action], list[Blocked]]:
        """The source-change guard: a strategy defined only in uncommitted files must never be
        stopped silently because the loop began reading commits. What the fleet files ask for —
        stops, restarts, moves — waits; recovery from faults (failover, stale copies) does not."""
        why = self.options.source_change
        held = [a for a in actions if why and a.action in ("stop", "restart", "move") and a.cause in DESIRED_CAUSES]
        if not held:
            return actions, []
        ids = set(map(id, held))
        return ([a for a in actions if id(a) not in ids],
                [Blocked(SOURCE_CHANGE, f"{why}; check that these are meant, then pass --allow-source-change "
                                        "(once)", tuple(held))])

    def guard(self, actions: list[Action]) -> tuple[list[Action], list[Blocked]]:
        """Mass-stop guard: refuse stopping more than half of the running strategies at once."""
        stops = self.refused_stops(actions)
        if not stops:
            return actions, []
        running = sum(1 for sid in self.current if self._running(sid))
        held = set(map(id, stops))
        reason = (f"would stop {len(stops)} of {running} running strategies; check the fleet directory, "
                  "then pass --allow-mass-stop")
        return [a for a in actions if id(a) not in held], [Blocked("mass-stop", reason, tuple(stops))]


__all__ = ["PlanOptions", "plan", "Decision"]
