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
from typing import Any, Iterable

import yaml

from tests.support import Proc, cli_env, kill_all, proc_info, processes, wait_for  # noqa: F401

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable

HEARTBEAT_MS = 300         # the supervisor restarts a runner silent for 3 x this: room for a busy disk (fsync) and CPU
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
        self.daemons: list[subprocess.Popen] = []

    # --- writing -----------------------------------------------------------------------------------

    @property
    def ssh(self) -> dict[str, Any]:
        return self.settings["ssh"]

    def short_lease(self, ttl: float, *, cron_period: float | None = None, offline_after: float = 1) -> "SshFleet":
        """A lease of `ttl` seconds, with the other terms of the lease rule short enough for it: a
        controller restart and a probe deadline of half a second, and `cron_period` when the test
        runs `reconcile --once` back to back."""
        self.settings["monitor"] = {"workerOfflineAfterSeconds": offline_after, "leaseTtlSeconds": ttl,
                                    "controllerRestartSeconds": 0.5, "autoRecover": True}
        self.settings["reconcile"]["probeDeadlineSeconds"] = 0.5
        if cron_period is not None:
            self.settings["reconcile"]["cronPeriodSeconds"] = cron_period
        return self

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

    def spawn(self, *args: Any, log: Path) -> subprocess.Popen:
        """Start `python -m quantlab ARGS --fleet DIR` in its own session (the reconcile daemon),
        its output into `log`; killed by `reap()` at teardown."""
        # PYTHONFAULTHANDLER: a test that finds it hung can SIGABRT it for every thread's stack (stop()).
        with open(log, "ab") as out:
            proc = subprocess.Popen([PYTHON, "-m", "quantlab", *map(str, args), "--fleet", str(self.dir)],
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    env={**cli_env(), "PYTHONFAULTHANDLER": "1"}, cwd=REPO, start_new_session=True)
        self.daemons.append(proc)
        return proc

    @staticmethod
    def stop(daemon: subprocess.Popen, log: Path, timeout: float = 30.0) -> int:
        """SIGTERM the daemon and wait for it to exit; returns its exit code. A daemon that does not
        exit in time is aborted (its threads' stacks land in its log) and the test fails with the log."""
        daemon.send_signal(signal.SIGTERM)
        try:
            return daemon.wait(timeout)
        except subprocess.TimeoutExpired:
            daemon.send_signal(signal.SIGABRT)
            daemon.wait(10)
            raise AssertionError(f"the daemon did not stop within {timeout:g}s of SIGTERM:\n{log.read_text()[-20000:]}")

    def apply(self) -> dict[str, str]:
        """`apply --yes`; every action must succeed. Returns strategy -> worker of the starts."""
        result = self.cli("apply", "--yes", "--output", "json")
        report = result.json()
        assert report["ok"], result.describe()
        return {o["strategy"]: o["worker"] for o in report["outcomes"] if o["action"] == "start"}

    def status(self) -> dict[str, Any]:
        return self.cli("status", "--output", "json").json()

    def placements(self) -> dict[str, str]:
        """strategy -> worker, as the state file records them (none before there is a state file)."""
        path = self.dir / ".quantlab" / "state.json"
        if not path.exists():
            return {}
        state = json.loads(path.read_text())
        return {sid: p["worker"] for sid, p in state["placements"].items()}

    def controller(self) -> Any:
        from quantlab.app.controller import Controller, default_state_path
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
            sid = p.environ().get("QUANTLAB_STRATEGY_ID")     # None: it ended since it was listed
            if sid is not None:
                out.setdefault(sid, []).append(p)
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
        for proc in self.daemons:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except OSError:
                    pass
            proc.wait(timeout=10)
        return kill_all(self.markers)
