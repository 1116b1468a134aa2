"""Values that may hold credentials never show in what quantlab prints or writes for people.

A worker's proxy carries a password, so does the notify webhook (in its userinfo, path and query).
The fleet is applied, then the proxy changes twice — once its port with its password, once its
password alone — so that a strategy restarts with a reason each time (by `apply`, then by `reconcile
--once`); one strategy requires the first proxy and stops fitting; strategies print their proxy and
quote it in their errors (exchange clients do), one until its supervisor gives up on it, which makes
a notice. Then every output is searched for the planted secrets: `plan` (text, JSON and the plan
file), `apply` (text and JSON), `reconcile --once`, `status`, `events` (text and JSON),
events.jsonl, `explain`, `logs`, the snapshot, `quantlab serve`'s /api/status, /api/events and
/api/logs, the notices the webhook received, and the state (its file and `state pull`: it keeps a
proxy with credentials redacted, with a digest to tell a change). The strategies themselves still
get the real proxy.
"""
from __future__ import annotations

import http.client
import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from harness import REPO, quantlab, wait_for
from tests.support import cli_env, free_port

SECRET = "S3cretPlanted"
FIRST = f"http://trader:{SECRET}@127.0.0.1:8890"
SECOND = f"http://trader:{SECRET}Two@127.0.0.1:8891"       # another port, another password
THIRD = f"http://trader:{SECRET}Three@127.0.0.1:8891"      # only the password differs
HOOK_SECRETS = ("HookUserSecretPlanted", "HookPathSecretPlanted", "HookQuerySecretPlanted")

# Prints its proxy at start and quotes it in every heartbeat's error (maxErrors is high: it keeps
# running); with `failInit` its st_init throws with the proxy in the message. It keeps the proxy it
# got in proxy.json of its checkpoint folder.
LOUD_JS = r"""
import fs from 'node:fs';
import path from 'node:path';

export async function st_init(ctx) {
  fs.writeFileSync(path.join(process.env.QUANTLAB_STATE_DIR, 'proxy.json'), JSON.stringify(ctx.proxy));
  ctx.log(`connecting through ${ctx.proxy}`);
  if (ctx.params.failInit) throw new Error(`login refused by ${ctx.proxy}`);
}
export async function st_heartbeat(ctx) {
  throw new Error(`exchange unreachable through ${ctx.proxy}`);
}
export async function st_exit(ctx) {}
"""


class Hook:
    """A webhook on loopback that keeps every body POSTed to it."""

    def __init__(self) -> None:
        received = self.received = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the http.server API
                received.append(self.rfile.read(int(self.headers["Content-Length"])).decode())
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        user, path, query = HOOK_SECRETS
        self.url = f"http://hook:{user}@127.0.0.1:{self.server.server_port}/services/{path}?token={query}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hook():
    h = Hook()
    yield h
    h.close()


def serve(fleet, tmp_path: Path) -> tuple[int, Path]:
    port = free_port()
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "quantlab", "serve", "--fleet", str(fleet.root),
                                 "--listen", f"127.0.0.1:{port}"], stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=cli_env(), cwd=REPO, start_new_session=True)
    fleet.daemons.append(proc)
    wait_for(lambda: "Serving the fleet page" in log.read_text() or proc.poll() is not None, 20, "serve to start")
    assert proc.poll() is None, log.read_text()
    return port, log


def get(port: int, path: str) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", path, headers={"Host": f"127.0.0.1:{port}"})
    answer = conn.getresponse()
    body = answer.read().decode()
    conn.close()
    assert answer.status == 200, (path, answer.status, body)
    return body


def leaks(outputs: dict[str, str], secrets: tuple[str, ...]) -> list[str]:
    return [f"{name}: …{text[max(0, text.find(s) - 80):text.find(s) + 40]}…"
            for name, text in outputs.items() for s in secrets if s in text]


