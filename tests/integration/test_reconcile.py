"""Leases, the state lock, the reconcile daemon and crash safety, with real processes."""
from __future__ import annotations

import json
import os
import signal
import time

import pytest

from harness import alive, hold_for, supervisors, wait_for


@pytest.mark.slow
def test_lease_not_renewed_stops_the_strategy(fleet):
    ttl = 3.0
    fleet.short_lease(ttl).worker("w1").strategy("fenced").write()
    applied = fleet.apply()
    assert f"strategies stop in {ttl:g} s unless `quantlab reconcile` runs" in applied.stderr, applied.describe()
    fleet.beating("fenced", beats=1)
    pid = fleet.runner_pid("fenced")
    lease = fleet.read_json("fenced", "lease.json")      # granted by the start, never renewed since
    assert lease["expiresAt"] - fleet.host_status("fenced")["startedAt"] <= ttl * 1000

    stopped = wait_for(lambda: (s := fleet.host_status("fenced")) and s["state"] == "stopped" and s, ttl + 5,
                       what="the supervisor to stop the strategy when its lease ran out")
    # Not before the lease ran out; soon after it (the supervisor polls every heartbeatMs / 4).
    assert fleet.read_json("fenced", "lease.json") == lease
    assert lease["expiresAt"] - 50 <= stopped["stoppedAt"] <= lease["expiresAt"] + 2000, (lease, stopped)
    assert stopped["reason"].startswith("lease expired"), stopped
    # Facts, not a guess: the host cannot tell a stopped loop from a partition or its own freeze.
    assert "no renewal reached this host for 3s" in stopped["reason"] and "?" not in stopped["reason"], stopped
    wait_for(lambda: not alive(pid) and fleet.supervisor_pid("fenced") is None, 5, what="the processes to end")
    assert len(fleet.lines("fenced", "exit.log")) == 1, ("st_exit did not run once", fleet.host_events("fenced"))

    s = fleet.strategy_status("fenced")
    assert s["status"] == "stopped" and s["healthy"] is False, s
    assert s["reason"].startswith("lease expired"), s
    events = fleet.events("--strategy", "fenced")
    expired = [e for e in events if e["event"] == "lease-expired"]
    assert len(expired) == 1, events
    assert expired[0]["detail"].startswith("lease expired") and expired[0]["worker"] == "w1", expired
    epoch = expired[0]["epoch"]
    assert "quantlab-supervisor: stopped: lease expired" in fleet.ql("logs", "fenced").stdout

    # A reconcile records the host's event for good (and starts the strategy again); it is still
    # listed once.
    fleet.ql("reconcile", "--once")
    recorded = [json.loads(line) for line in (fleet.root / ".quantlab" / "events.jsonl").read_text().splitlines()]
    assert [(e["event"], e["strategy"]) for e in recorded if e["event"] == "lease-expired"] == [("lease-expired", "fenced")]
    again = [e for e in fleet.events("--strategy", "fenced") if e["event"] == "lease-expired" and e["epoch"] == epoch]
    assert len(again) == 1, again


def test_parallel_reconciles_one_fails_fast_naming_the_holder(fleet, tmp_path):
    # 'slow' takes 3 s in st_exit, so the reconcile that stops it holds the state lock that long.
    fleet.worker("w1").strategy("slow", {"exitDelayMs": 3000}, stopTimeoutSeconds=10).strategy("other").write()
    fleet.apply()
    fleet.beating("slow", beats=1)
    del fleet.strategies["slow"]
    fleet.write()

    procs = [fleet.spawn("reconcile", "--once", log=tmp_path / f"reconcile-{n}.log") for n in (1, 2)]
    started = time.monotonic()
    ended: dict[int, float] = {}

    def all_done():
        for p in procs:
            if p.poll() is not None and p.pid not in ended:
                ended[p.pid] = time.monotonic() - started
        return len(ended) == len(procs)

    wait_for(all_done, 30, what="both reconciles to finish")
    codes = sorted((p.returncode, n) for n, p in enumerate(procs))
    assert [c for c, _ in codes] == [0, 1], codes
    winner, loser = procs[codes[0][1]], procs[codes[1][1]]
    out = (tmp_path / f"reconcile-{codes[1][1] + 1}.log").read_text()
    assert f"state is locked by pid {winner.pid} " in out and "(quantlab reconcile)" in out, out
    assert ended[winner.pid] >= 3, ended
    assert ended[loser.pid] < ended[winner.pid] / 2, ended
    assert len(fleet.lines("slow", "exit.log")) == 1
    assert fleet.placement("slow") is None


