"""Phase 2: one verdict per strategy — keep it, act where it is (restart, start again, pause,
resume), wait, leave it alone with a note, place it on a (new) worker, or stop it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from .. import health
from ..health import WorkerLiveness, format_duration
from ..plan import Action, Cause, Note, Waiting
from ..redact import DIGEST_KEY, comparable_launch, describe_change
from ..spec import StrategySpec, worker_launch
from .context import Context, Current, Epochs, ToPlace, down_for
from .locate import Located


@dataclass(frozen=True)
class Verdict:
    strategy: str
    kind: Literal["keep", "act", "wait", "note", "place", "stop"]
    action: Action | None = None       # act, stop
    waiting: Waiting | None = None     # wait (also a stop whose worker is silent)
    note: Note | None = None           # note
    place: ToPlace | None = None       # place
    stays: bool = False                # it keeps its slot on its current worker meanwhile
    braked: bool = False               # wait: the failover brake holds its move


def keep(sid: str) -> Verdict:
    return Verdict(sid, "keep", stays=True)


def act(action: Action) -> Verdict:
    return Verdict(action.strategy, "act", action=action, stays=True)


def wait(waiting: Waiting, braked: bool = False) -> Verdict:
    return Verdict(waiting.strategy, "wait", waiting=waiting, stays=True, braked=braked)


def classify(ctx: Context, located: Located, epochs: Epochs) -> list[Verdict]:
    """Every desired strategy in the fleet's order, then every one removed from it."""
    out = []
    for sid, spec in ctx.fleet.strategies.items():
        cur = located.current.get(sid)
        if spec.desired_state == "stopped":
            if cur is not None:
                out.append(stop_or_wait(ctx, sid, cur, "desired-stopped", "desiredState: stopped"))
            continue
        if cur is None:
            held = unaccounted(ctx, spec)
            if held is None:
                note = "; starts paused" if spec.desired_state == "paused" else ""
                out.append(Verdict(sid, "place", place=ToPlace(spec, "new", "new" + note)))
            else:
                out.append(Verdict(sid, "wait", waiting=held))
            continue
        out.append(judge(ctx, spec, cur, epochs))
    for sid, cur in located.current.items():
        if sid not in ctx.fleet.strategies:
            out.append(stop_or_wait(ctx, sid, cur, "removed", "removed from fleet"))
    return out


