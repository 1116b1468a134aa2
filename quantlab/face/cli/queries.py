"""`quantlab status`, `explain`, `logs` and `events`: what runs, why it runs where it does, its output,
and what happened; none of them changes the state."""
from __future__ import annotations

import json
import re
import sys
from typing import Annotated, Optional

import typer
from rich.markup import escape

from .. import render
from quantlab.core.explain import outcome, verdicts
from quantlab.core.planner import PlanOptions
from quantlab.core.redact import fleet_secrets, redact_json, redact_lines
from quantlab.core.spec import FleetInvalid
from quantlab.core.status import fleet_status, unhealthy
from quantlab.edges.eventlog import event_problem
from .common import (FleetOpt, HostKeysOpt, Output, OutputOpt, StateOpt, controller_for, err, fail, handled,
                     leadership, look, out)


def _banner(problems: list[str]) -> None:
    """What runs is still shown while the fleet does not validate, under this banner (on stderr)."""
    if not problems:
        return
    err.print(f"[red bold]The fleet does not validate ({len(problems)} problem{'s' if len(problems) != 1 else ''})"
              "[/]: reconciling is frozen (leases are renewed, nothing is started or stopped); shown from the "
              "state file and the hosts:")
    for problem in problems:
        err.print(f"  {escape(problem)}")


@handled
def status(
    fleet: FleetOpt = None,
    state: StateOpt = None,
    output: OutputOpt = Output.text,
    detailed_exitcode: Annotated[bool, typer.Option("--detailed-exitcode",
                                                    help="Exit 2 when a desired strategy is not running healthy")] = False,
    accept_new_host_keys: HostKeysOpt = False,
) -> None:
    """Workers and strategies as they are now."""
    ctl = controller_for(fleet, state, accept_new_host_keys)
    try:
        loaded, memory, gathered, result = look(ctl, PlanOptions())
        problems: list[str] = []
    except FleetInvalid as exc:
        problems = [str(p) for p in exc.problems]
        try:
            loaded = ctl.fallback_fleet(ctl.read_memory(None))
            memory = ctl.read_memory(loaded)
            gathered, result = ctl.observe(loaded, memory, person=True), None
        finally:
            ctl.close()
    report = fleet_status(loaded, gathered.observed, memory, ctl.clock.mono(), ctl.clock.wall(), result,
                          result.fleet_revision if result else None, problems)
    if ctl.backend.shared:
        report["leader"] = leadership(ctl, "status").describe()
    if output is not Output.json:
        _banner(problems)
    warning = ctl.state_warning()
    if warning is not None:
        err.print(f"[yellow]Warning:[/] {escape(warning)}")
    if output is Output.json:
        print(json.dumps(report, indent=1))
    else:
        if "leader" in report:
            out.print(escape(render.leader_line(report["leader"], ctl.clock.wall())))
        for table in render.status_tables(report, ctl.clock.wall()):
            out.print(table)
    if detailed_exitcode and unhealthy(report):
        raise typer.Exit(2)


@handled
def explain(
    strategy: Annotated[str, typer.Argument(metavar="STRATEGY", help="Strategy id")],
    fleet: FleetOpt = None,
    state: StateOpt = None,
    output: OutputOpt = Output.text,
    accept_new_host_keys: HostKeysOpt = False,
) -> None:
    """Every worker's verdict for one strategy, their ranking, and what would change the outcome."""
    ctl = controller_for(fleet, state, accept_new_host_keys)
    loaded, memory, gathered, result = look(ctl, PlanOptions())
    spec = loaded.strategies.get(strategy)
    if spec is None:
        raise fail(f"{strategy} is not a strategy of {ctl.fleet_dir}; `quantlab status` lists them")
    found = verdicts(loaded, gathered.observed, memory, ctl.clock.mono(), strategy)
    report = {"strategy": strategy, "policy": loaded.settings.policy, "outcome": outcome(result, memory, strategy),
              "workers": [v.to_json(spec) for v in found]}
    if output is Output.json:
        print(json.dumps(report, indent=1))
        return
    for line in render.explain_lines(report):
        out.print(line)


