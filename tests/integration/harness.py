"""Helpers for the end-to-end tests: real fleets in tmp dirs, the real CLI, real processes.

No mocks: every test drives `python -m quantlab` as a subprocess against a fleet directory it wrote,
on `host: local` workers, and looks at the result the way an operator would (the CLI's JSON, the
files the agent and runner keep, and /proc). Waits poll with a deadline (`wait_for`); nothing sleeps
to synchronise. The fixtures in conftest.py tear everything down.

Imported by conftest.py and the test modules as `harness` (pytest's default "prepend" import mode
puts this folder on sys.path; it has no __init__.py).
"""
from __future__ import annotations

import copy
import ctypes
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import yaml

from tests.support import Proc, alive, cli_env, hold_for, kill_all, proc_info, processes, wait_for  # noqa: F401

REPO = Path(__file__).resolve().parents[2]
EXAMPLE_FLEET = REPO / "fleet"
PYTHON = sys.executable

# Fast settings for every test fleet (the spec allows sub-second durations).
HEARTBEAT_MS = 300         # the supervisor restarts a runner silent for 3 x this: room for a busy disk (fsync) and CPU
FAST_SCHEDULING = {"restartDelay": 100, "stopTimeoutSeconds": 2, "initTimeoutSeconds": 5}
LONG_LEASE = 300
INTERVAL = 0.5


# --- /proc -------------------------------------------------------------------------------------------

def runners(marker: str) -> list[Proc]:
    """Runner processes (node, with QUANTLAB_STRATEGY_ID in their environment) under `marker`."""
    return [p for p in processes(marker)
            if p.argv and os.path.basename(p.argv[0]).startswith("node") and "QUANTLAB_STRATEGY_ID" in p.environ()]


def runner_counts(marker: str) -> Counter:
    """How many runner processes run per strategy id (read from /proc/PID/environ)."""
    return Counter(p.environ().get("QUANTLAB_STRATEGY_ID") for p in runners(marker))


def supervisors(marker: str) -> list[Proc]:
    """One per instance: a supervisor runs as two processes (keeper and supervisor proper) in one
    process group led by the keeper."""
    found = [p for p in processes(marker) if "supervise" in p.argv]
    return [p for p in found if p.pid == p.pgid]


# --- the CLI -----------------------------------------------------------------------------------------

@dataclass
class Result:
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def json(self) -> Any:
        try:
            return json.loads(self.stdout)
        except ValueError:
            raise AssertionError(f"{' '.join(self.argv[2:])} did not print JSON:\n{self.describe()}") from None

    def describe(self) -> str:
        return (f"$ quantlab {' '.join(self.argv[3:])}\nexit {self.returncode} after {self.seconds:.2f}s\n"
                f"--- stdout\n{self.stdout}\n--- stderr\n{self.stderr}")


def quantlab(*args: Any, check: int | None = 0, timeout: float = 60.0, cwd: Path | None = None) -> Result:
    """Run `python -m quantlab ARGS` with no terminal on stdin; assert its exit code unless check=None."""
    argv = [PYTHON, "-m", "quantlab", *map(str, args)]
    started = time.monotonic()
    done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout,
                          env=cli_env(), cwd=cwd or REPO)
    result = Result(argv, done.returncode, done.stdout, done.stderr, time.monotonic() - started)
    if check is not None:
        assert result.returncode == check, f"expected exit {check}\n{result.describe()}"
    return result


def spawn_quantlab(*args: Any, log: Path) -> subprocess.Popen:
    """Start `python -m quantlab ARGS` in its own session, stdout+stderr into `log`."""
    with open(log, "ab") as out:
        return subprocess.Popen([PYTHON, "-m", "quantlab", *map(str, args)], stdin=subprocess.DEVNULL,
                                stdout=out, stderr=subprocess.STDOUT, env=cli_env(), cwd=REPO,
                                start_new_session=True)


# --- bad input, judged: a deadline, no traceback, the words promised, nothing changed -----------------

