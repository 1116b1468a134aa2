"""Reconcile daemons on one PostgreSQL state with `local` workers: the lead is handed over on purpose
(`quantlab leader step-down`, or SIGTERM) within a second or two, nothing restarts, and `status`
and the events say who leads."""
from __future__ import annotations

import http.client
import json
import signal

from tests.integration.harness import FleetDir, quantlab, runners
from tests.support import free_port, hold_for, wait_for


def leader_of(fl: FleetDir, dsn: str) -> dict:
    return quantlab("leader", "show", "--fleet", fl.root, "--output", "json", "--state", dsn).json() or {}



def get(port: int, path: str) -> dict | None:
    """The page's JSON, straight to loopback (no proxy variables consulted)."""
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("GET", path)
        answer = conn.getresponse()
        body = answer.read()
        conn.close()
        return json.loads(body) if answer.status == 200 else None
    except (OSError, ValueError):
        return None


def runner_pids(fl: FleetDir) -> list[int]:
    return sorted(p.pid for p in runners(fl.marker))


def test_step_down_and_sigterm_hand_the_lead_over_and_nothing_restarts(daemon_fleet, pg_dsn, tmp_path):
    daemon_fleet.worker("w1").strategy("s1").write()
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    port = free_port()
    a = daemon_fleet.spawn("reconcile", "--state", pg_dsn, "--serve", f"127.0.0.1:{port}", log=logs[0])
    wait_for(lambda: f"pid {a.pid} " in (leader_of(daemon_fleet, pg_dsn).get("holder") or ""), 20, "a to lead")
    wait_for(lambda: len(runner_pids(daemon_fleet)) == 1, 20, "s1 to run")
    before = runner_pids(daemon_fleet)
    b = daemon_fleet.spawn("reconcile", "--state", pg_dsn, log=logs[1])
    wait_for(lambda: "standing by:" in logs[1].read_text(), 20, "b to stand by")

    # The page, served by the leader from the snapshot in the database, names it.
    page = wait_for(lambda: (r := get(port, "/api/status")) and (r.get("leader") or {}).get("term") == 1 and r, 10,
                    "the page to name the leader")
    assert f"pid {a.pid} " in page["leader"]["holder"] and page["strategies"][0]["id"] == "s1"
    status = daemon_fleet.ql("status", "--output", "json", "--state", pg_dsn).json()
    assert f"pid {a.pid} " in status["leader"]["holder"] and status["leader"]["term"] == 1
    text = daemon_fleet.ql("status", "--state", pg_dsn).stdout
    assert "Leader: reconcile pid" in text and "term 1" in text

    asked = quantlab("leader", "step-down", "--fleet", daemon_fleet.root, "--state", pg_dsn)
    assert "to step down" in asked.stdout
    wait_for(lambda: f"pid {b.pid} " in (leader_of(daemon_fleet, pg_dsn).get("holder") or ""), 6,
             "b to lead within a few seconds of the step-down")
    assert leader_of(daemon_fleet, pg_dsn)["term"] == 2
    assert "stepped down in term 1" in logs[0].read_text()

    # SIGTERM: the leader steps down as it exits, and the standby (a again) takes over at once.
    wait_for(lambda: "standing by:" in logs[0].read_text().split("stepped down")[-1], 10, "a to stand by")
    b.send_signal(signal.SIGTERM)
    assert b.wait(30) == 0
    wait_for(lambda: f"pid {a.pid} " in (leader_of(daemon_fleet, pg_dsn).get("holder") or ""), 6, "a to lead again")
    events = [e for e in daemon_fleet.ql("events", "--output", "json", "--state", pg_dsn).json() if e["event"] == "leader"]
    assert [(e["change"], e["term"]) for e in events] == [("took", 1), ("stepped-down", 1), ("took", 2),
                                                          ("stepped-down", 2), ("took", 3)], events
    assert runner_pids(daemon_fleet) == before, "nothing restarted"


