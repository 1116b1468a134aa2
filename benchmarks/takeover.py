"""Takeover time: the leading reconcile daemon is killed (SIGKILL), and a standby on the same
PostgreSQL state leads and renews the strategies' leases. 20 runs, median and max, against
Kubernetes' leader-election defaults (lease 15 s, retry period 2 s: a standby acquires at most
lease + retry period after the leader's last renewal) and quantlab's documented bound (lease + two
watch intervals after the leader's last renewal of the row, which is at most the kill).

Two daemons as real processes (`quantlab reconcile --state postgresql://…`), the distribution's
PostgreSQL in a temporary folder, one `local` worker with one running strategy; the leadership
lease is Kubernetes' default, 15 s, the interval quantlab's default, 5 s. After each kill a new
standby is started, so that two daemons run again before the next one.

Measured from the kill: "leads" — the row names the standby; "renewed" — the strategy's lease file on
the worker shows a renewal granted after the kill (the new leader's first renewal round reached it).

    .venv/bin/python benchmarks/takeover.py [--runs 20]

It prints a table and writes it into benchmarks/README.md between the takeover markers.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import yaml  # noqa: E402

from benchmarks.readme_block import write_block  # noqa: E402
from tests.pg_server import PgServer  # noqa: E402
from tests.support import cli_env, kill_all, wait_for  # noqa: E402

LEASE_S = 15.0          # Kubernetes' LeaseDuration default
K8S_RETRY_S = 2.0       # Kubernetes' RetryPeriod default
WATCH_S = 1.0
INTERVAL_S = 5.0

STRATEGY = """
export function st_init(ctx) {}
export function st_heartbeat(ctx) {}
export function st_exit(ctx) {}
"""


def write_fleet(root: Path) -> None:
    (root / "strategies").mkdir(parents=True)
    (root / "strategies" / "calm.mjs").write_text(STRATEGY)
    docs = [{"apiVersion": "quantlab/v1", "kind": "Fleet",
             "reconcile": {"intervalSeconds": INTERVAL_S, "leaderLeaseSeconds": LEASE_S},
             "monitor": {"leaseTtlSeconds": 30}},
            {"apiVersion": "quantlab/v1", "kind": "Worker", "id": "w1", "host": "local",
             "capabilities": {"maxStrategies": 4, "supportedApis": ["paper"]}},
            {"apiVersion": "quantlab/v1", "kind": "Strategy", "id": "s1", "strategyFile": "strategies/calm.mjs",
             "requirements": {"api": "paper"}}]
    (root / "fleet.yaml").write_text(yaml.safe_dump_all(docs, explicit_start=True))


def holder(dsn: str) -> str | None:
    import psycopg
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            row = conn.execute("SELECT holder FROM quantlab_leader WHERE id = 1").fetchone()
    except psycopg.Error:
        return None
    return row[0] if row else None


def render(runs: int, took: list[float], renewed: list[float], bound: float, k8s: float) -> str:
    return "\n".join([
        f"| {runs} kills of the leader (lease {LEASE_S:g} s, interval {INTERVAL_S:g} s) | median | max | "
        f"max against quantlab's bound ({bound:g} s: lease + 2 watch intervals) | max against Kubernetes' "
        f"defaults ({k8s:g} s: lease + retry period) |",
        "| --- | --- | --- | --- | --- |",
        f"| a standby leads | {statistics.median(took):.1f} s | {max(took):.1f} s | {max(took) / bound:.2f}× | "
        f"{max(took) / k8s:.2f}× |",
        f"| its first renewal reached the worker | {statistics.median(renewed):.1f} s | {max(renewed):.1f} s | "
        f"{max(renewed) / bound:.2f}× | {max(renewed) / k8s:.2f}× |",
    ])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ql-takeover-") as tmp, PgServer(Path(tmp) / "pg") as server:
        root = Path(tmp) / "fleet"
        write_fleet(root)
        dsn = server.dsn
        logs = Path(tmp) / "logs"
        logs.mkdir()
        count = 0

        def spawn() -> subprocess.Popen:
            nonlocal count
            count += 1
            with open(logs / f"daemon-{count}.log", "wb") as out:
                return subprocess.Popen([sys.executable, "-m", "quantlab", "reconcile", "--fleet", str(root),
                                         "--state", dsn], stdout=out, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, env=cli_env(), start_new_session=True)

        def leads(proc: subprocess.Popen) -> bool:
            return f"pid {proc.pid} " in (holder(dsn) or "")

        lease = root / ".quantlab" / "workers" / "w1" / "instances" / "s1" / "lease.json"
        daemons = [spawn()]
        wait_for(lambda: leads(daemons[0]), 30, "the first daemon to lead")
        wait_for(lambda: lease.exists(), 60, "the strategy to start")
        daemons.append(spawn())
        took, renewed = [], []
        try:
            for run in range(args.runs):
                leader = next(d for d in daemons if leads(d))
                standby = next(d for d in daemons if d is not leader)
                log = logs / f"daemon-{count}.log"
                wait_for(lambda: "standing by:" in log.read_text(), 60, "the standby to stand by")
                time.sleep(INTERVAL_S * (run % 5) / 5)          # kill at different points of the round
                os.killpg(leader.pid, signal.SIGKILL)
                killed = time.monotonic()
                granted = json.loads(lease.read_text())["deadline"]
                wait_for(lambda: leads(standby), 60, "the standby to lead")
                took.append(time.monotonic() - killed)
                wait_for(lambda: json.loads(lease.read_text())["deadline"] > granted + 1, 30, "a renewal")
                renewed.append(time.monotonic() - killed)
                leader.wait(10)
                daemons = [standby, spawn()]
                print(f"run {run + 1}: leads after {took[-1]:.2f} s, renewed after {renewed[-1]:.2f} s", flush=True)
        finally:
            for d in daemons:
                try:
                    os.killpg(d.pid, signal.SIGKILL)
                except OSError:
                    pass
            kill_all([str(root) + os.sep])
    bound = LEASE_S + 2 * WATCH_S
    k8s = LEASE_S + K8S_RETRY_S
    table = render(args.runs, took, renewed, bound, k8s)
    print(table)
    write_block("takeover", "Takeover of the lead", table)


if __name__ == "__main__":
    main()
