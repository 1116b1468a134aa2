"""Apply at scale: `quantlab apply --yes` starting three strategies on each of N real sshd hosts.

For each N (default 30, 60) this starts N OpenSSH daemons on loopback with the test fixture, puts
three workers on each (one strategy each; a shell stub runner that honours the heartbeat file stands
in for node, to fit 2 cores) and runs, from a fresh state each time:

- quantlab: `quantlab apply --yes`, the agent kept running on each host lane (`agent.pyz serve`);
- baseline: the same apply with every agent call a call of its own (QUANTLAB_AGENT_SERVE=0), an
  interpreter started on the host for each — what quantlab did before it kept agents.

It reports the wall time of each apply, starts per second, the controller's CPU (the apply process
and what it reaped) and the whole machine's CPU over the apply (the controller, every sshd and agent,
the supervisors and stub runners: on this box the hosts share the cores with the controller). Every
instance is stopped between runs; the run fails if a process it started is left.

    .venv/bin/python benchmarks/apply_scale.py [--hosts 30,60] [--repeat 1]

It writes its table into benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from probe_fanout import write_fleet  # noqa: E402
from readme_block import write_block  # noqa: E402
from tests.sshd_hosts import SshdCluster  # noqa: E402
from tests.support import kill_all, processes  # noqa: E402

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def machine_cpu() -> float:
    """CPU seconds the whole machine has used (user, nice, system, irq, softirq)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]
    user, nice, system, _idle, _iowait, irq, softirq = map(int, fields)
    return (user + nice + system + irq + softirq) / CLOCK_TICKS


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def quantlab(fleet_dir: Path, *args: str, serve: bool) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), QUANTLAB_AGENT_SERVE="1" if serve else "0")
    return subprocess.run([sys.executable, "-m", "quantlab", *args, "--fleet", str(fleet_dir)],
                          capture_output=True, text=True, env=env, timeout=1800)


def one_apply(fleet_dir: Path, markers: list[str], serve: bool) -> dict:
    state = fleet_dir / ".quantlab"
    shutil.rmtree(state, ignore_errors=True)
    used, reaped, began = machine_cpu(), children_cpu(), time.perf_counter()
    done = quantlab(fleet_dir, "apply", "--yes", serve=serve)
    wall = time.perf_counter() - began
    controller, machine = children_cpu() - reaped, machine_cpu() - used
    if done.returncode != 0 or "0 failed" not in done.stdout:
        sys.exit(f"apply failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    starts = done.stdout.count("✓ start")
    stopped = quantlab(fleet_dir, "stop-all", "--yes", serve=True)
    if stopped.returncode != 0:
        sys.exit(f"stop-all failed:\n{stopped.stdout[-2000:]}\n{stopped.stderr[-2000:]}")
    kill_all(markers)                     # the supervisors stop-all ended, and their instance folders
    return {"wall": wall, "starts": starts, "controller_cpu": controller, "machine_cpu": machine}


def measure(n: int, repeat: int, base: Path) -> dict:
    with SshdCluster(base / f"hosts-{n}") as cluster:
        cluster.start(n)
        fleet_dir = base / f"fleet-{n}"
        write_fleet(fleet_dir, cluster)
        markers = [str(cluster.shared_dir)]
        runs: dict[str, list[dict]] = {"kept": [], "own": []}
        for _ in range(repeat):
            for name, serve in (("own", False), ("kept", True)):
                for h in cluster.hosts:        # every host as new: no agent, runner or strategy file
                    for workdir in list(h.workdir_root.iterdir()):
                        shutil.rmtree(workdir, ignore_errors=True)
                runs[name].append(one_apply(fleet_dir, markers, serve))
        left = kill_all(markers)
        if left or processes(markers):
            sys.exit(f"processes left behind: {[p.argv for p in left]}")
    out = {"n": n}
    for name, results in runs.items():
        for key in ("wall", "controller_cpu", "machine_cpu"):
            out[f"{name}_{key}"] = statistics.median(r[key] for r in results)
        out[f"{name}_starts"] = results[0]["starts"]
    return out


def table(rows: list[dict]) -> str:
    lines = ["| hosts (×3 workers) | starts | quantlab apply (kept agents) | baseline: calls of their own | "
             "speed-up | starts/s | controller CPU: kept / own | machine CPU per start: kept / own |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        starts = r["kept_starts"]
        lines.append(
            f"| {r['n']} | {starts} | {r['kept_wall']:.1f} s | {r['own_wall']:.1f} s | "
            f"{r['own_wall'] / r['kept_wall']:.2f}× | {starts / r['kept_wall']:.1f} | "
            f"{r['kept_controller_cpu']:.1f} / {r['own_controller_cpu']:.1f} s | "
            f"{1000 * r['kept_machine_cpu'] / starts:.0f} / {1000 * r['own_machine_cpu'] / starts:.0f} ms |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hosts", default="30,60")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--no-readme", action="store_true")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="ql-apply-scale-"))
    try:
        rows = []
        for n in map(int, args.hosts.split(",")):
            rows.append(measure(n, args.repeat, base))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
        text = table(rows)
        print(text)
        if not args.no_readme:
            write_block("apply_scale", "Apply at scale", text)
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
