"""A strategy cannot extend its own lease: only renewals that prove they come from the controller
(made with the copy's key, which its supervisor got through a pipe at start) extend it. A strategy
that rewrites its lease file — with a deadline far ahead, or with an old genuine renewal put back —
still stops when the controller stops renewing, and `status` never shows more lease than the
controller granted."""
from __future__ import annotations

import time

import pytest

from harness import wait_for


@pytest.mark.slow
def test_a_strategy_that_rewrites_its_lease_file_still_stops_when_renewals_stop(fleet):
    ttl = 3.0
    fleet.short_lease(ttl).worker("w1")
    fleet.strategy("forger", {"forgeLease": "forge"}, heartbeat_ms=100)
    fleet.strategy("replayer", {"forgeLease": "replay"}, heartbeat_ms=100)
    fleet.strategy("honest", heartbeat_ms=100)
    fleet.write()
    fleet.apply()
    for sid in ("forger", "replayer", "honest"):
        fleet.beating(sid, beats=2)
    honest = fleet.runner_pid("honest")
    # Genuine renewals, each with its proof, for longer than a lease: they are taken.
    until = time.monotonic() + 1.5 * ttl
    while time.monotonic() < until:
        fleet.ql("reconcile", "--once")
    assert fleet.runner_pid("honest") == honest and fleet.host_status("honest")["state"] == "running"
    wait_for(lambda: len(fleet.lines("replayer", "forged.log")) >= 3 and len(fleet.lines("forger", "forged.log")) >= 3,
             10, what="both strategies rewriting their lease files")
    renewed_at = time.time() * 1000

    report = fleet.status()
    for s in report["strategies"]:
        # The replayer may already be fenced, or restarting after its runner found the lease it put
        # back over: an old lease hides a real renewal from its copy, which hurts that strategy alone.
        left = s["leaseLeftSeconds"]
        assert left is None or left <= ttl, s
        assert left is not None or s["status"] != "running", s
    assert "277777" not in fleet.ql("status").stdout

    # No loop from here on: whatever the files say, each copy stops when the last real renewal ends.
    for sid in ("forger", "replayer", "honest"):
        stopped = wait_for(lambda sid=sid: (s := fleet.host_status(sid)) and s["state"] == "stopped" and s,
                           ttl + 10, what=f"{sid} to be fenced although it rewrites its lease file")
        assert stopped["reason"].startswith("lease expired"), stopped
        assert stopped["stoppedAt"] <= renewed_at + (ttl + 2.5) * 1000, (sid, stopped, renewed_at)
