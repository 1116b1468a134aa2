"""Chaos soak: the real reconcile daemon(s) over real sshd hosts while seeded faults hit the fleet.

Every strategy audits itself: each beat appends {t, worker, pid, epoch, n} to a file of its own
outside the hosts' workdirs (n is `ctx.state`'s counter, restored by the next copy), so that what
happened is judged from the strategies' own words, not from quantlab's. The fleet is a git work
tree; its changes are commits. Faults come from a seeded RNG (the same seed draws the same kinds, gaps and
durations; which host or copy a fault hits also depends on where things run at that moment):

- host-freeze: the host's sshd and its sessions stop (SIGSTOP) for 20-60 s; its strategies go on.
- host-reboot: the host's sshd and every process of its workdir are killed; sshd is back 10-40 s later.
- runner-crash / runner-hang: a strategy's runner gets SIGKILL / SIGSTOP.
- busy-loop: a strategy's copy spins in st_heartbeat for ever (asked through its command file).
- hostile-lease: a copy rewrites its lease file on every beat, and its host freezes for a lease
  and more: the copy must stop at its lease's end like any other.
- hostile-fence: a copy writes a huge controller term into its worker's fence file (at worst its own
  worker is fenced); the file is removed 30-60 s later, as the alert says.
- controller-kill (and with PostgreSQL daemon-kill / daemon-stop / db-restart): SIGKILL of a daemon,
  restarted 1-8 s later; SIGSTOP of one for 10-30 s; the database server restarted.
- cpu-starve: `--starve N` busy processes on the controller's machine for 20-40 s.
- commits: params of one strategy; cordon a worker (and uncordon); drain a worker (and undo);
  remove a strategy (and put it back); a commit that does not validate (and its fix).
- lock-held (JSON state): the state lock taken for 20-40 s, as by an `apply` that hangs.
- all along: the notify webhook is a server that answers one byte a second and never finishes.

Checked from the audit, at the end (after every fault healed and a quiet period):
- duplicates: two copies of one strategy whose beats overlap in time (target 0);
- false stops: a copy that ended with no fault that could explain it (its host, its runner, a
  commit that changed it; target 0);
- lost: a desired strategy with no copy beating at the end (target 0);
- recovery: from a fault to the affected strategies' next beats, median and max per kind;
- state loss per move: the counter's beats a new copy did not get back;
- nothing started from the commit that did not validate (its revision is in no event);
- the state file readable at every moment it was sampled (JSON file backend);
- the daemons' CPU seconds and peak resident memory.

    .venv/bin/python benchmarks/chaos.py [--minutes 30] [--seed 1] [--hosts 12] [--strategies 40]
        [--postgres] [--starve 7] [--report NAME]

`--report NAME` writes the table into RELIABILITY.md between the `chaos-NAME` markers. tests/ssh/
runs a short version (tests/ssh/test_chaos.py) with the same code and the same targets.
"""
from __future__ import annotations

import argparse
import fcntl
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import yaml  # noqa: E402

from tests.sshd_hosts import SshdCluster  # noqa: E402
from tests.support import cli_env, kill_all  # noqa: E402

PYTHON = str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv" / "bin" / "python").exists() else sys.executable
RELIABILITY = REPO / "RELIABILITY.md"

SETTINGS = {"interval": 5, "lease": 25, "offline": 15}      # the example fleet's (the README's defaults)
STOP_S = 5
HEARTBEAT_MS = 1000
REGIONS = ("JP", "US", "EU")
HUGE_TERM = "9223372036854775807"

