"""A host's footprint per strategy: quantlab's keeper and supervisor against pm2, on the same files.

N copies (default 5) of the example fleet's trend.mjs run with node and the reference runner
(runner.mjs), in two ways, one after the other in the same run:

- quantlab: `quantlab apply --yes` on a fleet of one `host: local` worker (each strategy gets a
  keeper and a supervisor, Python, and its runner);
- pm2: `pm2 start` of the same runner with the same environment for each strategy (pm2's daemon,
  node, and the runners), from a pm2 that npm installs into benchmarks/.pm2 on first use (the npm
  registry is needed once), with PM2_HOME in a temporary folder.

After the strategies settle, it reads each process's RSS and PSS (/proc/PID/smaps_rollup) and the
CPU each group uses over a window: the runners, and what runs beside them (quantlab's keepers and
supervisors; pm2's daemon). It reports the overhead per strategy beyond the runner and the totals,
as ratios against pm2. Nothing is left running: the run fails if a process it started is left.

    .venv/bin/python benchmarks/footprint.py [--strategies 5] [--window 30]

It writes its table into benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from readme_block import write_block  # noqa: E402
from tests.support import kill_all, processes, wait_for  # noqa: E402

PM2_DIR = REPO / "benchmarks" / ".pm2"
PM2_VERSION = "5.4.3"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
STRATEGY = REPO / "fleet" / "strategies" / "trend.mjs"
RUNNER = REPO / "quantlab" / "host" / "runner.mjs"
HEARTBEAT_MS = 5000


def pm2_binary() -> Path:
    binary = PM2_DIR / "node_modules" / ".bin" / "pm2"
    if not binary.exists():
        PM2_DIR.mkdir(parents=True, exist_ok=True)
        subprocess.run(["npm", "install", "--prefix", str(PM2_DIR), "--no-audit", "--no-fund",
                        f"pm2@{PM2_VERSION}"], check=True, timeout=600)
    return binary


def memory_kb(pid: int) -> tuple[int, int]:
    """(RSS, PSS) in KB, or (0, 0) for a process gone meanwhile."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0, 0
    fields = {line.split(":")[0]: int(line.split()[1]) for line in text.splitlines()[1:] if line.endswith("kB")}
    return fields.get("Rss", 0), fields.get("Pss", 0)


def cpu_s(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def measure(groups: dict[str, list[int]], window: float) -> dict[str, dict[str, float]]:
    """Memory now and CPU over `window` seconds of each group of processes."""
    before = {name: sum(cpu_s(p) for p in pids) for name, pids in groups.items()}
    time.sleep(window)
    out = {}
    for name, pids in groups.items():
        rss, pss = zip(*(memory_kb(p) for p in pids)) if pids else ((0,), (0,))
        out[name] = {"count": len(pids), "rss_mb": sum(rss) / 1024, "pss_mb": sum(pss) / 1024,
                     "cpu_ms_s": 1000 * (sum(cpu_s(p) for p in pids) - before[name]) / window}
    return out


def quantlab_run(base: Path, n: int, window: float, settle: float) -> dict:
    fleet = base / "quantlab-fleet"
    (fleet / "strategies").mkdir(parents=True)
    shutil.copy(STRATEGY, fleet / "strategies" / STRATEGY.name)
    (fleet / "fleet.yaml").write_text("apiVersion: quantlab/v1\nkind: Fleet\nmonitor: {leaseTtlSeconds: 0}\n")
    (fleet / "workers.yaml").write_text(
        "apiVersion: quantlab/v1\nkind: Worker\nid: w1\nhost: local\n"
        f"capabilities: {{maxStrategies: {n}, supportedApis: [paper]}}\n")
    (fleet / "strategies.yaml").write_text("---\n".join(
        f"apiVersion: quantlab/v1\nkind: Strategy\nid: s{k}\nstrategyFile: strategies/{STRATEGY.name}\n"
        f"params: {{symbol: SYM{k}}}\nheartbeatMs: {HEARTBEAT_MS}\nrequirements: {{api: paper}}\n"
        for k in range(n)))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-m", "quantlab", "apply", "--yes", "--fleet", str(fleet)],
                          capture_output=True, text=True, env=env, timeout=300)
    if done.returncode != 0:
        sys.exit(f"quantlab apply failed:\n{done.stdout}\n{done.stderr}")
    marker = str(fleet)
    wait_for(lambda: len([p for p in processes([marker]) if "runner" in p.cmdline and "node" in p.cmdline]) == n,
             60, "every runner started")
    time.sleep(settle)
    procs = processes([marker])
    groups = {"runners": [p.pid for p in procs if "node" in p.argv[0]],
              "overhead": [p.pid for p in procs if "supervise" in p.argv]}
    result = measure(groups, window)
    subprocess.run([sys.executable, "-m", "quantlab", "stop-all", "--yes", "--fleet", str(fleet)],
                   capture_output=True, text=True, env=env, timeout=300)
    kill_all([marker])
    return result


