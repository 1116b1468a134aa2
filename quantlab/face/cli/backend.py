"""`quantlab state` and `quantlab leader`: a copy of the state, its move into another backend, and
who leads the reconcile daemons of a PostgreSQL state."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from .. import render
from .common import (FleetOpt, LockOpt, Output, OutputOpt, StateOpt, check_out, controller_for, err, fail, handled,
                     leadership, out, write_out)


state_app = typer.Typer(help="Read a state, or move it into another backend.", no_args_is_help=True,
                        rich_markup_mode=None)


leader_app = typer.Typer(help="Who leads the reconcile daemons of a PostgreSQL state.", no_args_is_help=True,
                         rich_markup_mode=None)


@leader_app.command("show")
@handled
def leader_show(fleet: FleetOpt = None, state: StateOpt = None, output: OutputOpt = Output.text) -> None:
    """Who leads, in which term, since when."""
    ctl = controller_for(fleet, state)
    row = leadership(ctl, "leader show").describe()
    if output is Output.json:
        print(json.dumps(row, indent=1))
    else:
        out.print(escape(render.leader_line(row, ctl.clock.wall())))


@leader_app.command("step-down")
@handled
def leader_step_down(fleet: FleetOpt = None, state: StateOpt = None) -> None:
    """Ask the leading daemon to hand over (before upgrading or stopping its machine): it steps down
    after its current act round, and a standby takes over within a second or two."""
    ctl = controller_for(fleet, state)
    asked = leadership(ctl, "leader step-down").ask_handover()
    if asked is None:
        out.print("Nobody leads: nothing to hand over.")
        return
    out.print(f"Asked {escape(asked['holder'])} (term {asked['term']}) to step down; a standby takes over "
              "once it has (`quantlab leader show`).")


@state_app.command("pull")
@handled
def state_pull(
    fleet: FleetOpt = None,
    state: StateOpt = None,
    out_file: Annotated[Optional[Path], typer.Option("--out", readable=False, metavar="FILE",
                                                     help="Write it to FILE (mode 0600) instead of stdout")] = None,
) -> None:
    """A read-only copy of the state as JSON (backups, inspection); the source is not changed."""
    if out_file is not None:
        check_out(out_file, "state.json")
    ctl = controller_for(fleet, state)
    text = json.dumps(ctl.stored_state().to_json(), indent=1, sort_keys=True) + "\n"
    if out_file is None:
        sys.stdout.write(text)
        return
    write_out(out_file, text.encode(), "state.json")
    err.print(f"Wrote the state to {escape(str(out_file))}.")


@state_app.command("push")
@handled
def state_push(
    destination: Annotated[str, typer.Argument(metavar="FILE|DSN", help="Where the state moves: an empty one")],
    fleet: FleetOpt = None,
    state: StateOpt = None,
    lock_timeout: LockOpt = 0.0,
) -> None:
    """Move the state (placements, leases, restart counts, history, checkpoints) into another backend;
    the state it came from is marked migrated, so that no controller acts on it any more."""
    if destination.strip() in ("", "-"):
        raise fail("state push needs where the state goes: a state FILE or a postgresql:// DSN (`-` is not one; "
                   "`quantlab state pull` writes a copy to stdout)")
    source = controller_for(fleet, state)
    dest = controller_for(fleet, destination)
    moved = source.push_state(dest, lock_timeout)
    out.print(f"Moved the state (lineage {moved.lineage}, {len(moved.placements)} placements) to "
              f"{escape(str(dest.store.path))}: pass that --state from now on (the old one refuses to act).")
