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

Under CPU starvation, with the strategies' lease at the lease rule's minimum: does the new leader's
first renewal still reach every strategy before its lease ends? `--starve N` keeps N busy processes
on the 2 cores for the whole run, `--strategies K` runs K strategies, `--lease S` sets their lease
(the rule's minimum with these settings is printed), and each run counts the `lease-expired` events
after the kill (a strategy that ran out of lease and was started again). Written between the
takeover-starved markers:

    .venv/bin/python benchmarks/takeover.py --runs 5 --strategies 5 --starve 7 --lease 24.3
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


def write_fleet(root: Path, strategies: int = 1, lease: float = 30.0) -> None:
    (root / "strategies").mkdir(parents=True)
    (root / "strategies" / "calm.mjs").write_text(STRATEGY)
    docs = [{"apiVersion": "quantlab/v1", "kind": "Fleet",
             "reconcile": {"intervalSeconds": INTERVAL_S, "leaderLeaseSeconds": LEASE_S},
             "monitor": {"leaseTtlSeconds": lease}},
            {"apiVersion": "quantlab/v1", "kind": "Worker", "id": "w1", "host": "local",
             "capabilities": {"maxStrategies": max(4, strategies), "supportedApis": ["paper"]}}]
    docs += [{"apiVersion": "quantlab/v1", "kind": "Strategy", "id": f"s{i + 1}", "strategyFile": "strategies/calm.mjs",
              "requirements": {"api": "paper"}} for i in range(strategies)]
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
    parser.add_argument("--strategies", type=int, default=1)
    parser.add_argument("--starve", type=int, default=0, help="busy processes for the whole run")
    parser.add_argument("--lease", type=float, default=30.0, help="the strategies' leaseTtlSeconds")
    args = parser.parse_args()
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True)
               for _ in range(args.starve)]
    try:
        run_all(args)
    finally:
        for b in burners:
            b.kill()
            b.wait()


def expired_after(root: Path, dsn: str, since_ms: int) -> int:
    done = subprocess.run([sys.executable, "-m", "quantlab", "events", "--fleet", str(root), "--state", dsn,
                           "--output", "json"], capture_output=True, text=True, timeout=120, env=cli_env())
    return sum(1 for e in json.loads(done.stdout or "[]") if e.get("event") == "lease-expired" and e["t"] >= since_ms)


def run_all(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="ql-takeover-") as tmp, PgServer(Path(tmp) / "pg") as server:
        root = Path(tmp) / "fleet"
        write_fleet(root, args.strategies, args.lease)
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
        took, renewed, expired = [], [], []
        try:
            for run in range(args.runs):
                leader = next(d for d in daemons if leads(d))
                standby = next(d for d in daemons if d is not leader)
                log = logs / f"daemon-{count}.log"
                wait_for(lambda: "standing by:" in log.read_text(), 60, "the standby to stand by")
                time.sleep(INTERVAL_S * (run % 5) / 5)          # kill at different points of the round
                os.killpg(leader.pid, signal.SIGKILL)
                killed, killed_ms = time.monotonic(), int(time.time() * 1000)
                granted = json.loads(lease.read_text())["deadline"]
                wait_for(lambda: leads(standby), 60, "the standby to lead")
                took.append(time.monotonic() - killed)
                wait_for(lambda: json.loads(lease.read_text())["deadline"] > granted + 1, 30, "a renewal")
                renewed.append(time.monotonic() - killed)
                leader.wait(10)
                if args.strategies > 1 or args.starve:
                    time.sleep(args.lease)                   # any lease that ran out has been said by now
                    expired.append(expired_after(root, dsn, killed_ms))
                daemons = [standby, spawn()]
                print(f"run {run + 1}: leads after {took[-1]:.2f} s, renewed after {renewed[-1]:.2f} s"
                      + (f", {expired[-1]} of {args.strategies} ran out of lease" if expired else ""), flush=True)
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
    if expired:
        table += (f"\n\nWith {args.strategies} strategies, lease {args.lease:g} s"
                  + (f", {args.starve} busy processes on 2 cores" if args.starve else "")
                  + f": {sum(expired)} of {args.strategies * args.runs} leases ran out before the new leader renewed "
                  f"them (per run: {', '.join(map(str, expired))}).")
    print(table)
    if expired:
        write_block("takeover-starved" if args.starve else "takeover-many", "Takeover under load", table)
    else:
        write_block("takeover", "Takeover of the lead", table)


if __name__ == "__main__":
    main()
