"""What every command shares: the typer app, its options, the consoles, the controller for a
fleet and a state, `--out` files, and how known failures become a message and an exit code."""
from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.markup import escape

from .. import render
from quantlab.edges.atomicfile import NotARegularFile, atomic_write, check_replaceable
from quantlab.app.controller import Controller, default_fleet_dir, default_state_path
from quantlab.edges.hosts import AgentError
from quantlab.core.plan import Plan
from quantlab.core.planner import PlanOptions, UnknownTarget
from quantlab.core.spec import Fleet, FleetInvalid
from quantlab.edges.statebackend import NotShared
from quantlab.edges.store import StateError
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


def controller_for(fleet: Optional[Path], state: Optional[str], accept_new_host_keys: bool = False) -> Controller:
    fleet_dir = fleet or default_fleet_dir()
    if state and is_dsn(state):
        return Controller(fleet_dir, default_state_path(fleet_dir), accept_new_host_keys=accept_new_host_keys,
                          state_dsn=state)
    return Controller(fleet_dir, Path(state) if state else default_state_path(fleet_dir),
                      accept_new_host_keys=accept_new_host_keys)


def fail(message: str, code: int = 1) -> typer.Exit:
    err.print(f"[red]Error:[/] {escape(message)}")
    return typer.Exit(code)


def out_refused(path: Path, exc: OSError, example: str) -> typer.Exit:
    """`--out FILE` that cannot be written there: what is in the way and what to give instead."""
    if isinstance(exc, NotARegularFile):
        instead = f" such as {path / example}" if path.is_dir() else ""
        return fail(f"--out {exc}: give the path of a file to write{instead} (only a regular file is "
                    "replaced); nothing was written")
    return fail(f"--out {path}: cannot write it: {exc.strerror or exc}; give a file in a folder you can write "
                "to; nothing was written")


def write_out(path: Path, data: bytes, example: str) -> None:
    """Write `data` to `--out` (mode 0600), replacing at most a regular file, atomically."""
    try:
        atomic_write(path, data, mode=0o600, files_only=True)
    except OSError as exc:
        raise out_refused(path, exc, example) from None


def check_out(path: Path, example: str) -> None:
    """Refuse a bad `--out` before any work (a plan probes every host first)."""
    try:
        check_replaceable(path)
    except OSError as exc:
        raise out_refused(path, exc, example) from None


def invalid(exc: FleetInvalid) -> typer.Exit:
    for problem in exc.problems:
        err.print(escape(str(problem)))
    n = len(exc.problems)
    err.print(f"[red]{n} problem{'s' if n != 1 else ''}[/] — nothing was changed. Reconciling is frozen until "
              "they are fixed: a reconcile loop renews leases and starts or stops nothing.")
    return typer.Exit(1)


def handled(fn: Any) -> Any:
    """Known failures become one clear message and exit 1; anything else is a bug and shows a trace."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except FleetInvalid as exc:
            raise invalid(exc) from None
        except (StateError, TransportError, AgentError, UnknownTarget) as exc:
            raise fail(str(exc)) from None
    return wrapper


def look(ctl: Controller, options: PlanOptions) -> tuple[Fleet, Any, Any, Plan]:
    """Read-only: the fleet, the memory, a probe of every host (no lease renewed) and the plan."""
    try:
        loaded = ctl.load_fleet()
        memory = ctl.read_memory(loaded)
        loaded = ctl.with_leaving(loaded, memory)
        gathered = ctl.observe(loaded, memory, person=True)
        return loaded, memory, gathered, ctl.plan(loaded, memory, gathered, options)
    finally:
        ctl.close()


def leadership(ctl: Controller, command: str) -> Any:
    from quantlab.app.leader import Leader
    try:
        return ctl.backend.leadership(Leader.name(command))
    except NotShared as exc:
        raise fail(str(exc)) from None


def is_dsn(state: str) -> bool:
    return state.startswith(("postgresql://", "postgres://"))
