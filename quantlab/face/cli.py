"""The `quantlab` command: parse options, call the controller, render, map errors to exit codes."""
from __future__ import annotations

import json
import re
import signal
import sys
import threading
import time
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.markup import escape

from . import render
from quantlab.edges.atomicfile import NotARegularFile, atomic_write, check_replaceable
from quantlab.app.controller import Controller, default_fleet_dir, default_state_path
from quantlab.app.handover import apply_or_hand_over
from quantlab.edges.execute import Outcome
from quantlab.core.explain import outcome, verdicts
from quantlab.edges.hosts import AgentError
from quantlab.core.plan import Action, Plan
from quantlab.core.planner import PlanOptions, UnknownTarget
from quantlab.core.redact import fleet_secrets, redact_json, redact_lines, redact_url
from quantlab.core.spec import Fleet, FleetInvalid, FleetSettings
from quantlab.core.status import fleet_status, not_answering, unhealthy
from quantlab.edges.statebackend import NotShared
from quantlab.edges.store import LockHeld, StateError, event_problem, read_plan, write_plan
from quantlab.edges.transport.base import TransportError

app = typer.Typer(
    name="quantlab",
    help="Keep a fleet of trading strategies running where the fleet directory says they should be.",
    no_args_is_help=True,
    add_completion=True,
    # Plain help: the rich panels of this typer release print a "<bool>" placeholder on flags.
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
)


def _usage_name(self: Any) -> str:
    """A required argument as `STRATEGY`, an optional one as `[PLANFILE]`: recent typer releases write
    `{STRATEGY}`, which reads like a template left unfilled."""
    name = self.metavar or self.name.upper()
    return (name if self.required or name.startswith("[") else f"[{name}]") + ("..." if self.nargs != 1 else "")


if hasattr(getattr(typer, "core", None), "TyperArgument") and \
        hasattr(typer.core.TyperArgument, "_usage_display_name"):
    typer.core.TyperArgument._usage_display_name = _usage_name   # type: ignore[method-assign]


def _show_version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version
        try:
            out.print(f"quantlab {version('quantlab')}")
        except PackageNotFoundError:       # run from a source tree that was never installed
            out.print("quantlab (not installed)")
        raise typer.Exit()


@app.callback()
def _main(show_version: Annotated[bool, typer.Option("--version", callback=_show_version, is_eager=True,
                                                     help="Show quantlab's version and exit")] = False) -> None:
    pass


class _SafeConsole(Console):
    """Every string printed (a message, a line, a table cell) is made terminal-safe before its markup
    is read: messages carry text from hosts, strategies and people (errors, reasons), and rich
    prints control characters such as ESC as they are. Newlines stay: messages may have several."""

    def render_str(self, text: str, **kwargs: Any) -> Any:
        return super().render_str(render.terminal_safe(text), **kwargs)


# Off a terminal (pipes, CI logs), tables get room instead of the 80-column default. No emoji codes:
# text from hosts and people is printed as written (`--listen 127.0.0.1:-1:` is not a thumbs-down).
out = _SafeConsole(highlight=False, soft_wrap=True, emoji=False, width=None if sys.stdout.isatty() else 200)
err = _SafeConsole(stderr=True, highlight=False, soft_wrap=True, emoji=False)


class Output(str, Enum):
    text = "text"
    json = "json"


def _fleet_dir(value: str) -> Path:
    """`--fleet DIR`, but never an empty one: Path("") is the working directory, and `--fleet "$UNSET"`
    would validate (or walk, from /, the whole disk as) whatever folder the command runs in."""
    if not value:
        raise typer.BadParameter("an empty path (an unset variable?); give the fleet directory, or leave "
                                 "--fleet out for $QUANTLAB_FLEET or ./fleet")
    return Path(value)


