"""The `quantlab` command: parse options, call the controller, render, map errors to exit codes.

common.py holds the typer app and what every command shares (options, consoles, errors to exit
codes); each group of commands is a module: applying (validate, plan, apply), queries (status,
explain, logs, events), holds (suspend, stop-all, retry, resume), daemons (reconcile, serve),
backend (the state and leader sub-commands) and scaffolding (init). The commands are registered
here, in the order `quantlab --help` lists them.
"""
from __future__ import annotations

import sys

from . import applying, backend, daemons, holds, queries, scaffolding
from ...edges.transport.base import raise_open_file_limit
from .common import app, err

__all__ = ["app", "main"]

app.command()(applying.validate)
app.command()(applying.plan)
app.command()(applying.apply)
app.command()(queries.status)
app.command()(daemons.reconcile)
app.command()(daemons.serve)
app.command()(queries.explain)
app.command()(holds.suspend)
app.command("stop-all")(holds.stop_all)
app.command()(holds.retry)
app.command()(holds.resume)
app.command()(queries.logs)
app.command()(queries.events)
app.command()(scaffolding.init)
app.add_typer(backend.state_app, name="state")
app.add_typer(backend.leader_app, name="leader")


def main() -> None:
    raise_open_file_limit()
    try:
        app()
    except KeyboardInterrupt:
        err.print("Interrupted.")
        sys.exit(130)
