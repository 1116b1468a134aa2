"""The supervisor on the host: pause/resume, in-place restarts with backoff, heartbeat-based health,
giving up after maxRestarts. Real runners on `host: local` workers; faults are injected for real
(SIGKILL, a heartbeat that never returns, a heartbeat that always throws)."""
from __future__ import annotations

import os
import re
import signal
import time

import pytest

from harness import alive, wait_for


@pytest.mark.slow
def test_pause_and_resume_keep_the_process_and_skip_st_init(fleet):
    fleet.worker("w1").strategy("pausy").write()
    fleet.apply()
    fleet.beating("pausy")
    pid = fleet.runner_pid("pausy")

    fleet.strategies["pausy"]["desiredState"] = "paused"
    fleet.write()
    plan = fleet.plan()
    assert [(a["action"], a["strategy"]) for a in plan["actions"]] == [("pause", "pausy")]
    fleet.apply()
    paused = wait_for(lambda: (h := fleet.heartbeat("pausy")) and h["paused"] and h, 5,
                      what="the heartbeat file to say paused")
    # The paused runner keeps rewriting its file (so it does not look dead) without calling st_heartbeat.
    hb = paused
    for _ in range(3):
        t = hb["t"]
        hb = wait_for(lambda: (h := fleet.heartbeat("pausy")) and h["t"] > t and h, 5, what="a fresh paused heartbeat")
        assert hb["paused"] is True and hb["beats"] == paused["beats"], hb
    s = fleet.strategy_status("pausy")
    assert s["status"] == "paused" and s["healthy"] is True, s
    assert fleet.runner_pid("pausy") == pid
    fleet.ql("plan", "--detailed-exitcode", check=0)

    fleet.strategies["pausy"]["desiredState"] = "running"
    fleet.write()
    plan = fleet.plan()
    assert [(a["action"], a["strategy"]) for a in plan["actions"]] == [("resume", "pausy")]
    fleet.apply()
    wait_for(lambda: (h := fleet.heartbeat("pausy")) and not h["paused"] and h["beats"] >= paused["beats"] + 3, 5,
             what="beats to increase again after resume")
    assert fleet.runner_pid("pausy") == pid
    assert len(fleet.lines("pausy", "init.log")) == 1, "resume ran st_init again"
    assert fleet.strategy_status("pausy")["status"] == "running"
    events = [e["event"] for e in fleet.host_events("pausy")]
    assert "paused" in events and "resumed" in events


def test_pid_files_hold_one_number_and_the_agent_keeps_their_identity_beside(fleet):
    fleet.worker("w1").strategy("plain").write()
    fleet.apply()
    fleet.beating("plain", beats=1)
    folder = fleet.find_idir("plain")
    for name, pid in (("supervisor.pid", fleet.supervisor_pid("plain")), ("runner.pid", fleet.runner_pid("plain"))):
        assert (folder / name).read_text() == f"{pid}\n", name           # `kill $(cat supervisor.pid)` works
        recorded, started = (folder / f"{name}.ident").read_text().split()
        stat = open(f"/proc/{pid}/stat").read()
        assert (int(recorded), started) == (pid, stat[stat.rindex(")") + 2:].split()[19]), name
    assert fleet.strategy_status("plain")["status"] == "running"


def test_killed_runner_is_restarted_with_backoff(fleet):
    # heartbeatMs 500: the supervisor resets the restart count after 10 healthy beats (5 s here),
    # which leaves `status` ample time to see restarts >= 1.
    delay_ms = 400
    fleet.worker("w1").strategy("victim", heartbeat_ms=500, maxRestarts=5, restartDelay=delay_ms).write()
    fleet.apply()
    fleet.beating("victim", beats=1)
    old = fleet.runner_pid("victim")

    killed_at = time.monotonic()
    os.kill(old, signal.SIGKILL)
    new = wait_for(lambda: (p := fleet.runner_pid("victim")) != old and p, 10, what="a new runner pid")
    restarted_after = time.monotonic() - killed_at
    fleet.beating("victim", beats=1)
    assert not alive(old)
    assert new != old
    s = fleet.strategy_status("victim")
    assert s["restarts"] >= 1 and s["status"] == "running", s
    restart = [e for e in fleet.host_events("victim") if e["event"] == "restart"]
    assert restart and "runner was killed by SIGKILL" in restart[0]["detail"], restart
    # The first restart waits restartDelay with jitter (0.5x..1.5x) before the new runner starts.
    host = fleet.host_status("victim")
    waited = host["startedAt"] - host["lastRestartAt"]
    assert 0.5 * delay_ms - 20 <= waited <= 1.5 * delay_ms + 200, host
    assert restarted_after < 5, restarted_after
    assert len(fleet.lines("victim", "init.log")) == 2
    assert fleet.runner_counts() == {"victim": 1}


