"""The host agent against hostile instance files.

A strategy runs as the agent's user with its instance folder as working directory, so it can replace
any file there. Each test drives the agent (quantlab/host/agent/) directly, the way the controller does (one
subprocess per call, JSON on stdin), with real `node` runners on workdirs in tmp_path, and checks that
a bad file is that instance's problem only: every probe answers quickly and in full, healthy neighbours
keep running and get their leases renewed, and the hostile instance says what is wrong with it.

`AgentHost` and the `agent_host` fixture are shared with test_containment.py.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support import alive, wait_for

REPO = Path(__file__).resolve().parents[2]
AGENT = REPO / "quantlab" / "host" / "agent"       # the zipapp's folder, runnable as it is
RUNNER = REPO / "quantlab" / "host" / "runner.mjs"
CALL_TIMEOUT = 60.0     # no agent call may hang a test
PROBE_BOUND = 5.0       # "answers quickly": a probe takes a fraction of a second here
TTL = 30.0

CALM = """
export function st_init(ctx) {}
export function st_heartbeat(ctx) {}
export function st_exit(ctx) {}
"""


def not_after(ahead: float = 20.0) -> dict[str, Any]:
    """The not-after a controller would send: this boot, a few seconds ahead on the boot-time clock."""
    boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    return {"bootId": boot_id, "boottime": time.clock_gettime(time.CLOCK_BOOTTIME) + ahead}


class AgentHost:
    """Workdirs under one tmp dir, and agent calls on them as the controller makes them."""

    def __init__(self, root: Path):
        self.root = root

    def workdir(self, name: str) -> Path:
        path = self.root / name
        (path / "agent").mkdir(parents=True, exist_ok=True)
        (path / "files").mkdir(exist_ok=True)
        shutil.copy(RUNNER, path / "agent" / "runner-test.mjs")
        return path

    def run(self, command: str, request: dict[str, Any], *, timeout: float = CALL_TIMEOUT,
            args: tuple[str, ...] = (), **popen: Any) -> subprocess.CompletedProcess:
        """The agent's process as it ended (`popen`: more subprocess.run arguments, e.g. preexec_fn)."""
        return subprocess.run([sys.executable, str(AGENT), command, *args], input=json.dumps(request).encode(),
                              capture_output=True, timeout=timeout, cwd=REPO, **popen)

    def call(self, command: str, request: dict[str, Any], *, timeout: float = CALL_TIMEOUT,
             **popen: Any) -> tuple[dict[str, Any], float]:
        """(answer, seconds it took)."""
        began = time.monotonic()
        done = self.run(command, request, timeout=timeout, **popen)
        took = time.monotonic() - began
        assert done.returncode in (0, 1), f"agent {command} exited {done.returncode}: {done.stderr.decode()}"
        return json.loads(done.stdout or b"null"), took

    def start_request(self, workdir: Path, sid: str, source: str, *, heartbeat_ms: int = 200, epoch: int = 1,
                      params: dict[str, Any] | None = None, ttl: float = TTL, **scheduling: Any) -> dict[str, Any]:
        """The start request a controller sends (the strategy file is put in place)."""
        (workdir / "files" / f"{sid}.mjs").write_text(source)
        return {
            "worker": workdir.name, "workdir": str(workdir), "strategy": sid, "epoch": epoch,
            "specHash": f"hash-{sid}", "file": f"files/{sid}.mjs", "runnerFile": "agent/runner-test.mjs",
            "runner": ["node", "{runner}"], "params": params or {}, "heartbeatMs": heartbeat_ms,
            "scheduling": {"autoRestart": True, "maxRestarts": 100, "restartDelay": 100, "maxErrors": 10,
                           "stopTimeoutSeconds": 1, "initTimeoutSeconds": 10, **scheduling},
            "region": None, "proxy": None, "account": None, "leaseTtlSeconds": ttl, "paused": False,
            "notAfter": not_after(),
        }

    def start(self, workdir: Path, sid: str, source: str, **options: Any) -> dict[str, Any]:
        """Start, as start_request() builds it (`options`: its keywords); it must answer `started`."""
        answer, _ = self.call("start", self.start_request(workdir, sid, source, **options))
        assert answer["result"] == "started", answer
        return answer

    def probe(self, workdirs: list[Path], renew: dict[str, dict[str, int]] | None = None,
              *, ttl: float = TTL, ahead: float = 20.0,
              program: str = "node") -> tuple[dict[str, Any], float]:
        """`ahead`: the request's not-after, seconds from now on the boot-time clock."""
        request = {"workers": [{"id": w.name, "workdir": str(w), "program": program} for w in workdirs],
                   "renew": renew or {}, "leaseTtlSeconds": ttl, "notAfter": not_after(ahead),
                   "eventsSince": {w.name: 0 for w in workdirs}}
        return self.call("probe", request)

    def stop(self, workdir: Path, sid: str, grace: float = 1.0) -> tuple[dict[str, Any], float]:
        return self.call("stop", {"workdir": str(workdir), "strategy": sid, "stopTimeoutSeconds": grace,
                                  "reason": "stopped by the test"})

    @staticmethod
    def folder(workdir: Path, sid: str) -> Path:
        return workdir / "instances" / sid

    def pid(self, workdir: Path, sid: str, name: str = "supervisor.pid") -> int | None:
        try:
            return int((self.folder(workdir, sid) / name).read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def events(self, workdir: Path, sid: str) -> list[dict[str, Any]]:
        try:
            text = (self.folder(workdir, sid) / "events.log").read_text()
        except OSError:
            return []
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def lease_deadline(self, workdir: Path, sid: str) -> float:
        return json.loads((self.folder(workdir, sid) / "lease.json").read_text())["deadline"]

    def status(self, workdir: Path, sid: str) -> dict[str, Any]:
        """status.json as the supervisor last wrote it ({} while it is being replaced)."""
        try:
            return json.loads((self.folder(workdir, sid) / "status.json").read_text())
        except (OSError, ValueError):
            return {}

    def supervisor_log(self, workdir: Path, sid: str) -> str:
        path = self.folder(workdir, sid) / "supervisor.log"
        return path.read_text(errors="replace") if path.exists() else ""


@pytest.fixture
def agent_host(node, reaper, tmp_path) -> AgentHost:
    """`reaper` (conftest.py) kills whatever mentions tmp_path at teardown and fails if anything is left."""
    return AgentHost(tmp_path)


# --- one hostile instance beside healthy ones --------------------------------------------------------

# Each strategy replaces its heartbeat file once st_heartbeat runs, then never returns, so the runner
# never rewrites the file: the supervisor has to deal with what is there.
HOSTILE = """
import fs from 'node:fs';
import { execFileSync } from 'node:child_process';
export function st_init(ctx) {}
export async function st_heartbeat(ctx) {
  const file = process.env.QUANTLAB_HEARTBEAT_FILE;
  const replace = (text) => { fs.writeFileSync(`${file}.new`, text); fs.renameSync(`${file}.new`, file); };
  fs.rmSync(file, { force: true, recursive: true });
  switch (ctx.params.kind) {
    case 'not-an-object': replace('[1,2]'); break;
    case 'wrong-types': replace('{"errorCount": "x", "t": "soon"}'); break;
    case 'fifo': execFileSync('mkfifo', [file]); break;
    case 'dev-zero': fs.symlinkSync('/dev/zero', file); break;
    case 'directory': fs.mkdirSync(file); break;
    case 'oversized': replace(JSON.stringify({ t: Date.now(), pad: 'x'.repeat(1 << 20) })); break;
  }
  await new Promise(() => setInterval(() => {}, 1000));
}
export function st_exit(ctx) {}
"""

# kind -> what the probe's `problems` and the supervisor's events must say about heartbeat.json
HOSTILE_KINDS = {
    "not-an-object": "not a JSON object (list)",
    "wrong-types": "errorCount: expected an integer >= 0",
    "fifo": "not a regular file (fifo)",
    "dev-zero": "not a regular file (symlink)",
    "directory": "not a regular file (directory)",
    "oversized": "too large",
}


def problems_of(answer: dict[str, Any], workdir: Path, sid: str) -> list[str]:
    return answer["workers"][workdir.name]["instances"][sid].get("problems", [])


@pytest.mark.parametrize("kind", sorted(HOSTILE_KINDS))
def test_a_bad_heartbeat_file_is_its_instance_problem_only(agent_host, kind):
    host = agent_host
    first, second = host.workdir("wa"), host.workdir("wb")
    # The healthy ones beat less often: a busy test machine must not make them look dead.
    host.start(first, "calm-a", CALM, heartbeat_ms=500)
    host.start(second, "calm-b", CALM, heartbeat_ms=500)
    host.start(first, "hostile", HOSTILE, params={"kind": kind})
    healthy = [(first, "calm-a"), (second, "calm-b")]
    renew = {"wa": {"calm-a": 1, "hostile": 1}, "wb": {"calm-b": 1}}
    expected = HOSTILE_KINDS[kind]

    def probe_in_full(settled: bool = True) -> dict[str, Any]:
        """A probe that answered quickly, for every instance of both workdirs, renewing the healthy
        ones' leases; once `settled`, they must be running with nothing wrong."""
        answer, took = host.probe([first, second], renew)
        assert took < PROBE_BOUND, f"the probe took {took:.1f}s"
        assert set(answer["workers"]) == {"wa", "wb"}, answer
        assert set(answer["workers"]["wa"]["instances"]) == {"calm-a", "hostile"}, answer
        assert set(answer["workers"]["wa"]["renewed"]) >= {"calm-a"}, answer["workers"]["wa"]
        assert answer["workers"]["wb"]["renewed"] == ["calm-b"], answer["workers"]["wb"]
        for workdir, sid in healthy:
            inst = answer["workers"][workdir.name]["instances"][sid]
            assert "problems" not in inst and inst["status"] in (("running",) if settled else ("starting", "running")), inst
        assert answer["workers"]["wa"]["instances"]["hostile"]["status"] != "unknown", answer
        return answer

    def beating(answer: dict[str, Any]) -> bool:
        return all(answer["workers"][w.name]["instances"][s]["status"] == "running" for w, s in healthy)

    # The healthy ones beat; remember who runs them.
    wait_for(lambda: beating(probe_in_full(settled=False)), 20, what="the healthy instances to beat")
    pids = {(w, s): (host.pid(w, s), host.pid(w, s, "runner.pid")) for w, s in healthy}
    hostile_supervisor = host.pid(first, "hostile")

    # The probe names the file and what is wrong with it, while the bad file is there.
    seen = wait_for(lambda: [p for p in problems_of(probe_in_full(), first, "hostile")
                             if p.startswith("heartbeat.json: ") and expected in p],
                    20, what=f"the probe to report the {kind} heartbeat file")
    assert len(seen[0]) <= 200, seen

    # The supervisor records it once as an instance problem and restarts the runner, saying why.
    events = wait_for(lambda: [e for e in host.events(first, "hostile") if e["event"] == "restart"]
                      and host.events(first, "hostile"), 20, what="a restart of the hostile runner")
    noted = [e for e in events if e["event"] == "instance-problem"]
    assert noted and all("heartbeat.json: " in e["detail"] and expected in e["detail"] for e in noted), events
    assert len({e["detail"] for e in noted}) == len(noted), "one event per distinct problem"
    restart = [e for e in events if e["event"] == "restart"][0]
    assert "no valid heartbeat" in restart["detail"] and expected in restart["detail"], restart

    # Healthy neighbours: same processes, fresh beats, leases that keep moving forward.
    for workdir, sid in healthy:
        before = host.lease_deadline(workdir, sid)
        wait_for(lambda: probe_in_full() and host.lease_deadline(workdir, sid) > before, 10,
                 what=f"a renewal of {sid}'s lease")
        assert (host.pid(workdir, sid), host.pid(workdir, sid, "runner.pid")) == pids[(workdir, sid)]
        assert all(alive(p) for p in pids[(workdir, sid)])
        assert [e["event"] for e in host.events(workdir, sid)] == ["start"]

    # The hostile instance's supervisor never crashed: same process, no traceback.
    assert host.pid(first, "hostile") == hostile_supervisor and alive(hostile_supervisor)
    assert "Traceback" not in host.supervisor_log(first, "hostile")
    final = probe_in_full()["workers"]["wa"]["instances"]["hostile"]
    assert final["alive"] is True and final["restarts"] >= 1, final


# --- files that would block or never end a read -----------------------------------------------------

def make_fifo(path: Path) -> None:
    path.unlink(missing_ok=True)
    os.mkfifo(path)


def test_probe_of_fifos_and_symlinks_returns_within_a_bound(agent_host, tmp_path):
    """No process needed: an instance folder as a strategy could leave it."""
    host = agent_host
    workdir = host.workdir("wa")
    folder = host.folder(workdir, "trap")
    (folder / "state").mkdir(parents=True)
    make_fifo(folder / "status.json")
    (folder / "runner.pid").symlink_to("/dev/zero")
    (folder / "supervisor.pid").symlink_to(folder / "status.json")
    make_fifo(folder / "heartbeat.json")
    (folder / "lease.json").symlink_to("/dev/zero")
    make_fifo(folder / "events.log")
    make_fifo(folder / "spec.json")
    make_fifo(folder / "state" / "pipe")
    (folder / "state" / "zero").symlink_to("/dev/zero")
    (folder / "state" / "state.json").write_text('{"n": 1}')

    answer, took = host.probe([workdir], renew={"wa": {"trap": 1}})
    assert took < PROBE_BOUND, f"the probe took {took:.1f}s"
    trap = answer["workers"]["wa"]["instances"]["trap"]
    assert trap["status"] == "stopped" and trap["alive"] is False, trap
    assert answer["workers"]["wa"]["renewed"] == []
    problems = trap["problems"]
    for name in ("status.json", "runner.pid", "supervisor.pid", "heartbeat.json", "lease.json", "events.log"):
        assert any(p.startswith(name + ": not a regular file") for p in problems), (name, problems)
    # The checkpoint holds the state's regular file only; the FIFO and the link were skipped unopened.
    request = {"workers": {"wa": {"workdir": str(workdir), "instances": {"trap": {"epoch": None, "have": None}}}}}
    answer, took = host.call("checkpoints", request)
    copied = answer["workers"]["wa"]["trap"]
    assert took < PROBE_BOUND and copied["result"] == "copied", copied
    assert set(copied["checkpoint"]["files"]) == {"state.json"}, copied
    request["workers"]["wa"]["instances"]["trap"]["have"] = copied["checkpoint"]["hash"]
    assert host.call("checkpoints", request)[0]["workers"]["wa"]["trap"] == {"result": "unchanged"}

    # stop and logs of it return as well (they replace what is in their way, or refuse it).
    answer, took = host.stop(workdir, "trap")
    assert took < PROBE_BOUND and answer["result"] == "not-running", answer
    make_fifo(folder / "output.log")
    done = subprocess.run([sys.executable, str(AGENT), "logs"], capture_output=True, timeout=CALL_TIMEOUT,
                          input=json.dumps({"workdir": str(workdir), "strategy": "trap", "lines": 10}).encode())
    assert done.returncode == 0 and done.stdout == b"", done


def test_probe_reports_only_well_typed_fields(agent_host):
    """Files of the right kind with the wrong content: the answer keeps the types the controller reads."""
    host = agent_host
    workdir = host.workdir("wa")
    folder = host.folder(workdir, "typed")
    folder.mkdir(parents=True)
    (folder / "status.json").write_text(json.dumps({"state": "error", "epoch": "7", "restarts": -1,
                                                    "startedAt": "now", "reason": "r" * 10000}))
    (folder / "heartbeat.json").write_text(json.dumps({"t": 1, "beats": True, "errorCount": 2,
                                                       "lastError": "e" * 10000}))
    (folder / "lease.json").write_text(json.dumps({"epoch": 1, "deadline": "never"}))
    (folder / "events.log").write_text('[1]\n{"t": "x", "event": "error"}\n{"t": 5, "event": "start", "detail": {"a": 1}}\n')
    (folder / "supervisor.pid").write_text("1 ?\n")
    (folder / "nested").mkdir()
    (workdir / "instances" / "not-a-folder").write_text("x")

    answer, took = host.probe([workdir])
    assert took < PROBE_BOUND
    typed = answer["workers"]["wa"]["instances"]["typed"]
    assert typed["epoch"] is None and typed["restarts"] == 0 and typed["startedAt"] is None, typed
    assert typed["status"] == "error" and typed["reason"].startswith("rrr") and len(typed["reason"]) <= 500, typed
    assert typed["beats"] is None and typed["heartbeatAgeMs"] is None, typed     # no valid heartbeat
    assert typed["errorCount"] == 2 and len(typed["lastError"]) <= 500, typed
    assert typed["leaseLeftSeconds"] is None
    assert typed["events"] == [{"t": 5, "event": "start"}], typed["events"]
    joined = " | ".join(typed["problems"])
    for expected in ("status.json: epoch: expected an integer", "status.json: restarts: expected an integer >= 0",
                     "heartbeat.json: beats: expected an integer >= 0", "lease.json: deadline: expected a number",
                     "supervisor.pid: not a usable pid"):
        assert expected in joined, (expected, typed["problems"])
    stray = answer["workers"]["wa"]["instances"]["not-a-folder"]
    assert stray["status"] == "unknown" and stray["alive"] is False and stray["problems"], stray


SCRIBBLER = """
import fs from 'node:fs';
export function st_init(ctx) {}
export function st_heartbeat(ctx) {
  if (ctx.state.done) return;
  ctx.state.done = true;
  fs.rmSync('status.json', { force: true });
  fs.mkdirSync('status.json');
  fs.writeFileSync('supervisor.pid', 'garbage');
  fs.rmSync('runner.pid', { force: true });
  fs.symlinkSync('/dev/zero', 'runner.pid');
}
export function st_exit(ctx) {}
"""


def test_supervisor_puts_back_the_files_it_owns(agent_host):
    """A strategy scribbling over status.json and the pid files: the probe stays bounded, and the
    supervisor rewrites them (the probe and `stop` rely on them), saying so once per problem."""
    host = agent_host
    workdir = host.workdir("wa")
    host.start(workdir, "scribbler", SCRIBBLER)
    supervisor = host.pid(workdir, "scribbler")
    noted = wait_for(lambda: {e["detail"] for e in host.events(workdir, "scribbler") if e["event"] == "instance-problem"}
                     >= {"status.json: changed by another process; rewritten"} and host.events(workdir, "scribbler"),
                     20, what="the supervisor to notice status.json was replaced")

    def healed() -> dict[str, Any] | None:
        answer, took = host.probe([workdir], renew={"wa": {"scribbler": 1}})
        assert took < PROBE_BOUND
        inst = answer["workers"]["wa"]["instances"]["scribbler"]
        return inst if inst["status"] == "running" and "problems" not in inst and answer["workers"]["wa"]["renewed"] else None

    inst = wait_for(healed, 20, what="status.json and the pid files to be rewritten")
    assert inst["alive"] and host.pid(workdir, "scribbler") == supervisor
    details = [e["detail"] for e in host.events(workdir, "scribbler") if e["event"] == "instance-problem"]
    assert any(d.startswith("supervisor.pid: ") for d in details), noted
    assert any(d.startswith("runner.pid: not a regular file (symlink)") for d in details), noted
    answer, took = host.stop(workdir, "scribbler")
    assert answer["result"] == "stopped" and not alive(supervisor), answer


def test_a_stopped_folder_is_kept_while_a_stray_of_its_copy_runs(agent_host):
    """A start in a folder it made itself skips the scan for strays of an earlier copy (a scan reads
    every process's environment), so prune never removes a folder whose strays still run."""
    host = agent_host
    workdir = host.workdir("wa")
    quiet = "export function st_init() {}\nexport function st_heartbeat() {}\nexport function st_exit() {}\n"
    for sid in ("gone", "now"):
        host.start(workdir, sid, quiet)
        answer, _ = host.stop(workdir, sid)
        assert answer["result"] == "stopped", answer
    # What a copy killed with its supervisor and keeper together leaves: a process with its mark.
    env = dict(os.environ, QUANTLAB_HEARTBEAT_FILE=str(host.folder(workdir, "gone") / "heartbeat.json"))
    stray = subprocess.Popen(["sleep", "60"], env=env)
    try:
        answer, _ = host.call("stop", {"workdir": str(workdir), "strategy": "now", "stopTimeoutSeconds": 1,
                                       "keep": [], "keepStopped": 0})
        assert answer["pruned"] == [], answer
        assert host.folder(workdir, "gone").is_dir()

        host.start(workdir, "gone", quiet)              # the folder is there: its strays are ended
        assert stray.wait(10) == -9
        answer, _ = host.stop(workdir, "gone")
        answer, _ = host.call("stop", {"workdir": str(workdir), "strategy": "now", "stopTimeoutSeconds": 1,
                                       "keep": [], "keepStopped": 0})
        assert answer["pruned"] == ["gone"], answer
    finally:
        stray.kill()
        stray.wait()


def test_a_stop_removes_the_oldest_stopped_instance_folders_and_nothing_placed_or_running(agent_host):
    host = agent_host
    workdir = host.workdir("wa")
    quiet = "export function st_init() {}\nexport function st_heartbeat() {}\nexport function st_exit() {}\n"
    for sid in ("old-1", "old-2", "placed", "running", "last"):
        host.start(workdir, sid, quiet)
    for sid in ("old-1", "old-2", "placed", "last"):
        answer, _ = host.stop(workdir, sid)
        assert answer["result"] == "stopped", answer
    (workdir / "instances" / "old-2" / "state" / "link").symlink_to(workdir / "instances" / "running")
    # Keep one stopped folder besides what is placed: the newest one other than the stop's own.
    answer, _ = host.call("stop", {"workdir": str(workdir), "strategy": "last", "stopTimeoutSeconds": 1,
                                   "keep": ["placed"], "keepStopped": 1})
    assert answer["pruned"] == ["old-1"], answer
    assert sorted(p.name for p in (workdir / "instances").iterdir()) == ["last", "old-2", "placed", "running"]
    assert (workdir / "instances" / "running" / "status.json").exists()      # a link inside was not followed
    assert host.pid(workdir, "running") is not None and alive(host.pid(workdir, "running"))
    host.stop(workdir, "running")