AUDITED = r"""
import fs from 'node:fs';
import path from 'node:path';

// Each copy says what it does, in a file of its own that no quantlab process writes.
function say(ctx, kind) {
  const line = JSON.stringify({ t: Date.now(), k: kind, w: ctx.workerId, pid: process.pid, e: ctx.epoch,
                                n: ctx.state.n ?? 0 });
  fs.appendFileSync(path.join(ctx.params.audit, `${ctx.id}.jsonl`), `${line}\n`);
}

// The soak asks one copy (by pid) to misbehave through <audit>/cmd/<id>: "busy PID", "lease PID", "fence PID".
function asked(ctx) {
  try {
    const [what, pid] = fs.readFileSync(path.join(ctx.params.audit, 'cmd', ctx.id), 'utf8').trim().split(' ');
    return Number(pid) === process.pid ? what : null;
  } catch (e) { return null; }
}

function forgeLease() {
  const file = process.env.QUANTLAB_LEASE_FILE;
  let lease;
  try { lease = JSON.parse(fs.readFileSync(file, 'utf8')); } catch (e) { return; }
  lease.deadline = 1e12;
  lease.expiresAt = Date.now() + 1e9;
  fs.writeFileSync(`${file}.forged`, JSON.stringify(lease));
  fs.renameSync(`${file}.forged`, file);
}

function forgeFence(term) {
  const file = path.resolve(process.env.QUANTLAB_STATE_DIR, '..', '..', '..', 'agent', 'fence.json');
  let seen;
  try { seen = JSON.parse(fs.readFileSync(file, 'utf8')); } catch (e) { return; }
  const text = '{' + Object.keys(seen).map((k) => `${JSON.stringify(k)}: ${term}`).join(', ') + '}';
  fs.writeFileSync(`${file}.forged`, text);
  fs.renameSync(`${file}.forged`, file);
}

export function st_init(ctx) { say(ctx, 'init'); }

export function st_heartbeat(ctx) {
  ctx.state.n = (ctx.state.n ?? 0) + 1;
  say(ctx, 'beat');
  const what = asked(ctx);
  if (what === 'busy') { for (;;) { /* spin */ } }
  if (what === 'lease') forgeLease();
  if (what === 'fence') forgeFence('""" + HUGE_TERM + r"""');
}

export function st_exit(ctx) { say(ctx, 'exit'); }
"""


class Trickle:
    """A webhook that reads the request, then answers one byte a second for ever (until the client
    gives up): quantlab's notifier must drop it at its deadline and never hold a round up."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.5)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/hook/TRICKLE"
        self.stop = threading.Event()
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            threading.Thread(target=self._drip, args=(conn,), daemon=True).start()

    def _drip(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.settimeout(5)
                conn.recv(65536)
                conn.sendall(b"HTTP/1.1 200 OK\r\n")
                while not self.stop.wait(1.0):
                    conn.sendall(b"x")
            except OSError:
                pass

    def close(self) -> None:
        self.stop.set()
        self.sock.close()


# --- what happened ------------------------------------------------------------------------------------

@dataclass
class Fault:
    kind: str
    start: float                         # epoch seconds
    heal_at: float
    target: str = ""                     # worker, strategy or daemon it hit
    workers: set[str] = field(default_factory=set)      # copies on these may end, until `until`
    strategies: set[str] = field(default_factory=set)   # copies of these may end, until `until`
    until: float = 0.0
    healed: bool = False
    heal: Callable[[], None] | None = None
    recovery: float | None = None        # seconds until every affected strategy beat again


@dataclass
class Copy:
    strategy: str
    worker: str
    pid: int
    epoch: int
    first: float
    last: float
    init_n: int | None
    last_n: int
    exited: bool = False


def read_audit(audit: Path, strategies: list[str]) -> dict[str, list[Copy]]:
    """Each strategy's copies (by pid, epoch and worker) in the order they first spoke."""
    copies: dict[str, list[Copy]] = {}
    for sid in strategies:
        found: dict[tuple, Copy] = {}
        try:
            lines = (audit / f"{sid}.jsonl").read_text().splitlines()
        except OSError:
            lines = []
        for line in lines:
            try:
                r = json.loads(line)
            except ValueError:
                continue                 # a line cut by a SIGKILL mid-write
            key = (r["pid"], r["e"], r["w"])
            t = r["t"] / 1000
            c = found.get(key)
            if c is None:
                c = found[key] = Copy(sid, r["w"], r["pid"], r["e"], t, t, None, r["n"])
            if r["k"] == "init":
                c.init_n = r["n"]
            c.first, c.last = min(c.first, t), max(c.last, t)
            c.last_n = max(c.last_n, r["n"])
            c.exited = c.exited or r["k"] == "exit"
        copies[sid] = sorted(found.values(), key=lambda c: c.first)
    return copies


# --- the soak -----------------------------------------------------------------------------------------

