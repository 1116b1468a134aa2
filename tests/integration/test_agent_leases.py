"""Leases, locks and answers of the host agent, driven directly as the controller drives it.

Each test runs the agent (quantlab/host/agent/) as a subprocess with JSON on stdin (see `AgentHost` in
test_agent_hostile.py), with real `node` runners on workdirs in tmp_path:

- a lease that has run out stays out: the agent refuses to renew it, and a supervisor (and its runner)
  whose lease passed takes no later deadline, even one written while it was frozen;
- no runner life starts without a live lease;
- heartbeat age is judged on the monotonic clock, not from file mtimes (a wall-clock step);
- `start` answers `started` once a supervisor runs, whatever bookkeeping fails after that;
- a held instance lock makes start/stop/pause/resume answer `busy` within a deadline, never hang,
  and renewals take no lock;
- a probe renews before it runs slow runtime checks;
- the agent takes no `--renew` argument any more (only `--request FILE`).

`reaper` (conftest.py, behind `agent_host`) kills whatever mentions tmp_path at teardown and fails the
test if anything was left.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import resource
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from test_agent_hostile import CALM, PROBE_BOUND, AgentHost, agent_host, not_after  # noqa: F401 - fixture by name
from tests.support import alive, hold_for, processes, wait_for

EXIT_BAD_REQUEST = 4


def boottime() -> float:
    """The clock leases are written on (CLOCK_BOOTTIME)."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def running(host: AgentHost, workdir: Path, sid: str) -> bool:
    """The supervisor says st_init finished and the runner beats."""
    return host.status(workdir, sid).get("state") == "running"


def event_names(host: AgentHost, workdir: Path, sid: str) -> list[str]:
    return [e["event"] for e in host.events(workdir, sid)]


@contextmanager
def frozen(host: AgentHost, workdir: Path, sid: str) -> Iterator[None]:
    """The instance's keeper, supervisor and runner (with everything in their process groups)
    stopped with SIGSTOP, as on a host that is frozen (a paused VM), until the block ends."""
    groups = [host.pid(workdir, sid), host.pid(workdir, sid, "runner.pid")]
    assert all(groups), groups
    for group in groups:
        os.killpg(group, signal.SIGSTOP)
    try:
        yield
    finally:
        for group in groups:
            os.killpg(group, signal.SIGCONT)


def wait_past(deadline: float, what: str) -> None:
    wait_for(lambda: boottime() > deadline + 0.2, deadline - boottime() + 5, what=what)


# --- 1. a lease that ran out stays out ------------------------------------------------------------

SHORT_TTL = 3.0


def test_a_lease_that_ran_out_is_not_renewed(agent_host):
    """A host frozen past its lease resumes, and a renewal reaches the agent before the supervisor
    has looked at its clock: the agent refuses it (saying so per instance), and the supervisor fences."""
    host = agent_host
    workdir = host.workdir("wa")
    host.start(workdir, "frozen", CALM, ttl=SHORT_TTL)
    wait_for(lambda: running(host, workdir, "frozen"), 20, what="the strategy to run")
    supervisor = host.pid(workdir, "frozen")
    with frozen(host, workdir, "frozen"):
        deadline = host.lease_deadline(workdir, "frozen")
        wait_past(deadline, "the lease to run out while the host is frozen")
        answer, took = host.probe([workdir], renew={"wa": {"frozen": 1}}, ttl=SHORT_TTL)
        assert took < PROBE_BOUND, took
        worker = answer["workers"]["wa"]
        assert worker["renewed"] == [], worker
        assert worker["refused"]["frozen"].startswith("its lease ran out at "), worker["refused"]
        assert "host" in answer and "renewRefused" not in answer["host"], answer["host"]  # the request was in time
        assert host.lease_deadline(workdir, "frozen") == deadline, "lease.json was rewritten"

    # Thawed: the supervisor finds its lease gone and stops its strategy, saying why.
    status = wait_for(lambda: (s := host.status(workdir, "frozen")).get("state") == "stopped" and s, 10,
                      what="the supervisor to fence its strategy")
    assert status["reason"].startswith("lease expired"), status
    assert "lease-expired" in event_names(host, workdir, "frozen")
    wait_for(lambda: not alive(supervisor), 10, what="the supervisor to exit")


