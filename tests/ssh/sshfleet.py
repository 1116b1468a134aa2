"""Helpers for the tests that run quantlab fleets on real sshd "hosts" (tests/sshd_hosts.py).

A `SshFleet` is a fleet directory whose workers point at the cluster's hosts through its ssh_config
aliases (`host: host-01`), with each worker's workdir under that host's workdir root (writable by
the login user `qltest`). The CLI runs as a subprocess (`python -m quantlab`), the controller can
also be used in-process. Everything quantlab starts on the "hosts" (agents, supervisors, runners)
has one of the workdir roots in its command line; `reap()` SIGKILLs those, and the fleet dir's
processes, until none is left.

Imported as `sshfleet` (pytest's default "prepend" import mode puts this folder on sys.path; the
name differs from tests/integration/harness.py on purpose). Waits poll with a deadline.
"""
from __future__ import annotations

import json
import os
import pwd
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import yaml

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable

HEARTBEAT_MS = 200
FAST_SCHEDULING = {"restartDelay": 200, "stopTimeoutSeconds": 2, "initTimeoutSeconds": 10}

# A strategy that keeps quiet (nothing in output.log) and records what it was given in its state.
QUIET_JS = r"""
export async function st_init(ctx) {
  ctx.state.params = ctx.params;
  ctx.state.workerId = ctx.workerId;
}
export async function st_heartbeat(ctx) {
  ctx.state.beats = (ctx.state.beats ?? 0) + 1;
  ctx.state.params = ctx.params;
}
export async function st_exit(ctx) {}
"""


# --- waiting -----------------------------------------------------------------------------------------

def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll until `predicate()` is truthy and return it; fail after `timeout` s saying what was awaited."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what} (last value: {value!r})")
        time.sleep(interval)


# --- /proc -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Proc:
    pid: int
    pgid: int
    uid: int
    state: str
    argv: tuple[str, ...]

    @property
    def cmdline(self) -> str:
        return " ".join(self.argv)

    def environ(self) -> dict[str, str]:
        try:
            raw = Path(f"/proc/{self.pid}/environ").read_bytes()
        except OSError:
            return {}
        out = {}
        for item in raw.split(b"\0"):
            if b"=" in item:
                key, value = item.split(b"=", 1)
                out[key.decode(errors="replace")] = value.decode(errors="replace")
        return out


def proc_info(pid: int) -> Proc | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
        argv = Path(f"/proc/{pid}/cmdline").read_bytes()
        uid = os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None
    fields = stat.rsplit(b")", 1)[1].split()
    return Proc(pid, int(fields[2]), uid, fields[0].decode(),
                tuple(a.decode(errors="replace") for a in argv.split(b"\0") if a))


def processes(markers: Iterable[str]) -> list[Proc]:
    """Live (non-zombie) processes, other than this one, whose command line mentions a marker."""
    markers = [m for m in markers if m]
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        info = proc_info(int(entry))
        if info is not None and info.state not in ("Z", "X") and any(m in info.cmdline for m in markers):
            out.append(info)
    return out


def kill_all(markers: Iterable[str], timeout: float = 10.0) -> list[Proc]:
    """SIGKILL (by pid, or by process group when the process leads its own) every process that
    mentions a marker, until none is left; never this process's group. Returns what was left."""
    markers = list(markers)
    own_group = os.getpgrp()
    deadline = time.monotonic() + timeout
    while True:
        found = processes(markers)
        if not found or time.monotonic() >= deadline:
            return found
        # Supervisors first, so none of them restarts its runner in between.
        for p in sorted(found, key=lambda p: "supervise" not in p.argv):
            try:
                if p.pgid == p.pid and p.pgid != own_group:
                    os.killpg(p.pgid, signal.SIGKILL)
                else:
                    os.kill(p.pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.05)


# --- the CLI -----------------------------------------------------------------------------------------

@dataclass
class Result:
    args: list[str]
    returncode: int
    stdout: bytes
    stderr: bytes
    seconds: float

    @property
    def out(self) -> str:
        return self.stdout.decode(errors="replace")

    @property
    def err(self) -> str:
        return self.stderr.decode(errors="replace")

    def json(self) -> Any:
        try:
            return json.loads(self.stdout)
        except ValueError:
            raise AssertionError(f"no JSON on stdout:\n{self.describe()}") from None

    def describe(self) -> str:
        return (f"$ quantlab {' '.join(self.args)}\nexit {self.returncode} after {self.seconds:.2f}s\n"
                f"--- stdout\n{self.out[-6000:]}\n--- stderr\n{self.err[-6000:]}")


def cli_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUANTLAB_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


# --- a fleet on the cluster --------------------------------------------------------------------------

