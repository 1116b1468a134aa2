"""Integration tests for the reference JavaScript runner (quantlab/host/runner.mjs).

Every test starts the real runner with `node` in a tmp_path and watches the heartbeat file the way
the supervisor does. No mocks; waits poll with a deadline instead of sleeping.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest

REPO = Path(__file__).resolve().parents[2]
RUNNER = REPO / "quantlab" / "host" / "runner.mjs"
EXAMPLES = REPO / "fleet" / "strategies"
HEARTBEAT_MS = 50
TIMEOUT = 5.0  # generous upper bound for any single wait; a passing wait returns far sooner
# An intermediate parent for the runner: starts it, writes its pid to argv[1], waits for it.
PARENT = [sys.executable, "-c", "import subprocess, sys\n"
          "child = subprocess.Popen(sys.argv[2:])\n"
          "open(sys.argv[1], 'w').write(str(child.pid))\n"
          "child.wait()"]


def _node_or_reason() -> tuple[str | None, str]:
    node = shutil.which("node")
    if node is None:
        return None, "node is not on PATH (the reference runner needs Node.js 18+)"
    out = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=10).stdout.strip()
    major = int(out.lstrip("v").split(".")[0] or 0)
    if major < 18:
        return None, f"node {out} is too old (the reference runner needs Node.js 18+)"
    return node, ""


@pytest.fixture(scope="session")
def node() -> str:
    path, reason = _node_or_reason()
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}; CI=true, so this is a failure, not a skip")
        pytest.skip(reason)
    return path


def wait_for(predicate: Callable[[], object], timeout: float = TIMEOUT, what: str = "condition"):
    """Poll every 20 ms until predicate() is truthy; return its value or fail with `what`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


class Runner:
    """One runner process plus the files the supervisor would give it."""

    def __init__(self, node: str, base: Path, strategy: Path, params: dict | None = None,
                 under_parent: bool = False, **env: str):
        self.base = base
        self.state_dir = base / "state"
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.heartbeat_file = base / "heartbeat.json"
        self.stdout_file = base / "stdout.log"
        self.stderr_file = base / "stderr.log"
        self.env = {
            "PATH": os.environ.get("PATH", ""),
            "QUANTLAB_STRATEGY_ID": "test-strategy",
            "QUANTLAB_STRATEGY_FILE": str(strategy),
            "QUANTLAB_PARAMS": json.dumps(params if params is not None else {}),
            "QUANTLAB_HEARTBEAT_MS": str(HEARTBEAT_MS),
            "QUANTLAB_STATE_DIR": str(self.state_dir),
            "QUANTLAB_HEARTBEAT_FILE": str(self.heartbeat_file),
            "QUANTLAB_WORKER_ID": "worker-001",
            "QUANTLAB_REGION": "JP",
            "QUANTLAB_EPOCH": "7",
            "QUANTLAB_PROXY": "",
            **env,
        }
        self.node = node
        self.proc: subprocess.Popen | None = None
        # under_parent: self.proc is an intermediate parent, and the runner its child (pid in this file).
        self.child_pid_file = base / "runner.pid" if under_parent else None

    def start(self, keep_heartbeat: bool = False) -> "Runner":
        # Like the supervisor, forget the previous run's heartbeat so a wait cannot see an old file.
        if not keep_heartbeat:
            self.heartbeat_file.unlink(missing_ok=True)
        argv = [self.node, str(RUNNER)]
        if self.child_pid_file is not None:
            argv = [*PARENT, str(self.child_pid_file), *argv]
        with open(self.stdout_file, "ab") as out, open(self.stderr_file, "ab") as err:
            self.proc = subprocess.Popen(argv, env=self.env, stdout=out, stderr=err,
                                         stdin=subprocess.DEVNULL, cwd=self.base)
        return self

    def child_pid(self) -> int | None:
        try:
            return int(self.child_pid_file.read_text())
        except (AttributeError, FileNotFoundError, ValueError):
            return None

    def heartbeat(self) -> dict | None:
        try:
            return json.loads(self.heartbeat_file.read_text())
        except FileNotFoundError:
            return None

    def state(self) -> dict:
        return json.loads((self.state_dir / "state.json").read_text())

    def wait_beats(self, n: int, timeout: float = TIMEOUT) -> dict:
        def reached():
            self.assert_alive()
            hb = self.heartbeat()
            return hb if hb and hb["beats"] >= n else None
        return wait_for(reached, timeout, f"beats >= {n}")

    def wait_refreshes(self, count: int) -> dict:
        """Wait until the heartbeat file has been rewritten `count` more times; return the last."""
        hb = wait_for(self.heartbeat, what="a heartbeat file")
        for _ in range(count):
            t = hb["t"]
            hb = wait_for(lambda: (h := self.heartbeat()) and h["t"] > t and h, what="a fresh heartbeat")
        return hb

    def assert_alive(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"runner exited with {self.proc.returncode}; stderr:\n{self.stderr()}")

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait_exit(self, timeout: float = TIMEOUT) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def stop(self) -> int:
        self.signal(signal.SIGTERM)
        return self.wait_exit()

    def stdout(self) -> str:
        return self.stdout_file.read_text()

    def stderr(self) -> str:
        return self.stderr_file.read_text()

    def wait_gone(self, by: float) -> float:
        """Wait until the runner has exited, at the latest when the boot-time clock reaches `by`;
        return the boot time at which it was seen gone."""
        assert self.proc is not None
        wait_for(lambda: self.proc.poll() is not None, by - boot_seconds(), "the runner to exit")
        return boot_seconds()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=TIMEOUT)
        pid = self.child_pid()
        if pid is not None and not pid_gone(pid) and str(RUNNER) in _cmdline(pid):
            os.kill(pid, signal.SIGKILL)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def pid_gone(pid: int) -> bool:
    """True once `pid` has exited. It is not our child, so a zombie nobody reaps counts as gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat[stat.rindex(")") + 2] == "Z"


def boot_seconds() -> float:
    """The host's boot-time clock (CLOCK_BOOTTIME), the one the agent writes lease deadlines on."""
    return float(Path("/proc/uptime").read_text().split()[0])