def test_a_supervisor_whose_lease_ran_out_takes_no_later_deadline(agent_host):
    """lease.json renewed while the supervisor and runner are frozen past their lease (by an agent of
    the previous release, which did not check, or in the instant between a check and its write): on
    resuming, neither adopts it. Before, both did, and the strategy traded on for one more TTL."""
    host = agent_host
    workdir = host.workdir("wa")
    host.start(workdir, "frozen", CALM, ttl=SHORT_TTL)
    wait_for(lambda: running(host, workdir, "frozen"), 20, what="the strategy to run")
    runner = host.pid(workdir, "frozen", "runner.pid")
    lease_file = host.folder(workdir, "frozen") / "lease.json"
    with frozen(host, workdir, "frozen"):
        wait_past(host.lease_deadline(workdir, "frozen"), "the lease to run out while the host is frozen")
        beats = json.loads((host.folder(workdir, "frozen") / "heartbeat.json").read_text())["beats"]
        renewed = {"epoch": 1, "deadline": boottime() + SHORT_TTL, "expiresAt": int((time.time() + SHORT_TTL) * 1000)}
        (lease_file.parent / "lease.json.new").write_text(json.dumps(renewed))
        os.replace(lease_file.parent / "lease.json.new", lease_file)
        thawed = time.monotonic()

    # Well before the renewed deadline, the strategy is stopped, and it never beat again.
    status = wait_for(lambda: (s := host.status(workdir, "frozen")).get("state") == "stopped" and s,
                      SHORT_TTL - 1, what="the supervisor to fence its strategy despite the later lease.json")
    assert time.monotonic() - thawed < SHORT_TTL - 1
    assert status["reason"].startswith("lease expired"), status
    wait_for(lambda: not alive(runner), 5, what="the runner to exit")
    assert json.loads((host.folder(workdir, "frozen") / "heartbeat.json").read_text())["beats"] == beats
    assert event_names(host, workdir, "frozen") == ["start", "lease-expired"]


# --- 3. no runner life without a lease -------------------------------------------------------------

# Loads (a note per runner life), beats once, then hangs in st_heartbeat so the supervisor restarts it;
# st_exit hangs too, so stopping the runner takes the whole stop timeout, which outlasts the lease.
HANGS_ON_SECOND_BEAT = """
import fs from 'node:fs';
const params = JSON.parse(process.env.QUANTLAB_PARAMS);
fs.appendFileSync(params.notes, `loaded ${process.pid}\\n`);
let beats = 0;
const forever = () => new Promise(() => { setInterval(() => {}, 1000); });
export function st_init(ctx) { fs.appendFileSync(ctx.params.notes, 'init\\n'); }
export function st_heartbeat(ctx) { beats += 1; if (beats >= 2) return forever(); }
export function st_exit(ctx) { return forever(); }
"""


def test_no_runner_life_starts_after_the_lease_ran_out(agent_host, tmp_path):
    """The lease runs out while the supervisor stops an unhealthy runner (st_exit hangs for the whole
    stop timeout); with no restart delay, the supervisor used to start the next life at once, and its
    runner ran st_init with the lease long gone. It must end fenced instead, saying why."""
    host = agent_host
    workdir = host.workdir("wa")
    notes = tmp_path / "notes"
    host.start(workdir, "hang", HANGS_ON_SECOND_BEAT, ttl=SHORT_TTL, params={"notes": str(notes)},
               stopTimeoutSeconds=SHORT_TTL + 1, restartDelay=0)
    supervisor = host.pid(workdir, "hang")
    runner = wait_for(lambda: host.pid(workdir, "hang", "runner.pid"), 10, what="the first runner")
    status = wait_for(lambda: (s := host.status(workdir, "hang")).get("state") == "stopped" and s, 20,
                      what="the supervisor to end")
    wait_for(lambda: not alive(supervisor), 10, what="the supervisor to exit")
    # One runner, one life: no restart, and no second runner (not even one killed before it loaded).
    assert event_names(host, workdir, "hang") == ["start", "lease-expired"], host.events(workdir, "hang")
    assert status["runnerPid"] == runner and status["restarts"] == 0, status
    lives = [line for line in notes.read_text().splitlines() if line.startswith("loaded")]
    assert lives == [f"loaded {runner}"], notes.read_text()
    assert status["reason"].startswith("lease expired"), status
    assert "no runner was started after: no heartbeat for" in status["reason"], status


# --- 2. heartbeat age on the monotonic clock --------------------------------------------------------

# A team's own runner whose heartbeat files carry an mtime one hour old: what the supervisor sees when
# the host's wall clock steps an hour ahead. It beats every 100 ms while the `beating` file exists.
OLD_MTIME_RUNNER = """
import json, os, time
heartbeat = os.environ["QUANTLAB_HEARTBEAT_FILE"]
params = json.loads(os.environ["QUANTLAB_PARAMS"])
beats = 0
while True:
    if os.path.exists(params["beating"]):
        beat = {"t": int(time.time() * 1000), "beats": beats, "errorCount": 0, "lastError": None, "paused": False}
        with open(heartbeat + ".new", "w") as handle:
            json.dump(beat, handle)
        an_hour_ago = time.time() - 3600
        os.utime(heartbeat + ".new", (an_hour_ago, an_hour_ago))
        os.replace(heartbeat + ".new", heartbeat)
        beats += 1
    time.sleep(0.1)
"""


