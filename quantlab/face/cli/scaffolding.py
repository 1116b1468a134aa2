"""`quantlab init`: a new fleet directory, or, with --systemd, the unit (and cron line) that run its loop."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from quantlab.app.controller import Controller, default_state_path
from quantlab.core.spec import FleetInvalid
from .common import StateOpt, fail, invalid, is_dsn, out


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
    from ..scaffold import FleetExists, create_fleet

    if systemd:
        _init_systemd(directory, state)
        return
    try:
        written = create_fleet(directory)
    except FleetExists as exc:
        raise fail(str(exc)) from None
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

    from ..scaffold import cron_line, systemd_unit

    root = directory.resolve()
    if state and not is_dsn(state):
        state = str(Path(state).resolve())      # the unit runs in another working directory
    state_file = Path(state) if state and not is_dsn(state) else default_state_path(root)
    try:
        loaded = Controller(root, state_file).load_fleet()
    except FleetInvalid as exc:
        raise invalid(exc) from None
    # The quantlab beside this Python (its venv), else the one on PATH, else this Python with -m.
    beside = Path(sys.executable).parent / "quantlab"
    program = str(beside) if beside.is_file() else shutil.which("quantlab") or f"{sys.executable} -m quantlab"
    deploy = state_file.parent / "deploy"
    try:
        deploy.mkdir(mode=0o700, parents=True, exist_ok=True)
        unit = deploy / "quantlab-reconcile.service"
        unit.write_text(systemd_unit(root, program, getpass.getuser(), state))
    except OSError as exc:
        raise fail(f"cannot write into {deploy}: {exc.strerror}") from None
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