def test_retry_through_the_leading_daemon(daemon_fleet, pg_dsn, tmp_path):
    """`quantlab retry` writes the request into the shared state; the leading daemon starts the
    strategy in error again at its next act round."""
    down = tmp_path / "exchange-down"
    down.write_text("")
    daemon_fleet.worker("w1").strategy("s1", {"throwWhile": str(down)}, heartbeat_ms=100, maxErrors=0,
                                       maxRestarts=1).write()
    daemon_fleet.spawn("reconcile", "--state", pg_dsn, log=tmp_path / "a.log")
    wait_for(lambda: (s := daemon_fleet.host_status("s1")) and s.get("state") == "error", 30, "s1 in error")
    down.unlink()
    placed = json.loads(quantlab("state", "pull", "--fleet", daemon_fleet.root, "--state", pg_dsn).stdout)
    epoch = placed["placements"]["s1"]["epoch"]
    daemon_fleet.ql("retry", "s1", "--reason", "exchange back", "--state", pg_dsn)

    def retried():
        state = json.loads(quantlab("state", "pull", "--fleet", daemon_fleet.root, "--state", pg_dsn).stdout)
        return state["placements"]["s1"]["epoch"] > epoch
    wait_for(retried, 20, "the leader to start s1 again")
    wait_for(lambda: (s := daemon_fleet.host_status("s1")) and s.get("state") == "running"
             and s.get("restarts") == 0, 20, "s1 running with a fresh restart budget")
    events = daemon_fleet.ql("events", "--output", "json", "--strategy", "s1", "--state", pg_dsn).json()
    assert any(e["event"] == "retry" and "exchange back" in e["detail"] for e in events), events


def test_a_forged_fence_file_fails_no_round_and_fences_at_most_its_own_worker(daemon_fleet, pg_dsn, tmp_path):
    """Two strategies rewrite their worker's agent/fence.json with terms no controller uses: one beyond
    what a database column holds (it once failed every renewal round of the fleet), one merely huge.
    Every round goes on; the strategies elsewhere keep running; the odd worker is reported."""
    for wid in ("w1", "w2", "w3", "w4"):
        daemon_fleet.worker(wid, max_strategies=1)
    daemon_fleet.strategy("healthy-a").strategy("healthy-b")
    daemon_fleet.strategy("forger-huge", {"forgeFence": "9223372036854775807"}, heartbeat_ms=200)
    daemon_fleet.strategy("forger-high", {"forgeFence": str(2 ** 40)}, heartbeat_ms=200)
    daemon_fleet.write()
    log = tmp_path / "daemon.log"
    daemon_fleet.spawn("reconcile", "--state", pg_dsn, log=log)
    wait_for(lambda: all(daemon_fleet.runner_pid(s) for s in ("healthy-a", "healthy-b", "forger-huge", "forger-high")),
             30, "every strategy running")
    wait_for(lambda: len(daemon_fleet.lines("forger-high", "forged.log")) >= 3
             and len(daemon_fleet.lines("forger-huge", "forged.log")) >= 3, 20, "both forgers at work")
    healthy = {sid: daemon_fleet.runner_pid(sid) for sid in ("healthy-a", "healthy-b")}
    # Longer than a strategy lease (10 s): only renewals keep the healthy ones on.
    hold_for(12, lambda: {sid: daemon_fleet.runner_pid(sid) for sid in healthy} == healthy,
             "the strategies on other workers running undisturbed")
    text = log.read_text()
    assert "renewal round failed" not in text and "out of range" not in text, text[-3000:]
    high_worker = json.loads(quantlab("state", "pull", "--fleet", daemon_fleet.root, "--state", pg_dsn).stdout
                             )["placements"]["forger-high"]["worker"]
    events = daemon_fleet.ql("events", "--output", "json", "--state", pg_dsn).json()
    odd = [e for e in events if e.get("kind") == "fence-anomaly"]
    assert odd and all(e["worker"] == high_worker for e in odd) and str(2 ** 40) in odd[0]["message"], odd
