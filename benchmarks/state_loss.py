"""How much of a strategy's state a move loses: 20 failovers (host frozen) and 20 drains.

Three real sshd hosts on loopback, one worker each, and one strategy that counts its beats in
`ctx.state` (saved by the reference runner after every beat) and, in `st_init`, records the count
it was restored with. The real reconcile daemon (APScheduler, in this process) keeps it running.
Each failover freezes the sshd of the host the strategy runs on — its supervisor and runner go on
beating in the dark until their lease runs out, as on a host whose network is cut — and waits
until the strategy heartbeats elsewhere; each drain sets `drain: true` on its worker and waits for
the move. Each failover moves a strategy of its own (a strategy that just failed over waits out
the reschedule backoff before the next), replacing the previous one. Beats lost = the old copy's last
count (read from its host's folder once it stopped)
minus the count the new copy was restored with.

Expected, from the README: a drain loses nothing (the final checkpoint is taken after the old copy
stopped); a failover loses what the old copy did between the host's last answered round and its
fencing: up to the lease (plus one round) of beats.

    .venv/bin/python benchmarks/state_loss.py [--failovers 20] [--drains 20]

It prints a table and writes it into benchmarks/README.md between the state_loss markers.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from quantlab.app.controller import Controller  # noqa: E402
from quantlab.app.loop import ReconcileLoop  # noqa: E402
from tests.sshd_hosts import SshdCluster  # noqa: E402
from benchmarks.readme_block import write_block  # noqa: E402
from tests.support import kill_all  # noqa: E402

INTERVAL, LEASE, OFFLINE, HEARTBEAT_MS = 2, 8, 4, 250
COUNTER_JS = r"""
import fs from 'node:fs';
import path from 'node:path';
export async function st_init(ctx) {
  fs.writeFileSync(path.join(process.env.QUANTLAB_STATE_DIR, `restored-${ctx.epoch}.json`),
                   JSON.stringify({ beats: ctx.state.beats ?? 0 }));
}
export async function st_heartbeat(ctx) { ctx.state.beats = (ctx.state.beats ?? 0) + 1; }
export async function st_exit(ctx) {}
"""


def write_fleet(root: Path, cluster: SshdCluster, sid: str, drain: str | None = None) -> dict[str, Path]:
    (root / "strategies").mkdir(parents=True, exist_ok=True)
    (root / "strategies" / "counter.mjs").write_text(COUNTER_JS)
    (root / "fleet.yaml").write_text(
        "apiVersion: quantlab/v1\nkind: Fleet\n"
        f"reconcile: {{intervalSeconds: {INTERVAL}, probeDeadlineSeconds: 1}}\n"
        f"monitor: {{leaseTtlSeconds: {LEASE}, workerOfflineAfterSeconds: {OFFLINE}, controllerRestartSeconds: 1}}\n"
        f"ssh: {{config: {cluster.ssh_config_path}, knownHosts: {cluster.known_hosts_path}, "
        "connectTimeoutSeconds: 2, commandTimeoutSeconds: 20}\n")
    workers, workdirs = [], {}
    for h in cluster.hosts:
        wid = f"w-{h.name}"
        workdirs[wid] = Path(h.workdir_root) / "loss" / wid
        workers.append(f"apiVersion: quantlab/v1\nkind: Worker\nid: {wid}\nhost: {h.name}\nworkdir: {workdirs[wid]}\n"
                       f"drain: {'true' if wid == drain else 'false'}\n"
                       "capabilities: {maxStrategies: 2, supportedApis: [paper]}\n")
    (root / "workers.yaml").write_text("---\n".join(workers))
    (root / "strategies.yaml").write_text(
        f"apiVersion: quantlab/v1\nkind: Strategy\nid: {sid}\nstrategyFile: strategies/counter.mjs\n"
        f"heartbeatMs: {HEARTBEAT_MS}\nrequirements: {{api: paper}}\n"
        "scheduling: {stopTimeoutSeconds: 2, initTimeoutSeconds: 10, restartDelay: 200}\n")
    return workdirs


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def placement(fleet_dir: Path, sid: str) -> tuple[str, int] | None:
    p = ((read_json(fleet_dir / ".quantlab" / "state.json") or {}).get("placements") or {}).get(sid)
    return (p["worker"], p["epoch"]) if p else None


def wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise RuntimeError(f"timed out after {timeout:g}s waiting for {what}")


def one_move(fleet_dir: Path, workdirs: dict[str, Path], cluster: SshdCluster, how: str, sid: str) -> int:
    """Move strategy `sid` once (`failover` or `drain`); the beats the move lost."""
    write_fleet(fleet_dir, cluster, sid)
    wid, epoch = wait(lambda: placement(fleet_dir, sid), 60, "a placement")
    old = workdirs[wid] / "instances" / sid
    wait(lambda: ((read_json(old / "state" / "state.json") or {}).get("beats") or 0) >= 8, 30, "a few beats")
    host = next(h for h in cluster.hosts if f"w-{h.name}" == wid)
    if how == "failover":
        host.freeze()
    else:
        write_fleet(fleet_dir, cluster, sid, drain=wid)
    try:
        new_wid, new_epoch = wait(lambda: (p := placement(fleet_dir, sid)) and p[0] != wid and p, 120, "the move")
        restored = wait(lambda: read_json(workdirs[new_wid] / "instances" / sid / "state" /
                                          f"restored-{new_epoch}.json"), 60, "the new copy's st_init")
        # The old copy is over once its supervisor recorded a stop (fenced, or stopped by the drain).
        wait(lambda: (read_json(old / "status.json") or {}).get("state") in ("stopped", "error"), 60,
             "the old copy to stop")
        last = (read_json(old / "state" / "state.json") or {}).get("beats", 0)
    finally:
        if how == "failover":
            host.thaw()
        else:
            write_fleet(fleet_dir, cluster, sid)
    return max(0, last - restored["beats"])


def run(failovers: int, drains: int) -> dict[str, list[int]]:
    lost: dict[str, list[int]] = {"failover": [], "drain": []}
    with tempfile.TemporaryDirectory(prefix="quantlab-loss-") as tmp, SshdCluster(Path(tmp) / "hosts") as cluster:
        cluster.start(3)
        fleet_dir = Path(tmp) / "fleet"
        workdirs = write_fleet(fleet_dir, cluster, "counter")
        ctl = Controller(fleet_dir, fleet_dir / ".quantlab" / "state.json", log=lambda line: None)
        loop = ReconcileLoop(ctl, log=lambda line: None)
        stop = threading.Event()
        daemon = threading.Thread(target=loop.run_forever, args=(INTERVAL, stop), daemon=True)
        daemon.start()
        try:
            for how, count in (("drain", drains), ("failover", failovers)):
                for i in range(count):
                    # A strategy that failed over waits out the reschedule backoff before its next
                    # failover (30 s, doubling): each failover moves a strategy of its own.
                    sid = "counter" if how == "drain" else f"counter-{i + 1}"
                    lost[how].append(one_move(fleet_dir, workdirs, cluster, how, sid))
                    print(f"{how} {i + 1}: lost {lost[how][-1]} beats", flush=True)
        finally:
            stop.set()
            daemon.join(60)
            kill_all([str(w) + "/" for w in workdirs.values()])
    return lost


def report(lost: dict[str, list[int]]) -> None:
    per_beat = HEARTBEAT_MS / 1000
    lines = ["| move | count | beats lost, median / max | as time, median / max | "
             f"max against the round interval ({INTERVAL} s) |",
             "| --- | --- | --- | --- | --- |"]
    for how, values in lost.items():
        if not values:
            continue
        med, top = statistics.median(values), max(values)
        lines.append(f"| {how} | {len(values)} | {med:g} / {top} | {med * per_beat:.2f} s / {top * per_beat:.2f} s "
                     f"| {top * per_beat / INTERVAL:.2f}× |")
    lines.append("")
    lines.append(f"Settings: interval {INTERVAL} s, lease {LEASE} s, offline after {OFFLINE} s, heartbeat "
                 f"{HEARTBEAT_MS} ms. A failover's loss is bounded by the lease plus one round "
                 f"({(LEASE + INTERVAL) / per_beat:.0f} beats here): what the copy on the frozen host did after its "
                 "last answered round.")
    text = "\n".join(lines)
    print(text)
    write_block("state_loss", "State lost by a move", text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--failovers", type=int, default=20)
    parser.add_argument("--drains", type=int, default=20)
    args = parser.parse_args()
    report(run(args.failovers, args.drains))


if __name__ == "__main__":
    main()