class SshFleet:
    def __init__(self, cluster: Any, root: Path, *, connect_timeout: float = 3, command_timeout: float = 10):
        self.cluster = cluster
        self.root = root
        self.dir = root / "fleet"
        (self.dir / "strategies").mkdir(parents=True, exist_ok=True)
        (self.dir / "strategies" / "quiet.mjs").write_text(QUIET_JS)
        self.hosts = {h.name: h for h in cluster.hosts}
        self.settings: dict[str, Any] = {
            "apiVersion": "quantlab/v1", "kind": "Fleet", "policy": "load-based",
            "reconcile": {"intervalSeconds": 1},
            "monitor": {"workerOfflineAfterSeconds": 60, "leaseTtlSeconds": 300, "autoRecover": True},
            "ssh": {"parallelism": 8, "config": str(cluster.ssh_config_path),
                    "knownHosts": str(cluster.known_hosts_path),
                    "connectTimeoutSeconds": connect_timeout, "commandTimeoutSeconds": command_timeout},
        }
        self.workers: dict[str, dict[str, Any]] = {}
        self.worker_hosts: dict[str, str] = {}          # worker id -> cluster host name its workdir is on
        self.strategies: dict[str, dict[str, Any]] = {}

    # --- writing -----------------------------------------------------------------------------------

    @property
    def ssh(self) -> dict[str, Any]:
        return self.settings["ssh"]

    def worker(self, wid: str, host: str, *, region: str | None = None, on: str | None = None,
               apis: Iterable[str] = ("bybit",), max_strategies: int = 4, workdir: str | None = None,
               **extra: Any) -> "SshFleet":
        """A worker reached as `host` (an ssh_config alias); its workdir is on cluster host `on`
        (default: the host of that name)."""
        on = on or host
        doc: dict[str, Any] = {"apiVersion": "quantlab/v1", "kind": "Worker", "id": wid, "host": host,
                               "workdir": workdir or f"{self.hosts[on].workdir_root}/{wid}",
                               "capabilities": {"maxStrategies": max_strategies, "supportedApis": list(apis)}}
        if region:
            doc["metadata"] = {"region": region}
        doc.update(extra)
        self.workers[wid] = doc
        self.worker_hosts[wid] = on
        return self

    def strategy(self, sid: str, *, region: str | None = None, params: dict[str, Any] | None = None,
                 heartbeat_ms: int = HEARTBEAT_MS, api: str = "bybit", file: str = "strategies/quiet.mjs",
                 **scheduling: Any) -> "SshFleet":
        requirements: dict[str, Any] = {"api": api}
        if region:
            requirements["region"] = region
        self.strategies[sid] = {"apiVersion": "quantlab/v1", "kind": "Strategy", "id": sid, "strategyFile": file,
                                "params": params or {}, "heartbeatMs": heartbeat_ms, "requirements": requirements,
                                "scheduling": {**FAST_SCHEDULING, **scheduling}}
        return self

    def write(self) -> "SshFleet":
        docs = [self.settings, *self.workers.values(), *self.strategies.values()]
        (self.dir / "fleet.yaml").write_text(yaml.safe_dump_all(docs, sort_keys=False, allow_unicode=True,
                                                                explicit_start=True))
        return self

    # --- running quantlab ----------------------------------------------------------------------------

    def cli(self, *args: Any, check: int | None = 0, timeout: float = 60.0) -> Result:
        argv = [str(a) for a in args] + ["--fleet", str(self.dir)]
        started = time.monotonic()
        done = subprocess.run([PYTHON, "-m", "quantlab", *argv], stdin=subprocess.DEVNULL, capture_output=True,
                              timeout=timeout, env=cli_env(), cwd=REPO)
        result = Result(argv, done.returncode, done.stdout, done.stderr, time.monotonic() - started)
        if check is not None:
            assert result.returncode == check, f"expected exit {check}\n{result.describe()}"
        return result

    def apply(self) -> dict[str, str]:
        """`apply --yes`; every action must succeed. Returns strategy -> worker of the starts."""
        result = self.cli("apply", "--yes", "--output", "json")
        report = result.json()
        assert report["ok"], result.describe()
        return {o["strategy"]: o["worker"] for o in report["outcomes"] if o["action"] == "start"}

    def status(self) -> dict[str, Any]:
        return self.cli("status", "--output", "json").json()

    def controller(self) -> Any:
        from quantlab.controller import Controller, default_state_path
        return Controller(self.dir, default_state_path(self.dir))

    # --- looking at the hosts ------------------------------------------------------------------------

    @property
    def markers(self) -> list[str]:
        return [str(h.workdir_root) + os.sep for h in self.cluster.hosts] + [str(self.dir) + os.sep]

    def workdir(self, wid: str) -> Path:
        return Path(self.workers[wid]["workdir"])

    def instance_dir(self, wid: str, sid: str) -> Path:
        return self.workdir(wid) / "instances" / sid

    def host_of_path(self, path: str) -> str | None:
        for h in self.cluster.hosts:
            if path.startswith(str(h.workdir_root) + os.sep):
                return h.name
        return None

    def runners(self) -> list[Proc]:
        """Runner processes (node, QUANTLAB_STRATEGY_ID in their environment) on the cluster's hosts."""
        return [p for p in processes(self.markers)
                if p.argv and os.path.basename(p.argv[0]).startswith("node") and "QUANTLAB_STRATEGY_ID" in p.environ()]

    def runners_by_strategy(self) -> dict[str, list[Proc]]:
        out: dict[str, list[Proc]] = {}
        for p in self.runners():
            out.setdefault(p.environ()["QUANTLAB_STRATEGY_ID"], []).append(p)
        return out

    def wait_runners(self, expected: dict[str, str], timeout: float = 15.0) -> dict[str, Proc]:
        """Wait until exactly one runner per expected strategy runs, with a heartbeat written, and
        no other runner; returns strategy -> its runner."""
        def ready() -> dict[str, Proc] | None:
            found = self.runners_by_strategy()
            if set(found) != set(expected) or any(len(v) != 1 for v in found.values()):
                return None
            for sid, wid in expected.items():
                if not (self.instance_dir(wid, sid) / "heartbeat.json").exists():
                    return None
            return {sid: procs[0] for sid, procs in found.items()}
        return wait_for(ready, timeout, f"one heartbeating runner for each of {sorted(expected)}")

    @property
    def login_uid(self) -> int:
        return pwd.getpwnam(self.cluster.user).pw_uid

    def give_to_login_user(self, path: Path) -> None:
        self.cluster.chown_to_user(path, recursive=False)

    # --- teardown ------------------------------------------------------------------------------------

    def reap(self) -> list[Proc]:
        return kill_all(self.markers)
