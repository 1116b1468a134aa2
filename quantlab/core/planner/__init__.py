"""The StrategyPool diffed against reality: (desired fleet, observed state, memory, now) -> Plan.

A pure function. It decides; it does not act. Every action carries its reason, and every desired
strategy ends up exactly one of: placed (running or about to), queued (no worker fits) or waiting
(its worker is not online and it cannot be moved yet).

A pipeline of phases, each returning values, in the spirit of Nomad's reconciler:
  locate    where each strategy runs now, which copies are stale, which to adopt   (locate.py)
  classify  one verdict per strategy: keep, act where it is, wait, note, place, stop (classify.py)
  place     a worker for each that needs one; drains; rebalancing                    (place.py)
  finish    --target, then the guards: source change, suspensions, mass stop, brake (guards.py)
"""
from __future__ import annotations

from dataclasses import replace

from ..memory import Memory
from ..observed import ObservedState
from ..plan import FAILOVER_BRAKE, Action, Blocked, Plan
from ..redact import redact_url
from ..spec import Fleet
from .classify import Verdict, classify
from .context import Context, Epochs, PlanOptions
from .guards import hold_mass_stop, hold_source_change, hold_suspended, refused_stops, suspended_by
from .locate import Located, locate
from .place import Placed, build_pool, place


class UnknownTarget(ValueError):
    """A --target names no strategy or worker that the fleet, the state or the hosts know."""


def plan(fleet: Fleet, observed: ObservedState, memory: Memory, now_ms: int,
         options: PlanOptions = PlanOptions()) -> Plan:
    unknown = unknown_targets(fleet, observed, memory, options.targets)
    if unknown:
        # A typo must not pass for "nothing to do": the operator would believe the target converged.
        raise UnknownTarget(f"--target {', '.join(unknown)}: no strategy or worker has this id in the fleet, "
                            f"the state or on the hosts; `quantlab status` lists them")
    ctx = Context(fleet, observed, memory, now_ms, options)
    epochs = Epochs(memory, observed)
    located = locate(ctx)
    verdicts = classify(ctx, located, epochs)
    acted = [v.action for v in verdicts if v.action is not None]
    placed = place(ctx, located, [v.place for v in verdicts if v.place is not None],
                   slots_taken(ctx, located, verdicts, acted), epochs, acted)
    stale = [Action("stop", inst.strategy, f"stale copy (epoch {inst.epoch}); the current one is on "
                    f"{located.current[inst.strategy].worker}", "stale-copy", worker=wid, epoch=inst.epoch)
             for wid, inst in located.stale]
    return finish(ctx, located, verdicts, placed, acted + placed.actions + stale, epochs)


def unknown_targets(fleet: Fleet, observed: ObservedState, memory: Memory, targets: frozenset[str]) -> list[str]:
    known = set(fleet.strategies) | set(fleet.workers) | set(memory.placements)
    known |= {p.worker for p in memory.placements.values()}
    known |= {i.strategy for w in observed.workers.values() for i in w.instances.values()}
    return sorted(set(targets) - known)


def slots_taken(ctx: Context, located: Located, verdicts: list[Verdict], acted: list[Action]) -> dict[str, list[str]]:
    """worker -> the strategies that keep their slot there while this plan places others: those
    that stay, and those whose stop the mass-stop guard refuses or a suspension holds."""
    staying: dict[str, list[str]] = {}
    for v in verdicts:
        if v.stays:
            staying.setdefault(located.current[v.strategy].worker, []).append(v.strategy)
    for a in refused_stops(ctx, located, [a for a in acted if ctx.targeted(a.strategy, *a.workers)]):
        staying.setdefault(a.workers[0], []).append(a.strategy)          # a stop: on its one worker
    for a in acted:
        if a.action == "stop" and suspended_by(ctx, a) and a.strategy not in staying.get(a.workers[0], []):
            staying.setdefault(a.workers[0], []).append(a.strategy)
    return staying


def finish(ctx: Context, located: Located, verdicts: list[Verdict], placed: Placed, actions: list[Action],
           epochs: Epochs) -> Plan:
    """--target keeps what it names; then what the guards hold is set apart from what runs."""
    policy = placed.policy
    assert policy is not None
    actions = sorted(actions, key=lambda a: (a.strategy, a.action, a.workers))
    queued = placed.queued
    waiting = [v.waiting for v in verdicts if v.waiting is not None]
    notes = [v.note for v in verdicts if v.note is not None] + placed.notes
    adopt = located.adopt
    braked = [v.strategy for v in verdicts if v.braked]
    cursor = policy.cursor if policy.keeps_cursor else ctx.memory.rr_cursor
    if ctx.options.targets:
        keep = ctx.targeted
        actions = [a for a in actions if keep(a.strategy, *a.workers)]
        queued = [q for q in queued if keep(q.strategy)]
        waiting = [w for w in waiting if keep(w.strategy, w.worker)]
        notes = [n for n in notes if keep(n.strategy, n.worker)]
        adopt = [a for a in adopt if keep(a.strategy, a.worker)]
        chosen = [a.target or a.worker for a in actions if a.action in ("start", "move")]
        cursor = chosen[-1] if chosen and policy.keeps_cursor else ctx.memory.rr_cursor
    actions, changed = hold_source_change(ctx, actions)
    actions, suspended = hold_suspended(ctx, actions)
    actions, refused = hold_mass_stop(ctx, located, actions)
    blocked = changed + suspended + refused
    if braked and any(ctx.targeted(sid) for sid in braked):
        blocked.append(Blocked(FAILOVER_BRAKE, f"{ctx.brake}; held: {', '.join(sorted(braked))}"))
    return without_credentials(Plan(
        actions=tuple(actions), queued=tuple(sorted(queued, key=lambda q: q.strategy)),
        waiting=tuple(sorted(waiting, key=lambda w: w.strategy)), blocked=tuple(blocked),
        notes=tuple(sorted(notes, key=lambda n: n.strategy)), adopt=tuple(adopt),
        fleet_hash=ctx.fleet.fleet_hash, lineage=ctx.memory.lineage, state_serial=ctx.memory.serial,
        rr_cursor=cursor, next_epoch=epochs.next, policy=policy.name,
    ))


def without_credentials(p: Plan) -> Plan:
    """The plan with every URL's credentials masked in its words. A plan is text for people (and
    its file, events and notices are made from it); its reasons quote what hosts and strategies
    said (an instance's error, often naming the proxy it trades through)."""
    def words(a: Action) -> Action:
        return replace(a, reason=redact_url(a.reason))
    return replace(
        p, actions=tuple(words(a) for a in p.actions),
        queued=tuple(replace(q, reason=redact_url(q.reason),
                             rejections=tuple((w, redact_url(r)) for w, r in q.rejections)) for q in p.queued),
        waiting=tuple(replace(w, reason=redact_url(w.reason)) for w in p.waiting),
        blocked=tuple(replace(b, reason=redact_url(b.reason), actions=tuple(words(a) for a in b.actions))
                      for b in p.blocked),
        notes=tuple(replace(n, note=redact_url(n.note)) for n in p.notes))


__all__ = ["PlanOptions", "UnknownTarget", "build_pool", "plan", "unknown_targets"]