def pm2_run(base: Path, n: int, window: float, settle: float) -> dict:
    pm2 = pm2_binary()
    home = base / "pm2-home"
    work = base / "pm2-work"
    env = dict(os.environ, PM2_HOME=str(home))
    apps = []
    for k in range(n):
        idir = work / f"s{k}"
        (idir / "state").mkdir(parents=True)
        apps.append({
            # node itself, started by pm2 (no wrapper in the runner's process): the same runner process
            # as quantlab's, so that what differs is only what runs beside it.
            "name": f"s{k}", "script": shutil.which("node"), "args": [str(RUNNER)], "interpreter": "none",
            "cwd": str(idir),
            "autorestart": True, "env": {
                "QUANTLAB_STRATEGY_ID": f"s{k}", "QUANTLAB_STRATEGY_FILE": str(STRATEGY),
                "QUANTLAB_PARAMS": json.dumps({"symbol": f"SYM{k}"}), "QUANTLAB_HEARTBEAT_MS": str(HEARTBEAT_MS),
                "QUANTLAB_STATE_DIR": str(idir / "state"), "QUANTLAB_HEARTBEAT_FILE": str(idir / "heartbeat.json"),
                "QUANTLAB_WORKER_ID": "w1", "QUANTLAB_EPOCH": "1"}})
    ecosystem = base / "ecosystem.json"
    ecosystem.write_text(json.dumps({"apps": apps}))
    try:
        subprocess.run([str(pm2), "start", str(ecosystem)], env=env, check=True, capture_output=True, timeout=120)
        wait_for(lambda: all((work / f"s{k}" / "heartbeat.json").exists() for k in range(n)), 60,
                 "every pm2 strategy beating")
        time.sleep(settle)
        procs = processes([str(home), str(RUNNER)])
        groups = {"runners": [p.pid for p in procs if str(RUNNER) in p.cmdline],
                  "overhead": [p.pid for p in procs if "PM2" in p.cmdline and str(RUNNER) not in p.cmdline]}
        return measure(groups, window)
    finally:
        subprocess.run([str(pm2), "kill"], env=env, capture_output=True, timeout=60)
        kill_all([str(home), str(work)])


def table(n: int, q: dict, p: dict) -> str:
    qo, po, qr, pr = q["overhead"], p["overhead"], q["runners"], p["runners"]
    return "\n".join([
        f"| {n} strategies | quantlab | pm2 | ratio |",
        "| --- | --- | --- | --- |",
        f"| processes beside the runners | {qo['count']} (a keeper and a supervisor each) | {po['count']} (its daemon) | |",
        f"| their RSS per strategy | {qo['rss_mb'] / n:.1f} MB | {po['rss_mb'] / n:.1f} MB | "
        f"{qo['rss_mb'] / po['rss_mb']:.2f}× |",
        f"| their PSS per strategy | {qo['pss_mb'] / n:.1f} MB | {po['pss_mb'] / n:.1f} MB | "
        f"{qo['pss_mb'] / po['pss_mb']:.2f}× |",
        f"| total RSS, runners included | {qo['rss_mb'] + qr['rss_mb']:.1f} MB | {po['rss_mb'] + pr['rss_mb']:.1f} MB | "
        f"{(qo['rss_mb'] + qr['rss_mb']) / (po['rss_mb'] + pr['rss_mb']):.2f}× |",
        f"| the runners' RSS (same in both) | {qr['rss_mb']:.1f} MB | {pr['rss_mb']:.1f} MB | |",
        f"| CPU beside the runners | {qo['cpu_ms_s']:.2f} ms/s | {po['cpu_ms_s']:.2f} ms/s | "
        f"{qo['cpu_ms_s'] / po['cpu_ms_s']:.2f}× |" if po["cpu_ms_s"] else
        f"| CPU beside the runners | {qo['cpu_ms_s']:.2f} ms/s | {po['cpu_ms_s']:.2f} ms/s | |",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--strategies", type=int, default=5)
    parser.add_argument("--window", type=float, default=30.0)
    parser.add_argument("--settle", type=float, default=10.0)
    parser.add_argument("--no-readme", action="store_true")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="ql-footprint-"))
    try:
        q = quantlab_run(base, args.strategies, args.window, args.settle)
        p = pm2_run(base, args.strategies, args.window, args.settle)
        left = processes([str(base)])
        if left:
            sys.exit(f"processes left behind: {[x.argv for x in left]}")
        text = table(args.strategies, q, p)
        print(text)
        if not args.no_readme:
            write_block("footprint", "Host footprint per strategy", text)
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
