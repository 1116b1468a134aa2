"""Hosts that do not answer: a stopped sshd (connection refused) and a frozen one (TCP accepted, no
SSH ever), for a new connection and for a connection kept from an earlier gather. Their workers are
unreachable with the reason, the other hosts answer, and the cost is bounded by the timeouts."""
from __future__ import annotations

import json
import threading
import time

import pytest

from quantlab.edges.gather import gather
from quantlab.edges.hosts import Hosts
from quantlab.edges.transport.ssh import SshTransport
from tests.support import wait_for

pytestmark = pytest.mark.ssh

CONNECT_S = 1.0
COMMAND_S = 2.0
# What a `quantlab` process costs on top of the timeouts here (interpreter, imports, the healthy
# hosts' probes): measured ~0.8 s on 2 cores.
CLI_SLACK_S = 2.0


def bounded(fn, limit: float, host):
    """fn() in a thread; if it is not back within `limit` s (a hang: the bug these tests are about),
    thaw `host` so it can return, and fail instead of hanging the suite."""
    box = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            box["error"] = exc
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(limit)
    if thread.is_alive():
        host.thaw()
        thread.join(30)
        raise AssertionError(f"still waiting after {limit:g}s: not bounded by the timeouts")
    if "error" in box:
        raise box["error"]
    return box["value"]


def three_workers(ssh_fleet):
    fl = ssh_fleet(3, connect_timeout=CONNECT_S, command_timeout=COMMAND_S)
    fl.worker("jp-1", "host-01", region="JP").worker("jp-2", "host-02", region="JP")
    fl.worker("us-1", "host-03", region="US")
    # Every host answers once before the fault: a worker never seen by this state could still run
    # copies an earlier state placed there, and the planner would rightly hold JP starts for it. (A
    # first round on a busy machine may miss a host's deadline: the next one finds it warm.)
    fl.write()

    def all_answered():
        fl.cli("reconcile", "--once", check=None)
        state = json.loads((fl.dir / ".quantlab" / "state.json").read_text())
        return set(state.get("answered", {})) >= {"jp-1", "jp-2", "us-1"}
    wait_for(all_answered, 60, "every host to answer a probe once")
    fl.strategy("grid-jp", region="JP").strategy("trend-us", region="US")
    return fl.write()


def test_stopped_host_is_unreachable_with_connection_refused(ssh_fleet):
    fl = three_workers(ssh_fleet)
    fl.hosts["host-02"].stop()

    plan = fl.cli("plan")
    assert plan.seconds < CONNECT_S + CLI_SLACK_S, plan.describe()
    assert "jp-2" in plan.out and "connection refused" in plan.out, plan.describe()
    # The other hosts answered: both strategies are placed there, nothing on jp-2.
    assert "grid-jp" in plan.out and "→ jp-1" in plan.out and "→ us-1" in plan.out, plan.describe()
    assert "→ jp-2" not in plan.out

    planned = fl.cli("plan", "--output", "json").json()
    assert {(a["strategy"], a["worker"]) for a in planned["actions"]} == {("grid-jp", "jp-1"), ("trend-us", "us-1")}

    status = fl.cli("status", "--output", "json")
    assert status.seconds < CONNECT_S + CLI_SLACK_S
    workers = {w["id"]: w for w in status.json()["workers"]}
    assert workers["jp-2"]["status"] in ("unreachable", "offline")
    assert "connection refused" in workers["jp-2"]["error"]
    assert str(fl.hosts["host-02"].port) in workers["jp-2"]["error"]
    for wid in ("jp-1", "us-1"):
        assert workers[wid]["status"] == "idle" and workers[wid]["error"] is None, workers[wid]


@pytest.mark.slow
def test_frozen_host_new_connection_is_bounded_by_the_connect_timeout(ssh_fleet):
    fl = three_workers(ssh_fleet)
    fl.hosts["host-02"].freeze()

    plan = fl.cli("plan")
    assert plan.seconds < CONNECT_S + CLI_SLACK_S, plan.describe()
    assert "jp-2" in plan.out and "no SSH handshake" in plan.out, plan.describe()
    assert "→ jp-1" in plan.out and "→ us-1" in plan.out, plan.describe()

    status = fl.cli("status", "--output", "json")
    assert status.seconds < CONNECT_S + CLI_SLACK_S, status.describe()
    workers = {w["id"]: w for w in status.json()["workers"]}
    assert "no SSH handshake" in workers["jp-2"]["error"] and f"within {CONNECT_S:g}s" in workers["jp-2"]["error"]
    assert workers["jp-1"]["error"] is None and workers["us-1"]["error"] is None