# readable=False on every path: quantlab checks paths itself, with a message that says what to do
# and exit 1 (typer's own check would exit 2 before anything could explain it).
FleetOpt = Annotated[Optional[Path], typer.Option("--fleet", readable=False, metavar="DIR", parser=_fleet_dir,
                                                  help="Fleet directory [default: $QUANTLAB_FLEET or ./fleet]")]
StateOpt = Annotated[Optional[str], typer.Option("--state", envvar="QUANTLAB_STATE", metavar="FILE|DSN",
                                                 help="State file, or postgresql://USER@HOST/DB (credentials from "
                                                      "PGPASSFILE or a service file) [default: "
                                                      "FLEET/.quantlab/state.json]")]
OutputOpt = Annotated[Output, typer.Option("--output", "-o", metavar="text|json", help="text or json")]
TargetOpt = Annotated[Optional[list[str]], typer.Option("--target", metavar="ID",
                                                        help="Limit to this strategy or worker id (repeatable)")]
LockOpt = Annotated[float, typer.Option("--lock-timeout", min=0, metavar="SECONDS",
                                        help="Wait this many seconds for the state lock")]
TokenOpt = Annotated[Optional[Path], typer.Option("--token-file", metavar="FILE", readable=False,
                                                 help="Require this bearer token (required beyond loopback)")]
TlsCertOpt = Annotated[Optional[Path], typer.Option("--tls-cert", metavar="FILE", readable=False, help="TLS certificate (PEM)")]
TlsKeyOpt = Annotated[Optional[Path], typer.Option("--tls-key", metavar="FILE", readable=False, help="TLS private key (PEM)")]
InsecureOpt = Annotated[bool, typer.Option("--insecure-http",
                                           help="Beyond loopback without TLS (a TLS proxy in front terminates it)")]
AllowHostOpt = Annotated[Optional[list[str]], typer.Option("--allow-host", metavar="NAME",
                                                           help="Also answer requests for this Host name (repeatable)")]
HostKeysOpt = Annotated[bool, typer.Option("--accept-new-host-keys",
                                           help="Record the keys of SSH hosts never seen before (like OpenSSH accept-new)")]
DetailedOpt = Annotated[bool, typer.Option("--detailed-exitcode", help="Exit 2 when there is something to do")]


def _controller(fleet: Optional[Path], state: Optional[str], accept_new_host_keys: bool = False) -> Controller:
    fleet_dir = fleet or default_fleet_dir()
    if state and _is_dsn(state):
        return Controller(fleet_dir, default_state_path(fleet_dir), accept_new_host_keys=accept_new_host_keys,
                          state_dsn=state)
    return Controller(fleet_dir, Path(state) if state else default_state_path(fleet_dir),
                      accept_new_host_keys=accept_new_host_keys)


def _fail(message: str, code: int = 1) -> typer.Exit:
    err.print(f"[red]Error:[/] {escape(message)}")
    return typer.Exit(code)


def _out_refused(path: Path, exc: OSError, example: str) -> typer.Exit:
    """`--out FILE` that cannot be written there: what is in the way and what to give instead."""
    if isinstance(exc, NotARegularFile):
        instead = f" such as {path / example}" if path.is_dir() else ""
        return _fail(f"--out {exc}: give the path of a file to write{instead} (only a regular file is "
                     "replaced); nothing was written")
    return _fail(f"--out {path}: cannot write it: {exc.strerror or exc}; give a file in a folder you can write "
                 "to; nothing was written")


def _write_out(path: Path, data: bytes, example: str) -> None:
    """Write `data` to `--out` (mode 0600), replacing at most a regular file, atomically."""
    try:
        atomic_write(path, data, mode=0o600, files_only=True)
    except OSError as exc:
        raise _out_refused(path, exc, example) from None


def _check_out(path: Path, example: str) -> None:
    """Refuse a bad `--out` before any work (a plan probes every host first)."""
    try:
        check_replaceable(path)
    except OSError as exc:
        raise _out_refused(path, exc, example) from None


