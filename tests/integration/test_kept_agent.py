"""The kept agent (`agent.pyz serve`, quantlab/edges/session.py) with the real agent processes on the
local transport: it answers every call as a call of its own would, pipelined calls get their own
answers, a killed or silent one fails its calls as a broken connection would and is replaced, it ends
with its channel (finishing what it was asked), and a stream not framed as its own ends it."""
from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from harness import wait_for
from quantlab.edges.hosts import AGENT_PATH, Agent, Serving, agent_zipapp
from quantlab.edges.transport.base import TransportError
from quantlab.edges.transport.local import LocalTransport
from quantlab.host.agent.qlagent.protocol import EXIT_BAD_REQUEST
from tests.support import alive, processes


@pytest.fixture
def home(reaper, tmp_path) -> Path:
    """A workdir; `reaper` (conftest.py) fails the test if any process mentioning tmp_path is left."""
    (tmp_path / "w1").mkdir()
    return tmp_path / "w1"


@pytest.fixture
def serving():
    kept = Serving()
    yield kept
    kept.close()


def agent(home: Path, serving: Serving | None) -> Agent:
    return Agent(LocalTransport(), str(home), sys.executable, "local", serving=serving)


def kept_agents(home: Path) -> list[int]:
    """The `serve` processes of this workdir (not their children, which name themselves ql-COMMAND)."""
    out = []
    for p in processes(str(home)):
        if "serve" in p.argv and Path(f"/proc/{p.pid}/comm").read_text().strip().startswith("python"):
            out.append(p.pid)
    return out


def probe_request(home: Path) -> dict:
    return {"workers": [{"id": "w1", "workdir": str(home), "program": sys.executable}], "eventsSince": {"w1": 0}}


def held_lock(home: Path, sid: str = "s1") -> int:
    """The instance lock of `sid`, held by this process, so that a stop waits for it (lockTimeoutSeconds)."""
    folder = home / "instances" / sid
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def waiting_stop(home: Path, wait: float) -> dict:
    """A stop of s1 that waits up to `wait` seconds for its instance lock (see held_lock)."""
    return {"workdir": str(home), "strategy": "s1", "stopTimeoutSeconds": 1, "reason": "test",
            "lockTimeoutSeconds": wait}


def stop_in_flight(home: Path) -> None:
    """Until the kept agent's child running that stop is there (it names itself ql-stop)."""
    def running() -> bool:
        for p in processes(str(home)):
            try:
                if Path(f"/proc/{p.pid}/comm").read_text().strip() == "ql-stop":
                    return True
            except OSError:                 # ended since it was listed
                continue
        return False
    wait_for(running, 10, what="the stop to wait for the instance lock")


BAD = {"probe": {"workers": [{"workdir": 5}]}, "stop": {"strategy": "s1"}, "start": {"workdir": "/x"},
       "pause": {"workdir": "/x", "strategy": ["s1"]}, "checkpoints": {"workers": {"w1": 5}}}


def test_a_kept_agent_answers_as_a_call_of_its_own(home, serving):
    kept, own = agent(home, serving), agent(home, None)
    for command, request in BAD.items():
        served, alone = kept.run(command, request, 30), own.run(command, request, 30)
        assert served.returncode == alone.returncode == EXIT_BAD_REQUEST, (command, served, alone)
        assert served.stdout == alone.stdout == b""
        assert served.stderr == alone.stderr and served.stderr.startswith(f"bad {command} request: ".encode())
    served, alone = kept.call("probe", probe_request(home), 30), own.call("probe", probe_request(home), 30)
    # The same answer, but for what the host measures anew each time (free disk space moves while
    # other tests write).
    def settled(answer: dict) -> dict:
        return {w: {k: v for k, v in found.items() if k != "diskFreeMb"} for w, found in answer["workers"].items()}
    assert settled(served) == settled(alone) and set(served["host"]) == set(alone["host"])
    assert isinstance(served["workers"]["w1"]["diskFreeMb"], int)
    # One kept agent answered all of it (it was shipped on the first call, like a call of its own).
    assert (home / AGENT_PATH).read_bytes() == agent_zipapp()
    assert len(kept_agents(home)) == 1