@pytest.mark.slow
def test_daemon_converges_renews_follows_changes_survives_bad_yaml(fleet, tmp_path):
    ttl = 3.0
    fleet.short_lease(ttl).worker("w1").strategy("d1", heartbeat_ms=200).strategy("d2", heartbeat_ms=200).write()
    log = tmp_path / "daemon.log"
    daemon = fleet.spawn("reconcile", log=log)

    # Converges a fresh fleet.
    for sid in ("d1", "d2"):
        fleet.beating(sid, beats=1)
    pids = {sid: fleet.runner_pid(sid) for sid in ("d1", "d2")}

    def unchanged():
        assert daemon.poll() is None, f"the daemon exited:\n{log.read_text()}"
        for sid, pid in pids.items():
            assert fleet.runner_pid(sid) == pid and fleet.host_status(sid)["state"] == "running", \
                (sid, fleet.host_status(sid), fleet.host_events(sid), log.read_text())
        return True

    # Keeps renewing: more than three TTLs later the same runners still run.
    hold_for(3 * ttl + 0.5, unchanged, "the first runners running under renewed leases")
    for sid in pids:
        assert fleet.lines(sid, "exit.log") == []
        assert not any(e["event"] == "lease-expired" for e in fleet.host_events(sid))

    # Follows a YAML change.
    fleet.strategy("d3", heartbeat_ms=200)
    fleet.write()
    fleet.beating("d3", beats=1, timeout=15)
    pids["d3"] = fleet.runner_pid("d3")

    # Survives an invalid edit: reports it, stops nothing, keeps renewing past the TTL.
    (fleet.root / "strategies.yaml").write_text("apiVersion: quantlab/v1\nkind: Strategy\nid: [broken\n")
    wait_for(lambda: "does not validate" in log.read_text(), 10, what="the daemon to report the invalid fleet")
    hold_for(2 * ttl + 0.5, unchanged, "all runners running while the fleet is invalid")
    text = log.read_text()
    assert "strategies.yaml:" in text and "nothing is started or stopped" in text, text

    daemon.send_signal(signal.SIGTERM)
    code = wait_for(lambda: daemon.poll() is not None and (daemon.returncode,), 15,
                    what="the daemon to exit on SIGTERM")
    assert code == (0,), log.read_text()
    assert log.read_text().rstrip().splitlines()[-1].endswith("reconcile loop stopped"), log.read_text()
    assert fleet.runner_counts() == {"d1": 1, "d2": 1, "d3": 1}


@pytest.mark.slow
@pytest.mark.parametrize("kill", ["controller", "process-group"])
def test_controller_killed_mid_apply_then_reconcile_converges_without_duplicates(fleet, tmp_path, kill):
    # 's3' (sorted in the middle) takes 3 s in st_exit: its restart holds the apply up, so the kill
    # lands after s1 and s2 started and before s4 and s5 did.
    fleet.worker("w1", max_strategies=8)
    fleet.strategy("s3", {"exitDelayMs": 3000, "v": 1}, stopTimeoutSeconds=10).write()
    fleet.apply()
    fleet.beating("s3", beats=1)
    for sid in ("s1", "s2", "s4", "s5"):
        fleet.strategy(sid)
    fleet.strategies["s3"]["params"]["v"] = 2
    fleet.write()

    apply = fleet.spawn("apply", "--yes", log=tmp_path / "apply.log")
    wait_for(lambda: fleet.lines("s3", "exit-begin.log"), 15, what="the restart of s3 to begin")
    # Their starts were answered before it began; their runners come a moment later (the supervisor
    # writes runner.pid once it has spawned one), well within s3's 3 s st_exit.
    wait_for(lambda: fleet.runner_pid("s1") and fleet.runner_pid("s2"), 2, what="the runners of s1 and s2")
    assert not fleet.instance_dirs("s4") and not fleet.instance_dirs("s5")
    if kill == "controller":
        os.kill(apply.pid, signal.SIGKILL)          # the agent it was talking to finishes on its own
    else:
        os.killpg(apply.pid, signal.SIGKILL)        # the agent dies with it, mid-stop
    apply.wait(timeout=10)
    assert apply.returncode == -signal.SIGKILL

    state = json.loads(fleet.state_path.read_text())          # readable, whole
    assert set(state["placements"]) >= {"s1", "s2", "s3"}
    assert max(fleet.runner_counts().values()) == 1
    fleet.ql("status", "--output", "json")

    # The next reconcile converges; nothing ever runs twice.
    fleet.ql("reconcile", "--once", "--lock-timeout", "10", timeout=60)

    def converged():
        counts = fleet.runner_counts()
        assert max(counts.values(), default=0) <= 1, f"a strategy runs twice: {counts}"
        if counts != {sid: 1 for sid in ("s1", "s2", "s3", "s4", "s5")}:
            return False
        return fleet.ql("plan", "--detailed-exitcode", check=None).returncode == 0

    wait_for(converged, 20, interval=0.2, what="the fleet to converge after the crash")
    for sid in ("s1", "s2", "s3", "s4", "s5"):
        fleet.beating(sid, beats=1)
        assert len(fleet.instance_dirs(sid)) == 1
    assert fleet.recorded("s3", "params.json")["v"] == 2
    assert len(fleet.lines("s3", "exit.log")) == 1        # the old s3 ended once, through st_exit
    assert fleet.runner_counts() == {sid: 1 for sid in ("s1", "s2", "s3", "s4", "s5")}
    assert len({p.pid for p in supervisors(fleet.marker)}) == 5


