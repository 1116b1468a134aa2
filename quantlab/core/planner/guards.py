"""Phase 4, the guards: what the plan would do but must not do yet — held by a suspension
(`quantlab suspend`), by a change of source (until --allow-source-change), or refused by the
mass-stop guard (until --allow-mass-stop)."""
from __future__ import annotations

from ..plan import DESIRED_CAUSES, MASS_STOP, SOURCE_CHANGE, SUSPENDED, Action, Blocked
from .context import Context
from .locate import Located


def refused_stops(ctx: Context, located: Located, actions: list[Action]) -> list[Action]:
    """The stops of running strategies that the mass-stop guard refuses (all of them, or none).
    Stopping a copy that is already dead (in error, say) is clean-up and never refused."""
    stops = [a for a in actions if a.action == "stop" and a.cause in ("removed", "desired-stopped")
             and located.running(a.strategy)]
    running = sum(1 for sid in located.current if located.running(sid))
    if ctx.options.allow_mass_stop or running <= 1 or 2 * len(stops) <= running:
        return []
    return stops


def suspended_by(ctx: Context, a: Action) -> str | None:
    """The suspension that holds `a` ("*", its strategy or one of its workers), or None. A stale
    copy's stop is never held: that copy is a second one, and must go."""
    holds = ctx.memory.suspended
    if not holds or a.cause == "stale-copy":
        return None
    # `apply --target X` acts by hand on a suspended X (the loop leaves it alone meanwhile);
    # a suspension of anything else it touches still holds.
    return next((k for k in ("*", a.strategy, *a.workers) if k and k in holds and k not in ctx.options.targets),
                None)


def hold_source_change(ctx: Context, actions: list[Action]) -> tuple[list[Action], list[Blocked]]:
    """The source-change guard: a strategy defined only in uncommitted files must never be
    stopped silently because the loop began reading commits. What the fleet files ask for —
    stops, restarts, moves — waits; recovery from faults (failover, stale copies) does not."""
    why = ctx.options.source_change
    held = [a for a in actions if why and a.action in ("stop", "restart", "move") and a.cause in DESIRED_CAUSES]
    if not held:
        return actions, []
    ids = set(map(id, held))
    return ([a for a in actions if id(a) not in ids],
            [Blocked(SOURCE_CHANGE, f"{why}; check that these are meant, then pass --allow-source-change "
                                    "(once)", tuple(held))])


def hold_suspended(ctx: Context, actions: list[Action]) -> tuple[list[Action], list[Blocked]]:
    """`quantlab suspend`: nothing starts, stops or moves for a suspended strategy or worker (or
    at all, for "*") until `quantlab resume`; renewals are not actions and go on."""
    holds = ctx.memory.suspended
    held = [a for a in actions if suspended_by(ctx, a)]
    if not held:
        return actions, []
    by = sorted({k for a in held if (k := suspended_by(ctx, a)) is not None})
    # Who and why come from the state file, where they may be of any type (a hand edit): shown as text.
    why = "; ".join(f"{'everything' if k == '*' else k} suspended by {holds[k].get('by')}"
                    f"{': ' + str(holds[k]['reason']) if holds[k].get('reason') else ''}"
                    for k in by)
    return ([a for a in actions if not suspended_by(ctx, a)],
            [Blocked(SUSPENDED, f"{why}; `quantlab resume` lifts it", tuple(held))])


def hold_mass_stop(ctx: Context, located: Located, actions: list[Action]) -> tuple[list[Action], list[Blocked]]:
    """Mass-stop guard: refuse stopping more than half of the running strategies at once."""
    stops = refused_stops(ctx, located, actions)
    if not stops:
        return actions, []
    running = sum(1 for sid in located.current if located.running(sid))
    held = set(map(id, stops))
    reason = (f"would stop {len(stops)} of {running} running strategies; check the fleet directory, "
              "then pass --allow-mass-stop")
    return [a for a in actions if id(a) not in held], [Blocked(MASS_STOP, reason, tuple(stops))]