def test_pipelined_calls_each_get_their_own_answer(home, serving):
    kept = agent(home, serving)
    kept.call("probe", probe_request(home), 30)
    answers: dict[int, tuple[str, bytes]] = {}

    def call(i: int) -> None:
        command = list(BAD)[i % len(BAD)]
        answers[i] = (command, kept.run(command, BAD[command], 30).stderr)
    threads = [threading.Thread(target=call, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(answers) == 20
    for command, said in answers.values():
        assert said.startswith(f"bad {command} request: ".encode()), (command, said)
    assert len(kept_agents(home)) == 1


def test_a_killed_kept_agent_loses_its_calls_in_flight_and_is_replaced(home, serving):
    kept = agent(home, serving)
    kept.call("probe", probe_request(home), 30)
    [first] = kept_agents(home)
    lock = held_lock(home)
    failed: list[BaseException] = []

    def waits() -> None:
        try:
            kept.call("stop", waiting_stop(home, 20), 30)
        except BaseException as exc:      # noqa: BLE001 - what the call ended with is the point
            failed.append(exc)
    caller = threading.Thread(target=waits)
    began = time.monotonic()
    caller.start()
    stop_in_flight(home)
    os.kill(first, signal.SIGKILL)
    caller.join(10)
    assert failed and isinstance(failed[0], TransportError) and failed[0].maybe_ran, failed
    assert "connection lost during agent stop" in str(failed[0])
    assert time.monotonic() - began < 10, "the lost call waited for its deadline"
    os.close(lock)                          # the orphaned stop finds nothing to stop and ends
    assert set(kept.call("probe", probe_request(home), 30)["workers"]) == {"w1"}
    [second] = kept_agents(home)
    assert second != first


def test_a_call_past_its_deadline_drops_its_kept_agent(home, serving):
    kept = agent(home, serving)
    kept.call("probe", probe_request(home), 30)
    [first] = kept_agents(home)
    lock = held_lock(home)
    began = time.monotonic()
    with pytest.raises(TransportError) as late:
        kept.call("stop", waiting_stop(home, 20), 0.5)
    assert late.value.maybe_ran and "agent stop did not finish within 0.5s" in str(late.value), late.value
    assert time.monotonic() - began < 3
    wait_for(lambda: not alive(first), 5, what="the silent kept agent to be dropped")
    os.close(lock)
    kept.call("probe", probe_request(home), 30)
    assert kept_agents(home) not in ([], [first])


def test_a_kept_agent_ends_with_its_channel_once_its_calls_are_done(home, serving):
    kept = agent(home, serving)
    kept.call("probe", probe_request(home), 30)
    [pid] = kept_agents(home)
    lock = held_lock(home)
    answers: list[dict] = []
    caller = threading.Thread(target=lambda: answers.append(
        kept.call("stop", waiting_stop(home, 1.5), 30)))
    caller.start()
    stop_in_flight(home)
    serving.close()          # the channel closes (a local one waits a moment for the agent to end)
    caller.join(10)
    # The call in flight was finished and answered (the lock was still held: busy) before it ended.
    assert [a["result"] for a in answers] == ["busy"], answers
    wait_for(lambda: not alive(pid), 10, what="the kept agent to end once its call was done")
    assert not processes(str(home))
    os.close(lock)


def serve(home: Path, data: bytes) -> subprocess.CompletedProcess:
    (home / "agent").mkdir(exist_ok=True)
    (home / AGENT_PATH).write_bytes(agent_zipapp())
    return subprocess.run([sys.executable, "-I", "-S", str(home / AGENT_PATH), "serve"], input=data,
                          capture_output=True, timeout=30)


@pytest.mark.parametrize("data, said", [
    (b"garbage\n", "a request header that cannot be read"),
    (b'{"id": 1, "command": "probe"}\n', "a request header that cannot be read"),
    (b'{"id": 1, "command": "probe", "size": 99999999999}\n', "a request of 99999999999 bytes"),
    (b"x" * 5000, "a request header longer than 4096 bytes"),
])
def test_a_stream_not_framed_as_its_own_ends_the_kept_agent(home, data, said):
    done = serve(home, data)
    hello, *rest = done.stdout.split(b"\n")
    assert json.loads(hello)["serve"] == 1 and rest == [b""], done.stdout
    assert done.returncode == 0 and said in done.stderr.decode(), done.stderr


@pytest.mark.parametrize("command", ["serve", "supervise", "nope"])
def test_a_kept_agent_runs_only_the_calls_a_controller_makes(home, command):
    body = json.dumps(str(home)).encode()
    done = serve(home, json.dumps({"id": 7, "command": command, "size": len(body)}).encode() + b"\n" + body)
    lines = done.stdout.split(b"\n")
    answer = json.loads(lines[1])
    assert answer == {"id": 7, "code": EXIT_BAD_REQUEST, "out": 0, "err": len(lines[2]) + 1}, done.stdout
    assert lines[2] == f"unknown command {command!r}".encode()
    assert not processes(str(home))


def test_a_host_whose_first_worker_changed_keeps_one_agent(home, serving, tmp_path):
    """The agent copy a host's calls run from is its first worker's: when a worker that sorts first is
    added there, its copy takes over, and the kept agent of the earlier one ends."""
    transport = LocalTransport()
    (tmp_path / "w0").mkdir()
    before = Agent(transport, str(home), sys.executable, "local", serving=serving)
    after = Agent(transport, str(tmp_path / "w0"), sys.executable, "local", serving=serving)
    before.call("probe", probe_request(home), 30)
    [earlier] = kept_agents(home)
    after.call("probe", probe_request(home), 30)
    wait_for(lambda: not alive(earlier), 10, what="the earlier kept agent to end")
    assert len(kept_agents(tmp_path / "w0")) == 1
