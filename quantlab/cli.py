"""The `quantlab` command: parse options, call the controller, render, map errors to exit codes."""
from __future__ import annotations

import json
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

from . import render
from .controller import Controller, default_fleet_dir, default_state_path
from .planner import PlanOptions
from .spec import FleetInvalid
from .store import StateError, write_plan

app = typer.Typer(
    name="quantlab",
    help="Keep a fleet of trading strategies running where the fleet directory says they should be.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


class Output(str, Enum):
    text = "text"
    json = "json"


FleetOpt = Annotated[Optional[Path], typer.Option("--fleet", help="Fleet directory [default: $QUANTLAB_FLEET or ./fleet]")]
StateOpt = Annotated[Optional[Path], typer.Option("--state", help="State file [default: FLEET/.quantlab/state.json]")]
OutputOpt = Annotated[Output, typer.Option("--output", "-o", help="text or json")]
TargetOpt = Annotated[Optional[list[str]], typer.Option("--target", help="Limit to this strategy or worker id (repeatable)")]


def _controller(fleet: Optional[Path], state: Optional[Path]) -> Controller:
    fleet_dir = fleet or default_fleet_dir()
    return Controller(fleet_dir, state or default_state_path(fleet_dir))


def _fail(message: str, code: int = 1) -> typer.Exit:
    err.print(f"[red]Error:[/] {escape(message)}")
    return typer.Exit(code)


def _invalid(exc: FleetInvalid) -> typer.Exit:
    for problem in exc.problems:
        err.print(escape(str(problem)))
    n = len(exc.problems)
    err.print(f"[red]{n} problem{'s' if n != 1 else ''}[/] — nothing was changed.")
    return typer.Exit(1)


@app.command()
def validate(fleet: FleetOpt = None) -> None:
    """Check every fleet file against the schemas and the cross-references."""
    ctl = _controller(fleet, None)
    try:
        loaded = ctl.load_fleet()
    except FleetInvalid as exc:
        raise _invalid(exc) from None
    out.print(f"{escape(str(ctl.fleet_dir))} is valid: {len(loaded.strategies)} strategies, "
              f"{len(loaded.workers)} workers, policy {loaded.settings.policy}.")


@app.command()
def plan(
    fleet: FleetOpt = None,
    state: StateOpt = None,
    output: OutputOpt = Output.text,
    out_file: Annotated[Optional[Path], typer.Option("--out", help="Save the plan for `quantlab apply PLANFILE`")] = None,
    detailed_exitcode: Annotated[bool, typer.Option("--detailed-exitcode", help="Exit 2 when there are actions")] = False,
    rebalance: Annotated[bool, typer.Option("--rebalance", help="Also propose moves toward even load")] = False,
    max_moves: Annotated[int, typer.Option("--max-moves", min=0, help="At most this many rebalance moves")] = 1,
    target: TargetOpt = None,
) -> None:
    """Show what apply would do, and why."""
    ctl = _controller(fleet, state)
    try:
        loaded = ctl.load_fleet()
        memory = ctl.store.load()
        observed = ctl.observe(loaded, memory)
        options = PlanOptions(rebalance=rebalance, max_moves=max_moves, targets=frozenset(target or ()))
        result = ctl.plan(loaded, memory, observed, options)
        if out_file is not None:
            write_plan(out_file, result)
    except FleetInvalid as exc:
        raise _invalid(exc) from None
    except StateError as exc:
        raise _fail(str(exc)) from None
    if output is Output.json:
        print(json.dumps(result.to_json(), indent=1))
    else:
        header = _fleet_header(ctl, loaded, observed, memory.serial, result.fleet_revision, result.fleet_dirty)
        for line in render.plan_lines(result, header):
            out.print(line)
        if out_file is not None:
            out.print(f"Saved the plan to {escape(str(out_file))}: apply it with `quantlab apply {escape(str(out_file))}`.")
    if detailed_exitcode and result.has_changes:
        raise typer.Exit(2)


def _fleet_header(ctl: Controller, fleet, observed, serial: int, commit: str | None, dirty: bool) -> str:
    at = f"at {commit} ({'dirty' if dirty else 'clean'})" if commit else "(not in git)"
    down = sum(1 for wid in fleet.workers if not (observed.worker(wid) and observed.worker(wid).reachable))
    workers = f"{len(fleet.workers)} workers" + (f" ({down} not answering)" if down else "")
    return (f"Fleet {escape(str(ctl.fleet_dir))}/ {at} · {workers} · {len(fleet.strategies)} strategies · "
            f"state serial {serial}")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        err.print("Interrupted.")
        sys.exit(130)


if __name__ == "__main__":
    main()
