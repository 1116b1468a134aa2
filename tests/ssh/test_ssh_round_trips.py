"""What a tick costs on the wire: the agent is uploaded once (not on every gather), strategy files
and the runner only when a host lacks them, and a probe is one command per host however many
workers and instances live there, on a connection kept across gathers, to an agent kept running.

The counting happens in `CountingSsh`, a subclass of the real paramiko transport handed to
quantlab.edges.hosts.Hosts through its transport_factory: every call still goes to the real sshd.
A command is a call of its own or a request to a kept agent; `opens` counts the kept agents started."""
from __future__ import annotations

import json
import threading
from collections import Counter
from pathlib import Path

import pytest

from quantlab.edges.gather import Prober, gather, renewals
from quantlab.edges.hosts import AGENT_PATH, RUNNER_PATH, HostKey, Hosts
from quantlab.core.planner import PlanOptions
from quantlab.edges.transport.ssh import SshTransport

pytestmark = pytest.mark.ssh


class CountingSsh(SshTransport):
    """The real SSH transport, counting commands, uploads and connections."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.runs: list[list[str]] = []
        self.opens = 0
        self.puts: list[str] = []
        self.connects = 0
        self._count_lock = threading.Lock()

    def run(self, argv, stdin=b"", timeout=30.0):
        with self._count_lock:
            self.runs.append(list(argv))
        return super().run(argv, stdin, timeout)

    def open(self, argv, deadline):
        with self._count_lock:
            self.opens += 1
        pipe = super().open(argv, deadline)
        send = pipe.send

        def counted(data, until):
            header = json.loads(data[:data.index(b"\n")])
            with self._count_lock:
                self.runs.append(argv[:-1] + [header["command"]])
            return send(data, until)
        pipe.send = counted
        return pipe

    def put_file(self, data, path, mode=0o644):
        with self._count_lock:
            self.puts.append(path)
        return super().put_file(data, path, mode)

    def _connect(self):
        with self._count_lock:
            self.connects += 1
        return super()._connect()


class Counting:
    """A transport_factory for Hosts that keeps the transports it made, by host alias (one per lane:
    probes and actions each have their own connection)."""

    def __init__(self, fleet):
        self.settings = fleet.settings.ssh
        self.made: dict[str, list[CountingSsh]] = {}

    def __call__(self, key: HostKey) -> CountingSsh:
        transport = CountingSsh.for_host(key.host, key.port, key.user, self.settings)
        self.made.setdefault(key.host, []).append(transport)
        return transport

    def runs(self) -> dict[str, int]:
        return {host: sum(len(t.runs) for t in ts) for host, ts in sorted(self.made.items())}

    def puts(self) -> dict[str, list[str]]:
        return {host: [p for t in ts for p in t.puts] for host, ts in sorted(self.made.items())}

    def opens(self) -> dict[str, int]:
        return {host: sum(t.opens for t in ts) for host, ts in sorted(self.made.items())}

    def connects(self) -> dict[str, int]:
        return {host: sum(t.connects for t in ts) for host, ts in sorted(self.made.items())}


class NoBook:
    """Where a round books its renewals; this test counts commands only, so nothing is kept."""

    def request_leases(self, bounds):
        return 0

    def settle_lease(self, booking, worker, until):
        pass


def identity(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return st.st_ino, st.st_mtime_ns, st.st_size


@pytest.mark.slow
def test_agent_is_uploaded_once_not_on_every_gather(ssh_fleet):
    fl = ssh_fleet(3)
    fl.worker("jp-1", "host-01", region="JP").worker("jp-2", "host-02", region="JP")
    fl.worker("us-1", "host-03", region="US")
    fl.strategy("grid-a", region="JP").strategy("grid-b", region="JP")
    fl.write()
    ctl = fl.controller()
    fleet = ctl.load_fleet()
    memory = ctl.store.load()
    counting = Counting(fleet)
    hosts = Hosts(fleet, counting)
    agents = {w: fl.workdir(w) / AGENT_PATH for w in ("jp-1", "jp-2", "us-1")}
    all_hosts = ["host-01", "host-02", "host-03"]
    try:
        # Cold: each host says the agent is missing (its kept agent does not start), gets it once,
        # starts it, and answers the probe.
        cold = gather(fleet, memory, hosts, ctl.clock)
        assert all(s.reachable for s in cold.observed.workers.values()), cold.observed.workers
        assert counting.runs() == {h: 1 for h in all_hosts}
        assert counting.opens() == {h: 2 for h in all_hosts}
        assert counting.puts() == {"host-01": [str(agents["jp-1"])], "host-02": [str(agents["jp-2"])],
                                   "host-03": [str(agents["us-1"])]}
        shipped = {w: identity(p) for w, p in agents.items()}

        # Warm, several times: one command per host each, no upload, the same connection and agent.
        warm_times = []
        for i in range(1, 5):
            warm = gather(fleet, memory, hosts, ctl.clock)
            warm_times.append(warm.seconds)
            assert all(s.reachable for s in warm.observed.workers.values())
            assert counting.runs() == {h: 1 + i for h in all_hosts}
        assert counting.opens() == {h: 2 for h in all_hosts}
        assert counting.puts() == {h: [p] for h, p in zip(all_hosts, map(str, agents.values()))}
        assert counting.connects() == {h: 1 for h in all_hosts}
        assert {w: identity(p) for w, p in agents.items()} == shipped
        print(f"\n[timing] 3 hosts: cold gather (connect + agent upload) {cold.seconds:.3f}s, "
              f"warm {min(warm_times):.3f}-{max(warm_times):.3f}s")

        # A new controller (a new `quantlab` process) finds the agent there: one command, no upload.
        fresh = Counting(fleet)
        fresh_hosts = Hosts(fleet, fresh)
        try:
            assert all(s.reachable for s in gather(fleet, memory, fresh_hosts, ctl.clock).observed.workers.values())
            assert fresh.runs() == {h: 1 for h in all_hosts} and fresh.puts() == {h: [] for h in all_hosts}
            assert fresh.opens() == {h: 1 for h in all_hosts}
        finally:
            fresh_hosts.close()

        # Apply through the controller with the counting transports: the runner and the strategy
        # file go to the two JP workers once; the renewals after it upload nothing.
        ctl._hosts = hosts
        before = {h: len(p) for h, p in counting.puts().items()}
        ttl = fleet.settings.monitor.lease_ttl_s
        with ctl.ledger.hold(ttl):
            gathered = ctl.renew(fleet)
            plan = ctl.plan(fleet, ctl.ledger.memory, gathered, PlanOptions())
            outcomes = ctl.execute(fleet, plan, "test")
        assert outcomes and all(o.ok for o in outcomes), [(o.action.strategy, o.detail) for o in outcomes]
        placed = {o.action.strategy: o.action.worker for o in outcomes}
        assert set(placed.values()) == {"jp-1", "jp-2"}
        spec = fleet.strategies["grid-a"]
        file_name = f"files/{spec.file_sha256}{spec.file_ext}"
        new_puts = {h: p[before[h]:] for h, p in counting.puts().items()}
        for wid, host in (("jp-1", "host-01"), ("jp-2", "host-02")):
            assert sorted(new_puts[host]) == sorted([f"{fl.workdir(wid)}/{RUNNER_PATH}",
                                                     f"{fl.workdir(wid)}/{file_name}"]), new_puts
        assert new_puts["host-03"] == []
        fl.wait_runners(placed)
        after_apply = counting.puts()
        with ctl.ledger.hold(ttl):
            for _ in range(3):
                gathered = ctl.renew(fleet)
                assert all(s.reachable for s in gathered.observed.workers.values())
        assert counting.puts() == after_apply
        # One connection per lane: probes on one, the starts on the other (JP hosts only).
        assert counting.connects() == {"host-01": 2, "host-02": 2, "host-03": 1}
        assert {w: identity(p) for w, p in agents.items()} == shipped
        for wid in agents:
            assert [p.name for p in (fl.workdir(wid) / "agent").glob("agent-*.pyz")] == [agents[wid].name]
    finally:
        ctl.close()
        hosts.close()

    # And over the CLI: `status` runs leave the shipped agents as they are.
    for _ in range(2):
        fl.cli("status", "--output", "json")
    assert {w: identity(p) for w, p in agents.items()} == shipped


@pytest.mark.slow
def test_one_command_per_host_per_probe(ssh_fleet):
    fl = ssh_fleet(2)
    for wid in ("a-1", "a-2", "a-3"):
        fl.worker(wid, "host-01", max_strategies=2)
    fl.worker("b-1", "host-02", max_strategies=2)
    for i in range(6):
        fl.strategy(f"s-{i}")
    fl.write()
    placed = fl.apply()
    per_worker = Counter(placed.values())
    assert set(per_worker) == {"a-1", "a-2", "a-3", "b-1"} and max(per_worker.values()) <= 2, per_worker
    fl.wait_runners(placed)

    ctl = fl.controller()
    fleet = ctl.load_fleet()
    memory = ctl.read_memory(fleet)
    counting = Counting(fleet)
    hosts = Hosts(fleet, counting)
    prober = Prober(hosts, ctl.clock)
    try:
        for tick in range(1, 4):
            started = counting.runs()
            # Leases renewed on the way, as the reconcile loop does. A host first heard from in this
            # process gets a plain probe (connection, clock), then its renewals; after that, one
            # command per host per round.
            gathered = prober.round(fleet, memory, renew=renewals(memory), leases=NoBook())
            ran = {h: n - started.get(h, 0) for h, n in counting.runs().items()}
            assert ran == ({"host-01": 2, "host-02": 2} if tick == 1 else {"host-01": 1, "host-02": 1}), \
                f"tick {tick}: {ran}"
            seen = {sid: wid for wid, s in gathered.observed.workers.items() for sid in s.instances}
            assert seen == placed
            assert all(i.status == "running" for s in gathered.observed.workers.values() for i in s.instances.values())
            assert sorted(w for ws in gathered.renewed.values() for w in ws) == sorted(placed)
        probe = counting.made["host-01"][0].runs[-1]
        assert probe[:5] == ["python3", "-I", "-S", f"{fl.workdir('a-1')}/{AGENT_PATH}", "probe"], probe
        assert counting.connects() == {"host-01": 1, "host-02": 1}
        assert all(t.puts == [] for ts in counting.made.values() for t in ts)
    finally:
        hosts.close()
        ctl.close()
