"""Notifications: a strategy that gives up, a refused mass stop — to a real webhook on loopback and a
real command (argv, JSON on stdin), each alert told once. And endpoints that misbehave — a webhook
that answers one byte per second for ever, one that answers garbage, a command that hangs — never
stall a `reconcile --once`: each delivery has a 5 s deadline, the notices get at most 5 s at exit,
the failure is logged (naming the webhook by scheme, host and port only), and nothing of a hanging
command is left running."""
from __future__ import annotations

import json
import socket
import sys
import threading
import uuid
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Callable

import pytest

from harness import processes, wait_for

# `reconcile --once` must end within this even when every notice is stuck: the 5 s of flushing at
# exit, the tick itself and the interpreter's start.
STUCK_RUN_BOUND_S = 10.0


class Hook:
    """An HTTP endpoint on 127.0.0.1 that keeps every JSON body POSTed to it."""

    def __init__(self) -> None:
        received = self.received = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the http.server API
                body = self.rfile.read(int(self.headers["Content-Length"]))
                received.append(json.loads(body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hook():
    h = Hook()
    yield h
    h.close()


@pytest.mark.slow
def test_error_and_refused_mass_stop_are_told_once_to_webhook_and_command(fleet, hook, tmp_path):
    told = tmp_path / "told.jsonl"
    # The command gets each notice as JSON on stdin; its argv is never given to a shell.
    script = tmp_path / "notify.py"
    script.write_text("import sys\nopen(sys.argv[1], 'a').write(sys.stdin.read() + '\\n')\n")
    fleet.settings["notify"] = {"webhook": hook.url, "command": [sys.executable, str(script), str(told)]}
    fleet.worker("w1")
    fleet.strategy("thrower", {"throwAlways": True}, heartbeat_ms=100, maxErrors=0, maxRestarts=1, restartDelay=100)
    fleet.strategy("steady-a").strategy("steady-b").write()
    fleet.apply()
    wait_for(lambda: (s := fleet.host_status("thrower")) and s.get("state") == "error", 15,
             what="the supervisor to give up on thrower")

    fleet.ql("reconcile", "--once")                   # sees the supervisor's "error" event
    kinds = [(n["kind"], n.get("strategy")) for n in hook.received]
    assert kinds == [("strategy-error", "thrower")], hook.received
    assert "gave up after 1 restarts" in hook.received[0]["message"]
    by_command = [json.loads(line) for line in told.read_text().splitlines()]
    assert by_command == hook.received

    fleet.ql("reconcile", "--once")                   # nothing new: nothing told
    assert len(hook.received) == 1

    # Every strategy removed: the guard refuses, once told, and told again only when it clears.
    fleet.strategies.clear()
    fleet.write()
    fleet.ql("reconcile", "--once", check=1)
    fleet.ql("reconcile", "--once", check=1)
    assert [n["kind"] for n in hook.received] == ["strategy-error", "guard-blocked"], hook.received
    assert "would stop 2 of 2 running strategies" in hook.received[1]["message"]   # thrower is dead already
    fleet.ql("apply", "--yes", "--allow-mass-stop")
    assert [n["kind"] for n in hook.received][2:] == ["resolved"]
    assert hook.received[2]["alert"] == "guard:mass-stop"


# --- endpoints that misbehave ----------------------------------------------------------------------

class RawHook:
    """A TCP endpoint on 127.0.0.1 that reads one HTTP request per connection, keeps it, and then
    answers with `respond(connection, stop)`, which may take as long as it likes: `stop` is set at
    teardown. The URL carries a token in its path and query, as chat webhooks do."""

    def __init__(self, respond: Callable[[socket.socket, threading.Event], None]) -> None:
        self.respond = respond
        self.requests: list[bytes] = []
        self.stop = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.port = self.listener.getsockname()[1]
        self.path_token, self.query_token = f"path-{uuid.uuid4().hex}", f"query-{uuid.uuid4().hex}"
        self.url = f"http://127.0.0.1:{self.port}/hooks/{self.path_token}?key={self.query_token}"
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                connection, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            worker = threading.Thread(target=self._serve, args=(connection,), daemon=True)
            self.threads.append(worker)
            worker.start()

    def _serve(self, connection: socket.socket) -> None:
        with connection:
            connection.settimeout(5)
            try:
                self.requests.append(_read_request(connection))
                self.respond(connection, self.stop)
            except OSError:
                pass                     # the client hung up: what the tests want it to do

    def close(self) -> None:
        self.stop.set()
        self.listener.close()
        for thread in self.threads:
            thread.join(5)


def _read_request(connection: socket.socket) -> bytes:
    """The request's head and its Content-Length body."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = connection.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    while len(body) < length:
        chunk = connection.recv(65536)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


def trickle_for_ever(connection: socket.socket, stop: threading.Event) -> None:
    """A status line and then one header byte per second, until the test ends (or the client leaves)."""
    reply = b"HTTP/1.1 200 OK\r\nX-Slow: "
    sent = 0
    while not stop.wait(1.0):
        connection.sendall(reply[sent:sent + 1] if sent < len(reply) else b"a")
        sent += 1


def garbage_status_line(connection: socket.socket, stop: threading.Event) -> None:
    connection.sendall(b"garbage\r\n\r\n")


@pytest.fixture
def raw_hook():
    """`RawHook(respond)` factory; every endpoint made is closed at teardown."""
    made: list[RawHook] = []

    def make(respond: Callable[[socket.socket, threading.Event], None]) -> RawHook:
        made.append(RawHook(respond))
        return made[-1]
    yield make
    for endpoint in made:
        endpoint.close()


def strategy_in_error(fleet) -> None:
    """A fleet whose strategy `thrower` has ended in error on its host; its next reconcile has a
    `strategy-error` notice to tell. (No notify settings yet: the test adds them.)"""
    # Probe deadline = the interval: 2 s, which a local probe meets also on a busy machine (with
    # 0.5 s, a slow probe counts the worker as not answering, and the error goes unseen).
    fleet.settings["reconcile"]["intervalSeconds"] = 2.0
    fleet.worker("w1")
    fleet.strategy("thrower", {"throwAlways": True}, heartbeat_ms=100, maxErrors=0, maxRestarts=1, restartDelay=100)
    fleet.write()
    fleet.apply()
    wait_for(lambda: (s := fleet.host_status("thrower")) and s.get("state") == "error", 15,
             what="the supervisor to give up on thrower")


def notify(fleet, **settings) -> None:
    fleet.settings["notify"] = settings
    fleet.write()


def assert_not_stalled(result) -> None:
    assert result.seconds < STUCK_RUN_BOUND_S, f"a stuck notice held the run up\n{result.describe()}"
    assert "Traceback" not in result.output, result.describe()


def test_a_webhook_that_trickles_its_reply_for_ever_does_not_stall_the_run(fleet, raw_hook):
    strategy_in_error(fleet)
    endpoint = raw_hook(trickle_for_ever)
    notify(fleet, webhook=endpoint.url)

    result = fleet.ql("reconcile", "--once", check=0, timeout=30)
    assert_not_stalled(result)
    assert len(endpoint.requests) == 1 and b"strategy-error" in endpoint.requests[0], endpoint.requests
    failure = [line for line in result.output.splitlines() if "webhook" in line and "not delivered" in line]
    assert failure, f"the failed delivery is not logged\n{result.describe()}"
    assert f"http://127.0.0.1:{endpoint.port}" in failure[0]
    assert endpoint.path_token not in result.output and endpoint.query_token not in result.output, \
        f"the webhook's token was printed\n{result.describe()}"
    told = [e for e in fleet.events() if e.get("event") == "notify"]
    assert [e["kind"] for e in told] == ["strategy-error"], told     # recorded, though never delivered


def test_a_webhook_that_answers_garbage_is_logged_and_the_run_ends_normally(fleet, raw_hook):
    strategy_in_error(fleet)
    endpoint = raw_hook(garbage_status_line)
    notify(fleet, webhook=endpoint.url)

    result = fleet.ql("reconcile", "--once", check=0, timeout=30)
    assert_not_stalled(result)
    assert len(endpoint.requests) == 1, endpoint.requests
    assert any("webhook" in line and "not delivered" in line for line in result.output.splitlines()), \
        f"the failed delivery is not logged\n{result.describe()}"
    assert endpoint.path_token not in result.output and endpoint.query_token not in result.output, result.describe()


def test_a_notify_command_that_hangs_is_killed_with_what_it_started(fleet, tmp_path):
    strategy_in_error(fleet)
    marker = f"notify-hang-{uuid.uuid4().hex}"       # in the argv of the command and of its child
    pids = tmp_path / "hang.pids"
    script = tmp_path / "hang.py"
    script.write_text(
        "import os, subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)', sys.argv[2]])\n"
        "open(sys.argv[1], 'w').write(f'{os.getpid()} {child.pid}\\n')\n"
        "time.sleep(60)\n")
    notify(fleet, command=[sys.executable, str(script), str(pids), marker])

    result = fleet.ql("reconcile", "--once", check=0, timeout=30)
    assert_not_stalled(result)
    assert pids.exists(), f"the notify command never ran\n{result.describe()}"
    wait_for(lambda: not processes(marker), 2, what="no process of the hanging notify command to be left")
    assert any("command" in line and "not delivered" in line for line in result.output.splitlines()), \
        f"the notice the hanging command never took is not logged\n{result.describe()}"