@dataclass
class Soak:
    minutes: float = 30.0
    seed: int = 1
    hosts: int = 12
    strategies: int = 40
    postgres: bool = False
    starve: int = 0                      # busy processes during cpu-starve faults (0: no such fault)
    quiet_s: float = 150.0               # the longest convergence may take after the last heal
    base: Path | None = None
    log: Callable[[str], None] = print

    # set up by run()
    rng: random.Random = field(init=False)
    faults: list[Fault] = field(default_factory=list)
    daemons: list[subprocess.Popen] = field(default_factory=list)
    spawned: int = 0
    cpu_s: float = 0.0
    peak_rss_mb: float = 0.0
    state_reads: int = 0
    state_unreadable: int = 0
    broken_revisions: list[str] = field(default_factory=list)
    removed: set[str] = field(default_factory=set)
    broken: bool = False                 # the fleet's commits do not validate (commit-broken, until healed)

    def run(self) -> dict[str, Any]:
        self.rng = random.Random(self.seed)
        own = self.base is None
        base = Path(tempfile.mkdtemp(prefix="quantlab-chaos-")) if own else self.base
        os.chmod(base, 0o755)
        self.base = base
        self.marker = str(base) + os.sep
        self.cluster = SshdCluster(base / "hosts")
        pg = None
        try:
            self.cluster.start(self.hosts)
            if self.postgres:
                from tests.pg_server import PgServer
                pg = self.pg = PgServer(base / "pg").start()
            self.trickle = Trickle()
            self.audit = self.cluster.shared_dir / "audit"
            (self.audit / "cmd").mkdir(parents=True)
            self.cluster.chown_to_user(self.audit)
            self.write_fleet()
            self.state = pg.dsn if pg else str(self.fleet / ".quantlab" / "state.json")
            for _ in range(2 if self.postgres else 1):
                self.daemons.append(self.spawn_daemon())
            started = time.time()
            self.wait_all_beating(240, "every strategy beating before the first fault")
            self.log(f"all {self.strategies} strategies beating after {time.time() - started:.0f} s; faults for "
                     f"{self.minutes:g} min (seed {self.seed})")
            self.soak_start = time.time()
            self.inject_until(self.soak_start + self.minutes * 60)
            for fault in self.faults:
                self.heal(fault)
            healed_at = time.time()
            converged = self.wait_all_beating(self.quiet_s, None)
            self.converged_s = (converged - healed_at) if converged else None
            time.sleep(2 * HEARTBEAT_MS / 1000)
            return self.judge()
        finally:
            for d in self.daemons:
                self.account(d)
                if d.poll() is None:
                    d.kill()
            kill_all(self.marker)
            self.cluster.stop_all()
            if pg is not None:
                pg.stop()
            if getattr(self, "trickle", None) is not None:
                self.trickle.close()
            kill_all(self.marker)

    # --- the fleet ----------------------------------------------------------------------------------------

    def write_fleet(self) -> None:
        self.repo = self.base / "repo"
        self.fleet = self.repo / "fleet"
        (self.fleet / "strategies").mkdir(parents=True)
        (self.fleet / "strategies" / "audited.mjs").write_text(AUDITED)
        self.workers = {}
        for i, h in enumerate(self.cluster.hosts):
            wid = f"w{i + 1:02d}"
            self.workers[wid] = {
                "apiVersion": "quantlab/v1", "kind": "Worker", "id": wid, "host": h.name,
                "workdir": str(h.workdir_root / wid),
                "capabilities": {"maxStrategies": 5 + i % 2,
                                 "supportedApis": ["paper", "binance"] if i % 2 == 0 else ["paper"]},
                "metadata": {"region": REGIONS[i % 3]}}
        self.host_of = {wid: h for wid, h in zip(self.workers, self.cluster.hosts)}
        self.specs = {}
        for i in range(self.strategies):
            sid = f"s{i + 1:02d}"
            req: dict[str, Any] = {"api": "binance" if i % 5 == 4 else "paper"}
            if i % 4 == 0:
                req["region"] = "JP"
            self.specs[sid] = {
                "apiVersion": "quantlab/v1", "kind": "Strategy", "id": sid, "strategyFile": "strategies/audited.mjs",
                "params": {"audit": str(self.audit), "rev": 0}, "heartbeatMs": HEARTBEAT_MS, "requirements": req,
                "scheduling": {"maxRestarts": 100, "restartDelay": 2 * HEARTBEAT_MS, "stopTimeoutSeconds": STOP_S,
                               "initTimeoutSeconds": 30}}
        self.settings = {
            "apiVersion": "quantlab/v1", "kind": "Fleet", "name": "chaos",
            "reconcile": {"intervalSeconds": SETTINGS["interval"]},
            "monitor": {"workerOfflineAfterSeconds": SETTINGS["offline"], "leaseTtlSeconds": SETTINGS["lease"]},
            "notify": {"webhook": self.trickle.url},
            "ssh": {"config": str(self.cluster.ssh_config_path), "knownHosts": str(self.cluster.known_hosts_path),
                    "parallelism": 32, "connectTimeoutSeconds": 10, "commandTimeoutSeconds": 30}}
        self.git("init", "-q", "-b", "main")
        (self.repo / ".gitignore").write_text(".quantlab/\n")
        self.commit("the fleet")

    def git(self, *args: str) -> str:
        env = {**os.environ, "GIT_AUTHOR_NAME": "soak", "GIT_AUTHOR_EMAIL": "soak@localhost",
               "GIT_COMMITTER_NAME": "soak", "GIT_COMMITTER_EMAIL": "soak@localhost"}
        return subprocess.run(["git", *args], cwd=self.repo, env=env, check=True, capture_output=True,
                               text=True, timeout=30).stdout.strip()

    def commit(self, message: str) -> str:
        """Commit the fleet as it stands; while `self.broken`, strategies.yaml does not validate."""
        (self.fleet / "fleet.yaml").write_text(yaml.safe_dump(self.settings, sort_keys=False))
        (self.fleet / "workers.yaml").write_text(yaml.safe_dump_all(list(self.workers.values()), sort_keys=False,
                                                                    explicit_start=True))
        text = yaml.safe_dump_all([s for sid, s in self.specs.items() if sid not in self.removed],
                                  sort_keys=False, explicit_start=True)
        (self.fleet / "strategies.yaml").write_text(text + ("---\nkind: Strategy\nid: [broken\n" if self.broken else ""))
        self.git("add", "-A")
        self.git("commit", "-q", "-m", message)
        sha = self.git("rev-parse", "HEAD")
        if self.broken:
            self.broken_revisions.append(sha)
        return sha

    def spawn_daemon(self) -> subprocess.Popen:
        self.spawned += 1
        log = open(self.base / f"daemon-{self.spawned}.log", "ab")
        return subprocess.Popen([PYTHON, "-m", "quantlab", "reconcile", "--fleet", str(self.fleet),
                                 "--state", self.state], stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=cli_env(), cwd=self.repo, start_new_session=True)

    def account(self, daemon: subprocess.Popen) -> None:
        """Add a daemon's CPU so far to the total, and its peak memory to the peak (before it dies)."""
        try:
            fields = Path(f"/proc/{daemon.pid}/stat").read_text().rsplit(")", 1)[1].split()
            self.cpu_s += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            for line in Path(f"/proc/{daemon.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    self.peak_rss_mb = max(self.peak_rss_mb, int(line.split()[1]) / 1024)
        except (OSError, IndexError, ValueError):
            pass

    # --- looking --------------------------------------------------------------------------------------------

    def desired(self) -> list[str]:
        return [sid for sid in self.specs if sid not in self.removed]

    def beating(self, within: float = 3.0) -> dict[str, Copy]:
        """The copy of each desired strategy that beat in the last `within` seconds."""
        now = time.time()
        out = {}
        for sid, copies in read_audit(self.audit, self.desired()).items():
            live = [c for c in copies if now - c.last <= within]
            if live:
                out[sid] = live[-1]
        return out

    def wait_all_beating(self, timeout: float, what: str | None) -> float | None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            self.sample_state()
            if len(self.beating()) == len(self.desired()):
                return time.time()
            time.sleep(1.0)
        if what:
            missing = sorted(set(self.desired()) - set(self.beating()))
            raise RuntimeError(f"timed out after {timeout:g}s waiting for {what}; not beating: {missing}")
        return None

    def sample_state(self) -> None:
        """The JSON state must be readable at any moment (it is replaced atomically)."""
        if self.postgres:
            return
        try:
            json.loads(Path(self.state).read_text())
            self.state_reads += 1
        except FileNotFoundError:
            pass
        except (OSError, ValueError):
            self.state_reads += 1
            self.state_unreadable += 1

    # --- faults --------------------------------------------------------------------------------------------

    def kinds(self) -> dict[str, float]:
        weights = {"host-freeze": 3, "host-reboot": 2, "runner-crash": 3, "runner-hang": 2, "busy-loop": 1,
                   "hostile-lease": 1, "hostile-fence": 1, "commit-params": 2, "commit-cordon": 1,
                   "commit-drain": 1, "commit-remove": 1, "commit-broken": 1}
        if self.postgres:
            weights.update({"daemon-kill": 2, "daemon-stop": 1, "db-restart": 1})
        else:
            weights.update({"controller-kill": 2, "lock-held": 1})
        if self.starve:
            weights["cpu-starve"] = 2
        return weights

    def inject_until(self, end: float) -> None:
        kinds = self.kinds()
        names, weights = list(kinds), list(kinds.values())
        while True:
            gap = self.rng.uniform(6, 16)
            kind = self.rng.choices(names, weights)[0]
            hold = self.rng.uniform(0, 1)                 # drawn always: the sequence depends on the seed only
            wake = time.time() + gap
            while time.time() < wake:
                self.heal_due()
                self.sample_state()
                time.sleep(0.5)
            if time.time() >= end:
                return
            try:
                fault = self.inject(kind, hold)
            except Exception as exc:                      # a fault that could not be set up is said, not fatal
                self.log(f"  {kind}: not injected: {exc}")
                continue
            if fault is not None:
                self.faults.append(fault)
                self.log(f"  {time.time() - self.soak_start:6.0f}s {fault.kind} {fault.target}")

    def busy_hosts(self) -> set[str]:
        """The workers an unhealed fault holds (frozen, rebooting, forged, cordoned, draining)."""
        return {w for f in self.faults if not f.healed
                for w in f.workers | ({f.target} if f.target in self.workers else set())}

    def pick_worker(self, with_strategies: bool = True) -> str | None:
        """A worker no unhealed fault holds, with strategies on it; at most 2 hosts hurt at once (a third of
        the fleet would start the failover brake, which holds failovers on purpose)."""
        if len(self.busy_hosts()) >= 2:
            return None
        on = {c.worker for c in self.beating().values()}
        free = [w for w in self.workers if w not in self.busy_hosts() and (w in on or not with_strategies)
                and not self.workers[w].get("drain") and not self.workers[w].get("cordoned")]
        return self.rng.choice(sorted(free)) if free else None

    def pick_copy(self) -> Copy | None:
        live = [c for sid, c in sorted(self.beating().items()) if c.worker not in self.busy_hosts()]
        return self.rng.choice(live) if live else None

    def inject(self, kind: str, hold: float) -> Fault | None:
        now = time.time()
        lease = SETTINGS["lease"]
        slack = lease + SETTINGS["interval"] * 3 + STOP_S + 30
        if kind in ("host-freeze", "host-reboot", "hostile-lease", "hostile-fence"):
            wid = self.pick_worker()
            if wid is None:
                return None
            host = self.host_of[wid]
            on = {sid for sid, c in self.beating().items() if c.worker == wid}
            if kind == "host-freeze":
                host.freeze()
                span = 20 + 40 * hold
                return Fault(kind, now, now + span, wid, {wid}, on, now + span + slack, heal=host.thaw)
            if kind == "host-reboot":
                host.stop()
                kill_all(str(host.workdir_root) + os.sep)
                span = 10 + 30 * hold
                return Fault(kind, now, now + span, wid, {wid}, on, now + span + slack,
                             heal=lambda: host.start())
            copy = next((c for c in self.beating().values() if c.worker == wid), None)
            if copy is None:
                return None
            if kind == "hostile-lease":
                self.ask(copy, "lease")
                time.sleep(2 * HEARTBEAT_MS / 1000)       # it forged at least once before the host goes silent
                host.freeze()
                span = lease + 15 + 20 * hold
                return Fault(kind, now, now + span, f"{wid} ({copy.strategy})", {wid}, on, now + span + slack,
                             heal=host.thaw)
            self.ask(copy, "fence")
            span = 30 + 30 * hold
            fence = Path(self.workers[wid]["workdir"]) / "agent" / "fence.json"
            return Fault(kind, now, now + span, f"{wid} ({copy.strategy})", {wid}, on, now + span + slack,
                         heal=lambda: fence.unlink(missing_ok=True))
        if kind in ("runner-crash", "runner-hang", "busy-loop"):
            copy = self.pick_copy()
            if copy is None:
                return None
            if kind == "busy-loop":
                self.ask(copy, "busy")
            else:
                os.kill(copy.pid, signal.SIGKILL if kind == "runner-crash" else signal.SIGSTOP)
            return Fault(kind, now, now, copy.strategy, set(), {copy.strategy}, now + slack, healed=True)
        if kind == "controller-kill" or kind == "daemon-kill":
            i = self.rng.randrange(len(self.daemons))
            self.account(self.daemons[i])
            self.daemons[i].kill()
            self.daemons[i].wait()

            def restart(i: int = i) -> None:
                self.daemons[i] = self.spawn_daemon()
            return Fault(kind, now, now + 1 + 7 * hold, f"daemon {i}", heal=restart)
        if kind == "daemon-stop":
            i = self.rng.randrange(len(self.daemons))
            os.killpg(self.daemons[i].pid, signal.SIGSTOP)
            return Fault(kind, now, now + 10 + 20 * hold, f"daemon {i}",
                         heal=lambda: os.killpg(self.daemons[i].pid, signal.SIGCONT))
        if kind == "db-restart":
            self.pg.stop()
            return Fault(kind, now, now + 2 + 6 * hold, "postgres", heal=self.pg.resume)
        if kind == "lock-held":
            fd = os.open(f"{self.state}.lock", os.O_RDWR | os.O_CREAT, 0o600)
            deadline = time.time() + 15                  # the daemon holds it only while it acts
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.time() > deadline:
                        os.close(fd)
                        return None
                    time.sleep(0.05)

            def release() -> None:
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)
            return Fault(kind, now, now + 20 + 20 * hold, "state lock", heal=release)
        if kind == "cpu-starve":
            burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True)
                       for _ in range(self.starve)]

            def cool() -> None:
                for b in burners:
                    b.kill()
                    b.wait()
            return Fault(kind, now, now + 20 + 20 * hold, f"{self.starve} busy processes", heal=cool)
        return self.inject_commit(kind, hold, now, slack)

    def inject_commit(self, kind: str, hold: float, now: float, slack: float) -> Fault | None:
        interval = SETTINGS["interval"]
        if kind == "commit-params":
            sid = self.rng.choice(self.desired())
            self.specs[sid]["params"]["rev"] += 1
            self.commit(f"{sid}: rev {self.specs[sid]['params']['rev']}")
            return Fault(kind, now, now, sid, set(), {sid}, now + 3 * interval + STOP_S + 30, healed=True)
        if kind in ("commit-cordon", "commit-drain"):
            wid = self.pick_worker()
            if wid is None:
                return None
            flag = "cordoned" if kind == "commit-cordon" else "drain"
            self.workers[wid][flag] = True
            self.commit(f"{wid}: {flag}")

            def undo() -> None:
                self.workers[wid][flag] = False
                self.commit(f"{wid}: not {flag}")
            span = 30 + 60 * hold
            moved = {wid} if flag == "drain" else set()
            return Fault(kind, now, now + span, wid, moved, set(), now + span + slack, heal=undo)
        if kind == "commit-remove":
            if self.removed:
                return None
            sid = self.rng.choice(self.desired())
            self.removed.add(sid)
            self.commit(f"remove {sid}")

            def back() -> None:
                self.removed.discard(sid)
                self.commit(f"{sid} is back")
            span = 20 + 30 * hold
            return Fault(kind, now, now + span, sid, set(), {sid}, now + span + slack, heal=back)
        if kind == "commit-broken":
            if any(f.kind == "commit-broken" and not f.healed for f in self.faults):
                return None
            self.broken = True
            self.commit("a commit that does not validate")

            def fix() -> None:
                self.broken = False
                self.commit("fix the commit that did not validate")
            return Fault(kind, now, now + 15 + 25 * hold, "strategies.yaml", heal=fix)
        raise ValueError(kind)

    def ask(self, copy: Copy, what: str) -> None:
        path = self.audit / "cmd" / copy.strategy
        path.write_text(f"{what} {copy.pid}\n")
        os.chmod(path, 0o644)

    def heal_due(self) -> None:
        for fault in self.faults:
            if not fault.healed and time.time() >= fault.heal_at:
                self.heal(fault)

    def heal(self, fault: Fault) -> None:
        if fault.healed:
            return
        fault.healed = True
        fault.heal_at = time.time()
        fault.until = max(fault.until, fault.heal_at + SETTINGS["lease"] + 60)
        if fault.heal is not None:
            try:
                fault.heal()
            except Exception as exc:
                self.log(f"  heal of {fault.kind} {fault.target} failed: {exc}")

    # --- judging ----------------------------------------------------------------------------------------------

    def explains(self, copy: Copy) -> Fault | None:
        """The fault that may have ended this copy: the latest one on its worker (a copy that ran there
        before the fault healed) or of its strategy (a copy that ran when the fault began), whose
        window the end falls in. A copy started after a fault is not excused by it: a replacement that
        the controller stopped by mistake is a false stop."""
        found = [f for f in self.faults if f.start - 2 <= copy.last <= f.until and (
                 (copy.worker in f.workers and copy.first <= f.heal_at + 1)
                 or (copy.strategy in f.strategies and copy.first <= f.start + 1))]
        return max(found, key=lambda f: f.start) if found else None

    def judge(self) -> dict[str, Any]:
        end = time.time()
        copies = read_audit(self.audit, list(self.specs))
        duplicates, false_stops = [], []
        loss: dict[str, list[int]] = {}           # kind of the fault that ended the old copy -> beats lost
        worst: list[tuple[int, str]] = []
        for sid, cs in copies.items():
            for a, b in zip(cs, cs[1:]):
                # A copy that did not exit (killed, or fenced without st_exit) may have lived until its
                # next beat was due.
                if b.first <= a.last + (0 if a.exited else HEARTBEAT_MS / 1000):
                    duplicates.append(f"{sid}: {a.worker} pid {a.pid} epoch {a.epoch} beat until {a.last:.3f}, "
                                      f"{b.worker} pid {b.pid} epoch {b.epoch} from {b.first:.3f}")
            ended = cs[:-1] + ([cs[-1]] if cs and end - cs[-1].last > 5 and sid not in self.removed else [])
            for c in ended:
                if c.last < self.soak_start:
                    continue                      # before the first fault: the start-up
                fault = self.explains(c)
                nxt = next((d for d in cs if d.first > c.last), None)
                if fault is None:
                    false_stops.append(f"{sid}: copy on {c.worker} (pid {c.pid}, epoch {c.epoch}) ended at "
                                       f"+{c.last - self.soak_start:.0f}s with no fault to explain it")
                    continue
                if nxt is not None:
                    fault.recovery = max(fault.recovery or 0.0, nxt.first - fault.start)
                    if nxt.init_n is not None:
                        lost_beats = max(0, c.last_n - nxt.init_n)
                        loss.setdefault(fault.kind, []).append(lost_beats)
                        worst.append((lost_beats, f"{sid} {c.worker}→{nxt.worker} after {fault.kind} "
                                                  f"{fault.target}: {c.last_n} → {nxt.init_n}"))
        lost = sorted(sid for sid in self.desired() if not copies[sid] or end - copies[sid][-1].last > 5)
        by_kind: dict[str, list[Fault]] = {}
        for fault in self.faults:
            by_kind.setdefault(fault.kind, []).append(fault)
        return {
            "minutes": self.minutes, "seed": self.seed, "hosts": self.hosts, "strategies": self.strategies,
            "backend": "PostgreSQL, 2 daemons" if self.postgres else "JSON file, 1 daemon",
            "starve": self.starve,
            "faults": {k: {"count": len(v),
                           "recoveries": sorted(round(f.recovery, 1) for f in v if f.recovery is not None),
                           "loss": sorted(loss.get(k, []))}
                       for k, v in sorted(by_kind.items())},
            "duplicates": duplicates, "false_stops": false_stops, "lost": lost,
            "worst_losses": [w for _, w in sorted(worst, reverse=True)[:5]],
            "started_from_broken": self.started_from_broken(),
            "state_reads": self.state_reads, "state_unreadable": self.state_unreadable,
            "converged_s": self.converged_s,
            "controller_cpu_s": round(self.cpu_s, 1), "controller_peak_rss_mb": round(self.peak_rss_mb, 1),
            "webhook_calls": self.trickle.connections,
        }

    def started_from_broken(self) -> list[str]:
        if not self.broken_revisions:
            return []
        done = subprocess.run([PYTHON, "-m", "quantlab", "events", "--fleet", str(self.fleet), "--state", self.state,
                               "--output", "json"], capture_output=True, text=True, timeout=120, env=cli_env())
        try:
            events = json.loads(done.stdout)
        except ValueError:
            return [f"events unreadable: {done.stderr.strip()[-300:]}"]
        return [f"{e.get('event')} {e.get('strategy')} from {e.get('revision')}" for e in events
                if e.get("revision") and any(r.startswith(str(e["revision"])) for r in self.broken_revisions)]