def _invalid(exc: FleetInvalid) -> typer.Exit:
    for problem in exc.problems:
        err.print(escape(str(problem)))
    n = len(exc.problems)
    err.print(f"[red]{n} problem{'s' if n != 1 else ''}[/] — nothing was changed. Reconciling is frozen until "
              "they are fixed: a reconcile loop renews leases and starts or stops nothing.")
    return typer.Exit(1)


def _handled(fn: Any) -> Any:
    """Known failures become one clear message and exit 1; anything else is a bug and shows a trace."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except FleetInvalid as exc:
            raise _invalid(exc) from None
        except (StateError, TransportError, AgentError, UnknownTarget) as exc:
            raise _fail(str(exc)) from None
    return wrapper


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


def _banner(problems: list[str]) -> None:
    """What runs is still shown while the fleet does not validate, under this banner (on stderr)."""
    if not problems:
        return
    err.print(f"[red bold]The fleet does not validate ({len(problems)} problem{'s' if len(problems) != 1 else ''})"
              "[/]: reconciling is frozen (leases are renewed, nothing is started or stopped); shown from the "
              "state file and the hosts:")
    for problem in problems:
        err.print(f"  {escape(problem)}")


def _look(ctl: Controller, options: PlanOptions) -> tuple[Fleet, Any, Any, Plan]:
    """Read-only: the fleet, the memory, a probe of every host (no lease renewed) and the plan."""
    try:
        loaded = ctl.load_fleet()
        memory = ctl.read_memory(loaded)
        loaded = ctl.with_leaving(loaded, memory)
        gathered = ctl.observe(loaded, memory, person=True)
        return loaded, memory, gathered, ctl.plan(loaded, memory, gathered, options)
    finally:
        ctl.close()


@app.command()
@_handled
def validate(fleet: FleetOpt = None) -> None:
    """Check every fleet file against the schemas and the cross-references."""
    ctl = _controller(fleet, None)
    loaded = ctl.load_fleet()
    out.print(f"{escape(str(ctl.fleet_dir))} is valid: {len(loaded.strategies)} strategies, "
              f"{len(loaded.workers)} workers, policy {loaded.settings.policy}.")


@app.command()
@_handled
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
        _check_out(out_file, "plan.json")
    ctl = _controller(fleet, state, accept_new_host_keys)
    options = PlanOptions(rebalance=rebalance, max_moves=max_moves, targets=frozenset(target or ()))
    loaded, memory, gathered, result = _look(ctl, options)
    if out_file is not None:
        try:
            write_plan(out_file, result)
        except OSError as exc:
            raise _out_refused(out_file, exc, "plan.json") from None
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


@app.command()
@_handled
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
    ctl = _controller(fleet, state, accept_new_host_keys)
    quiet = output is Output.json
    saved = read_plan(planfile) if planfile is not None else None
    if saved is not None:
        if target or rebalance:
            raise _fail("--target and --rebalance shape a new plan and cannot change a saved one; "
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
            raise _fail("apply needs a confirmation: run it in a terminal, or pass --yes")
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


@app.command()
@_handled
def status(
    fleet: FleetOpt = None,
    state: StateOpt = None,
    output: OutputOpt = Output.text,
    detailed_exitcode: Annotated[bool, typer.Option("--detailed-exitcode",
                                                    help="Exit 2 when a desired strategy is not running healthy")] = False,
    accept_new_host_keys: HostKeysOpt = False,
) -> None:
    """Workers and strategies as they are now."""
    ctl = _controller(fleet, state, accept_new_host_keys)
    try:
        loaded, memory, gathered, result = _look(ctl, PlanOptions())
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
        report["leader"] = _leadership(ctl, "status").describe()
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


@app.command()
@_handled
def reconcile(
    once: Annotated[bool, typer.Option("--once", help="One pass, then exit (for cron)")] = False,
    fleet: FleetOpt = None,
    state: StateOpt = None,
    lock_timeout: LockOpt = 0.0,
    accept_new_host_keys: HostKeysOpt = False,
    working_tree: Annotated[bool, typer.Option(
        "--working-tree", help="Apply the files on disk, uncommitted changes too (default in git: the "
                               "commits of the branch checked out)")] = False,
    git_pull: Annotated[bool, typer.Option(
        "--git-pull", help="Follow the branch's upstream: fetch it into a private mirror (fast-forwards only)")] = False,
    git_pull_interval: Annotated[float, typer.Option(
        "--git-pull-interval", min=1.0, metavar="SECONDS", help="How often --git-pull fetches")] = 60.0,
    allow_source_change: Annotated[bool, typer.Option(
        "--allow-source-change", help="Confirm that what the loop applies changed (working tree, commits, "
                                      "another ref): let its stops and restarts go ahead")] = False,
    serve_at: Annotated[Optional[str], typer.Option(
        "--serve", metavar="HOST:PORT", help="Also serve the fleet page and /metrics (see `quantlab serve`)")] = None,
    token_file: TokenOpt = None,
    tls_cert: TlsCertOpt = None,
    tls_key: TlsKeyOpt = None,
    insecure_http: InsecureOpt = False,
    allow_host: AllowHostOpt = None,
) -> None:
    """Gather, plan and apply: once, or every reconcile.intervalSeconds until SIGINT/SIGTERM."""
    from quantlab.edges.follow import Follower
    from quantlab.edges.gitsource import GitError
    from quantlab.app.loop import ReconcileLoop
    from .web.server import ServeRefused, parse_listen

    if serve_at is not None:
        try:
            parse_listen(serve_at)      # a typo is said at once, also with --once (which serves nothing)
        except ServeRefused as exc:
            raise _fail(str(exc).replace("--listen", "--serve", 1), 2) from None
    ctl = _controller(fleet, state, accept_new_host_keys)

    def log(line: str) -> None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
        print(f"{stamp} {render.terminal_safe(redact_url(line))}", flush=True)     # lines quote hosts and strategies

    try:
        follower = Follower(ctl.fleet_dir, ctl.state_path.parent, working_tree=working_tree, pull=git_pull)
    except GitError as exc:
        raise _fail(str(exc)) from None
    ctl.log = log                      # the controller's own notes (leadership, warnings) with a time too
    leader = _leader_for_loop(ctl, follower, once) if ctl.backend.shared else None
    loop = ReconcileLoop(ctl, log, lock_timeout, follower, allow_source_change, leader)
    if once:
        try:
            tick = loop.tick()
        finally:
            ctl.close(flush_s=5.0)      # queued notices get at most 5 s before the process ends
        if not tick.ok:
            raise typer.Exit(1)
        return
    ctl.require_fleet_dir()
    try:
        interval = follower.load().settings.reconcile_interval_s
    except (FleetInvalid, GitError) as exc:
        for problem in getattr(exc, "problems", [exc]):
            err.print(escape(str(problem)))
        what = "does not validate" if isinstance(exc, FleetInvalid) else "cannot be read yet"
        err.print(f"[yellow]The fleet {what}; the loop starts anyway and keeps renewing leases.[/]")
        # The interval of the last fleet that validated, as the state file remembers it.
        interval = FleetSettings.from_snapshot(ctl.read_memory(None).fleet_settings).reconcile_interval_s
    page = None
    if serve_at is not None:
        page = _page_server(ctl, serve_at, token_file, tls_cert, tls_key, insecure_http, allow_host,
                            fleet_for_logs=loop.current_fleet)
        threading.Thread(target=page.serve_forever, name="fleet-page", daemon=True).start()
        log(f"serving the fleet page on {_page_url(page)}")
    try:
        loop.run_forever(interval, pull_interval=git_pull_interval)
    finally:
        if page is not None:
            page.shutdown()
            page.server_close()


def _page_server(ctl: Controller, listen: str, token_file: Optional[Path], tls_cert: Optional[Path],
                 tls_key: Optional[Path], insecure_http: bool, allow_host: Optional[list[str]],
                 fleet_for_logs: Optional[Any] = None) -> Any:
    """`fleet_for_logs`: inside the daemon, the fleet the loop applies (its hosts are the loop's:
    fetching a log must not point them at another fleet)."""
    from importlib.metadata import PackageNotFoundError, version

    from .web.server import ServeRefused, Source, make_server

    def logs(strategy: str, lines: int) -> bytes:
        fleet = fleet_for_logs() if fleet_for_logs is not None else ctl.fleet_or_fallback()[0]
        return b"".join(redact_lines(ctl.logs(fleet, strategy, lines, follow=False).chunks, fleet_secrets(fleet)))
    try:
        installed = version("quantlab")
    except PackageNotFoundError:
        installed = "unknown"
    # Events written before credentials were redacted in them are shown without, too.
    source = Source(ctl.snapshot_store(), lambda: redact_json(list(ctl.events.read())), logs, installed)
    try:
        return make_server(listen, source, token_file=token_file, tls_cert=tls_cert, tls_key=tls_key,
                           insecure_http=insecure_http, allow_hosts=tuple(allow_host or ()))
    except ServeRefused as exc:
        raise _fail(str(exc), 2) from None


def _page_url(server: Any) -> str:
    host, port = server.server_address[:2]
    scheme = "https" if server.tls is not None else "http"
    return f"{scheme}://{'[' + host + ']' if ':' in host else host}:{port}/"


@app.command()
@_handled
def serve(
    fleet: FleetOpt = None,
    state: StateOpt = None,
    listen: Annotated[str, typer.Option("--listen", metavar="HOST:PORT", help="Where to listen")] = "127.0.0.1:8421",
    token_file: TokenOpt = None,
    tls_cert: TlsCertOpt = None,
    tls_key: TlsKeyOpt = None,
    insecure_http: InsecureOpt = False,
    allow_host: AllowHostOpt = None,
    accept_new_host_keys: HostKeysOpt = False,
) -> None:
    """A read-only web page of the fleet, its JSON API (/api/status, /api/events) and Prometheus
    /metrics, from the snapshot the last apply or reconcile round recorded (no SSH load); a
    strategy's log lines are fetched from its host on demand."""
    ctl = _controller(fleet, state, accept_new_host_keys)
    page = _page_server(ctl, listen, token_file, tls_cert, tls_key, insecure_http, allow_host)
    err.print(f"Serving the fleet page on {_page_url(page)} (read only); stop with Ctrl-C.")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    threading.Thread(target=page.serve_forever, name="fleet-page", daemon=True).start()
    try:
        while not stop.wait(0.5):
            pass
    finally:
        page.shutdown()
        page.server_close()
        ctl.close()