def judge(ctx: Context, spec: StrategySpec, cur: Current, epochs: Epochs) -> Verdict:
    """What a placed strategy needs: an action where it is, a new worker, or nothing yet."""
    sid, wid = spec.id, cur.worker
    worker = ctx.fleet.workers.get(wid)
    if worker is None:
        return lost(ctx, spec, cur, "worker-removed", f"{wid} removed from fleet")
    live = ctx.liveness[wid]
    if live.status == "unreachable":
        return wait_unreachable(ctx, spec, cur, live)
    if live.status == "offline":
        return lost(ctx, spec, cur, "worker-offline", f"{wid} offline {down_for(live)}")
    misfit = ctx.misfit(spec, worker)
    inst = cur.instance
    if inst is not None and inst.status == "unknown":
        # The agent could not read the instance (disk full?): acting blind could run it twice.
        return Verdict(sid, "note", note=Note(sid, wid, f"left alone: {inst.reason}"), stays=True)
    if worker.leaving:
        if inst is None or not inst.alive:
            return Verdict(sid, "place", place=ToPlace(spec, "worker-leaving", f"not running on {wid}, which was "
                                                       "removed from the fleet", cur))
        return keep(sid)                       # the drain moves it off, one per plan
    paused = spec.desired_state == "paused"
    if inst is not None and inst.status == "orphaned":
        # The supervisor is gone but the runner runs on: start replaces it under a new supervisor.
        return act(Action("start", sid, f"{inst.reason} on {wid}", "orphaned", worker=wid, epoch=epochs.take(),
                          spec_hash=spec.spec_hash, paused=paused))
    if inst is None or not inst.alive:
        if inst is not None and inst.status == "error" and inst.spec_hash == spec.spec_hash:
            why = f"in error after {inst.restarts} restarts: {inst.reason or inst.last_error or 'unhealthy'}"
            asked = ctx.memory.retry.get(sid)
            if asked is not None and asked.get("epoch") == cur.epoch and not misfit:
                said = f" ({asked['reason']})" if asked.get("reason") else ""
                return act(Action("start", sid, f"retry asked by {asked.get('by')}{said}; {why}", "retry",
                                  worker=wid, epoch=epochs.take(), spec_hash=spec.spec_hash, paused=paused))
            return Verdict(sid, "note", stays=True, note=Note(
                sid, wid, f"{why}; `quantlab retry {sid}` starts it again (or change the strategy or its params)"))
        why = f"not running on {wid} ({inst.reason or inst.status})" if inst else f"not running on {wid}"
        if misfit:
            return Verdict(sid, "place", place=ToPlace(spec, "requirements", f"{why}, which no longer fits: {misfit}", cur),
                           stays=True)
        state = ctx.observed.worker(wid)
        if state is not None and state.reachable and state.disk_low:
            # A start there would be refused (and its copy could not write a heartbeat): elsewhere.
            return Verdict(sid, "place", place=ToPlace(spec, "worker-unfit", f"{why}, and the disk of {wid} is full",
                                                       cur), stays=True)
        return act(Action("start", sid, why, "not-running", worker=wid, epoch=epochs.take(),
                          spec_hash=spec.spec_hash, paused=paused))
    if misfit:
        return Verdict(sid, "place", place=ToPlace(spec, "requirements", f"{wid} no longer fits: {misfit}", cur),
                       stays=True)
    started_on = cur.launched.worker if cur.launched is not None else None
    if inst.spec_hash != spec.spec_hash:
        return act(Action("restart", sid, changes(spec, cur), "spec-changed", worker=wid, epoch=cur.epoch,
                          spec_hash=spec.spec_hash, paused=paused))
    now_on = comparable_launch(started_on, worker_launch(worker)) if started_on is not None else None
    if started_on is not None and now_on is not None and started_on != now_on:
        return act(Action("restart", sid, f"worker {wid} changed: {worker_changes(started_on, now_on)}",
                          "worker-changed", worker=wid, epoch=cur.epoch, spec_hash=spec.spec_hash, paused=paused))
    if inst.lease_ttl_s is not None and inst.lease_ttl_s != ctx.monitor.lease_ttl_s:
        # Its supervisor enforces the lease it was started with, whatever a renewal asks for.
        return act(Action("restart", sid, f"leaseTtlSeconds {inst.lease_ttl_s:g} → {ctx.monitor.lease_ttl_s:g}",
                          "lease-changed", worker=wid, epoch=cur.epoch, spec_hash=spec.spec_hash, paused=paused))
    if paused and not inst.paused:
        return act(Action("pause", sid, "desiredState: paused", "desired-paused", worker=wid, epoch=cur.epoch))
    if not paused and inst.paused:
        return act(Action("resume", sid, "desiredState: running", "desired-running", worker=wid, epoch=cur.epoch))
    return keep(sid)


def unaccounted(ctx: Context, spec: StrategySpec) -> Waiting | None:
    """A worker that could run `spec` has not answered once since this state began: a copy that
    an earlier (lost) state file placed there may still hold a lease. Hold the first start (as
    waiting) until such a lease has surely run out."""
    if ctx.memory.placements.get(spec.id) is not None:
        return None
    silent = [wid for wid in ctx.never_answered if ctx.misfit(spec, ctx.fleet.workers[wid]) is None]
    if not silent:
        return None
    began = ctx.memory.began or ctx.now
    extra = ctx.monitor.lease_ttl_s + spec.scheduling.stop_timeout_s + ctx.monitor.failover_margin_s
    left = (began + extra * 1000 - ctx.now) / 1000
    if ctx.monitor.fencing and left <= 0:
        return None
    why = f"{silent[0]} has not answered since this state file began; a copy placed there before may still run"
    if not ctx.monitor.fencing:
        return Waiting(spec.id, silent[0], f"{why} (fencing is off): not started until it answers", None)
    return Waiting(spec.id, silent[0], f"{why}; started elsewhere once its lease has surely run out, in "
                                       f"{format_duration(left)}", left)