def test_runner_that_stops_heartbeating_is_restarted(fleet):
    hb_ms, delay_ms, stop_s = 150, 100, 0.5
    # hangAfter 3: the 4th st_heartbeat never settles while a timer keeps the process busy. The stuck
    # runner cannot finish st_exit (a beat is in flight), so stopTimeoutSeconds bounds its end.
    fleet.worker("w1").strategy("hangs", {"hangAfter": 3}, heartbeat_ms=hb_ms, restartDelay=delay_ms,
                                stopTimeoutSeconds=stop_s, maxRestarts=10).write()
    fleet.apply()
    old = wait_for(lambda: fleet.runner_pid("hangs"), 10, what="the first runner")
    last_beat = {"t": None}

    def replaced():
        hb = fleet.heartbeat("hangs")
        current = fleet.runner_pid("hangs")
        if current not in (None, old):
            return current
        if hb is not None and current == old:
            last_beat["t"] = hb["t"]
        return None

    new = wait_for(replaced, 15, interval=0.02, what="a replacement runner after the hang")
    noticed = time.time() * 1000
    assert last_beat["t"] is not None and fleet.lines("hangs", "hang.log"), "the runner never hung"
    hang_pid = int(fleet.lines("hangs", "hang.log")[0].split()[0])
    assert hang_pid == old and alive(new) and not alive(old)
    # Detection at 3 x heartbeatMs, then st_exit's grace, then the jittered first backoff (<= 1.5 x).
    bound_ms = 3 * hb_ms + stop_s * 1000 + 1.5 * delay_ms + 1000
    assert noticed - last_beat["t"] <= bound_ms, f"restarted {noticed - last_beat['t']:.0f} ms after the last beat"
    restart = [e for e in fleet.host_events("hangs") if e["event"] == "restart"][0]
    assert "no heartbeat for" in restart["detail"], restart
    fleet.beating("hangs", beats=1)


@pytest.mark.slow
def test_always_throwing_heartbeat_ends_in_error_after_max_restarts(fleet):
    fleet.worker("w1").strategy("thrower", {"throwAlways": True}, heartbeat_ms=100, maxErrors=2,
                                maxRestarts=2, restartDelay=100).write()
    fleet.apply()
    final = wait_for(lambda: (s := fleet.host_status("thrower")) and s.get("state") == "error" and s, 15,
                     what="the supervisor to give up")
    events = fleet.host_events("thrower")
    restarts = [e for e in events if e["event"] == "restart"]
    assert [e["restarts"] for e in restarts] == [1, 2], events
    for e in restarts:
        # Usually 3 (the first count past maxErrors); a loaded machine may let the runner beat once more.
        found = re.search(r"errorCount (\d+) > maxErrors 2 \(last error: probe failure number (\d+)\)", e["detail"])
        assert found and int(found[1]) >= 3 and found[1] == found[2], e
    assert [e["event"] for e in events].count("error") == 1
    assert "gave up after 2 restarts" in final["reason"]
    assert len(fleet.lines("thrower", "init.log")) == 3          # the first start and two restarts
    last = fleet.heartbeat("thrower")                             # the last life's final report
    assert last["errorCount"] >= 3 and last["lastError"] == f"probe failure number {last['errorCount']}", last
    assert fleet.runner_pid("thrower") is None
    wait_for(lambda: fleet.supervisor_pid("thrower") is None, 5, what="the supervisor to exit after giving up")

    s = fleet.strategy_status("thrower")
    assert s["status"] == "error" and s["healthy"] is False and s["restarts"] == 2, s
    assert "> maxErrors 2" in s["reason"] and "gave up after 2 restarts" in s["reason"], s
    assert (s["errorCount"], s["lastError"]) == (last["errorCount"], last["lastError"]), s   # the last life's report
    # The controller does not start it again (no restart loop): it leaves a note until the spec changes.
    plan = fleet.plan()
    assert plan["actions"] == [], plan["actions"]
    assert [n["strategy"] for n in plan["notes"]] == ["thrower"]
    assert "in error after 2 restarts" in plan["notes"][0]["note"]
    fleet.ql("plan", "--detailed-exitcode", check=0)
    fleet.ql("status", "--detailed-exitcode", check=2)
    fleet.apply()
    assert len(fleet.lines("thrower", "init.log")) == 3

    # As the note says, a changed spec starts it again, with a fresh restart budget.
    fleet.strategies["thrower"]["params"] = {"throwAlways": False}
    fleet.write()
    plan = fleet.plan()
    assert [(a["action"], a["strategy"]) for a in plan["actions"]] == [("start", "thrower")]
    fleet.apply()
    fleet.beating("thrower")
    s = fleet.strategy_status("thrower")
    assert s["status"] == "running" and s["restarts"] == 0 and s["errorCount"] == 0, s