def write_lease(path: Path, seconds_ahead: float, *, epoch: int = 7, expires_at: int | None = None) -> float:
    """Grant a lease the way the agent does (one atomic replace); return its boot-time deadline."""
    deadline = boot_seconds() + seconds_ahead
    if expires_at is None:
        expires_at = int((time.time() + seconds_ahead) * 1000)
    replace_file(path, json.dumps({"epoch": epoch, "deadline": deadline, "expiresAt": expires_at}))
    return deadline


def replace_file(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def holds_until(predicate: Callable[[], object], until: float, what: str) -> None:
    """Polling invariant: predicate() stays truthy until the boot-time clock reaches `until`."""
    while boot_seconds() < until:
        assert predicate(), f"{what} stopped holding {until - boot_seconds():.2f}s too early"
        time.sleep(0.02)


@pytest.fixture
def runners(node, tmp_path):
    """Factory: runners(strategy_path, params=..., **env) -> started Runner; all killed at teardown."""
    started: list[Runner] = []

    def make(strategy: Path, params: dict | None = None, *, base: Path | None = None,
             keep_heartbeat: bool = False, under_parent: bool = False, **env: str) -> Runner:
        r = Runner(node, base or tmp_path / f"run{len(started)}", strategy, params, under_parent, **env)
        started.append(r)
        return r.start(keep_heartbeat)

    yield make
    for r in started:
        r.kill()


def store(directory: Path, source: str, ext: str) -> Path:
    """Store a strategy the way the agent does: content-addressed as <dir>/<sha256>.<ext>."""
    directory.mkdir(parents=True, exist_ok=True)
    data = source.encode()
    path = directory / f"{hashlib.sha256(data).hexdigest()}{ext}"
    path.write_bytes(data)
    return path


ESM_COUNTER = """
export function st_init(ctx) { ctx.state.inits = (ctx.state.inits || 0) + 1; ctx.state.count ??= 0; }
export async function st_heartbeat(ctx) { await null; ctx.state.count += 1; ctx.log('beat', ctx.state.count); }
export function st_exit(ctx) { ctx.state.exited = true; }
"""

CJS_COUNTER = """
'use strict';
const fs = require('node:fs');
function st_init(ctx) { ctx.state.count = ctx.state.count || 0; }
function st_heartbeat(ctx) { ctx.state.count += 1; }
function st_exit(ctx) { ctx.state.exited = true; }
module.exports = { st_init, st_heartbeat, st_exit };
"""


# --- loading --------------------------------------------------------------------------------------

@pytest.mark.parametrize("source, ext", [(ESM_COUNTER, ".js"), (CJS_COUNTER, ".js"), (ESM_COUNTER, ".mjs"),
                                         (CJS_COUNTER, ".cjs")],
                         ids=["esm-js", "cjs-js", "mjs", "cjs"])
def test_strategy_kinds_reach_two_beats(runners, tmp_path, source, ext):
    r = runners(store(tmp_path / "files", source, ext))
    hb = r.wait_beats(2)
    assert hb["errorCount"] == 0 and hb["lastError"] is None and hb["paused"] is False
    assert r.stop() == 0
    assert r.state()["count"] >= 2


def test_esm_js_under_commonjs_package_json_loads_through_mjs_copy(runners, tmp_path):
    # An explicit "type": "commonjs" makes every Node version refuse `export` in a .js file.
    files = tmp_path / "files"
    files.mkdir()
    (files / "package.json").write_text('{"type": "commonjs"}')
    strategy = store(files, ESM_COUNTER, ".js")
    r = runners(strategy)
    r.wait_beats(2)
    assert strategy.with_suffix(".mjs").read_text() == ESM_COUNTER


def test_cjs_js_under_module_package_json_loads_through_cjs_copy(runners, tmp_path):
    files = tmp_path / "files"
    files.mkdir()
    (files / "package.json").write_text('{"type": "module"}')
    strategy = store(files, CJS_COUNTER, ".js")
    r = runners(strategy)
    r.wait_beats(2)
    assert strategy.with_suffix(".cjs").exists()


@pytest.mark.parametrize("missing", ["st_init", "st_heartbeat", "st_exit"])
def test_missing_export_is_a_start_error(runners, tmp_path, missing):
    source = "".join(f"export function {name}(ctx) {{}}\n"
                     for name in ("st_init", "st_heartbeat", "st_exit") if name != missing)
    strategy = store(tmp_path / "files", source, ".mjs")
    r = runners(strategy)
    assert r.wait_exit() == 78
    assert f"quantlab-runner: {strategy} does not export {missing}" in r.stderr()
    assert r.heartbeat() is None


def test_st_init_throw_exits_1_without_heartbeat(runners, tmp_path):
    source = ("export function st_init() { throw new Error('no api key'); }\n"
              "export function st_heartbeat() {}\nexport function st_exit() {}\n")
    r = runners(store(tmp_path / "files", source, ".mjs"))
    assert r.wait_exit() == 1
    assert "no api key" in r.stderr()
    assert r.heartbeat() is None


def test_invalid_params_json_is_a_config_error(runners, tmp_path):
    r = runners(store(tmp_path / "files", ESM_COUNTER, ".mjs"), QUANTLAB_PARAMS="{not json")
    assert r.wait_exit() == 78
    assert "QUANTLAB_PARAMS" in r.stderr()


# --- ctx --------------------------------------------------------------------------------------------

CTX_RECORDER = """
export function st_init(ctx) { ctx.state.atInit = { id: ctx.id, params: ctx.params, epoch: ctx.epoch,
  workerId: ctx.workerId, region: ctx.region, proxy: ctx.proxy, leaseExpiresAt: ctx.leaseExpiresAt }; }
export function st_heartbeat(ctx) { ctx.state.lease = ctx.leaseExpiresAt; ctx.log('lease', ctx.leaseExpiresAt, 'two\\nlines'); }
export function st_exit(ctx) {}
"""


def test_ctx_fields_reach_the_strategy(runners, tmp_path):
    lease = tmp_path / "lease.json"
    first = int(time.time() * 1000) + 3_600_000            # an hour ahead: the lease is valid
    write_lease(lease, 3600, epoch=42, expires_at=first)
    params = {"symbol": "BTCUSDT", "account": "wjcgm@bbt-sub1", "grid": [1, 2.5], "nested": {"a": None}}
    r = runners(store(tmp_path / "files", CTX_RECORDER, ".mjs"), params,
                QUANTLAB_STRATEGY_ID="grid-btc-sub1", QUANTLAB_EPOCH="42", QUANTLAB_WORKER_ID="worker-003",
                QUANTLAB_PROXY="http://127.0.0.1:8890", QUANTLAB_LEASE_FILE=str(lease))
    r.wait_beats(1)
    assert r.state()["atInit"] == {
        "id": "grid-btc-sub1", "params": params, "epoch": 42, "workerId": "worker-003", "region": "JP",
        "proxy": "http://127.0.0.1:8890", "leaseExpiresAt": first,
    }
    # The supervisor renews the lease: the strategy sees the new deadline on a later beat.
    write_lease(lease, 3780, epoch=42, expires_at=first + 180_000)
    wait_for(lambda: r.state().get("lease") == first + 180_000, what="the renewed lease in ctx")
    # Neither "no lease" nor another epoch's lease takes back the one the runner enforces.
    replace_file(lease, json.dumps({"epoch": 42, "expiresAt": None}))
    holds_until(lambda: r.state().get("lease") == first + 180_000, boot_seconds() + 0.5, "the renewed lease")
    write_lease(lease, 7200, epoch=41)
    holds_until(lambda: r.state().get("lease") == first + 180_000, boot_seconds() + 0.5, "the renewed lease")
    # ctx.log: one line per call, ISO timestamp first.
    line = r.stdout().splitlines()[0]
    stamp, rest = line.split(" ", 1)
    assert stamp.endswith("Z") and "T" in stamp and rest.startswith("lease ")
    assert line.endswith(" two\\nlines")  # a newline in the text stays on one line, escaped


def test_empty_proxy_and_missing_lease_file_are_null(runners, tmp_path):
    r = runners(store(tmp_path / "files", CTX_RECORDER, ".mjs"),
                QUANTLAB_LEASE_FILE=str(tmp_path / "absent.json"))
    r.wait_beats(1)
    seen = r.state()["atInit"]
    assert seen["proxy"] is None and seen["leaseExpiresAt"] is None and seen["epoch"] == 7


PARAM_ECHO = """
import fs from 'node:fs';
export function st_init(ctx) { fs.writeFileSync(ctx.params.out, JSON.stringify(ctx.params)); }
export function st_heartbeat() {}
export function st_exit() {}
"""


def test_params_arrive_verbatim_and_nothing_executes(runners, tmp_path):
    marker = tmp_path / "pwned"
    out = tmp_path / "params-seen.json"
    params = {
        "out": str(out),
        "subshell": f"$(touch {marker})",
        "backticks": f"`touch {marker}`",
        "quotes": "it's \"quoted\" \\ back\\slash",
        "newlines": f"line1\nline2\r\n; touch {marker}",
        "js": f"${{require('fs').writeFileSync('{marker}', 'x')}}",
        "unicode": "ümlaut ✓ 東京",
    }
    r = runners(store(tmp_path / "files", PARAM_ECHO, ".mjs"), params)
    r.wait_beats(1)
    assert json.loads(out.read_text()) == params
    assert not marker.exists()


# --- the lease watchdog ------------------------------------------------------------------------------
# The supervisor fences first; these cover a runner whose supervisor is gone (killed, OOM, frozen), so
# no supervisor is in the picture: the runner alone must stop, however stuck its strategy is.

GRACE_MS = 1000     # QUANTLAB_STOP_TIMEOUT_MS in these tests (st_exit and its fsync on a busy disk)
GRACE = GRACE_MS / 1000
LEASE_AHEAD = 1.5   # seconds from writing the lease to its deadline
SLACK = 1.5         # the watchdog's poll, process start and exit, and a busy machine

LEASE_PROBE = """
import fs from 'node:fs';
let calls = 0;
const note = (ctx, line) => fs.appendFileSync(ctx.params.notes, line + '\\n');
// Never settles, yet keeps the event loop alive: like a request on a socket that never answers.
const forever = () => new Promise(() => { setInterval(() => {}, 1000); });
export function st_init(ctx) { note(ctx, 'init'); }
export function st_heartbeat(ctx) {
  calls += 1;
  ctx.state.lease = ctx.leaseExpiresAt;
  if (calls < 2 || !ctx.params.stuckBeat) return;
  note(ctx, 'stuck');
  if (ctx.params.stuckBeat === 'busy') for (;;) {}
  return forever();
}
export function st_exit(ctx) {
  note(ctx, 'exit');
  if (ctx.params.stuckExit) return forever();
}
"""

needs_boot_clock = pytest.mark.skipif(not Path("/proc/uptime").exists(), reason="needs Linux /proc/uptime")


def start_probe(runners, tmp_path: Path, *, stuck_beat: str | None = None, stuck_exit: bool = False,
                leased: bool = True, expires_at: int | None = None, **env: str) -> tuple[Runner, float | None]:
    """Start LEASE_PROBE with a short grace and (if leased) a lease ending LEASE_AHEAD from now.
    Returns the runner and the lease's boot-time deadline."""
    lease = tmp_path / "lease.json"
    deadline = write_lease(lease, LEASE_AHEAD, expires_at=expires_at) if leased else None
    params = {"notes": str(tmp_path / "notes"), "stuckBeat": stuck_beat, "stuckExit": stuck_exit}
    env = {"QUANTLAB_STOP_TIMEOUT_MS": str(GRACE_MS), "QUANTLAB_LEASE_FILE": str(lease), **env}
    return runners(store(tmp_path / "files", LEASE_PROBE, ".mjs"), params, **env), deadline


def notes(tmp_path: Path) -> list[str]:
    path = tmp_path / "notes"
    return path.read_text().split() if path.exists() else []


def wait_stuck(tmp_path: Path) -> None:
    wait_for(lambda: "stuck" in notes(tmp_path), what="st_heartbeat to get stuck")


@needs_boot_clock
@pytest.mark.parametrize("heartbeat_ms", [HEARTBEAT_MS, 60_000], ids=["beating", "heartbeat-longer-than-lease"])
def test_a_runner_whose_lease_ran_out_stops_itself(runners, tmp_path, heartbeat_ms):
    """Defence in depth: a runner orphaned by a killed supervisor must not trade on past its lease,
    also when its next heartbeat is due long after the lease ends. The boot-time deadline fences: the
    wall-clock expiresAt is an hour stale here and changes nothing."""
    stale = int(time.time() * 1000) - 3_600_000
    r, deadline = start_probe(runners, tmp_path, expires_at=stale, QUANTLAB_HEARTBEAT_MS=str(heartbeat_ms))
    wait_for(r.heartbeat, what="st_init to finish")
    gone_at = r.wait_gone(by=deadline + SLACK)
    assert gone_at > deadline, "stopped before its lease ran out"
    assert r.proc.returncode == 0
    assert notes(tmp_path) == ["init", "exit"]
    assert "quantlab-runner: lease expired" in r.stderr()


@needs_boot_clock
def test_a_runner_frozen_past_its_lease_beats_no_more_when_it_resumes(runners, tmp_path):
    """A host frozen as a whole (a paused VM) resumes after its lease ended, with a heartbeat long
    due: the runner must stop without calling st_heartbeat again, before its watchdog even looks."""
    r, deadline = start_probe(runners, tmp_path)
    wait_for(lambda: (hb := r.heartbeat()) and hb["beats"] >= 2, what="a few beats")
    r.proc.send_signal(signal.SIGSTOP)
    try:
        wait_for(lambda: boot_seconds() > deadline + 0.3, timeout=LEASE_AHEAD + 5, what="the lease to end")
        beats = r.heartbeat()["beats"]
    finally:
        r.proc.send_signal(signal.SIGCONT)
    r.wait_gone(by=boot_seconds() + GRACE + SLACK)
    assert r.heartbeat()["beats"] == beats, "st_heartbeat ran after the lease had ended"
    assert notes(tmp_path)[-1] == "exit"


@needs_boot_clock
def test_a_runner_frozen_past_its_lease_takes_no_later_renewal(runners, tmp_path):
    """Expired stays expired: a renewal written while the runner was frozen past its lease (the agent
    of the previous release did not check) must not bring it back. Its next beat is a minute away,
    so only the watchdog can stop it, and it must not adopt the later deadline it reads first."""
    r, deadline = start_probe(runners, tmp_path, QUANTLAB_HEARTBEAT_MS="60000")
    wait_for(r.heartbeat, what="st_init to finish")
    r.proc.send_signal(signal.SIGSTOP)
    try:
        wait_for(lambda: boot_seconds() > deadline + 0.3, timeout=LEASE_AHEAD + 5, what="the lease to end")
        write_lease(tmp_path / "lease.json", 3600)
    finally:
        r.proc.send_signal(signal.SIGCONT)
    r.wait_gone(by=boot_seconds() + GRACE + SLACK)
    assert r.proc.returncode == 0
    assert notes(tmp_path) == ["init", "exit"]
    assert "quantlab-runner: lease expired" in r.stderr()


@needs_boot_clock
def test_a_runner_whose_lease_ran_out_before_st_init_never_calls_it(runners, tmp_path):
    """Fail closed: the lease has run out by the time the strategy is loaded (a supervisor of the
    previous release started this life late). st_init must not run, not even before the watchdog's
    first look; the runner exits 0 and says why."""
    lease = tmp_path / "lease.json"
    write_lease(lease, -1.0)
    params = {"notes": str(tmp_path / "notes")}
    r = runners(store(tmp_path / "files", LEASE_PROBE, ".mjs"), params,
                QUANTLAB_STOP_TIMEOUT_MS=str(GRACE_MS), QUANTLAB_LEASE_FILE=str(lease))
    assert r.wait_exit() == 0
    assert notes(tmp_path) == [], "a strategy hook ran without a lease"
    assert r.heartbeat() is None
    assert "quantlab-runner: lease expired before st_init: not starting the strategy" in r.stderr()


@needs_boot_clock
def test_lease_expiry_kills_a_heartbeat_stuck_in_a_busy_loop(runners, tmp_path):
    r, deadline = start_probe(runners, tmp_path, stuck_beat="busy")
    wait_stuck(tmp_path)
    gone_at = r.wait_gone(by=deadline + GRACE + SLACK)
    assert gone_at > deadline, "stopped before its lease ran out"
    assert r.proc.returncode == -signal.SIGKILL  # the main thread never got to st_exit
    assert notes(tmp_path) == ["init", "stuck"]
    assert "quantlab-runner: lease expired" in r.stderr()
    assert "killing" in r.stderr()


@needs_boot_clock
def test_lease_expiry_runs_st_exit_past_a_heartbeat_that_never_settles(runners, tmp_path):
    r, deadline = start_probe(runners, tmp_path, stuck_beat="promise")
    wait_stuck(tmp_path)
    gone_at = r.wait_gone(by=deadline + GRACE + SLACK)
    assert gone_at > deadline, "stopped before its lease ran out"
    assert notes(tmp_path) == ["init", "stuck", "exit"]
    assert r.proc.returncode == 0  # st_exit returned within the grace: no kill needed
    assert "quantlab-runner: lease expired" in r.stderr()
    assert "st_heartbeat still running" in r.stderr()


@needs_boot_clock
def test_a_renewal_in_time_keeps_it_running_until_the_new_deadline(runners, tmp_path):
    r, first = start_probe(runners, tmp_path)
    r.wait_beats(1)
    renewed_expires_at = int((time.time() + 2 * LEASE_AHEAD) * 1000)
    second = write_lease(tmp_path / "lease.json", 2 * LEASE_AHEAD, expires_at=renewed_expires_at)
    assert boot_seconds() < first, "the test machine was too slow to renew in time"
    # Two watchdog polls past the first deadline, it still runs and beats.
    holds_until(lambda: r.proc.poll() is None, first + 0.5, "the renewed runner")
    wait_for(lambda: r.state().get("lease") == renewed_expires_at, what="the renewed lease in ctx")
    gone_at = r.wait_gone(by=second + SLACK)
    assert gone_at > second, "stopped before its renewed lease ran out"
    assert r.proc.returncode == 0
    assert "quantlab-runner: lease expired" in r.stderr()


def _another_epoch(lease: Path) -> None:
    write_lease(lease, 3600, epoch=8)


def _no_lease(lease: Path) -> None:
    replace_file(lease, json.dumps({"epoch": 7, "expiresAt": None}))


def _missing(lease: Path) -> None:
    lease.unlink()


def _not_json(lease: Path) -> None:
    replace_file(lease, '{"epoch": 7, "deadline": ')


def _oversized(lease: Path) -> None:
    text = json.dumps({"epoch": 7, "deadline": boot_seconds() + 3600, "expiresAt": None})
    replace_file(lease, text + " " * 5000)


def _fifo(lease: Path) -> None:
    lease.unlink()
    os.mkfifo(lease)  # an open() that waits for a writer would freeze the watchdog


@needs_boot_clock
@pytest.mark.parametrize("replace", [_another_epoch, _no_lease, _missing, _not_json, _oversized, _fifo],
                         ids=lambda f: f.__name__.strip("_").replace("_", "-"))
def test_a_lease_file_that_is_not_a_renewal_does_not_extend_it(runners, tmp_path, replace):
    r, deadline = start_probe(runners, tmp_path)
    r.wait_beats(1)
    replace(tmp_path / "lease.json")
    gone_at = r.wait_gone(by=deadline + SLACK)
    assert gone_at > deadline, "stopped before its lease ran out"
    assert r.proc.returncode == 0
    assert "quantlab-runner: lease expired" in r.stderr()


def test_a_runner_whose_parent_died_stops_itself_even_in_a_busy_loop(runners, tmp_path):
    """The supervisor also sets PR_SET_PDEATHSIG; this covers a parent that died before it could."""
    r, _ = start_probe(runners, tmp_path, stuck_beat="busy", leased=False, under_parent=True)
    wait_stuck(tmp_path)
    pid = r.child_pid()
    assert pid is not None
    r.proc.kill()
    r.proc.wait(timeout=TIMEOUT)
    wait_for(lambda: pid_gone(pid), GRACE + SLACK, "the orphaned runner to stop")
    assert "quantlab-runner: parent process" in r.stderr() and "is gone" in r.stderr()
    assert notes(tmp_path) == ["init", "stuck"]


@pytest.mark.parametrize("stuck_exit", [False, True], ids=["st_exit-returns", "st_exit-never-returns"])
def test_sigterm_while_a_heartbeat_never_settles(runners, tmp_path, stuck_exit):
    r, _ = start_probe(runners, tmp_path, stuck_beat="promise", stuck_exit=stuck_exit, leased=False)
    wait_stuck(tmp_path)
    r.signal(signal.SIGTERM)
    r.wait_gone(by=boot_seconds() + GRACE + SLACK)
    assert notes(tmp_path) == ["init", "stuck", "exit"]
    assert "st_heartbeat still running" in r.stderr()
    if stuck_exit:
        assert r.proc.returncode == -signal.SIGKILL
        assert "killing" in r.stderr()
    else:
        assert r.proc.returncode == 0


def test_a_promise_nothing_can_settle_still_ends_the_runner(runners, tmp_path):
    """The watchdog thread must not keep the process alive once the strategy's loop has run dry."""
    source = ("export function st_init() {}\n"
              "export function st_heartbeat() { return new Promise(() => {}); }\n"
              "export function st_exit() {}\n")
    r = runners(store(tmp_path / "files", source, ".mjs"))
    assert r.wait_exit() == 1
    assert "a strategy hook returned a promise that can never settle" in r.stderr()


# --- heartbeat errors ---------------------------------------------------------------------------------

FLAKY = """
export function st_init(ctx) { ctx.state.calls = 0; }
export function st_heartbeat(ctx) {
  ctx.state.calls += 1;
  if (ctx.state.calls % 2 === 0) throw new Error('exchange said no #' + ctx.state.calls + ' ' + 'x'.repeat(600));
}
export function st_exit() {}
"""


def test_heartbeat_throw_counts_errors_and_loop_goes_on(runners, tmp_path):
    r = runners(store(tmp_path / "files", FLAKY, ".mjs"))
    hb = wait_for(lambda: (h := r.heartbeat()) and h["errorCount"] >= 2 and h["beats"] >= 2 and h,
                  what="two beats and two errors")
    assert hb["lastError"].startswith("exchange said no #")
    assert len(hb["lastError"]) == 500
    assert "exchange said no #2" in r.stderr()
    # Beats continue to be written after the errors.
    later = r.wait_refreshes(2)
    assert later["beats"] + later["errorCount"] > hb["beats"] + hb["errorCount"]
    wait_for(lambda: r.state()["calls"] >= 4, what="state saved after failed beats too")


def test_async_rejection_counts_as_an_error(runners, tmp_path):
    source = ("export function st_init() {}\n"
              "export async function st_heartbeat() { await null; throw 'plain string'; }\n"
              "export function st_exit() {}\n")
    r = runners(store(tmp_path / "files", source, ".mjs"))
    hb = wait_for(lambda: (h := r.heartbeat()) and h["errorCount"] >= 2 and h, what="two errors")
    assert hb["beats"] == 0 and hb["lastError"] == "plain string"


# --- signals and state ----------------------------------------------------------------------------

EXIT_MARKER = """
import fs from 'node:fs';
export function st_init(ctx) { ctx.state.count ??= 0; }
export function st_heartbeat(ctx) { ctx.state.count += 1; }
export async function st_exit(ctx) {
  await new Promise((resolve) => setTimeout(resolve, 20));
  fs.writeFileSync(ctx.params.marker, JSON.stringify({ count: ctx.state.count }));
  ctx.state.exitedCleanly = true;
}
"""


def test_sigterm_runs_st_exit_and_exits_0(runners, tmp_path):
    marker = tmp_path / "exited.json"
    r = runners(store(tmp_path / "files", EXIT_MARKER, ".mjs"), {"marker": str(marker)})
    r.wait_beats(2)
    assert r.stop() == 0
    assert json.loads(marker.read_text())["count"] >= 2
    assert r.state()["exitedCleanly"] is True


def test_sigterm_during_st_init_still_runs_st_exit(runners, tmp_path):
    source = """
import fs from 'node:fs';
export async function st_init(ctx) {
  fs.writeFileSync(ctx.params.started, '');
  await new Promise((resolve) => setTimeout(resolve, 300));
}
export function st_heartbeat(ctx) { ctx.state.beat = true; }
export function st_exit(ctx) { fs.writeFileSync(ctx.params.marker, 'bye'); }
"""
    started, marker = tmp_path / "started", tmp_path / "exited"
    r = runners(store(tmp_path / "files", source, ".mjs"), {"started": str(started), "marker": str(marker)})
    wait_for(started.exists, what="st_init to start")
    assert r.stop() == 0
    assert marker.read_text() == "bye"
    assert "beat" not in r.state()


def test_st_exit_throw_is_reported_and_exit_is_still_0(runners, tmp_path):
    source = ("export function st_init() {}\nexport function st_heartbeat() {}\n"
              "export function st_exit() { throw new Error('cancel-all failed'); }\n")
    r = runners(store(tmp_path / "files", source, ".mjs"))
    r.wait_beats(1)
    assert r.stop() == 0
    assert "cancel-all failed" in r.stderr()


def test_state_persists_across_runs(runners, tmp_path):
    strategy = store(tmp_path / "files", ESM_COUNTER, ".mjs")
    first = runners(strategy, base=tmp_path / "instance")
    first.wait_beats(2)
    assert first.stop() == 0
    count = first.state()["count"]
    assert count >= 2

    second = runners(strategy, base=tmp_path / "instance")
    second.wait_beats(1)
    assert second.state()["inits"] == 2                  # saved by st_init, before the first beat
    wait_for(lambda: second.state()["count"] > count, what="the first beat's checkpoint")


def test_corrupt_state_starts_empty_and_is_kept_aside(runners, tmp_path):
    (tmp_path / "instance" / "state").mkdir(parents=True)
    (tmp_path / "instance" / "state" / "state.json").write_text("{truncated")
    r = runners(store(tmp_path / "files", ESM_COUNTER, ".mjs"), base=tmp_path / "instance")
    r.wait_beats(1)
    assert r.state()["inits"] == 1
    assert [p.read_text() for p in r.state_dir.glob("state.json.corrupt-*")] == ["{truncated"]


CALL_COUNTER = """
import fs from 'node:fs';
let calls = 0;
export function st_init(ctx) {
  const before = Number(fs.existsSync(ctx.params.inits) && fs.readFileSync(ctx.params.inits, 'utf8')) || 0;
  fs.writeFileSync(ctx.params.inits, String(before + 1));
}
export function st_heartbeat(ctx) { calls += 1; fs.writeFileSync(ctx.params.calls, String(calls)); }
export function st_exit() {}
"""


def _calls(path: Path) -> int:
    return int(path.read_text()) if path.exists() else 0


def test_sigusr1_pauses_and_sigusr2_resumes(runners, tmp_path):
    calls, inits = tmp_path / "calls", tmp_path / "inits"
    r = runners(store(tmp_path / "files", CALL_COUNTER, ".mjs"), {"calls": str(calls), "inits": str(inits)})
    r.wait_beats(2)

    r.signal(signal.SIGUSR1)
    wait_for(lambda: (h := r.heartbeat()) and h["paused"] is True, what="paused: true")
    # A beat already running when the signal came may still finish; after that, nothing.
    settled = r.wait_refreshes(2)
    frozen_calls = _calls(calls)
    later = r.wait_refreshes(3)  # the file stays fresh while paused ...
    assert later["paused"] is True
    assert later["beats"] == settled["beats"]  # ... but st_heartbeat is not called
    assert _calls(calls) == frozen_calls
    r.assert_alive()

    r.signal(signal.SIGUSR2)
    hb = r.wait_beats(settled["beats"] + 2)
    assert hb["paused"] is False
    assert inits.read_text() == "1"  # resuming does not run st_init again


def test_start_paused(runners, tmp_path):
    calls, inits = tmp_path / "calls", tmp_path / "inits"
    r = runners(store(tmp_path / "files", CALL_COUNTER, ".mjs"), {"calls": str(calls), "inits": str(inits)},
                QUANTLAB_PAUSED="1")
    first = wait_for(r.heartbeat, what="the heartbeat after st_init")
    assert first["paused"] is True and first["beats"] == 0
    assert inits.read_text() == "1"
    later = r.wait_refreshes(3)
    assert later["paused"] is True and later["beats"] == 0 and not calls.exists()

    r.signal(signal.SIGUSR2)
    assert r.wait_beats(2)["paused"] is False
    assert inits.read_text() == "1"
    assert r.stop() == 0


def test_stale_heartbeat_file_is_removed_at_start(runners, tmp_path):
    base = tmp_path / "instance"
    base.mkdir()
    (base / "heartbeat.json").write_text(json.dumps({"t": 1, "beats": 99, "errorCount": 0, "lastError": None,
                                                     "paused": False}))
    source = """
import fs from 'node:fs';
export async function st_init(ctx) {
  fs.writeFileSync(ctx.params.started, '');
  await new Promise((resolve) => setTimeout(resolve, 60000));
}
export function st_heartbeat() {}
export function st_exit() {}
"""
    started = tmp_path / "started"
    r = runners(store(tmp_path / "files", source, ".mjs"), {"started": str(started)}, base=base,
                keep_heartbeat=True)
    wait_for(started.exists, what="st_init to start")
    assert r.heartbeat() is None  # init has not finished: no heartbeat file, not the old one


# --- the example strategies -------------------------------------------------------------------------

EXAMPLE_PARAMS = {
    "grid-martingale.js": {"symbol": "BTCUSDT", "account": "paper@sub1", "gridCount": 8, "gridSpacing": 0.004,
                           "baseQty": 0.001},
    "martingale.js": {"symbol": "SOLUSDT", "account": "paper@sub2", "baseQty": 0.5, "multiplier": 2, "maxSteps": 4},
    "trend.mjs": {"symbol": "ETHUSDT", "account": "paper@sub3", "fast": 2, "slow": 3},
}


def test_every_example_strategy_is_covered():
    on_disk = {p.name for p in EXAMPLES.iterdir() if p.suffix in {".js", ".mjs", ".cjs", ".ts"}}
    assert on_disk == set(EXAMPLE_PARAMS)


@pytest.mark.parametrize("name", sorted(EXAMPLE_PARAMS))
def test_example_strategy_runs(runners, tmp_path, name):
    # Stored content-addressed, as the agent ships it (<sha256>.js with no package.json around it).
    strategy = store(tmp_path / "files", (EXAMPLES / name).read_text(), Path(name).suffix)
    first = runners(strategy, EXAMPLE_PARAMS[name], base=tmp_path / "instance")
    hb = first.wait_beats(2)
    assert hb["errorCount"] == 0, first.stderr()
    assert first.stop() == 0
    assert first.stderr() == ""
    lines = first.stdout().splitlines()
    assert len(lines) >= 4  # init, two beats, exit
    assert "stopping" in lines[-1]
    saved = first.state()
    assert saved

    # A restart continues the simulation from the checkpoint instead of starting over.
    second = runners(strategy, EXAMPLE_PARAMS[name], base=tmp_path / "instance")
    second.wait_beats(1)
    assert second.heartbeat()["errorCount"] == 0
    # The checkpoint is made durable off the beat, so it may land just after the heartbeat.
    wait_for(lambda: second.state()["ticks"] > saved["ticks"], what="a checkpoint past the restored one")
    assert f"tick {saved['ticks']}," in second.stdout()  # st_init saw the restored state


@pytest.mark.parametrize("exchange,request_fragment", [
    ("okx", "POST /api/v5/trade/cancel-all-after timeOut="), ("bybit", "POST /v5/order/disconnected-cancel-all timeWindow="),
    ("binance", "POST /fapi/v1/countdownCancelAll symbol=BTCUSDT countdownTime=")])
def test_the_example_grid_reconciles_at_start_and_arms_the_exchanges_dead_mans_switch(runners, tmp_path, exchange,
                                                                                       request_fragment):
    lease = tmp_path / "lease.json"
    write_lease(lease, 60)
    strategy = store(tmp_path / "files", (EXAMPLES / "grid-martingale.js").read_text(), ".js")
    r = runners(strategy, {**EXAMPLE_PARAMS["grid-martingale.js"], "exchange": exchange},
                QUANTLAB_LEASE_FILE=str(lease), QUANTLAB_EPOCH="7")
    r.wait_beats(1)
    out = wait_for(lambda: (o := r.stdout()).count("dead man's switch") >= 2 and o, what="the switch armed twice")
    assert "reconcile (paper): a live strategy fetches open orders" in out
    armed = [line for line in out.splitlines() if "dead man's switch (paper, not sent)" in line]
    assert all(request_fragment in line for line in armed), armed
    value = int(armed[-1].rsplit("=", 1)[1])
    # The lease (60 s from now) plus 5 s, within what the exchange allows.
    assert {"okx": 10 <= value <= 120, "bybit": 10 <= value <= 300, "binance": 55_000 <= value <= 65_000}[exchange], armed
    assert r.stop() == 0
