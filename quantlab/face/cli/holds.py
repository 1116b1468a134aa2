"""`quantlab suspend`, `stop-all`, `retry` and `resume`: hold what plans would do, brake the whole
fleet, start again what is in error, and lift the holds."""
from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.markup import escape

from quantlab.edges.store import LockHeld
from .common import FleetOpt, HostKeysOpt, StateOpt, TargetOpt, controller_for, fail, handled, out


@handled
def suspend(
    target: TargetOpt = None,
    reason: Annotated[Optional[str], typer.Option("--reason", metavar="TEXT",
                                                  help="Why, for status, plan and events")] = None,
    fleet: FleetOpt = None,
    state: StateOpt = None,
) -> None:
    """Start, stop and move nothing (for the targets, or at all) until resume; leases keep being renewed."""
    ctl = controller_for(fleet, state)
    targets = list(target or ["*"])
    ctl.suspend(targets, reason)
    what = "everything" if targets == ["*"] else ", ".join(targets)
    out.print(f"Suspended {escape(what)}: plans hold its starts, stops and moves (`quantlab resume` lifts it); "
              "leases keep being renewed.")


@handled
def stop_all(
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Confirm: every strategy of the fleet stops")] = False,
    reason: Annotated[Optional[str], typer.Option("--reason", metavar="TEXT",
                                                  help="Why, for status and events")] = None,
    fleet: FleetOpt = None,
    state: StateOpt = None,
    lock_timeout: Annotated[float, typer.Option("--lock-timeout", min=0, metavar="SECONDS",
                                                help="Wait this long for a running round to finish")] = 60.0,
) -> None:
    """Emergency brake: suspend everything, renew no lease, stop every strategy reachable now."""
    if not yes:
        raise fail("stop-all stops every strategy of the fleet (the fleet files stay as they are); "
                   "pass --yes to do it")
    ctl = controller_for(fleet, state)
    try:
        outcomes = ctl.stop_all(reason, lock_timeout)
    except LockHeld as exc:
        raise fail(f"everything is suspended and no lease is renewed any more, but the stops did not run: {exc}. "
                   "Run stop-all again to wait longer (--lock-timeout), or let the leases run out") from None
    finally:
        ctl.close()
    failed = [o for o in outcomes if not o.ok]
    for o in outcomes:
        mark = "ok" if o.ok else f"[red]FAILED[/]: {escape(o.detail)}"
        out.print(f"  stop {escape(o.action.strategy)} on {escape(str(o.action.worker))}: {mark}")
    out.print(f"Stopped {len(outcomes) - len(failed)} of {len(outcomes)}. Everything is suspended and no lease "
              "is renewed: a strategy not reached stops itself when its lease runs out. `quantlab resume` "
              "brings them back.")
    if failed:
        raise typer.Exit(1)


@handled
def retry(
    strategies: Annotated[list[str], typer.Argument(metavar="STRATEGY", help="Strategy ids in error")],
    reason: Annotated[Optional[str], typer.Option("--reason", metavar="TEXT", help="Why, for events")] = None,
    fleet: FleetOpt = None,
    state: StateOpt = None,
    accept_new_host_keys: HostKeysOpt = False,
) -> None:
    """Start strategies that are in error again, with a fresh restart budget, at the next round."""
    ctl = controller_for(fleet, state, accept_new_host_keys)
    asked = ctl.retry(list(strategies), reason)
    for sid, worker in asked.items():
        out.print(f"  {escape(sid)} on {escape(worker)}: to be started again")
    out.print("The next round starts them (a running loop within one interval; else `quantlab apply`); "
              "`quantlab events` records who asked.")


@handled
def resume(target: TargetOpt = None, fleet: FleetOpt = None, state: StateOpt = None) -> None:
    """Lift what suspend held (for the targets, or everything)."""
    ctl = controller_for(fleet, state)
    lifted = ctl.resume(list(target) if target else None)
    if not lifted:
        out.print("Nothing was suspended" + (f" for {escape(', '.join(target))}." if target else "."))
        return
    out.print(f"Resumed {escape(', '.join('everything' if t == '*' else t for t in lifted))}: the next plan "
              "acts on it again.")