# --- the report -----------------------------------------------------------------------------------------------

def render(r: dict[str, Any]) -> str:
    def fmt(xs: list[float], unit: str = " s") -> str:
        return f"{statistics.median(xs):g} / {max(xs):g}{unit}" if xs else "—"
    rows = [f"Soak of {r['minutes']:g} min, seed {r['seed']}: {r['hosts']} sshd hosts, {r['strategies']} strategies, "
            f"{r['backend']}" + (f", CPU starvation with {r['starve']} busy processes on 2 cores" if r["starve"] else "")
            + ".", "",
            "| fault | count | recovery, median / max (from the fault to the next beat of a copy it ended) "
            "| `ctx.state` beats lost per new copy, median / max (a beat a second) |",
            "| --- | --- | --- | --- |"]
    for kind, f in r["faults"].items():
        rows.append(f"| {kind} | {f['count']} | {fmt(f['recoveries'])} | {fmt(f['loss'], '')} |")
    rows += ["", "| promise | result | target |", "| --- | --- | --- |",
             f"| two copies of one strategy beating at once | {len(r['duplicates'])} | 0 |",
             f"| a copy ended with no fault to explain it (false stop) | {len(r['false_stops'])} | 0 |",
             f"| desired strategies not beating at the end (lost) | {len(r['lost'])} | 0 |",
             f"| started from a commit that does not validate | {len(r['started_from_broken'])} | 0 |",
             (f"| state file unreadable when sampled | {r['state_unreadable']} of {r['state_reads']} | 0 |"
              if r["state_reads"] else "| state file unreadable when sampled | not sampled (PostgreSQL) | 0 |"),
             "| every strategy beating again after the last heal | "
             + (f"{r['converged_s']:.0f} s" if r["converged_s"] is not None else "not within the quiet period")
             + " | within the failover bound |",
             f"| notifications to the trickling webhook (each dropped at its deadline) | {r.get('webhook_calls', '—')} | — |",
             f"| controller CPU, peak resident memory | {r['controller_cpu_s']:g} s "
             f"({100 * r['controller_cpu_s'] / (r['minutes'] * 60):.1f} % of one core), {r['controller_peak_rss_mb']:g} MB | — |"]
    return "\n".join(rows)


