"""`quantlab init DIR`: a new fleet directory with one example of each kind, ready to validate."""
from __future__ import annotations

import re
from pathlib import Path

from quantlab.core.spec.schemas import SCHEMA_FILES, schema_folder


class FleetExists(Exception):
    """The folder cannot become a new fleet (not empty, not a folder, not writable); the message says why."""


FLEET = """\
# yaml-language-server: $schema=schemas/fleet.schema.json
apiVersion: quantlab/v1
kind: Fleet
name: NAME# the state records it and refuses to act for a fleet of another name
policy: load-based              # or round-robin
# Leases are renewed every interval; a lost host's strategies start elsewhere about 55 s after it
# went silent (see "The lease rule" in the README before changing these).
reconcile: {intervalSeconds: 5}
monitor: {workerOfflineAfterSeconds: 15, leaseTtlSeconds: 25, autoRecover: true}
"""

WORKERS = """\
# yaml-language-server: $schema=schemas/worker.schema.json
# `host: local` runs on this machine; put an SSH host (or ssh_config alias) there to use another one.
apiVersion: quantlab/v1
kind: Worker
id: worker-001
host: local
capabilities: {maxStrategies: 4, supportedApis: [bybit, binance]}
metadata: {region: JP}
"""

STRATEGIES = """\
# yaml-language-server: $schema=schemas/strategy.schema.json
apiVersion: quantlab/v1
kind: Strategy
id: example-grid
name: Example grid (paper)
strategyFile: strategies/example.js
params: {symbol: BTCUSDT, account: demo@bybit-sub1, step: 0.005}
heartbeatMs: 10000
requirements: {api: bybit, account: demo@bybit-sub1, region: JP}
scheduling: {maxRestarts: 5, restartDelay: 10000, stopTimeoutSeconds: 30}
"""

EXAMPLE_JS = """\
// A paper strategy: st_init once, st_heartbeat every heartbeatMs, st_exit on stop.
// ctx.state is saved after every heartbeat and restored on the next start.
export function st_init(ctx) {
  ctx.state.price ??= 100;
  ctx.state.beats ??= 0;
  ctx.log(`init ${ctx.params.symbol} on ${ctx.workerId} (epoch ${ctx.epoch})`);
}

export function st_heartbeat(ctx) {
  ctx.state.beats += 1;
  ctx.state.price *= 1 + (Math.random() - 0.5) * ctx.params.step;
  ctx.log(`beat ${ctx.state.beats}: ${ctx.params.symbol} ${ctx.state.price.toFixed(2)}`);
}

export function st_exit(ctx) {
  ctx.log(`exit after ${ctx.state.beats} beats`);
}
"""

GITIGNORE = """\
# quantlab's local state (never commit it)
.quantlab/
"""


def create_fleet(directory: Path) -> list[Path]:
    directory = Path(directory)
    try:
        return _write_fleet(directory)
    except OSError as exc:
        what = exc.strerror or str(exc)
        where = exc.filename or directory
        raise FleetExists(f"cannot create the fleet in {directory}: {where}: {what}; choose a folder you can "
                          "write to") from None


def fleet_name_for(directory: Path) -> str:
    """A Fleet name (the id pattern) from the folder's name: `prod-jp/` is named prod-jp, and
    `trading/fleet/` trading-fleet (a name every default fleet had would tell none apart)."""
    folder = directory.resolve()
    words = re.findall(r"[a-z0-9]+", folder.name.lower())
    if words == ["fleet"]:                 # `quantlab init fleet`: named after where it lives, trading/fleet
        words = re.findall(r"[a-z0-9]+", folder.parent.name.lower()) + words
    return "-".join(words)[:63].strip("-") or "fleet"


def _write_fleet(directory: Path) -> list[Path]:
    if directory.is_dir() and any(directory.iterdir()):
        raise FleetExists(f"{directory} already exists and is not empty; choose a new folder")
    if directory.exists() and not directory.is_dir():
        raise FleetExists(f"{directory} exists and is not a folder; choose a new folder")
    name = fleet_name_for(directory)
    files = {
        "fleet.yaml": FLEET.replace("NAME", name.ljust(31 - len("name: ")) + " "), "workers.yaml": WORKERS,
        "strategies.yaml": STRATEGIES,
        "strategies/example.js": EXAMPLE_JS, ".gitignore": GITIGNORE,
    }
    # Copies of the schemas, so editors validate as you type ($schema modelines point at them).
    source = schema_folder()
    for name in SCHEMA_FILES:
        files[f"schemas/{name}"] = source.joinpath(name).read_text(encoding="utf-8")
    written = []
    for rel, text in files.items():
        path = directory / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


# --- running the loop: a systemd unit, or a cron line ----------------------------------------------

def systemd_unit(fleet_dir: Path, quantlab: str, user: str, state: str | None) -> str:
    """A unit for `quantlab reconcile`. KillMode=process: stopping or restarting the loop signals the
    loop alone, never the `local` workers' supervisors it started (they live in its cgroup and must
    outlive it: a restart of the loop never restarts a strategy)."""
    state_env = f"Environment=QUANTLAB_STATE={state}\n" if state else ""
    return f"""\
[Unit]
Description=quantlab reconcile loop for {fleet_dir}
Wants=network-online.target
After=network-online.target

[Service]
Type=simple
User={user}
WorkingDirectory={fleet_dir}
Environment=QUANTLAB_FLEET={fleet_dir}
{state_env}ExecStart={quantlab} reconcile --fleet {fleet_dir}
Restart=always
RestartSec=2
# Only the loop is signalled on stop or restart: the supervisors of `local` workers keep running.
KillMode=process
# SIGTERM lets the running rounds finish (and a leader hand over) before the loop exits.
TimeoutStopSec=60

[Install]
WantedBy=multi-user.target
"""


def cron_line(fleet_dir: Path, quantlab: str, period_s: float, state: str | None = None) -> str:
    """`reconcile --once` every period (whole minutes: cron's granularity), logging beside the state."""
    minutes = max(1, int(period_s // 60))
    when = "*" if minutes == 1 else f"*/{minutes}"
    state_opt = f" --state {state}" if state else ""
    log = Path(state).parent if state and not state.startswith(("postgresql://", "postgres://")) else \
        fleet_dir / ".quantlab"
    return (f"{when} * * * * cd {fleet_dir} && {quantlab} reconcile --once --fleet {fleet_dir}{state_opt} "
            f">> {log}/cron.log 2>&1\n")