DEADLINE = 20.0                # seconds a refusal may take before it counts as a hang


def ql(*args: Any, cwd: Path | None = None, unprivileged: bool = False, timeout: float = DEADLINE) -> Result:
    """`python -m quantlab ARGS`; a command still running after `timeout` fails the test as hung,
    with the tail of what it printed. `unprivileged`: as a user whom permission bits bind (root
    without the capabilities that ignore them, see `drop_permission_overrides`)."""
    argv = [PYTHON, "-m", "quantlab", *map(str, args)]
    preexec = drop_permission_overrides if unprivileged and os.geteuid() == 0 else None
    started = time.monotonic()
    try:
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout,
                              env=cli_env(), cwd=cwd or REPO, preexec_fn=preexec)
    except subprocess.TimeoutExpired as exc:
        hung = exc
    else:
        return Result(argv, done.returncode, done.stdout, done.stderr, time.monotonic() - started)
    import pytest

    pytest.fail(f"$ quantlab {' '.join(map(str, args))}\nhung: still running after {timeout:g}s (killed)\n"
                f"--- stdout (tail)\n{_tail(hung.stdout)}\n--- stderr (tail)\n{_tail(hung.stderr)}")


def _tail(data: Any, lines: int = 30) -> str:
    """The last lines of what a killed command printed (bytes or text, or None)."""
    text = data.decode(errors="replace") if isinstance(data, bytes) else (data or "")
    return "\n".join(text.splitlines()[-lines:])


def check(result: Result, code: int, *fragments: str) -> None:
    """Exit `code`, no traceback, and every fragment in what it printed."""
    shown = result.describe()
    assert result.returncode == code, f"expected exit {code}\n{shown}"
    assert "Traceback" not in result.output, f"printed a traceback\n{shown}"
    for fragment in fragments:
        assert fragment in result.output, f"expected {fragment!r} in the output\n{shown}"


