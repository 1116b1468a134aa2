"""A strategy that fills its worker's disk: a full disk is that host's reported problem. Supervisors
there survive it (output that cannot be written is dropped, a heartbeat the disk would not take
costs no restart); no new copy is started there; its strategies, which can no longer be renewed
there, are fenced when their lease ends and start again elsewhere; nothing prints a traceback.

The disk is a small tmpfs mounted by the test (root only): a skip elsewhere, a failure under CI."""
from __future__ import annotations

import os
import subprocess

import pytest

from harness import FleetDir, alive, kill_all, wait_for
from tests.support import require

TTL = 8.0


@pytest.fixture
def tiny_disk(tmp_path):
    mount = tmp_path / "tiny"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(mount)], capture_output=True,
                          text=True, timeout=30) if os.geteuid() == 0 else None
    require(None if done is not None and done.returncode == 0 else
            f"cannot mount a small tmpfs for a full disk ({done.stderr.strip() if done else 'not root'})")
    yield mount
    kill_all(str(tmp_path) + os.sep)
    subprocess.run(["umount", "-l", str(mount)], capture_output=True, timeout=30)


@pytest.mark.slow
def test_a_strategy_that_fills_the_disk_hurts_only_its_host(node, reaper, tmp_path, tiny_disk):
    fl = FleetDir(tmp_path / "fleet", lease_ttl=TTL).short_lease(TTL)
    fl.worker("w1", workdir=str(tiny_disk / "w1")).worker("w2", cordoned=True)
    beside = fl.workdir
    fl.workdir = lambda wid: tiny_disk / "w1" if wid == "w1" else beside(wid)     # type: ignore[method-assign]
    fl.strategy("filler", {"fillMb": 40}, heartbeat_ms=200)
    fl.strategy("calm-a", heartbeat_ms=200).strategy("calm-b", heartbeat_ms=200)
    fl.write()
    log = tmp_path / "loop.log"
    fl.spawn("reconcile", log=log)
    for sid in ("filler", "calm-a", "calm-b"):
        wait_for(lambda sid=sid: fl.runner_pid(sid), 20, what=f"{sid} running on w1")
    supervisors = {sid: fl.supervisor_pid(sid) for sid in ("filler", "calm-a", "calm-b")}
    wait_for(lambda: os.statvfs(tiny_disk).f_bavail == 0, 30, what="the filler to fill w1's disk")

    # The supervisors outlive the full disk (each still holds the lease it was last renewed with).
    wait_for(lambda: "disk full" in fl.ql("status").stdout, 10, what="status to say w1's disk is full")
    assert all(alive(pid) for pid in supervisors.values()), supervisors
    events = fl.events()
    assert any(e.get("kind") == "disk-full" and e.get("worker") == "w1" for e in events), events

    # Room elsewhere: what can no longer be renewed on w1 is fenced there and starts on w2.
    fl.workers["w2"]["cordoned"] = False
    fl.write()
    for sid in ("calm-a", "calm-b"):
        wait_for(lambda sid=sid: (p := fl.placement(sid)) and p["worker"] == "w2" and fl.runner_pid(sid), 60,
                 what=f"{sid} running again on w2")
    plan = fl.plan()
    assert not [a for a in plan["actions"] if a.get("worker") == "w1" or a.get("to") == "w1"], plan
    text = log.read_text()
    assert "Traceback" not in text, text[-4000:]
    fl.stop_daemons()