def passed(r: dict[str, Any]) -> bool:
    return not (r["duplicates"] or r["false_stops"] or r["lost"] or r["started_from_broken"] or r["state_unreadable"])


def write_report(name: str, text: str) -> None:
    import re
    body = RELIABILITY.read_text()
    block = f"<!-- chaos-{name}:start -->\n{text}\n<!-- chaos-{name}:end -->"
    if f"<!-- chaos-{name}:start -->" not in body:
        raise SystemExit(f"RELIABILITY.md has no chaos-{name} markers")
    RELIABILITY.write_text(re.sub(rf"<!-- chaos-{name}:start -->.*<!-- chaos-{name}:end -->", lambda _: block,
                                  body, flags=re.S))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--hosts", type=int, default=12)
    ap.add_argument("--strategies", type=int, default=40)
    ap.add_argument("--postgres", action="store_true", help="two daemons on a PostgreSQL state")
    ap.add_argument("--starve", type=int, default=0, help="busy processes during cpu-starve faults")
    ap.add_argument("--report", help="write the table into RELIABILITY.md between the chaos-NAME markers")
    ap.add_argument("--json", type=Path, help="also write the whole result here")
    args = ap.parse_args()
    soak = Soak(minutes=args.minutes, seed=args.seed, hosts=args.hosts, strategies=args.strategies,
                postgres=args.postgres, starve=args.starve)
    result = soak.run()
    text = render(result)
    print(text)
    for what in ("duplicates", "false_stops", "lost", "started_from_broken"):
        for line in result[what]:
            print(f"{what}: {line}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    if args.report:
        write_report(args.report, text)
    return 0 if passed(result) else 1


if __name__ == "__main__":
    sys.exit(main())