@pytest.mark.slow
def test_no_output_shows_a_proxy_password_or_the_webhook_s_tokens(fleet, hook, tmp_path):
    (fleet.root / "strategies" / "loud.mjs").write_text(LOUD_JS)
    fleet.settings["notify"] = {"webhook": hook.url}
    fleet.worker("w1", region="JP", proxy=FIRST).worker("w2", region="US")
    fleet.strategy("loud", file="strategies/loud.mjs", requirements={"region": "JP"}, maxErrors=1_000_000)
    fleet.strategy("doomed", {"failInit": True}, file="strategies/loud.mjs", requirements={"region": "JP"},
                   maxRestarts=0)
    fleet.strategy("picky", requirements={"proxy": FIRST})
    fleet.write()
    outputs: dict[str, str] = {}
    outputs["apply (json)"] = fleet.ql("apply", "--yes", "--output", "json", check=None).output
    assert {sid: fleet.placement(sid)["worker"] for sid in ("loud", "doomed", "picky")} == \
        {"loud": "w1", "doomed": "w1", "picky": "w1"}, outputs["apply (json)"]
    wait_for(lambda: (s := fleet.host_status("doomed")) and s.get("state") == "error", 15,
             what="the supervisor to give up on doomed")
    wait_for(lambda: (fleet.heartbeat("loud") or {}).get("errorCount", 0) >= 1, 15, what="loud to fail a beat")

    # The proxy moves to another port with another password: loud restarts with a reason.
    fleet.workers["w1"]["metadata"]["proxy"] = SECOND
    fleet.write()
    outputs["plan"] = fleet.ql("plan").output
    planned = fleet.ql("plan", "--output", "json", "--out", tmp_path / "saved.plan").output
    outputs["plan (json)"] = planned
    outputs["plan file"] = (tmp_path / "saved.plan").read_text()
    restart = [a for a in json.loads(planned)["actions"] if a["strategy"] == "loud"]
    assert [a["cause"] for a in restart] == ["worker-changed"], planned
    assert "http://***@127.0.0.1:8890 → http://***@127.0.0.1:8891" in restart[0]["reason"], restart
    outputs["apply"] = fleet.ql("apply", "--yes", check=None).output
    wait_for(lambda: (fleet.heartbeat("loud") or {}).get("errorCount", 0) >= 1, 15, what="loud to fail a beat")

    # Only its password changes: the restart says so without showing either.
    fleet.workers["w1"]["metadata"]["proxy"] = THIRD
    fleet.write()
    outputs["plan (password only)"] = again = fleet.ql("plan").output
    assert "credentials changed" in again, again
    outputs["reconcile --once"] = fleet.ql("reconcile", "--once", check=None).output
    wait_for(lambda: (fleet.heartbeat("loud") or {}).get("errorCount", 0) >= 1, 15, what="loud to fail a beat")

    # The strategy trades through the real proxy all along: its runner got it.
    assert fleet.placement("loud")["worker"] == "w1"
    assert fleet.read_json("loud", "spec.json")["proxy"] == THIRD
    wait_for(lambda: fleet.recorded("loud", "proxy.json") == THIRD, 15,
             what="loud's ctx.proxy to be the new proxy")

    outputs["status"] = fleet.ql("status").output
    outputs["status (json)"] = fleet.ql("status", "--output", "json").output
    outputs["events"] = fleet.ql("events").output
    outputs["events (json)"] = fleet.ql("events", "--output", "json").output
    outputs["events.jsonl"] = (fleet.root / ".quantlab" / "events.jsonl").read_text()
    for sid in ("loud", "picky"):
        outputs[f"explain {sid}"] = fleet.ql("explain", sid, check=None).output
        outputs[f"explain {sid} (json)"] = fleet.ql("explain", sid, "--output", "json", check=None).output
    outputs["logs loud"] = fleet.ql("logs", "loud", "--lines", "100000").output
    outputs["logs doomed"] = fleet.ql("logs", "doomed").output
    outputs["snapshot.json"] = (fleet.root / ".quantlab" / "snapshot.json").read_text()
    port, serve_log = serve(fleet, tmp_path)
    outputs["/api/status"] = get(port, "/api/status")
    outputs["/api/events"] = get(port, "/api/events")
    outputs["/api/logs/loud"] = get(port, "/api/logs/loud?lines=50")
    outputs["serve's log"] = serve_log.read_text()
    wait_for(lambda: hook.received, 10, what="a notice at the webhook")
    outputs["notices"] = "\n".join(hook.received)
    state = {"state.json": fleet.state_path.read_text(),
             "state pull": quantlab("state", "pull", "--fleet", fleet.root).output}

    # Not vacuous: the outputs say what happened, with the proxy redacted.
    assert "connecting through http://***@127.0.0.1:8891" in outputs["logs loud"], outputs["logs loud"]
    assert "exchange unreachable through http://***@127.0.0.1:8891" in outputs["status (json)"]
    assert '"strategy-error"' in outputs["notices"], outputs["notices"]
    assert "login refused by http://***@127.0.0.1:8890" in outputs["logs doomed"], outputs["logs doomed"]
    restarts = [e["reason"] for e in json.loads(outputs["events (json)"]) if e.get("cause") == "worker-changed"]
    assert restarts == ["worker w1 changed: proxy http://***@127.0.0.1:8890 → http://***@127.0.0.1:8891",
                        "worker w1 changed: proxy http://***@127.0.0.1:8891: credentials changed"], restarts
    assert "http://***@127.0.0.1:8891" in outputs["explain picky"], outputs["explain picky"]

    # The state keeps the webhook: it notifies from it while the fleet files do not validate.
    found = leaks(outputs, (SECRET, *HOOK_SECRETS)) + leaks(state, (SECRET,))
    assert not found, "secrets shown:\n" + "\n".join(found)
