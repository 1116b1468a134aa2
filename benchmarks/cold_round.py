"""The round a restarted controller makes: N real sshd hosts (three workers each, no strategies), a
fresh controller probing them all (TCP, key exchange, authentication, its agent started), then a warm
round over the kept connections — with kept agents, against the same rounds with every call a call
of its own (QUANTLAB_AGENT_SERVE=0), in one run.

Each host listens on its own loopback address (127.0.0.2 ...), as N machines would. The agent is
shipped by a first, unmeasured controller, so the rounds measured are those of a restart, not of a
first deployment. Controller CPU is this process's; on this box the hosts' sshd and agents share its
cores, so the wall times include their work.

    .venv/bin/python benchmarks/cold_round.py [--hosts 250] [--repeat 2]
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from probe_fanout import WORKERS_PER_HOST, write_fleet  # noqa: E402
from tests.sshd_hosts import SshdCluster  # noqa: E402
from tests.support import kill_all, processes  # noqa: E402

from quantlab.app.controller import Controller  # noqa: E402


def rounds(fleet_dir: Path, n: int, serve: bool) -> dict:
    """A cold round of a fresh controller, then a warm one over what it kept."""
    os.environ["QUANTLAB_AGENT_SERVE"] = "1" if serve else "0"
    ctl = Controller(fleet_dir, fleet_dir / ".quantlab" / "state.json")
    try:
        fleet, memory = ctl.load_fleet(), ctl.store.load()
        out = {}
        for name in ("cold", "warm"):
            wall, cpu = time.perf_counter(), time.process_time()
            gathered = ctl.prober(fleet).round(fleet, memory, deadline_s=60.0)
            out[name], out[f"{name}_cpu"] = time.perf_counter() - wall, time.process_time() - cpu
            out[f"{name}_answered"] = sum(1 for s in gathered.observed.workers.values() if s.reachable)
        return out
    finally:
        ctl.close()


def measure(n: int, repeat: int, base: Path) -> dict:
    with SshdCluster(base / f"hosts-{n}", distinct_addresses=True) as cluster:
        cluster.start(n)
        fleet_dir = base / f"fleet-{n}"
        write_fleet(fleet_dir, cluster)
        (fleet_dir / "strategies.yaml").unlink()          # workers only: a probe round, nothing to place
        rounds(fleet_dir, n, serve=False)                 # ships the agent (not measured)
        runs: dict[str, list[dict]] = {"kept": [], "own": []}
        for _ in range(repeat):
            for name, serve in (("own", False), ("kept", True)):
                runs[name].append(rounds(fleet_dir, n, serve))
        markers = [str(cluster.shared_dir)]
        left = kill_all(markers)
        if left or processes(markers):
            sys.exit(f"processes left behind: {[p.argv for p in left]}")
    out = {"n": n}
    for name, results in runs.items():
        for key in results[0]:
            out[f"{name}_{key}"] = statistics.median(r[key] for r in results)
    return out


def table(rows: list[dict]) -> str:
    lines = ["| hosts (×3 workers) | cold round: kept agents / calls of their own | workers answered | "
             "controller CPU, cold: kept / own | warm round: kept / own | warm vs own | "
             "controller CPU per host, warm: kept / own |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        n = r["n"]
        lines.append(
            f"| {n} | {r['kept_cold']:.2f} / {r['own_cold']:.2f} s | {r['kept_cold_answered']:.0f} / "
            f"{r['own_cold_answered']:.0f} of {n * WORKERS_PER_HOST} | {r['kept_cold_cpu']:.2f} / "
            f"{r['own_cold_cpu']:.2f} s | {r['kept_warm']:.3f} / {r['own_warm']:.3f} s | "
            f"{r['own_warm'] / r['kept_warm']:.1f}× faster | {1000 * r['kept_warm_cpu'] / n:.2f} / "
            f"{1000 * r['own_warm_cpu'] / n:.2f} ms |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hosts", default="250")
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="ql-cold-round-"))
    try:
        rows = [measure(n, args.repeat, base) for n in map(int, args.hosts.split(","))]
        print(table(rows))
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
