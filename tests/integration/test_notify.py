"""Notifications: a strategy that gives up, a refused mass stop — to a real webhook on loopback and a
real command (argv, JSON on stdin), each alert told once."""
from __future__ import annotations

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from harness import wait_for


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
