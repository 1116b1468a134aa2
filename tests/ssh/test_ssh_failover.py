"""Seed scenario 2 for real: a JP host goes dark while its strategy runs. The supervisor there stops
the strategy when its lease runs out; only after the lease has surely expired does `reconcile` start
a replacement on the other JP host, with the last checkpoint copied from the lost one. At no moment
do two copies run, and when the lost host returns nothing runs twice."""
from __future__ import annotations

import base64
import json
import time
import zlib

import pytest

from sshfleet import wait_for

pytestmark = pytest.mark.ssh

TTL = 5.0
CRON_PERIOD = 1.5      # the tests run `reconcile --once` back to back, each well under this


def checkpoint_beats(fl, sid: str) -> int:
    """ctx.state.beats in the controller's copy of the strategy's checkpoint."""
    copy = json.loads((fl.dir / ".quantlab" / "checkpoints" / f"{sid}.json").read_text())
    state = json.loads(zlib.decompress(base64.b64decode(copy["files"]["state.json"])))
    return int(state["beats"])


@pytest.mark.slow
def test_lost_jp_host_fails_over_to_the_other_jp_host_with_its_checkpoint(ssh_fleet):
    fl = ssh_fleet(3, connect_timeout=1, command_timeout=3)
    fl.short_lease(TTL, cron_period=CRON_PERIOD)
    fl.worker("jp-1", "host-01", region="JP").worker("jp-2", "host-02", region="JP")
    fl.worker("us-1", "host-03", region="US")
    fl.strategy("grid-jp", region="JP", stopTimeoutSeconds=1)
    fl.write()

    placed = fl.apply()
    lost = placed["grid-jp"]
    assert lost in ("jp-1", "jp-2"), placed
    other = "jp-2" if lost == "jp-1" else "jp-1"
    fl.wait_runners({"grid-jp": lost})
    state_file = fl.instance_dir(lost, "grid-jp") / "state" / "state.json"
    wait_for(lambda: state_file.exists() and json.loads(state_file.read_text()).get("beats", 0) >= 3, 10,
             f"a few heartbeats on {lost}")
    fl.cli("reconcile", "--once")                     # renews the lease and copies the checkpoint
    copied = checkpoint_beats(fl, "grid-jp")
    assert copied >= 3

    lost_host = fl.hosts[fl.worker_hosts[lost]]
    lost_host.stop()                                  # the host goes dark; its runner keeps going for now
    moved = None
    deadline_ticks = 40
    for _ in range(deadline_ticks):
        runners = fl.runners_by_strategy().get("grid-jp", [])
        assert len(runners) <= 1, f"two copies of grid-jp run at once: {[p.cmdline for p in runners]}"
        report = fl.cli("reconcile", "--once", check=None)
        if "move grid-jp" in report.out:
            moved = report
            break
    assert moved is not None, "reconcile never moved grid-jp off the lost host"
    assert f"move grid-jp {other}: ok" in moved.out, moved.describe()

    # The old copy fenced itself (its lease ran out) before the new one started, and the new one
    # continues from the copied checkpoint instead of starting from scratch.
    old_status = json.loads((fl.instance_dir(lost, "grid-jp") / "status.json").read_text())
    assert old_status["state"] == "stopped" and old_status["reason"].startswith("lease expired"), old_status
    runner = fl.wait_runners({"grid-jp": other})["grid-jp"]
    assert runner.environ()["QUANTLAB_WORKER_ID"] == other
    new_state = fl.instance_dir(other, "grid-jp") / "state" / "state.json"
    wait_for(lambda: new_state.exists() and json.loads(new_state.read_text()).get("beats", 0) > copied, 10,
             f"beats on {other} to continue past the copied {copied}")

    # The lost host comes back: nothing runs twice and there is nothing left to do.
    lost_host.start()
    fl.cli("reconcile", "--once")
    assert len(fl.runners_by_strategy()["grid-jp"]) == 1
    fl.cli("plan", "--detailed-exitcode")
    status = {s["id"]: s for s in fl.status()["strategies"]}
    assert status["grid-jp"]["workerId"] == other and status["grid-jp"]["status"] == "running"


class LosesStartAnswers:
    """A transport factory for Hosts: the real SSH transport, except that the answer of an agent
    `start` is dropped after the command ran (as a timeout after sending would), while `lose` is set."""

    def __init__(self, fleet) -> None:
        from quantlab.edges.transport.ssh import SshTransport
        from quantlab.edges.transport.base import TransportError

        owner = self
        self.lose = False

        class Losing(SshTransport):
            def run(self, argv, stdin=b"", timeout=30.0):
                done = super().run(argv, stdin, timeout)
                if owner.lose and len(argv) > 4 and argv[4] == "start":
                    raise TransportError(self.name, "start: answer lost (test)", maybe_ran=True)
                return done

        self.settings = fleet.settings.ssh
        self.make = Losing

    def __call__(self, key):
        return self.make.for_host(key.host, key.port, key.user, self.settings)


@pytest.mark.slow
def test_a_start_whose_answer_was_lost_then_its_host_went_dark_never_runs_twice(ssh_fleet):
    from quantlab.app.controller import Controller, default_state_path
    from quantlab.edges.hosts import Hosts
    from quantlab.app.loop import ReconcileLoop

    fl = ssh_fleet(2, connect_timeout=1, command_timeout=3)
    fl.short_lease(TTL, cron_period=CRON_PERIOD)
    fl.worker("jp-1", "host-01", region="JP").worker("jp-2", "host-02", region="JP")
    fl.strategy("warm-1", region="JP", stopTimeoutSeconds=1).strategy("warm-2", region="JP", stopTimeoutSeconds=1)
    fl.write()
    ctl = Controller(fl.dir, default_state_path(fl.dir))
    factory = LosesStartAnswers(ctl.load_fleet())
    ctl._hosts = Hosts(ctl.load_fleet(), transport_factory=factory, serve=False)   # Losing loses `run`'s answers
    loop = ReconcileLoop(ctl, log=lambda line: None)
    assert all(o.ok for o in loop.tick().outcomes)          # ships agent, runner and file everywhere

    fl.strategy("solo", region="JP", stopTimeoutSeconds=1).write()
    factory.lose = True
    [lost] = loop.tick().outcomes
    assert not lost.ok and "answer lost" in lost.detail
    factory.lose = False
    where = lost.action.worker
    assert fl.placements()["solo"] == where        # the intent was recorded before the host was asked
    fl.wait_runners(fl.placements())

    # Its host goes dark before any run heard of the start. The state recorded the intent, so the
    # strategy waits out the lease there instead of starting a second copy elsewhere.
    fl.hosts[fl.worker_hosts[where]].stop()
    moved = False
    deadline = time.monotonic() + 30
    while not moved and time.monotonic() < deadline:
        assert len(fl.runners_by_strategy().get("solo", [])) <= 1, "two copies of solo at once"
        moved = any(o.action.strategy == "solo" and o.ok for o in loop.tick().outcomes)
    assert moved, "solo was never started elsewhere:\n" + fl.cli("plan", check=None).out
    other = "jp-2" if where == "jp-1" else "jp-1"
    [runner] = wait_for(lambda: fl.runners_by_strategy().get("solo"), 10, "solo's runner on the other worker")
    assert runner.environ()["QUANTLAB_WORKER_ID"] == other
    old_status = json.loads((fl.instance_dir(where, "solo") / "status.json").read_text())
    assert old_status["reason"].startswith("lease expired"), old_status   # it fenced itself first
    ctl.close()