def _leader_for_loop(ctl: Controller, follower: Any, once: bool) -> Any:
    """With PostgreSQL, a daemon leads only while it holds the leadership row: this process's side
    of it. The fleet's lease must then also cover a takeover (see `validate`)."""
    from quantlab.edges.gitsource import GitError
    from quantlab.app.leader import Leader

    try:
        settings = follower.load().settings
    except (FleetInvalid, GitError):
        settings = FleetSettings.from_snapshot(ctl.read_memory(None).fleet_settings)
    broken = settings.lease_rule_problem(standbys=True)
    if broken is not None:
        where = f"{settings.source}: " if settings.source is not None else ""
        raise _fail(f"{where}{broken} (with a PostgreSQL state a standby controller may take over, and the "
                    "strategies' lease must outlast that); nothing was started", 2)
    # A daemon carries out the plans an `apply` hands to it; a `--once` run leads only for its run.
    table = ctl.backend.leadership(Leader.name("reconcile"), kind="run" if once else "daemon")
    return Leader(table, ctl.clock, settings.leader_lease)


@app.command()
@_handled
def explain(
    strategy: Annotated[str, typer.Argument(metavar="STRATEGY", help="Strategy id")],
    fleet: FleetOpt = None,
    state: StateOpt = None,
    output: OutputOpt = Output.text,
    accept_new_host_keys: HostKeysOpt = False,
) -> None:
    """Every worker's verdict for one strategy, their ranking, and what would change the outcome."""
    ctl = _controller(fleet, state, accept_new_host_keys)
    loaded, memory, gathered, result = _look(ctl, PlanOptions())
    spec = loaded.strategies.get(strategy)
    if spec is None:
        raise _fail(f"{strategy} is not a strategy of {ctl.fleet_dir}; `quantlab status` lists them")
    found = verdicts(loaded, gathered.observed, memory, ctl.clock.mono(), strategy)
    report = {"strategy": strategy, "policy": loaded.settings.policy, "outcome": outcome(result, memory, strategy),
              "workers": [v.to_json(spec) for v in found]}
    if output is Output.json:
        print(json.dumps(report, indent=1))
        return
    for line in render.explain_lines(report):
        out.print(line)