@handled
def logs(
    strategy: Annotated[str, typer.Argument(metavar="STRATEGY", help="Strategy id")],
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new output")] = False,
    lines: Annotated[int, typer.Option("--lines", "-n", min=0, metavar="N", help="How many lines of the tail")] = 200,
    since: Annotated[Optional[str], typer.Option(
        "--since", metavar="WHEN", help="Only lines written since: 10m, 2h, 3d or an ISO time (by each line's "
                                        "leading time; lines without one go with the line before)")] = None,
    grep: Annotated[Optional[str], typer.Option(
        "--grep", metavar="PATTERN", help="Only lines matching this regular expression (searched on the host)")] = None,
    fleet: FleetOpt = None,
    state: StateOpt = None,
    accept_new_host_keys: HostKeysOpt = False,
) -> None:
    """The strategy's output, from its worker."""
    ctl = controller_for(fleet, state, accept_new_host_keys)
    try:
        since_ms = render.parse_since(since, ctl.clock.wall()) if since else None
        if grep is not None:
            re.compile(grep)
    except ValueError as exc:
        raise fail(str(exc)) from None
    except re.error as exc:
        raise fail(f"--grep {grep!r} is not a regular expression: {exc}") from None
    loaded, problems = ctl.fleet_or_fallback()
    _banner(problems)
    sink = sys.stdout.buffer
    try:
        output = ctl.logs(loaded, strategy, lines, follow, since_ms, grep)
        if output.stopped:      # its log stays on the worker it last ran on
            err.print(f"{escape(strategy)} is not running: its output on {escape(output.worker)}, up to its stop")
        # A strategy's output may print the proxy it trades through (and an error quoting it).
        for chunk in redact_lines(output.chunks, fleet_secrets(loaded)):
            sink.write(chunk)
            sink.flush()
    except KeyboardInterrupt:
        pass
    finally:
        ctl.close()


@handled
def events(
    since: Annotated[Optional[str], typer.Option("--since", metavar="WHEN",
                                                 help="Only newer events: 10m, 2h, 3d or an ISO time")] = None,
    strategy: Annotated[Optional[str], typer.Option("--strategy", metavar="ID", help="Only this strategy")] = None,
    fleet: FleetOpt = None,
    state: StateOpt = None,
    output: OutputOpt = Output.text,
) -> None:
    """The recorded history of placements, starts, stops, faults and recoveries."""
    ctl = controller_for(fleet, state)
    try:
        cutoff = render.parse_since(since, ctl.clock.wall()) if since else None
    except ValueError as exc:
        raise fail(str(exc)) from None
    try:
        unrecorded, problems = ctl.unrecorded_host_events()
    finally:
        ctl.close()
    _banner(problems)
    history = list(ctl.events.read())
    if ctl.events.skipped:
        n = ctl.events.skipped
        err.print(f"[yellow]Warning:[/] skipped {n} line{'s' if n != 1 else ''} of the events log that "
                  f"{'are' if n != 1 else 'is'} not events (the first: {escape(str(ctl.events.first_skipped))}); "
                  "every other event is shown. Delete such lines, or move the log away, to silence this.")
    # What hosts report is checked as the log's lines are: a strategy can write its events.log.
    history += [e for e in unrecorded if event_problem(e) is None]
    history.sort(key=lambda e: e.get("t", 0))
    selected = [e for e in history
                if (cutoff is None or e.get("t", 0) >= cutoff) and (strategy is None or e.get("strategy") == strategy)]
    selected = redact_json(selected)     # also what a host reports, and events of a release that kept credentials
    if output is Output.json:
        print(json.dumps(selected, indent=1))
        return
    if not selected:
        out.print("No events.")
    for event in selected:
        out.print(render.event_line(event))