def test_heartbeat_age_does_not_follow_the_wall_clock(agent_host, tmp_path):
    """Every beat's file says it was written an hour ago (a wall-clock step): a runner that keeps
    beating stays healthy. One that goes silent is still restarted after 3 x heartbeatMs."""
    host = agent_host
    workdir = host.workdir("wa")
    (workdir / "agent" / "old-mtime-runner.py").write_text(OLD_MTIME_RUNNER)
    beating = tmp_path / "beating"
    beating.touch()
    request = host.start_request(workdir, "stepped", CALM, heartbeat_ms=300, params={"beating": str(beating)})
    request.update(runner=[sys.executable, "{runner}"], runnerFile="agent/old-mtime-runner.py")
    answer, _ = host.call("start", request)
    assert answer["result"] == "started", answer
    wait_for(lambda: running(host, workdir, "stepped"), 20, what="the first beat")
    # 3 x heartbeatMs is 0.9 s: judged by mtime, every look would find the beat an hour old.
    hold_for(3.0, lambda: running(host, workdir, "stepped") and event_names(host, workdir, "stepped") == ["start"],
             "a healthy runner left alone")

    beating.unlink()
    restart = wait_for(lambda: [e for e in host.events(workdir, "stepped") if e["event"] == "restart"], 10,
                       what="a restart of the silent runner")[0]
    age = float(re.match(r"no heartbeat for ([0-9.]+)s", restart["detail"]).group(1))
    assert 0.9 <= age < 5, restart       # printed to 0.1 s


# --- 4. start answers `started` once a copy runs ------------------------------------------------------

FILE_SIZE_LIMIT = 64 * 1024


def limit_file_size() -> None:
    """RLIMIT_FSIZE for the agent (and what it starts): writes past 64 KiB fail with EFBIG, as on a
    full disk, while the small files of a start still fit. Python ignores SIGXFSZ."""
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_SIZE_LIMIT, FILE_SIZE_LIMIT))


