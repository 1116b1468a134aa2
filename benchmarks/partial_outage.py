"""Renewals and failover while part of the fleet's hosts freeze.

For N real sshd hosts on loopback (default 30 and 60), one worker and one strategy each, the real
reconcile daemon (APScheduler, in this process) runs with the default settings; then a share of the
hosts freezes — every sshd process of them, kept connections included (their supervisors and runners
go on, as on a host whose sshd hangs) — and this measures:

- the renewal round time (median and largest) while they are frozen;
- the largest gap between two renewals of any strategy on a healthy host (from the grants the
  agent writes to each instance's lease.json; target: at most the interval + 1 s, at every share);
- how long after the freeze the frozen hosts' strategies heartbeat on another host (target: within
  the documented bound, which with the default settings is under 60 s). With 75 % frozen the brake
  must hold every failover instead, while the healthy quarter keeps being renewed.

The baseline, measured in the same run: the same failover with the previous release's defaults
(interval 30 s, lease 180 s, offline after 90 s) on 30 hosts with one frozen. A shell stub stands in
for node as the runner (it honours the heartbeat file, every 20 s), so that 60 instances fit on 2
cores: every "host" here shares those 2 cores, so a round's probes start together but their agents
get the CPU one after another, which spreads the renewals of one round over up to a second or two.

    .venv/bin/python benchmarks/partial_outage.py [--hosts 30,60] [--shares 0,1,10,40,75] [--no-baseline]

It prints a table and writes it into benchmarks/README.md between the partial_outage markers.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from quantlab.app.controller import Controller  # noqa: E402
from quantlab.app.loop import ReconcileLoop  # noqa: E402
from tests.sshd_hosts import SshdCluster  # noqa: E402
from benchmarks.readme_block import write_block  # noqa: E402
from tests.support import kill_all, processes  # noqa: E402

STUB_RUNNER = (
    "trap 'exit 0' TERM; while :; do "
    "printf '{\"t\":%s000,\"beats\":1,\"errorCount\":0,\"lastError\":null,\"paused\":false}' \"$(date +%s)\" "
    "> \"$QUANTLAB_HEARTBEAT_FILE.tmp\" && mv \"$QUANTLAB_HEARTBEAT_FILE.tmp\" \"$QUANTLAB_HEARTBEAT_FILE\"; "
    "sleep 20 & wait $!; done"
)
NEW = {"interval": 5, "lease": 25, "offline": 15, "restart": 10}
OLD = {"interval": 30, "lease": 180, "offline": 90, "restart": 10}
STOP_S = 10                     # the strategies' stopTimeoutSeconds


@dataclass
class Case:
    hosts: int
    share: int                  # percent frozen
    settings: dict
    round_times: list[float] = field(default_factory=list)
    largest_gap: float = 0.0
    failover: float | None = None
    held: bool | None = None    # 75 %: the brake held every failover

    @property
    def frozen(self) -> int:
        """At least one host for any share above 0 (1 % of 30 hosts is still a host)."""
        return max(1, round(self.hosts * self.share / 100)) if self.share else 0


def bound_s(settings: dict) -> float:
    """README, "The lease rule": deadline + lease + stop timeout + margin + interval + deadline, plus the start."""
    interval, lease = settings["interval"], settings["lease"]
    deadline = min(5, interval)
    return deadline + lease + STOP_S + (1 + 0.05 * lease) + interval + deadline


def write_fleet(root: Path, cluster: SshdCluster, case: str, settings: dict) -> dict[str, Path]:
    """One worker per host, one strategy each; returns worker id -> workdir."""
    (root / "strategies").mkdir(parents=True)
    (root / "strategies" / "stub.js").write_text("// the stub runner never loads this\n")
    (root / "fleet.yaml").write_text(
        "apiVersion: quantlab/v1\nkind: Fleet\n"
        f"reconcile: {{intervalSeconds: {settings['interval']}}}\n"
        f"monitor: {{leaseTtlSeconds: {settings['lease']}, workerOfflineAfterSeconds: {settings['offline']}, "
        f"controllerRestartSeconds: {settings['restart']}}}\n"
        f"ssh: {{config: {cluster.ssh_config_path}, knownHosts: {cluster.known_hosts_path}, "
        "parallelism: 32, connectTimeoutSeconds: 10, commandTimeoutSeconds: 30}\n")
    workers, strategies, workdirs = [], [], {}
    for h in cluster.hosts:
        wid = f"w-{h.name}"
        workdirs[wid] = Path(h.workdir_root) / case / wid
        workers.append(f"apiVersion: quantlab/v1\nkind: Worker\nid: {wid}\nhost: {h.name}\nworkdir: {workdirs[wid]}\n"
                       "capabilities: {maxStrategies: 4, supportedApis: [paper]}\n"
                       f"runner: [sh, -c, {json.dumps(STUB_RUNNER)}]\n")
        strategies.append(f"apiVersion: quantlab/v1\nkind: Strategy\nid: s-{h.name}\nstrategyFile: strategies/stub.js\n"
                          f"heartbeatMs: 20000\nrequirements: {{api: paper}}\n"
                          f"scheduling: {{stopTimeoutSeconds: {STOP_S}, initTimeoutSeconds: 10}}\n")
    (root / "workers.yaml").write_text("---\n".join(workers))
    (root / "strategies.yaml").write_text("---\n".join(strategies))
    return workdirs


def placements(fleet_dir: Path) -> dict[str, str]:
    try:
        return {s: p["worker"] for s, p in json.loads((fleet_dir / ".quantlab" / "state.json").read_text())["placements"].items()}
    except (OSError, ValueError, KeyError):
        return {}


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


class Grants:
    """Polls the lease.json of the given instances and keeps every distinct deadline the agent wrote:
    deadline - TTL is the moment of a grant on the host's boot-time clock, so the gap between two
    grants is the difference of two deadlines (exact, whatever the polling rate, as long as no grant
    is missed: it polls ten times per interval)."""

    def __init__(self, files: dict[str, Path], every: float):
        self.files, self.every = files, every
        self.seen: dict[str, list[float]] = {sid: [] for sid in files}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            for sid, path in self.files.items():
                deadline = (read_json(path) or {}).get("deadline")
                if isinstance(deadline, (int, float)) and (not self.seen[sid] or deadline != self.seen[sid][-1]):
                    self.seen[sid].append(deadline)

    def __enter__(self) -> "Grants":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def largest_gap(self) -> float:
        gaps = [b - a for seen in self.seen.values() for a, b in zip(seen, seen[1:])]
        return max(gaps, default=float("nan"))

    def widest(self) -> tuple[str, float, float] | None:
        """(strategy, deadline before, deadline after) of the largest gap."""
        pairs = [(b - a, sid, a, b) for sid, seen in self.seen.items() for a, b in zip(seen, seen[1:])]
        return max(pairs)[1:] if pairs else None


def wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise RuntimeError(f"timed out after {timeout:g}s waiting for {what}")


def run_case(cluster: SshdCluster, case: Case, base: Path) -> Case:
    name = f"c{case.hosts}-{case.share}-{case.settings['interval']}"
    fleet_dir = base / name
    workdirs = write_fleet(fleet_dir, cluster, name, case.settings)
    ctl = Controller(fleet_dir, fleet_dir / ".quantlab" / "state.json", log=lambda line: None)
    loop = ReconcileLoop(ctl, log=lambda line: None)
    rounds: list[tuple[float, float, int]] = []      # (started, seconds, silent workers)
    renew_round = loop.renew_round

    seen: list[tuple[float, float, dict[str, list[str]], dict[str, str]]] = []   # for explaining a gap

    def timed_round():
        started = time.monotonic()
        gathered = renew_round()
        rounds.append((started, time.monotonic() - started, len(gathered.silent)))
        silent = {wid: s.error or "" for wid, s in gathered.observed.workers.items() if not s.reachable}
        seen.append((time.clock_gettime(time.CLOCK_BOOTTIME) - (time.monotonic() - started), rounds[-1][1],
                     dict(gathered.renewed), silent))
        return gathered
    loop.renew_round = timed_round
    stop = threading.Event()
    daemon = threading.Thread(target=loop.run_forever, args=(case.settings["interval"], stop), daemon=True)
    daemon.start()
    frozen_hosts = cluster.hosts[len(cluster.hosts) - case.frozen:] if case.frozen else []
    try:
        placed = wait(lambda: len(p := placements(fleet_dir)) == case.hosts and p, 180, "every strategy placed")
        wait(lambda: all((workdirs[w] / "instances" / s / "heartbeat.json").exists() for s, w in placed.items()),
             120, "every strategy heartbeating")
        # Measured in the steady state: the burst of N starts on these same 2 cores is over once two
        # renewal rounds in a row heard every host.
        wait(lambda: len(rounds) >= 2 and all(silent == 0 for _, _, silent in rounds[-2:]), 120,
             "two renewal rounds that heard every host")
        lost = {f"w-{h.name}" for h in frozen_hosts}
        healthy = {s: workdirs[w] / "instances" / s / "lease.json" for s, w in placed.items() if w not in lost}
        moving = sorted(s for s, w in placed.items() if w in lost)
        interval = case.settings["interval"]
        with Grants(healthy, interval / 10) as grants:
            time.sleep(2 * interval)                 # a few renewals before the freeze: a measured window
            frozen_at = time.monotonic()
            before = len(rounds)
            for h in frozen_hosts:
                h.freeze()
            if case.share >= 75:
                # The brake: nothing may move; watch for as long as a failover would have taken.
                time.sleep(bound_s(case.settings) + 2 * interval)
                now = placements(fleet_dir)
                case.held = all(now.get(s) == placed[s] for s in moving)
            elif moving:
                def arrived() -> bool:
                    now = placements(fleet_dir)
                    return all(now.get(s) not in (None, placed[s]) and
                               (workdirs[now[s]] / "instances" / s / "heartbeat.json").exists() for s in moving)
                wait(arrived, bound_s(case.settings) + 120, "the frozen hosts' strategies to heartbeat elsewhere")
                case.failover = time.monotonic() - frozen_at
                time.sleep(interval)             # and one more renewal of everything after it
            else:
                time.sleep(4 * interval)
            case.round_times = [seconds for _, seconds, _ in rounds[before:]]
        case.largest_gap = grants.largest_gap()
        if case.largest_gap > case.settings["interval"] + 1:
            explain_gap(grants, placed, seen, case.settings["lease"])
    finally:
        stop.set()
        daemon.join(60)
        for h in frozen_hosts:
            h.thaw()
        kill_all([str(w) + "/" for w in workdirs.values()])
    return case


def explain_gap(grants: Grants, placed: dict[str, str], seen: list, ttl: float) -> None:
    """To stderr: the renewal rounds around the largest gap, and what each said of that worker."""
    widest = grants.widest()
    if widest is None:
        return
    sid, before, after = widest
    wid = placed[sid]
    print(f"largest gap: {sid} on {wid}: granted at {before - ttl:.2f} and {after - ttl:.2f} (boot s)", file=sys.stderr)
    for began, seconds, renewed, silent in seen:
        if before - ttl - 6 <= began <= after - ttl + 1:
            print(f"  round at {began:.2f} ({seconds:.2f} s): renewed {sid in renewed.get(wid, [])}"
                  f"{'; silent: ' + silent[wid] if wid in silent else ''}", file=sys.stderr)


def row(case: Case) -> str:
    rounds = case.round_times or [float("nan")]
    interval = case.settings["interval"]
    gap_ok = "✓" if case.largest_gap <= interval + 1 else "✗"
    if case.share >= 75:
        failover = "held by the brake ✓" if case.held else "NOT held ✗"
    elif case.failover is None:
        failover = "—"
    else:
        ok = "✓" if case.failover <= bound_s(case.settings) + 5 else "✗"
        failover = f"{case.failover:.1f} s {ok}"
    return (f"| {case.hosts} | {case.share} % ({case.frozen}) | {statistics.median(rounds):.2f} s / {max(rounds):.2f} s "
            f"| {case.largest_gap:.2f} s {gap_ok} | {failover} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hosts", default="30,60")
    parser.add_argument("--shares", default="0,1,10,40,75")
    parser.add_argument("--no-baseline", action="store_true")
    args = parser.parse_args()
    sizes = [int(n) for n in args.hosts.split(",")]
    shares = [int(s) for s in args.shares.split(",")]
    results: list[Case] = []
    baseline: Case | None = None
    with tempfile.TemporaryDirectory(prefix="quantlab-outage-") as tmp:
        base = Path(tmp)
        for n in sizes:
            with SshdCluster(base / f"hosts-{n}") as cluster:
                cluster.start(n)
                for share in shares:
                    case = run_case(cluster, Case(n, share, NEW), base)
                    results.append(case)
                    print(row(case), flush=True)
                if not args.no_baseline and n == sizes[0]:
                    baseline = run_case(cluster, Case(n, 1, OLD), base)     # one host
                    print("old defaults:", row(baseline), flush=True)
        # Every case stopped what it started: a process still running from this run is a failure.
        left = processes(str(base))
        kill_all(str(base))
        if left:
            sys.exit(f"{len(left)} processes were left behind (now killed): {[p.argv for p in left][:5]}")
    report(results, baseline)


def report(results: list[Case], baseline: Case | None) -> None:
    new_bound, old_bound = bound_s(NEW), bound_s(OLD)
    lines = ["| hosts | frozen | renewal round, median / largest | largest renewal gap, healthy hosts "
             f"(target ≤ {NEW['interval'] + 1} s) | frozen hosts' strategies heartbeat elsewhere after |",
             "| --- | --- | --- | --- | --- |"] + [row(c) for c in results]
    lines.append("")
    lines.append(f"Defaults: interval {NEW['interval']} s, probe deadline {min(5, NEW['interval'])} s, lease "
                 f"{NEW['lease']} s, stop timeout {STOP_S} s: documented bound {new_bound:.2f} s plus the start.")
    moved = [c.failover for c in results if c.failover is not None]
    if baseline is not None and baseline.failover is not None and moved:
        worst = max(moved)
        lines.append(f"Baseline, the previous defaults (interval {OLD['interval']} s, lease {OLD['lease']} s, offline "
                     f"after {OLD['offline']} s), {baseline.hosts} hosts, {baseline.frozen} frozen: failover after "
                     f"{baseline.failover:.1f} s (bound {old_bound:.0f} s plus the start); the slowest failover above "
                     f"took {worst:.1f} s, {baseline.failover / worst:.1f}× faster.")
    text = "\n".join(lines)
    print(text)
    write_block("partial_outage", "Partial outages", text)


if __name__ == "__main__":
    main()