@pytest.mark.slow
def test_frozen_host_kept_connection_is_bounded_by_the_probe_deadline(ssh_fleet):
    fl = three_workers(ssh_fleet)
    ctl = fl.controller()
    try:
        fleet = ctl.load_fleet()
        memory = ctl.read_memory(None)
        hosts = ctl.hosts(fleet)
        cold = gather(fleet, memory, hosts, ctl.clock)
        warm = gather(fleet, memory, hosts, ctl.clock)
        for g in (cold, warm):
            assert all(s.reachable for s in g.observed.workers.values()), g.observed.workers
        assert ctl.hosts(fleet) is hosts

        fl.hosts["host-02"].freeze()      # the kept connection's sshd process stops answering too
        frozen = bounded(lambda: gather(fleet, memory, hosts, ctl.clock), COMMAND_S + 10, fl.hosts["host-02"])
        assert frozen.seconds < COMMAND_S + 1.0, f"gather took {frozen.seconds:.2f}s"
        jp2 = frozen.observed.workers["jp-2"]
        assert not jp2.reachable
        assert "host-02" in jp2.error and "within 2s" in jp2.error, jp2.error
        assert frozen.observed.workers["jp-1"].reachable and frozen.observed.workers["us-1"].reachable

        # Still frozen: the next gather is bounded too (now by the connect timeout of a new connection).
        again = bounded(lambda: gather(fleet, memory, hosts, ctl.clock), COMMAND_S + 10, fl.hosts["host-02"])
        assert again.seconds < max(CONNECT_S, COMMAND_S) + 1.0
        assert not again.observed.workers["jp-2"].reachable

        # Thawed, it answers again on a fresh connection.
        fl.hosts["host-02"].thaw()
        deadline = time.monotonic() + 10
        while True:
            back = gather(fleet, memory, hosts, ctl.clock)
            if back.observed.workers["jp-2"].reachable or time.monotonic() > deadline:
                break
        assert back.observed.workers["jp-2"].reachable, back.observed.workers["jp-2"].error
        print(f"\n[timing] 3 hosts: cold gather {cold.seconds:.3f}s, warm {warm.seconds:.3f}s; "
              f"frozen kept connection {frozen.seconds:.3f}s, frozen again {again.seconds:.3f}s")
    finally:
        ctl.close()


class FreezeAfterChannelOpen(SshTransport):
    """The real SSH transport; once armed, it freezes its sshd host right after the next session
    channel opened, before the command is sent (an sshd that hangs between the two)."""

    host = None
    armed = False

    def _channel(self, deadline):
        channel = super()._channel(deadline)
        if self.armed:
            self.armed = False
            self.host.freeze()
        return channel


@pytest.mark.slow
def test_host_freezing_between_channel_open_and_command_is_bounded(ssh_fleet):
    fl = three_workers(ssh_fleet)
    ctl = fl.controller()
    fleet = ctl.load_fleet()
    memory = ctl.read_memory(None)
    made = {}

    def factory(key):
        made[key.host] = FreezeAfterChannelOpen.for_host(key.host, key.port, key.user, fleet.settings.ssh)
        made[key.host].host = fl.hosts[key.host]
        return made[key.host]
    hosts = Hosts(fleet, factory, serve=False)     # calls of their own: each opens a channel
    try:
        assert all(s.reachable for s in gather(fleet, memory, hosts, ctl.clock).observed.workers.values())
        made["host-02"].armed = True
        hung = bounded(lambda: gather(fleet, memory, hosts, ctl.clock), COMMAND_S + 10, fl.hosts["host-02"])
        assert fl.hosts["host-02"].frozen
        assert hung.seconds < COMMAND_S + 1.0, f"gather took {hung.seconds:.2f}s"
        jp2 = hung.observed.workers["jp-2"]
        assert not jp2.reachable and f"did not finish within {COMMAND_S:g}s" in jp2.error, jp2.error
        assert hung.observed.workers["jp-1"].reachable and hung.observed.workers["us-1"].reachable

        fl.hosts["host-02"].thaw()
        back = gather(fleet, memory, hosts, ctl.clock)
        assert back.observed.workers["jp-2"].reachable, back.observed.workers["jp-2"].error
    finally:
        hosts.close()
        ctl.close()


def test_kept_connection_to_a_restarted_sshd_is_remade_transparently(ssh_fleet):
    fl = three_workers(ssh_fleet)
    ctl = fl.controller()
    try:
        fleet = ctl.load_fleet()
        memory = ctl.read_memory(None)
        hosts = ctl.hosts(fleet)
        assert all(s.reachable for s in gather(fleet, memory, hosts, ctl.clock).observed.workers.values())
        host = fl.hosts["host-02"]
        host.stop()                       # kills the kept connection's session too
        down = gather(fleet, memory, hosts, ctl.clock)
        assert not down.observed.workers["jp-2"].reachable
        assert "connection refused" in down.observed.workers["jp-2"].error
        host.start()                      # same port, same host key
        back = gather(fleet, memory, hosts, ctl.clock)
        assert all(s.reachable for s in back.observed.workers.values()), back.observed.workers
    finally:
        ctl.close()


def test_a_command_that_ends_before_reading_its_input_is_answered_not_lost(ssh_fleet):
    """A cold host: python3 cannot open an agent not uploaded yet and exits before it reads the
    request, and sshd closes the channel while the request is still being sent. That is an answer
    (its exit code and stderr: the caller uploads the agent), not a lost connection."""
    fl = three_workers(ssh_fleet)
    fleet = fl.controller().load_fleet()
    transport = SshTransport.for_host("host-01", None, None, fleet.settings.ssh)
    try:
        # More than the channel's window: sending blocks until the channel is closed under it.
        done = transport.run(["sh", "-c", "echo gone >&2; exit 3"], stdin=b"x" * (8 << 20), timeout=30)
        assert done.returncode == 3 and done.stderr == b"gone\n", done
        assert transport.run(["echo", "again"], timeout=30).stdout == b"again\n"
    finally:
        transport.close()
