"""The background notifier against real HTTP servers on 127.0.0.1 and real subprocesses: a slow or
broken receiver costs at most its deadline, in the background; nothing raises; tokens never reach
a log line; a full queue drops routine notices before alerts and says how many it dropped."""
from __future__ import annotations

import faulthandler
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from quantlab.edges.notify import Notifier
from quantlab.edges.notify.delivery import ALERT_KINDS
from quantlab.core.spec import NotifySettings
from tests.support import free_port

SLEEPER = "import time; time.sleep(60)"


# --- safeguards and helpers ------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def no_hang():
    """A test that hangs dumps every thread's stack and ends the run instead of blocking forever."""
    faulthandler.dump_traceback_later(90, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


class Lines(list):
    """The notifier's log: a list of lines, appended to from its threads."""

    def __call__(self, line: str) -> None:
        self.append(line)


@pytest.fixture
def make_notifier():
    """Notifier factory; every notifier is closed (bounded) at teardown, so no thread outlives a test."""
    made: list[Notifier] = []

    def make(webhook=None, command=None, **options) -> tuple[Notifier, Lines]:
        log = Lines()
        notifier = Notifier(NotifySettings(webhook=webhook, command=tuple(command) if command else None), log,
                            **options)
        made.append(notifier)
        return notifier, log

    yield make
    for notifier in made:
        notifier.close(timeout=2.0)


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def notice(kind: str = "failover", **fields) -> dict:
    return {"t": int(time.time() * 1000), "kind": kind, "message": f"a {kind} notice", **fields}


def alive(pid: int) -> bool:
    """Running (a zombie waiting for a reaper is dead enough)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")



class Hook:
    """An HTTP endpoint on 127.0.0.1 whose behaviour the test picks: "ok" (keeps the JSON, 204),
    "trickle" (a 200 whose body comes one byte a second), "garbage" (a malformed status line),
    "block" (waits for `release`, then ok), "status:<code> <reason>" (that status line)."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.received: list[dict] = []
        self.arrived = 0                         # requests seen, delivered or not
        self.release = threading.Event()
        self.stopping = threading.Event()
        hook = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802 - the http.server API
                hook.arrived += 1
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                self.close_connection = True
                hook.answer(self, body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.handle_error = lambda *args: None    # a client hanging up on a trickle is expected
        self.port = self.server.server_port
        self.url = f"http://127.0.0.1:{self.port}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def answer(self, handler: BaseHTTPRequestHandler, body: dict) -> None:
        mode = self.mode
        if mode == "garbage":
            handler.wfile.write(b"garbage\r\n\r\n")
        elif mode == "trickle":
            handler.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
            for _ in range(100):                  # 100 s unless the client hangs up (or teardown)
                if self.stopping.wait(1.0):
                    return
                handler.wfile.write(b"x")
                handler.wfile.flush()
        elif mode.startswith("status:"):
            handler.wfile.write(f"HTTP/1.1 {mode[7:]}\r\nContent-Length: 0\r\n\r\n".encode())
        else:
            if mode == "block":
                self.release.wait(30)
            self.received.append(body)
            handler.send_response(204)
            handler.end_headers()

    def close(self) -> None:
        self.stopping.set()
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def hook():
    h = Hook()
    yield h
    h.close()


# --- delivery ------------------------------------------------------------------------------------

def test_delivers_to_webhook_and_command_argv_with_json_on_stdin(make_notifier, hook, tmp_path):
    told = tmp_path / "told.jsonl"
    script = tmp_path / "tell.py"
    script.write_text("import sys\nopen(sys.argv[1], 'a').write(sys.stdin.read() + '\\n')\n")
    # An argument that a shell would run; as argv it is just a string.
    notifier, log = make_notifier(webhook=hook.url, command=[sys.executable, str(script), str(told), "$(touch pwned)"])
    sent = [notice("strategy-error", strategy="a"), notice("worker-offline", worker="w1")]
    notifier.submit(sent)
    assert notifier.flush(10)
    assert hook.received == sent
    assert [json.loads(line) for line in told.read_text().splitlines()] == sent
    assert not (tmp_path / "pwned").exists() and not Path("pwned").exists()
    assert log == []


def test_nothing_is_queued_without_a_sink(make_notifier):
    notifier, log = make_notifier()
    notifier.submit([notice()])
    assert notifier.flush(0)
    assert not [t for t in threading.enumerate() if t.name.startswith("quantlab-notify")]
    assert log == []


def test_update_sends_later_notices_to_the_new_webhook(make_notifier, hook):
    notifier, log = make_notifier()
    notifier.submit([notice("failover", strategy="before")])       # no sink yet: not queued
    notifier.update(NotifySettings(webhook=hook.url))
    notifier.submit([notice("failover", strategy="after")])
    assert notifier.flush(10)
    assert [n["strategy"] for n in hook.received] == ["after"]


# --- a slow or broken webhook --------------------------------------------------------------------

def test_a_trickling_webhook_is_given_up_at_its_deadline_in_the_background(make_notifier, hook):
    hook.mode = "trickle"
    notifier, log = make_notifier(webhook=hook.url, webhook_deadline_s=1.0)
    started = time.monotonic()
    notifier.submit([notice()])
    assert time.monotonic() - started < 0.5, "submit must not wait for the webhook"
    assert notifier.flush(10)
    elapsed = time.monotonic() - started
    assert 0.9 <= elapsed < 3.0, elapsed
    assert len(log) == 1 and "no complete answer within 1s" in log[0], log

    hook.mode = "ok"                                  # the receiver behaves again: the next notice goes through
    notifier.submit([notice("resolved")])
    assert notifier.flush(5)
    assert [n["kind"] for n in hook.received] == ["resolved"]
    assert len(log) == 1, log


@pytest.mark.parametrize("mode, said", [
    ("garbage", "BadStatusLine"),
    ("status:500 Internal Server Error", "HTTP 500 Internal Server Error"),
    ("status:302 Found", "HTTP 302 Found"),
])
def test_a_broken_answer_is_one_log_line_and_nothing_raised(make_notifier, hook, mode, said):
    hook.mode = mode
    notifier, log = make_notifier(webhook=hook.url, webhook_deadline_s=5.0)
    notifier.submit([notice(), notice("guard-blocked")])
    assert notifier.flush(10)
    assert len(log) == 2, log                         # every failure is told, none skipped silently
    assert all(said in line and f"http://127.0.0.1:{hook.port}" in line for line in log), log
    assert "failover notice" in log[0] and "guard-blocked notice" in log[1]


def test_a_refused_connection_and_an_unknown_host_are_one_log_line_each(make_notifier):
    refused, log = make_notifier(webhook=f"http://127.0.0.1:{free_port()}/hook", webhook_deadline_s=2.0)
    unknown, log2 = make_notifier(webhook="http://no-such-host.invalid/hook", webhook_deadline_s=2.0)
    not_http, log3 = make_notifier(webhook="ftp://example.invalid/hook", webhook_deadline_s=2.0)
    started = time.monotonic()
    for notifier in (refused, unknown, not_http):
        notifier.submit([notice()])
    assert all(notifier.flush(10) for notifier in (refused, unknown, not_http))
    assert time.monotonic() - started < 5.0
    assert len(log) == 1 and "ConnectionRefusedError" in log[0], log
    assert len(log2) == 1 and "http://no-such-host.invalid" in log2[0], log2
    assert len(log3) == 1 and "http:// or https://" in log3[0], log3


def test_webhook_tokens_never_reach_the_log(make_notifier, hook):
    secret_parts = "user:secret@127.0.0.1:{port}/bot123:TOKEN/x?key=SECRET"
    # The server echoes the requested path in its reason phrase, as some do.
    hook.mode = "status:404 no such path /bot123:TOKEN/x?key=SECRET"
    answering, log = make_notifier(webhook="http://" + secret_parts.format(port=hook.port), webhook_deadline_s=2.0)
    port = free_port()
    refused, log2 = make_notifier(webhook="http://" + secret_parts.format(port=port), webhook_deadline_s=2.0)
    hook2 = Hook()
    try:
        hook2.mode = "trickle"
        slow, log3 = make_notifier(webhook="http://" + secret_parts.format(port=hook2.port), webhook_deadline_s=0.5)
        for notifier in (answering, refused, slow):
            notifier.submit([notice()])
        assert all(notifier.flush(10) for notifier in (answering, refused, slow))
    finally:
        hook2.close()
    lines = log + log2 + log3
    assert len(lines) == 3, lines
    for line in lines:
        assert "secret" not in line.lower() and "TOKEN" not in line and "user" not in line, line
    assert f"http://127.0.0.1:{hook.port}:" in log[0] and "HTTP 404" in log[0]
    assert f"http://127.0.0.1:{port}:" in log2[0]


# --- a hanging command ---------------------------------------------------------------------------

def test_a_hanging_command_is_killed_at_its_deadline_and_notices_do_not_add_up_in_submit(make_notifier, tmp_path):
    pids = tmp_path / "pids"
    script = f"import os, sys, time; open({str(pids)!r}, 'a').write(f'{{os.getpid()}}\\n'); time.sleep(60)"
    notifier, log = make_notifier(command=[sys.executable, "-c", script], command_deadline_s=1.0)
    started = time.monotonic()
    notifier.submit([notice() for _ in range(5)])
    assert time.monotonic() - started < 0.5, "submit must not run the command"
    assert notifier.flush(20)
    elapsed = time.monotonic() - started
    assert 4.5 <= elapsed < 12.0, elapsed             # one deadline per notice, in the background
    assert len(log) == 5 and all("killed with its process group" in line for line in log), log
    started_pids = [int(p) for p in pids.read_text().split()]
    assert len(started_pids) == 5
    wait_until(lambda: not any(alive(p) for p in started_pids), 5, "the commands to be gone")


@pytest.mark.parametrize("parent", ["sleeps", "exits"])
def test_a_command_and_the_child_it_forked_are_killed_together(make_notifier, tmp_path, parent):
    pids = tmp_path / "pids"
    script = (f"import os, time\n"
              f"if os.fork() == 0:\n"
              f"    open({str(pids)!r}, 'a').write(f'{{os.getpid()}}\\n')\n"
              f"    time.sleep(60)\n"
              f"{'time.sleep(60)' if parent == 'sleeps' else 'os._exit(0)'}\n")
    notifier, log = make_notifier(command=[sys.executable, "-c", script], command_deadline_s=1.0)
    started = time.monotonic()
    notifier.submit([notice()])
    assert notifier.flush(10)
    assert time.monotonic() - started < 4.0
    assert len(log) == 1 and "killed with its process group" in log[0], log
    wait_until(lambda: pids.exists() and pids.read_text().strip(), 5, "the child's pid")
    child = int(pids.read_text().split()[0])
    wait_until(lambda: not alive(child), 5, "the forked child to be killed")


def test_a_failing_command_is_one_log_line_with_its_stderr(make_notifier):
    script = "import sys; sys.stderr.write('no route to the chat'); sys.exit(3)"
    notifier, log = make_notifier(command=[sys.executable, "-c", script, "--token", "abcd-TOKEN"])
    missing, log2 = make_notifier(command=["/nonexistent/notify-tool"])
    notifier.submit([notice()])
    missing.submit([notice()])
    assert notifier.flush(10) and missing.flush(10)
    assert len(log) == 1 and "exited 3: no route to the chat" in log[0], log
    assert "TOKEN" not in log[0]
    assert len(log2) == 1 and "FileNotFoundError" in log2[0], log2


def test_a_slow_command_does_not_delay_the_webhook(make_notifier, hook):
    notifier, log = make_notifier(webhook=hook.url, command=[sys.executable, "-c", SLEEPER], command_deadline_s=30)
    notifier.submit([notice("strategy-error"), notice("resolved")])
    wait_until(lambda: len(hook.received) == 2, 5, "the webhook to get both notices while the command hangs")
    notifier.close(timeout=0.2)


# --- overflow --------------------------------------------------------------------------------------

def test_overflow_drops_the_oldest_routine_notices_keeps_alerts_and_says_how_many(make_notifier, hook):
    hook.mode = "block"
    notifier, log = make_notifier(webhook=hook.url, capacity=3, webhook_deadline_s=20)
    notifier.submit([notice("failover", n=0)])
    wait_until(lambda: hook.arrived == 1, 5, "the webhook to hold the first notice")

    burst = [notice("strategy-error", n=1), notice("worker-offline", n=2), notice("lease-expired", n=3),
             notice("failover", n=4, t=1234), notice("action-failed", n=5), notice("failover", n=6)]
    started = time.monotonic()
    notifier.submit(burst)
    assert time.monotonic() - started < 0.5
    assert notifier.dropped == 3                      # n=1, n=3, n=4: routine; the alerts stay
    hook.release.set()
    assert notifier.flush(10)

    told = [n for n in hook.received if n["kind"] != "notices-dropped"]
    assert [n["n"] for n in told] == [0, 2, 5, 6]
    summaries = [n for n in hook.received if n["kind"] == "notices-dropped"]
    assert summaries == [{"t": 1234, "kind": "notices-dropped",
                          "message": "3 notices were dropped (the notification queue was full)"}]
    assert sum("queue is full" in line for line in log) == 1, log

    notifier.submit([notice("failover", n=7)])       # the count starts again: no second summary
    assert notifier.flush(5)
    assert [n["kind"] for n in hook.received].count("notices-dropped") == 1


def test_overflow_of_alerts_only_drops_the_oldest_alert(make_notifier, hook):
    hook.mode = "block"
    notifier, log = make_notifier(webhook=hook.url, capacity=2, webhook_deadline_s=20)
    notifier.submit([notice("worker-offline", n=0)])
    wait_until(lambda: hook.arrived == 1, 5, "the webhook to hold the first notice")
    notifier.submit([notice(kind, n=i) for i, kind in enumerate(sorted(ALERT_KINDS)[:4], start=1)])
    assert notifier.dropped == 2
    hook.release.set()
    assert notifier.flush(10)
    assert [n["n"] for n in hook.received if n["kind"] != "notices-dropped"] == [0, 3, 4]
    assert [n["message"] for n in hook.received if n["kind"] == "notices-dropped"] == [
        "2 notices were dropped (the notification queue was full)"]


# --- closing -------------------------------------------------------------------------------------

def test_close_returns_within_its_timeout_and_kills_a_hung_command(make_notifier, hook, tmp_path):
    hook.mode = "block"
    pids = tmp_path / "pids"
    script = f"import os, time; open({str(pids)!r}, 'a').write(f'{{os.getpid()}}\\n'); time.sleep(60)"
    notifier, log = make_notifier(webhook=hook.url, command=[sys.executable, "-c", script],
                                  webhook_deadline_s=30, command_deadline_s=30)
    notifier.submit([notice(), notice("resolved")])
    wait_until(lambda: hook.arrived == 1 and pids.exists() and pids.read_text().strip(), 5,
               "both sinks to be busy")
    assert not notifier.flush(0.1)                    # not drained: flush says so
    started = time.monotonic()
    notifier.close(timeout=1.0)
    elapsed = time.monotonic() - started
    assert 0.9 <= elapsed < 1.6, elapsed
    command = int(pids.read_text().split()[0])
    wait_until(lambda: not alive(command), 5, "the hung command to be killed")
    wait_until(lambda: sum("cut short" in line for line in log) == 2, 5, "both deliveries to be cut short")
    assert sum("1 notices not sent (closing)" in line for line in log) == 2, log

    notifier.submit([notice()])                       # after close: told, not raised, not queued
    assert "the notifier is closed" in log[-1]