def tree(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every path under `root` (symlinks not followed) with its mode, size and mtime."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            info = Path(dirpath, name).lstat()
            found[str(Path(dirpath, name).relative_to(root))] = (
                info.st_mode, info.st_size if stat.S_ISREG(info.st_mode) else 0, info.st_mtime_ns)
    return found


# Root is not stopped by permission bits. Cases about permissions run the CLI as root without
# CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH (dropped from the bounding set just before exec), so that
# the bits of root-owned files bind it like any other user's. Switching to another uid instead would
# also lock the process out of its interpreter when that lives in a private home folder.
PR_CAPBSET_DROP = 24
PERMISSION_OVERRIDES = (1, 2)         # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH


def drop_permission_overrides() -> None:
    """In the child, before exec: root keeps its uid but loses the capabilities that ignore
    permission bits; exec cannot give them back once they left the bounding set."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in PERMISSION_OVERRIDES:
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def permission_problem(scratch: Path) -> str | None:
    """Why `ql(..., unprivileged=True)` would not run where permission bits stop it, or None.
    `scratch`: an empty folder of the caller's to try it on."""
    if os.geteuid() != 0:
        return None
    status = Path("/proc/self/status").read_text()
    inheritable = int(next(line.split()[1] for line in status.splitlines() if line.startswith("CapInh:")), 16)
    if inheritable & sum(1 << cap for cap in PERMISSION_OVERRIDES):
        return "root's permission overrides are inheritable capabilities here: exec keeps them"
    scratch.chmod(0o000)
    try:
        probe = subprocess.run([PYTHON, "-I", "-S", "-c", "import os, sys; os.listdir(sys.argv[1])", str(scratch)],
                               capture_output=True, timeout=DEADLINE, preexec_fn=drop_permission_overrides)
    except subprocess.SubprocessError as exc:
        return f"cannot drop root's permission overrides here: {exc}"
    finally:
        scratch.chmod(0o700)
    if probe.returncode == 0:
        return "root still reads a mode-000 folder after dropping its permission overrides"
    return None


# --- the test strategy ---------------------------------------------------------------------------------

# Records what the runner hands it into files of its checkpoint folder (QUANTLAB_STATE_DIR), and
# misbehaves on request through its params:
#   hangAfter: N     st_heartbeat never settles from beat N+1 on (a timer keeps the loop busy, so this
#                    is a live process that stops heartbeating, not an exit)
#   throwAlways      st_heartbeat throws every time
#   throwWhile: F    st_heartbeat throws while the file F exists (an exchange that is down, then back)
#   logBeats         ctx.log a line at every beat
#   fillMb: N        append 1 MB to a file of its checkpoint folder at every beat, N MB in all (a
#                    strategy that fills its worker's disk); errors are ignored
#   forgeFence: T    at every beat, put term T (a string of digits) for every state into its worker's
#                    agent/fence.json, as a strategy running as the agent's user can
#   forgeLease       "forge": rewrite QUANTLAB_LEASE_FILE with a deadline far ahead at every beat;
#                    "replay": keep putting back the first renewal it saw there (a genuine one, old)
#   exitDelayMs      st_exit takes this long
#   envHash: [K..]   writes sha256 of process.env[K] (or null) to env-hash.json, never the value
#   token            printed with ctx.log by st_init
PROBE_JS = r"""
import fs from 'node:fs';
import path from 'node:path';
import crypto from 'node:crypto';

const dir = process.env.QUANTLAB_STATE_DIR;
function put(name, value) {
  const file = path.join(dir, name);
  fs.writeFileSync(`${file}.tmp`, JSON.stringify(value));
  fs.renameSync(`${file}.tmp`, file);
}
const add = (name, line) => fs.appendFileSync(path.join(dir, name), `${line}\n`);
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
let beats = 0; // this process's beats (ctx.state survives restarts; this does not)
let filled = 0; // MB appended by fillMb

export async function st_init(ctx) {
  add('init.log', `${process.pid} ${ctx.epoch}`);
  put('params.json', ctx.params);
  const env = Object.fromEntries(Object.entries(process.env).filter(([k]) => k.startsWith('QUANTLAB_')));
  put('ctx.json', { id: ctx.id, epoch: ctx.epoch, workerId: ctx.workerId, region: ctx.region, proxy: ctx.proxy,
    pid: process.pid, env });
  const hashes = {};
  for (const key of ctx.params.envHash ?? []) {
    hashes[key] = key in process.env ? crypto.createHash('sha256').update(process.env[key]).digest('hex') : null;
  }
  put('env-hash.json', hashes);
  ctx.log(`probe ${ctx.id} started, epoch ${ctx.epoch}, token ${ctx.params.token ?? '-'}`);
}

export async function st_heartbeat(ctx) {
  beats += 1;
  ctx.state.beats = (ctx.state.beats ?? 0) + 1;
  const p = ctx.params;
  if (p.throwAlways) throw new Error(`probe failure number ${beats}`);
  if (p.throwWhile && fs.existsSync(p.throwWhile)) throw new Error(`probe: ${p.throwWhile} exists`);
  if (p.logBeats) ctx.log(`beat ${beats} epoch ${ctx.epoch}`);
  if (p.forgeLease) forgeLease(p.forgeLease, ctx.epoch);
  if (p.forgeFence) forgeFence(p.forgeFence);
  if (p.fillMb && filled < p.fillMb) {
    filled += 1;
    try { fs.appendFileSync(path.join(dir, 'junk'), Buffer.alloc(1 << 20, 120)); } catch (e) { /* full */ }
  }
  if (p.hangAfter !== undefined && beats > p.hangAfter) {
    add('hang.log', `${process.pid} ${Date.now()}`);
    setInterval(() => {}, 1000);
    await new Promise(() => {});
  }
}

function forgeFence(term) {
  const file = path.resolve(dir, '..', '..', '..', 'agent', 'fence.json');
  let seen;
  try { seen = JSON.parse(fs.readFileSync(file, 'utf8')); } catch (e) { return; }
  // Written as text: a JavaScript number cannot hold every term a JSON file can.
  const text = '{' + Object.keys(seen).map((k) => `${JSON.stringify(k)}: ${term}`).join(', ') + '}';
  fs.writeFileSync(`${file}.forged`, text);
  fs.renameSync(`${file}.forged`, file);
  add('forged.log', `${Date.now()}`);
}

let replayed = null;
function forgeLease(how, epoch) {
  const file = process.env.QUANTLAB_LEASE_FILE;
  let lease;
  if (how === 'forge') {
    lease = { epoch, deadline: 1e12, expiresAt: Date.now() + 1e9 };
  } else {
    try {
      const now = JSON.parse(fs.readFileSync(file, 'utf8'));
      if (replayed === null && now.proof) replayed = now;
    } catch (e) { return; }
    if (replayed === null) return;
    lease = replayed;
  }
  fs.writeFileSync(`${file}.forged`, JSON.stringify(lease));
  fs.renameSync(`${file}.forged`, file);
  add('forged.log', `${Date.now()}`);
}

export async function st_exit(ctx) {
  add('exit-begin.log', `${process.pid} ${Date.now()}`);
  if (ctx.params.exitDelayMs) await sleep(ctx.params.exitDelayMs);
  add('exit.log', `${process.pid} ${Date.now()}`);
}
"""


# --- fleet directories -----------------------------------------------------------------------------------

class FleetDir:
    """A fleet directory written by a test, and the ways to look at what quantlab made of it."""

    def __init__(self, root: Path, *, lease_ttl: float = LONG_LEASE, interval: float = INTERVAL):
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.marker = str(root.parent) + os.sep       # every process this test starts has it in argv
        self.settings: dict[str, Any] = {
            "apiVersion": "quantlab/v1", "kind": "Fleet", "policy": "load-based",
            "reconcile": {"intervalSeconds": interval},
            "monitor": {"workerOfflineAfterSeconds": 30, "leaseTtlSeconds": lease_ttl, "autoRecover": True},
            "ssh": {"commandTimeoutSeconds": 30},
        }
        self.workers: dict[str, dict[str, Any]] = {}
        self.strategies: dict[str, dict[str, Any]] = {}
        self.daemons: list[subprocess.Popen] = []
        (root / "strategies").mkdir(exist_ok=True)
        (root / "strategies" / "probe.mjs").write_text(PROBE_JS)

    # --- writing -----------------------------------------------------------------------------------

    def short_lease(self, ttl: float, *, cron_period: float | None = None) -> "FleetDir":
        """A lease of `ttl` seconds, with the other settings of the lease rule made short enough for
        it: a controller restart and a probe deadline of at most half a second."""
        self.settings["monitor"].update(leaseTtlSeconds=ttl, controllerRestartSeconds=0.5)
        self.settings["reconcile"]["probeDeadlineSeconds"] = min(0.5, self.settings["reconcile"]["intervalSeconds"])
        if cron_period is not None:
            self.settings["reconcile"]["cronPeriodSeconds"] = cron_period
        return self

    def worker(self, wid: str, apis: Iterable[str] = ("paper",), max_strategies: int = 4, **extra: Any) -> "FleetDir":
        doc: dict[str, Any] = {"apiVersion": "quantlab/v1", "kind": "Worker", "id": wid, "host": "local",
                               "capabilities": {"maxStrategies": max_strategies, "supportedApis": list(apis)}}
        metadata = {k: extra.pop(k) for k in ("region", "proxy") if k in extra}
        if metadata:
            doc["metadata"] = metadata
        doc.update(extra)
        self.workers[wid] = doc
        return self

    def strategy(self, sid: str, params: dict[str, Any] | None = None, *, api: str = "paper",
                 heartbeat_ms: int = HEARTBEAT_MS, desired: str | None = None,
                 requirements: dict[str, Any] | None = None, file: str = "strategies/probe.mjs",
                 **scheduling: Any) -> "FleetDir":
        doc: dict[str, Any] = {"apiVersion": "quantlab/v1", "kind": "Strategy", "id": sid, "strategyFile": file,
                               "params": params or {}, "heartbeatMs": heartbeat_ms,
                               "requirements": {"api": api, **(requirements or {})},
                               "scheduling": {**FAST_SCHEDULING, **scheduling}}
        if desired:
            doc["desiredState"] = desired
        self.strategies[sid] = doc
        return self

    def write(self) -> "FleetDir":
        (self.root / "fleet.yaml").write_text(yaml.safe_dump(self.settings, sort_keys=False))
        (self.root / "workers.yaml").write_text(yaml.safe_dump_all(list(self.workers.values()), sort_keys=False))
        path = self.root / "strategies.yaml"
        if self.strategies:
            # allow_unicode: the YAML keeps params as written; explicit_start: `---` between documents.
            path.write_text(yaml.safe_dump_all(list(self.strategies.values()), sort_keys=False,
                                               allow_unicode=True, explicit_start=True))
        else:
            path.unlink(missing_ok=True)      # an empty YAML file is invalid; no file means no strategies
        return self

    # --- the CLI -----------------------------------------------------------------------------------

    def ql(self, command: str, *args: Any, check: int | None = 0, timeout: float = 60.0) -> Result:
        return quantlab(command, "--fleet", self.root, *args, check=check, timeout=timeout)

    def apply(self, *args: Any, check: int | None = 0) -> Result:
        return self.ql("apply", "--yes", *args, check=check)

    def plan(self, *args: Any, check: int | None = 0) -> dict[str, Any]:
        return self.ql("plan", "--output", "json", *args, check=check).json()

    def status(self) -> dict[str, Any]:
        return self.ql("status", "--output", "json").json()

    def strategy_status(self, sid: str) -> dict[str, Any]:
        found = [s for s in self.status()["strategies"] if s["id"] == sid]
        assert found, f"{sid} is not in status"
        return found[0]

    def events(self, *args: Any) -> list[dict[str, Any]]:
        return self.ql("events", "--output", "json", *args).json()

    def spawn(self, command: str, *args: Any, log: Path) -> subprocess.Popen:
        proc = spawn_quantlab(command, "--fleet", self.root, *args, log=log)
        self.daemons.append(proc)
        return proc

    # --- what is on the "hosts" ----------------------------------------------------------------------

    @property
    def state_path(self) -> Path:
        return self.root / ".quantlab" / "state.json"

    def state(self) -> dict[str, Any]:
        return json.loads(self.state_path.read_text())

    def placement(self, sid: str) -> dict[str, Any] | None:
        try:
            return self.state().get("placements", {}).get(sid)
        except FileNotFoundError:
            return None

    def workdir(self, wid: str) -> Path:
        return self.root / ".quantlab" / "workers" / wid

    def instance_dirs(self, sid: str) -> list[Path]:
        return sorted(p for p in (self.root / ".quantlab" / "workers").glob(f"*/instances/{sid}") if p.is_dir())

    def find_idir(self, sid: str) -> Path | None:
        """The instance folder of `sid` on the worker the state file places it on, else the only
        one there is; None while there is none (or several and no placement says which)."""
        placed = self.placement(sid)
        if placed is not None:
            return self.workdir(placed["worker"]) / "instances" / sid
        found = self.instance_dirs(sid)
        return found[0] if len(found) == 1 else None

    def idir(self, sid: str) -> Path:
        found = self.find_idir(sid)
        assert found is not None, f"{sid}: no single instance folder ({self.instance_dirs(sid)})"
        return found

    def read_json(self, sid: str, name: str) -> Any:
        folder = self.find_idir(sid)
        try:
            return json.loads((folder / name).read_text()) if folder else None
        except (FileNotFoundError, ValueError):
            return None

    def heartbeat(self, sid: str) -> dict[str, Any] | None:
        return self.read_json(sid, "heartbeat.json")

    def host_status(self, sid: str) -> dict[str, Any] | None:
        return self.read_json(sid, "status.json")

    def recorded(self, sid: str, name: str) -> Any:
        """A JSON file the probe strategy wrote into its checkpoint folder."""
        return self.read_json(sid, f"state/{name}")

    def lines(self, sid: str, name: str) -> list[str]:
        folder = self.find_idir(sid)
        try:
            return (folder / "state" / name).read_text().splitlines() if folder else []
        except FileNotFoundError:
            return []

    def host_events(self, sid: str) -> list[dict[str, Any]]:
        folder = self.find_idir(sid)
        try:
            return [json.loads(line) for line in (folder / "events.log").read_text().splitlines()] if folder else []
        except FileNotFoundError:
            return []

    def runner_pid(self, sid: str) -> int | None:
        """The pid of the runner recorded for `sid`, when that process is alive."""
        folder = self.find_idir(sid)
        try:
            pid = int((folder / "runner.pid").read_text().split()[0]) if folder else None
        except (FileNotFoundError, ValueError, IndexError):
            return None
        return pid if alive(pid) else None

    def supervisor_pid(self, sid: str) -> int | None:
        folder = self.find_idir(sid)
        try:
            pid = int((folder / "supervisor.pid").read_text().split()[0]) if folder else None
        except (FileNotFoundError, ValueError, IndexError):
            return None
        return pid if alive(pid) else None

    def running(self, worker: str, sids: Iterable[str], max_strategies: int = 8) -> "FleetDir":
        """One worker with these strategies, applied, each beating once."""
        self.worker(worker, max_strategies=max_strategies)
        for sid in sids:
            self.strategy(sid)
        self.write()
        self.apply()
        for sid in sids:
            self.beating(sid, beats=1)
        return self

    def beating(self, sid: str, timeout: float = 10.0, beats: int = 2) -> dict[str, Any]:
        """Wait until `sid` has a live runner whose heartbeat file shows `beats` more beats than now."""
        pid = wait_for(lambda: self.runner_pid(sid), timeout, what=f"a live runner of {sid}")
        first = wait_for(lambda: self.heartbeat(sid), timeout, what=f"a heartbeat file of {sid}")
        hb = wait_for(lambda: (h := self.heartbeat(sid)) and h["beats"] >= first["beats"] + beats and h,
                      timeout, what=f"{sid}'s heartbeat beats to advance past {first['beats'] + beats - 1}")
        assert alive(pid), f"{sid}'s runner {pid} died while beating; its host's events: {self.host_events(sid)}"
        return hb

    def runner_counts(self) -> Counter:
        return runner_counts(self.marker)

    # --- teardown -----------------------------------------------------------------------------------

    def stop_daemons(self) -> None:
        for proc in self.daemons:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except OSError:
                    pass
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass


def copy_example_fleet(dest: Path, heartbeat_ms: int = HEARTBEAT_MS, lease_ttl: float = LONG_LEASE) -> FleetDir:
    """The example fleet (fleet/), with fast heartbeats and settings, as a FleetDir in `dest`."""
    fl = FleetDir(dest, lease_ttl=lease_ttl)
    shutil.copytree(EXAMPLE_FLEET / "strategies", dest / "strategies", dirs_exist_ok=True)
    for path in sorted(EXAMPLE_FLEET.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc:
                continue
            doc = copy.deepcopy(doc)
            if doc["kind"] == "Worker":
                fl.workers[doc["id"]] = doc
            elif doc["kind"] == "Strategy":
                doc["heartbeatMs"] = heartbeat_ms
                doc["scheduling"] = {**doc.get("scheduling", {}), **FAST_SCHEDULING}
                fl.strategies[doc["id"]] = doc
            elif doc["kind"] == "Fleet":
                doc["reconcile"] = {"intervalSeconds": INTERVAL}
                doc["monitor"] = {**doc.get("monitor", {}), "leaseTtlSeconds": lease_ttl}
                fl.settings = doc
    return fl.write()
