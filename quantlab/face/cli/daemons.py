"""`quantlab reconcile` and `quantlab serve`: the reconcile loop (one pass, or a daemon that leads
while it holds a PostgreSQL state's leadership) and the read-only fleet page beside it or alone."""
from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.markup import escape

from .. import render
from quantlab.app.controller import Controller
from quantlab.core.redact import fleet_secrets, redact_json, redact_lines, redact_url
from quantlab.core.spec import FleetInvalid, FleetSettings
from .common import (AllowHostOpt, FleetOpt, HostKeysOpt, InsecureOpt, LockOpt, StateOpt, TlsCertOpt, TlsKeyOpt,
                     TokenOpt, controller_for, err, fail, handled)


@handled
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
    from ..web.server import ServeRefused, parse_listen

    if serve_at is not None:
        try:
            parse_listen(serve_at)      # a typo is said at once, also with --once (which serves nothing)
        except ServeRefused as exc:
            raise fail(str(exc).replace("--listen", "--serve", 1), 2) from None
    ctl = controller_for(fleet, state, accept_new_host_keys)

    def log(line: str) -> None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
        print(f"{stamp} {render.terminal_safe(redact_url(line))}", flush=True)     # lines quote hosts and strategies

    try:
        follower = Follower(ctl.fleet_dir, ctl.state_path.parent, working_tree=working_tree, pull=git_pull)
    except GitError as exc:
        raise fail(str(exc)) from None
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

    from ..web.server import ServeRefused, Source, make_server

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
        raise fail(str(exc), 2) from None


def _page_url(server: Any) -> str:
    host, port = server.server_address[:2]
    scheme = "https" if server.tls is not None else "http"
    return f"{scheme}://{'[' + host + ']' if ':' in host else host}:{port}/"


@handled
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
    ctl = controller_for(fleet, state, accept_new_host_keys)
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
        raise fail(f"{where}{broken} (with a PostgreSQL state a standby controller may take over, and the "
                   "strategies' lease must outlast that); nothing was started", 2)
    # A daemon carries out the plans an `apply` hands to it; a `--once` run leads only for its run.
    table = ctl.backend.leadership(Leader.name("reconcile"), kind="run" if once else "daemon")
    return Leader(table, ctl.clock, settings.leader_lease)
