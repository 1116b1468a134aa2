"""`quantlab validate`, `plan` and `apply`: check the fleet, show what would change and why, carry it out."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.markup import escape

from .. import render
from quantlab.app.controller import Controller
from quantlab.app.handover import apply_or_hand_over
from quantlab.edges.execute import Outcome
from quantlab.core.plan import Action, Plan
from quantlab.core.planner import PlanOptions
from quantlab.core.spec import Fleet
from quantlab.core.status import not_answering
from quantlab.edges.planfile import read_plan, write_plan
from .common import (DetailedOpt, FleetOpt, HostKeysOpt, LockOpt, Output, OutputOpt, StateOpt, TargetOpt,
                     check_out, controller_for, err, fail, handled, look, out, out_refused)


def _header(ctl: Controller, fleet: Fleet, plan: Plan, observed: Any, memory: Any) -> str:
    serial = memory.serial
    at = (f"at {plan.fleet_revision} (working tree, {'uncommitted changes' if plan.fleet_dirty else 'clean'})"
          if plan.fleet_revision else "(not in git)")
    loop = ctl.loop_applies(fleet, memory)
    if loop is not None:       # what goes live is what the loop applies, not this working tree
        at += f" · the loop applies {loop.get('ref')} at {loop.get('revision')}"
    down = sorted(wid for wid, s in observed.workers.items() if not s.reachable)
    workers = f"{len(fleet.workers)} workers" + (f" ({not_answering(down)})" if down else "")
    header = (f"Fleet {escape(str(ctl.fleet_dir))}/ {at} · {workers} · {len(fleet.strategies)} strategies · "
              f"state serial {serial}")
    # Say why each silent worker did not answer (refused, timed out, host key...): the plan's
    # waits and placements depend on it, and the fix is on the host.
    for wid, s in observed.workers.items():
        if not s.reachable:
            header += f"\n  [red]! {escape(wid)}[/] not answering: [dim]{escape(s.error or 'no answer')}[/]"
    return header


@handled
def validate(fleet: FleetOpt = None) -> None:
    """Check every fleet file against the schemas and the cross-references."""
    ctl = controller_for(fleet, None)
    loaded = ctl.load_fleet()
    out.print(f"{escape(str(ctl.fleet_dir))} is valid: {len(loaded.strategies)} strategies, "
              f"{len(loaded.workers)} workers, policy {loaded.settings.policy}.")


@handled
def plan(
    fleet: FleetOpt = None,
    state: StateOpt = None,
    output: OutputOpt = Output.text,
    out_file: Annotated[Optional[Path], typer.Option("--out", readable=False, metavar="FILE",
                                                     help="Save the plan for `quantlab apply PLANFILE`")] = None,
    detailed_exitcode: DetailedOpt = False,
    rebalance: Annotated[bool, typer.Option("--rebalance", help="Also propose moves toward even load")] = False,
    max_moves: Annotated[int, typer.Option("--max-moves", min=0, metavar="N", help="At most this many rebalance moves")] = 1,
    target: TargetOpt = None,
    accept_new_host_keys: HostKeysOpt = False,
) -> None:
    """Show what apply would do, and why."""
    if out_file is not None:
        check_out(out_file, "plan.json")
    ctl = controller_for(fleet, state, accept_new_host_keys)
    options = PlanOptions(rebalance=rebalance, max_moves=max_moves, targets=frozenset(target or ()))
    loaded, memory, gathered, result = look(ctl, options)
    if out_file is not None:
        try:
            write_plan(out_file, result)
        except OSError as exc:
            raise out_refused(out_file, exc, "plan.json") from None
    if output is Output.json:
        print(json.dumps(result.to_json(), indent=1))
    else:
        for line in render.plan_lines(result, _header(ctl, loaded, result, gathered.observed, memory)):
            out.print(line)
        if out_file is not None:
            out.print(f"Saved the plan to {escape(str(out_file))}: apply it with "
                      f"`quantlab apply {escape(str(out_file))}`.")
    conflict = ctl.loop_conflict(loaded, memory, result)
    if conflict is not None:
        err.print(f"[yellow]Warning:[/] apply would refuse this plan: {escape(conflict)}")
    if detailed_exitcode and result.has_changes:
        raise typer.Exit(2)


class _ApplyProgress:
    """One line per finished action; on a terminal, a spinner says what runs meanwhile."""

    def __init__(self, total: int, quiet: bool):
        self.total, self.done, self.quiet = total, 0, quiet
        self.status = None
        if not quiet and out.is_terminal:
            self.status = out.status(f"Applying 0/{total}…")
            self.status.start()

    def __call__(self, stage: str, action: Action, outcome: Outcome | None) -> None:
        if stage != "done" or outcome is None:
            return
        self.done += 1
        if self.status is not None:
            self.status.update(f"Applying {self.done}/{self.total}…")
        if self.quiet:
            return
        where = f"{action.source} → {action.target}" if action.action == "move" else action.worker
        if outcome.ok:
            out.print(f"  [green]✓[/] {action.action} {escape(action.strategy)} {escape(str(where))} "
                      f"[dim]({outcome.seconds:.1f}s)[/]")
        else:
            out.print(f"  [red]✗[/] {action.action} {escape(action.strategy)} {escape(str(where))}: "
                      f"{escape(outcome.detail)}")

    def close(self) -> None:
        if self.status is not None:
            self.status.stop()


@handled
def apply(
    planfile: Annotated[Optional[Path], typer.Argument(readable=False, metavar="[PLANFILE]",
                                                                help="A plan saved by `quantlab plan --out`")] = None,
    fleet: FleetOpt = None,
    state: StateOpt = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation")] = False,
    allow_mass_stop: Annotated[bool, typer.Option("--allow-mass-stop",
                                                  help="Allow stopping more than half of what runs")] = False,
    target: TargetOpt = None,
    rebalance: Annotated[bool, typer.Option("--rebalance", help="Also move toward even load")] = False,
    max_moves: Annotated[int, typer.Option("--max-moves", min=0, metavar="N", help="At most this many rebalance moves")] = 1,
    output: OutputOpt = Output.text,
    lock_timeout: LockOpt = 0.0,
    accept_new_host_keys: HostKeysOpt = False,
) -> None:
    """Compute (or load) the plan, confirm, and carry it out."""
    ctl = controller_for(fleet, state, accept_new_host_keys)
    quiet = output is Output.json
    saved = read_plan(planfile) if planfile is not None else None
    if saved is not None:
        if target or rebalance:
            raise fail("--target and --rebalance shape a new plan and cannot change a saved one; "
                       "run `quantlab plan --out FILE` with them instead")
        if allow_mass_stop:
            saved = saved.with_guards_lifted()
    options = PlanOptions(rebalance=rebalance, max_moves=max_moves, targets=frozenset(target or ()),
                          allow_mass_stop=allow_mass_stop)

    planned: list[Plan] = []

    def shown(loaded: Fleet, result: Plan, gathered: Any) -> None:
        planned.append(result)
        if not quiet:
            header = _header(ctl, loaded, result, gathered.observed, ctl.ledger.memory)
            for line in render.plan_lines(result, header):
                out.print(line)

    def confirm(result: Plan) -> bool:
        # Asked with the state lock released: a person may take minutes, the loop may not.
        if not sys.stdin.isatty():
            raise fail("apply needs a confirmation: run it in a terminal, or pass --yes")
        return typer.confirm(f"\nApply {len(result.actions)} action(s)?", default=False)

    progress: _ApplyProgress | None = None

    def report(stage: str, action: Action, outcome: Outcome | None) -> None:
        nonlocal progress
        if progress is None:
            progress = _ApplyProgress(len(planned[-1].actions) if planned else 0, quiet)
        progress(stage, action, outcome)
    try:
        done = apply_or_hand_over(ctl, options, saved=saved, shown=shown, confirm=None if yes else confirm,
                                  progress=report, lock_timeout=lock_timeout)
    finally:
        if progress is not None:
            progress.close()
        ctl.close()
    result, outcomes = done.plan, done.outcomes
    if done.cancelled:
        err.print("Cancelled; nothing was changed.")
        raise typer.Exit(1)
    failed = [o for o in outcomes if not o.ok]
    if quiet:
        print(json.dumps({"plan": result.to_json(), "ok": not failed and not result.refused,
                          "outcomes": [_outcome_json(o) for o in outcomes]}, indent=1))
    else:
        if result.actions:
            ok = len(outcomes) - len(failed)
            out.print(f"\nApply complete: {ok} done, {len(failed)} failed." if not failed else
                      f"\n[red]Apply finished with {len(failed)} failed[/] ({ok} done); the state file records each outcome.")
        for b in result.blocked:
            if b in result.refused:
                err.print(f"[red]Refused by the {escape(b.guard)} guard:[/] {escape(b.reason)}")
            else:
                err.print(f"[yellow]Held, {len(b.actions)} action(s):[/] {escape(b.reason)}")
        _lease_warning(ctl, done.fleet, ctl.ledger.memory)
    if ctl.events.failure:
        err.print(f"[red]Error:[/] {escape(ctl.events.failure)}; what was done is in the state file, "
                  "but not in the history")
    if failed or result.refused or ctl.events.failure:
        raise typer.Exit(1)


def _outcome_json(o: Outcome) -> dict[str, Any]:
    return {**o.action.to_json(), "ok": o.ok, "detail": o.detail, "seconds": round(o.seconds, 3)}


def _lease_warning(ctl: Controller, fleet: Fleet, memory: Any) -> None:
    warning = ctl.lease_warning(fleet, memory)
    if warning is not None:
        err.print(f"[yellow]Warning:[/] {escape(warning)}")