@pytest.mark.slow
def test_refused_mass_stop_is_not_carried_out_by_fencing(fleet):
    """The fleet dir loses every strategy (a bad checkout): the loop refuses the mass stop, and keeps
    renewing their leases, so the strategies outlive several TTLs instead of fencing themselves.
    Run as from cron, back to back: the lease rule asks for a lease over two cron periods."""
    ttl = 5.0
    fleet.short_lease(ttl, cron_period=1.5).worker("w1")
    for sid in ("s1", "s2", "s3"):
        fleet.strategy(sid)
    fleet.write()
    fleet.apply()
    pids = {sid: fleet.beating(sid, beats=1) and fleet.runner_pid(sid) for sid in ("s1", "s2", "s3")}

    fleet.strategies.clear()
    fleet.write()
    started = time.monotonic()
    while time.monotonic() - started < 2 * ttl:
        tick = fleet.ql("reconcile", "--once", check=1)      # exit 1: a guard refused
        assert "blocked (mass-stop)" in tick.stdout, tick.describe()
        for sid, pid in pids.items():
            assert alive(pid), f"{sid} stopped although the mass stop was refused"
    for sid in pids:
        assert fleet.host_status(sid)["state"] == "running"
        assert fleet.lines(sid, "exit.log") == []


def test_the_loop_rebalances_on_its_own_when_the_fleet_asks_for_it(fleet, tmp_path):
    fleet.running("w1", ("r1", "r2", "r3", "r4"))
    # A second worker joins; only the loop's own rebalance moves anything there (plans stay sticky).
    fleet.worker("w2", max_strategies=8)
    fleet.settings["reconcile"]["rebalance"] = {"intervalSeconds": 600, "maxMoves": 1}
    fleet.write()
    log = tmp_path / "daemon.log"
    fleet.spawn("reconcile", log=log)
    moved = wait_for(lambda: [s for s in ("r1", "r2", "r3", "r4") if (p := fleet.placement(s)) and p["worker"] == "w2"],
                     20, what="the loop's first rebalance to move one strategy to w2")
    assert len(moved) == 1, moved
    fleet.beating(moved[0], beats=1)
    # One move per rebalance, and the next is 600 s away: nothing else moves meanwhile.
    hold_for(4 * 0.5 + 1, lambda: sum(1 for s in ("r1", "r2", "r3", "r4") if fleet.placement(s)["worker"] == "w2") == 1,
             "a single rebalance move")
    state = fleet.state()
    assert state["rebalanced"] == moved and state["rebalancedAt"] is not None
    moves = [(e["strategy"], e.get("cause"), e["actor"].split()[-1]) for e in fleet.events() if e["event"] == "move"]
    assert moves == [(moved[0], "rebalance", "reconcile")], moves


@pytest.mark.slow
def test_the_lease_expired_message_names_the_ttl_in_force(fleet):
    fleet.worker("w1").strategy("ttl").write()           # started under the long test lease
    fleet.apply()
    fleet.beating("ttl", beats=1)
    fleet.short_lease(3.0).write()                          # a shorter lease: the copy restarts under it
    fleet.apply()
    stopped = wait_for(lambda: (s := fleet.host_status("ttl")) and s["state"] == "stopped" and s, 15,
                       what="the copy to stop when its 3 s lease ran out")
    assert "no renewal reached this host for 3s" in stopped["reason"], stopped