def test_start_says_started_when_bookkeeping_fails_after_the_spawn(agent_host):
    """events.log cannot take another line once the supervisor is spawned: the answer is still
    `started` (else the controller would believe nothing runs here), with the failure as a problem."""
    host = agent_host
    workdir = host.workdir("wa")
    folder = host.folder(workdir, "full")
    folder.mkdir(parents=True)
    line = json.dumps({"t": 1, "event": "start", "detail": "x" * 100}) + "\n"
    (folder / "events.log").write_text(line * (FILE_SIZE_LIMIT // len(line) + 10))
    request = host.start_request(workdir, "full", CALM)
    answer, _ = host.call("start", request, preexec_fn=limit_file_size)
    assert answer is not None, "the agent failed instead of answering"
    assert answer["result"] == "started", answer
    assert answer["problems"] == ["events.log: cannot write it: File too large"], answer
    supervisor = answer["pid"]
    assert alive(supervisor) and host.pid(workdir, "full") == supervisor
    wait_for(lambda: running(host, workdir, "full"), 20, what="the strategy to run")

    # The supervisor keeps supervisor.pid itself (the agent's write may be the one that failed).
    (folder / "supervisor.pid").unlink()
    wait_for(lambda: host.pid(workdir, "full") == supervisor, 2, what="the supervisor to rewrite supervisor.pid")
    probed, _ = host.probe([workdir], renew={"wa": {"full": 1}})
    assert probed["workers"]["wa"]["renewed"] == ["full"], probed["workers"]["wa"]
    assert probed["workers"]["wa"]["instances"]["full"]["status"] == "running"

    stopped, _ = host.stop(workdir, "full")
    assert stopped["result"] == "stopped", stopped
    assert host.status(workdir, "full")["state"] == "stopped"
    assert not alive(supervisor)


# --- 5. a held instance lock ----------------------------------------------------------------------

# Holds its own instance's .lock (through flock(1), which keeps it to itself: -o) from st_init on,
# as any strategy could.
LOCKER = """
import { spawn } from 'node:child_process';
export function st_init(ctx) { spawn('flock', ['-o', ctx.params.lock, 'sleep', '1000'], { stdio: 'ignore' }); }
export function st_heartbeat(ctx) {}
export function st_exit(ctx) {}
"""


def lock_held(path: Path) -> bool:
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def test_a_held_instance_lock_makes_commands_busy_never_stuck(agent_host):
    host = agent_host
    workdir = host.workdir("wa")
    lock = host.folder(workdir, "locker") / ".lock"
    host.start(workdir, "locker", LOCKER, params={"lock": str(lock)})
    wait_for(lambda: running(host, workdir, "locker") and lock_held(lock), 20, what="the strategy to hold its lock")
    supervisor = host.pid(workdir, "locker")

    # Renewals take no lock.
    answer, took = host.probe([workdir], renew={"wa": {"locker": 1}})
    assert answer["workers"]["wa"]["renewed"] == ["locker"] and took < PROBE_BOUND, (answer, took)

    base = {"workdir": str(workdir), "strategy": "locker", "epoch": 1, "stopTimeoutSeconds": 1,
            "reason": "stopped by the test", "lockTimeoutSeconds": 1}
    requests = {"stop": base, "pause": base, "resume": base,
                "start": {**host.start_request(workdir, "locker", LOCKER, epoch=2, params={"lock": str(lock)}),
                          "lockTimeoutSeconds": 1}}
    for command, request in requests.items():
        began = time.monotonic()
        done = host.run(command, request, timeout=20)
        took = time.monotonic() - began
        assert done.returncode == 0, (command, done.returncode, done.stderr.decode())
        answer = json.loads(done.stdout)
        assert answer["result"] == "busy", (command, answer)
        assert answer["reason"].startswith(f"the instance lock is held ({lock}, by pid "), answer
        assert "(flock)" in answer["reason"], answer
        assert 1 <= took < 5, (command, took)

    # Without a budget of its own, a command waits 10 s at most.
    began = time.monotonic()
    answer, _ = host.call("stop", {key: value for key, value in base.items() if key != "lockTimeoutSeconds"},
                          timeout=30)
    took = time.monotonic() - began
    assert answer["result"] == "busy" and 10 <= took < 15, (answer, took)

    # Nothing was done meanwhile; once the lock is free, the stop goes through.
    assert host.pid(workdir, "locker") == supervisor and alive(supervisor)
    assert running(host, workdir, "locker") and event_names(host, workdir, "locker") == ["start"]
    for proc in processes(str(lock)):
        os.kill(proc.pid, signal.SIGKILL)
    wait_for(lambda: not lock_held(lock), 5, what="the lock to be free")
    answer, _ = host.stop(workdir, "locker")
    assert answer["result"] == "stopped", answer
    assert not alive(supervisor)


# --- 6. renewals before slow runtime checks ---------------------------------------------------------

SLOW_VERSION = "#!/bin/sh\nsleep 3\necho v99.0.0\n"


def test_a_probe_renews_before_it_asks_a_runtime_its_version(agent_host, tmp_path):
    """A first probe after a runtime upgrade runs `node --version` (here: 3 s) for the first worker;
    the renewals of both workers, due 1.5 s after the request left, must not wait for it."""
    host = agent_host
    first, second = host.workdir("wa"), host.workdir("wb")
    host.start(first, "one", CALM)
    host.start(second, "two", CALM)
    wait_for(lambda: running(host, first, "one") and running(host, second, "two"), 20, what="both to run")
    slow = tmp_path / "slow-node"
    slow.write_text(SLOW_VERSION)
    slow.chmod(0o755)
    before = host.lease_deadline(first, "one"), host.lease_deadline(second, "two")

    answer, took = host.probe([first, second], renew={"wa": {"one": 1}, "wb": {"two": 1}}, ahead=1.5,
                              program=str(slow))
    assert took >= 3, "the version check did not run"
    for wid, sid in (("wa", "one"), ("wb", "two")):
        worker = answer["workers"][wid]
        assert worker["renewed"] == [sid] and worker["refused"] == {}, worker
        assert worker["runtime"]["version"] == "v99.0.0", worker["runtime"]
        assert worker["instances"][sid]["status"] == "running", worker["instances"][sid]
    assert host.lease_deadline(first, "one") > before[0] and host.lease_deadline(second, "two") > before[1]


# --- 7. no `--renew` argument ------------------------------------------------------------------------

def test_the_agent_takes_no_renew_argument(agent_host, tmp_path):
    """`probe --renew TTL` used to renew with that TTL; a renewal now always comes in the request with
    its notAfter. The only option left is `--request FILE`."""
    host = agent_host
    workdir = host.workdir("wa")
    request = {"workers": [{"id": "wa", "workdir": str(workdir)}], "renew": {"wa": {"x": 1}}, "notAfter": not_after()}
    done = host.run("probe", request, args=("--renew", "30"))
    assert done.returncode == EXIT_BAD_REQUEST and done.stdout == b"", done
    assert "the only option is --request FILE" in done.stderr.decode(), done.stderr

    saved = tmp_path / "request.json"
    saved.write_text(json.dumps(request))
    done = host.run("probe", {}, args=("--request", str(saved)))
    assert done.returncode == 0, done.stderr
    worker = json.loads(done.stdout)["workers"]["wa"]
    assert worker["renewed"] == [] and worker["refused"] == {"x": "the request carries no leaseTtlSeconds"}, worker