def lost(ctx: Context, spec: StrategySpec, cur: Current, cause: Cause, what: str) -> Verdict:
    """A strategy whose worker is gone: wait while a copy may still run there, then fail over."""
    sid = spec.id
    left = ctx.seconds_until_movable(spec, cur)
    if not ctx.monitor.fencing:
        return wait(Waiting(sid, cur.worker, f"{what}; fencing is off (leaseTtlSeconds: 0), so it is never "
                                             "started elsewhere automatically", None))
    if not ctx.monitor.auto_recover:
        return wait(Waiting(sid, cur.worker, f"{what}; monitor.autoRecover is off", None))
    if left > 0:
        return wait(Waiting(sid, cur.worker, f"{what}; lease may live {format_duration(left)} more — not moved yet",
                            left))
    if ctx.brake and cause == "worker-offline":
        return wait(Waiting(sid, cur.worker, f"{what}; failover held: {ctx.brake}", None), braked=True)
    again = health.next_failover_at(sid, ctx.memory, ctx.now)
    if again is not None:
        count = ctx.memory.reschedules[sid][0]
        wait_s = (again - ctx.now) / 1000
        return wait(Waiting(sid, cur.worker, f"{what}; failed over {count} time(s) within the hour, so the next "
                                             f"move waits {format_duration(wait_s)} more (reschedule backoff)", wait_s))
    return Verdict(sid, "place", place=ToPlace(spec, cause, f"{what}, lease expired {format_duration(-left)} ago", cur))


def wait_unreachable(ctx: Context, spec: StrategySpec, cur: Current, live: WorkerLiveness) -> Verdict:
    down = live.down_for_s or 0.0
    offline_in = ctx.monitor.worker_offline_after_s - down
    left = None
    if ctx.monitor.fencing and ctx.monitor.auto_recover:
        left = max(offline_in, ctx.seconds_until_movable(spec, cur))
    return wait(Waiting(spec.id, cur.worker, f"{cur.worker} unreachable for {format_duration(down)}; "
                                             f"offline after {format_duration(ctx.monitor.worker_offline_after_s)}", left))


def stop_or_wait(ctx: Context, sid: str, cur: Current, cause: Cause, why: str) -> Verdict:
    # On a change of source a stop the fleet files ask for is listed (and held) even while its
    # worker is silent, so that the change is never confirmed with a stop still pending.
    if ctx.reachable(cur.worker) or ctx.options.source_change:
        return Verdict(sid, "stop", action=Action("stop", sid, why, cause, worker=cur.worker, epoch=cur.epoch))
    return Verdict(sid, "stop", waiting=Waiting(sid, cur.worker, f"{why}; {cur.worker} is not answering: it is "
                                                "stopped when seen again (its lease runs out meanwhile)", None))


def changes(spec: StrategySpec, cur: Current) -> str:
    """Words for what changed since the running copy was started."""
    old = cur.launched
    new = spec.launch_fields()
    if old is None:
        return f"spec changed ({cur.spec_hash} → {spec.spec_hash})"
    parts = []
    if old.file != new["file"]:
        parts.append(f"{spec.strategy_file} changed")
    for before, after, label in ((old.params or {}, new["params"], "params changed"),
                                 (old.scheduling, new["scheduling"], "scheduling changed")):
        diffs = [describe_change(k, before.get(k, '∅'), after.get(k, '∅'))
                 for k in sorted(set(before) | set(after)) if before.get(k) != after.get(k)]
        if diffs:
            more = f" (+{len(diffs) - 3} more)" if len(diffs) > 3 else ""
            parts.append(f"{label}: {', '.join(diffs[:3])}{more}")
    if old.heartbeat_ms != new["heartbeatMs"]:
        parts.append(f"heartbeatMs {old.heartbeat_ms} → {new['heartbeatMs']}")
    return "; ".join(parts) or "spec changed"


def worker_changes(before: dict[str, Any], after: dict[str, Any]) -> str:
    """Words for what changed on a worker since a copy was started there (`after` in the form the
    state keeps `before` in: see redact.comparable_launch); a proxy's credentials are never shown."""
    parts = []
    for k in sorted(after):
        if k == DIGEST_KEY:
            continue
        hidden = k == "proxy" and before.get(DIGEST_KEY) != after.get(DIGEST_KEY)
        if before.get(k) != after[k] or hidden:
            parts.append(describe_change(k, before.get(k), after[k], hidden_change=hidden))
    return ", ".join(parts)