@app.command()
@_handled
def suspend(
    target: TargetOpt = None,
    reason: Annotated[Optional[str], typer.Option("--reason", metavar="TEXT",
                                                  help="Why, for status, plan and events")] = None,
    fleet: FleetOpt = None,
    state: StateOpt = None,
) -> None:
    """Start, stop and move nothing (for the targets, or at all) until resume; leases keep being renewed."""
    ctl = _controller(fleet, state)
    targets = list(target or ["*"])
    ctl.suspend(targets, reason)
    what = "everything" if targets == ["*"] else ", ".join(targets)
    out.print(f"Suspended {escape(what)}: plans hold its starts, stops and moves (`quantlab resume` lifts it); "
              "leases keep being renewed.")


@app.command("stop-all")
@_handled
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
        raise _fail("stop-all stops every strategy of the fleet (the fleet files stay as they are); "
                    "pass --yes to do it")
    ctl = _controller(fleet, state)
    try:
        outcomes = ctl.stop_all(reason, lock_timeout)
    except LockHeld as exc:
        raise _fail(f"everything is suspended and no lease is renewed any more, but the stops did not run: {exc}. "
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


@app.command()
@_handled
def retry(
    strategies: Annotated[list[str], typer.Argument(metavar="STRATEGY", help="Strategy ids in error")],
    reason: Annotated[Optional[str], typer.Option("--reason", metavar="TEXT", help="Why, for events")] = None,
    fleet: FleetOpt = None,
    state: StateOpt = None,
    accept_new_host_keys: HostKeysOpt = False,
) -> None:
    """Start strategies that are in error again, with a fresh restart budget, at the next round."""
    ctl = _controller(fleet, state, accept_new_host_keys)
    asked = ctl.retry(list(strategies), reason)
    for sid, worker in asked.items():
        out.print(f"  {escape(sid)} on {escape(worker)}: to be started again")
    out.print("The next round starts them (a running loop within one interval; else `quantlab apply`); "
              "`quantlab events` records who asked.")


@app.command()
@_handled
def resume(target: TargetOpt = None, fleet: FleetOpt = None, state: StateOpt = None) -> None:
    """Lift what suspend held (for the targets, or everything)."""
    ctl = _controller(fleet, state)
    lifted = ctl.resume(list(target) if target else None)
    if not lifted:
        out.print("Nothing was suspended" + (f" for {escape(', '.join(target))}." if target else "."))
        return
    out.print(f"Resumed {escape(', '.join('everything' if t == '*' else t for t in lifted))}: the next plan "
              "acts on it again.")


@app.command()
@_handled
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
    ctl = _controller(fleet, state, accept_new_host_keys)
    try:
        since_ms = render.parse_since(since, ctl.clock.wall()) if since else None
        if grep is not None:
            re.compile(grep)
    except ValueError as exc:
        raise _fail(str(exc)) from None
    except re.error as exc:
        raise _fail(f"--grep {grep!r} is not a regular expression: {exc}") from None
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


@app.command()
@_handled
def events(
    since: Annotated[Optional[str], typer.Option("--since", metavar="WHEN",
                                                 help="Only newer events: 10m, 2h, 3d or an ISO time")] = None,
    strategy: Annotated[Optional[str], typer.Option("--strategy", metavar="ID", help="Only this strategy")] = None,
    fleet: FleetOpt = None,
    state: StateOpt = None,
    output: OutputOpt = Output.text,
) -> None:
    """The recorded history of placements, starts, stops, faults and recoveries."""
    ctl = _controller(fleet, state)
    try:
        cutoff = render.parse_since(since, ctl.clock.wall()) if since else None
    except ValueError as exc:
        raise _fail(str(exc)) from None
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


state_app = typer.Typer(help="Read a state, or move it into another backend.", no_args_is_help=True,
                        rich_markup_mode=None)
app.add_typer(state_app, name="state")


leader_app = typer.Typer(help="Who leads the reconcile daemons of a PostgreSQL state.", no_args_is_help=True,
                         rich_markup_mode=None)
app.add_typer(leader_app, name="leader")


def _leadership(ctl: Controller, command: str) -> Any:
    from quantlab.app.leader import Leader
    try:
        return ctl.backend.leadership(Leader.name(command))
    except NotShared as exc:
        raise _fail(str(exc)) from None


@leader_app.command("show")
@_handled
def leader_show(fleet: FleetOpt = None, state: StateOpt = None, output: OutputOpt = Output.text) -> None:
    """Who leads, in which term, since when."""
    ctl = _controller(fleet, state)
    row = _leadership(ctl, "leader show").describe()
    if output is Output.json:
        print(json.dumps(row, indent=1))
    else:
        out.print(escape(render.leader_line(row, ctl.clock.wall())))


@leader_app.command("step-down")
@_handled
def leader_step_down(fleet: FleetOpt = None, state: StateOpt = None) -> None:
    """Ask the leading daemon to hand over (before upgrading or stopping its machine): it steps down
    after its current act round, and a standby takes over within a second or two."""
    ctl = _controller(fleet, state)
    asked = _leadership(ctl, "leader step-down").ask_handover()
    if asked is None:
        out.print("Nobody leads: nothing to hand over.")
        return
    out.print(f"Asked {escape(asked['holder'])} (term {asked['term']}) to step down; a standby takes over "
              "once it has (`quantlab leader show`).")


@state_app.command("pull")
@_handled
def state_pull(
    fleet: FleetOpt = None,
    state: StateOpt = None,
    out_file: Annotated[Optional[Path], typer.Option("--out", readable=False, metavar="FILE",
                                                     help="Write it to FILE (mode 0600) instead of stdout")] = None,
) -> None:
    """A read-only copy of the state as JSON (backups, inspection); the source is not changed."""
    if out_file is not None:
        _check_out(out_file, "state.json")
    ctl = _controller(fleet, state)
    text = json.dumps(ctl.stored_state().to_json(), indent=1, sort_keys=True) + "\n"
    if out_file is None:
        sys.stdout.write(text)
        return
    _write_out(out_file, text.encode(), "state.json")
    err.print(f"Wrote the state to {escape(str(out_file))}.")


@state_app.command("push")
@_handled
def state_push(
    destination: Annotated[str, typer.Argument(metavar="FILE|DSN", help="Where the state moves: an empty one")],
    fleet: FleetOpt = None,
    state: StateOpt = None,
    lock_timeout: LockOpt = 0.0,
) -> None:
    """Move the state (placements, leases, restart counts, history, checkpoints) into another backend;
    the state it came from is marked migrated, so that no controller acts on it any more."""
    if destination.strip() in ("", "-"):
        raise _fail("state push needs where the state goes: a state FILE or a postgresql:// DSN (`-` is not one; "
                    "`quantlab state pull` writes a copy to stdout)")
    source = _controller(fleet, state)
    dest = _controller(fleet, destination)
    moved = source.push_state(dest, lock_timeout)
    out.print(f"Moved the state (lineage {moved.lineage}, {len(moved.placements)} placements) to "
              f"{escape(str(dest.store.path))}: pass that --state from now on (the old one refuses to act).")


@app.command()
def init(
    directory: Annotated[Path, typer.Argument(readable=False, metavar="DIR",
                                                          help="Folder for the new fleet (with --systemd: a fleet)")],
    systemd: Annotated[bool, typer.Option(
        "--systemd", help="For an existing fleet: write a systemd unit for the loop (and a cron line, when the "
                          "fleet's lease rule allows its reconcile.cronPeriodSeconds) into the state folder's "
                          "deploy/ (DIR/.quantlab/deploy/, which git ignores)")] = False,
    state: StateOpt = None,
) -> None:
    """A new fleet directory with an example of each kind; or, with --systemd, how to run its loop."""
    from .scaffold import FleetExists, create_fleet

    if systemd:
        _init_systemd(directory, state)
        return
    try:
        written = create_fleet(directory)
    except FleetExists as exc:
        raise _fail(str(exc)) from None
    for path in written:
        out.print(f"  created {escape(str(path))}")
    out.print(f"\nNext: `quantlab validate --fleet {escape(str(directory))}`, then "
              f"`quantlab plan --fleet {escape(str(directory))}`.")


def _init_systemd(directory: Path, state: Optional[str]) -> None:
    """quantlab-reconcile.service, and quantlab-reconcile.cron when the lease rule allows the fleet's
    cron period (reconcile.cronPeriodSeconds, in whole minutes), in the state folder's deploy/: they
    name this machine's paths and user, so they are not fleet content (the fleet folder is shared
    through git, and the loop would report them as uncommitted changes)."""
    import getpass
    import shutil

    from .scaffold import cron_line, systemd_unit

    root = directory.resolve()
    if state and not _is_dsn(state):
        state = str(Path(state).resolve())      # the unit runs in another working directory
    state_file = Path(state) if state and not _is_dsn(state) else default_state_path(root)
    try:
        loaded = Controller(root, state_file).load_fleet()
    except FleetInvalid as exc:
        raise _invalid(exc) from None
    # The quantlab beside this Python (its venv), else the one on PATH, else this Python with -m.
    beside = Path(sys.executable).parent / "quantlab"
    program = str(beside) if beside.is_file() else shutil.which("quantlab") or f"{sys.executable} -m quantlab"
    deploy = state_file.parent / "deploy"
    try:
        deploy.mkdir(mode=0o700, parents=True, exist_ok=True)
        unit = deploy / "quantlab-reconcile.service"
        unit.write_text(systemd_unit(root, program, getpass.getuser(), state))
    except OSError as exc:
        raise _fail(f"cannot write into {deploy}: {exc.strerror}") from None
    out.print(f"  created {escape(str(unit))}")
    install = (f"`sudo cp {escape(str(unit))} /etc/systemd/system/ && sudo systemctl daemon-reload && "
               "sudo systemctl enable --now quantlab-reconcile`")
    period = loaded.settings.cron_period_s
    if period is None or period % 60:
        why = ("set reconcile.cronPeriodSeconds (whole minutes) to run `reconcile --once` from cron instead"
               if period is None else f"reconcile.cronPeriodSeconds {period:g} is not whole minutes (cron's granularity)")
        out.print(f"No cron line: {why}.")
        out.print(f"\nInstall: {install}.")
        return
    cron = deploy / "quantlab-reconcile.cron"
    cron.write_text(cron_line(root, program, period, state))
    out.print(f"  created {escape(str(cron))} (every {period / 60:g} min; the lease rule allows it)")
    out.print(f"\nInstall one of them, never both: {install}, or the line in {escape(str(cron))} with `crontab -e`.")


def _is_dsn(state: str) -> bool:
    return state.startswith(("postgresql://", "postgres://"))


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        err.print("Interrupted.")
        sys.exit(130)


if __name__ == "__main__":
    main()
