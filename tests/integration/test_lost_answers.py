"""Answers lost on the way back: the command ran on the host, the controller never heard. The real
controller, agent and processes, over a transport that drops the answer of chosen commands after
running them (what a timeout or a broken connection does), so that nothing can run twice."""
from __future__ import annotations

from harness import wait_for
from quantlab.app.controller import Controller, default_state_path
from quantlab.edges.hosts import Hosts
from quantlab.app.loop import ReconcileLoop
from quantlab.edges.transport.base import TransportError
from quantlab.edges.transport.local import LocalTransport


class LosesAnswers(LocalTransport):
    """Runs every command for real; for the agent commands named in `lose`, raises afterwards as if
    the answer had been lost (maybe_ran=True), or before running them (maybe_ran=False)."""

    def __init__(self) -> None:
        self.lose: dict[str, bool] = {}       # agent command -> maybe_ran

    def run(self, argv, stdin=b"", timeout=30.0):
        command = argv[4] if len(argv) > 4 else ""
        if command in self.lose and not self.lose[command]:
            raise TransportError(self.name, "refused before running (test)")
        done = super().run(argv, stdin, timeout)
        if command in self.lose:
            raise TransportError(self.name, f"{command}: answer lost (test)", maybe_ran=True)
        return done


def controller(fleet_dir, transport: LosesAnswers) -> Controller:
    ctl = Controller(fleet_dir.root, default_state_path(fleet_dir.root))
    # Calls of their own: this transport loses the answers of `run`, which kept agents do not use.
    ctl._hosts = Hosts(ctl.load_fleet(), transport_factory=lambda key: transport, serve=False)
    return ctl


def tick(ctl: Controller):
    """One pass of the real reconcile loop, in-process: its outcomes and the memory after it."""
    outcomes = ReconcileLoop(ctl, log=lambda line: None).tick().outcomes
    return outcomes, ctl.store.load()


def test_a_start_whose_answer_was_lost_is_never_started_twice(fleet):
    # A first strategy ships the agent, the runner and the strategy file to both workers.
    fleet.worker("w1", max_strategies=1).worker("w2", max_strategies=2).strategy("first").strategy("second").write()
    transport = LosesAnswers()
    ctl = controller(fleet, transport)
    assert all(o.ok for o in tick(ctl)[0])

    fleet.strategy("solo").write()                 # w2 has the room left
    transport.lose = {"start": True}
    outcomes, memory = tick(ctl)
    [outcome] = outcomes
    assert not outcome.ok and "answer lost" in outcome.detail
    placed = memory.placements["solo"]             # the intent stands: a copy may run there
    assert placed.worker == outcome.action.worker
    wait_for(lambda: fleet.runner_counts()["solo"] == 1, 10, what="the runner the lost start began")

    transport.lose = {}
    outcomes, memory = tick(ctl)
    assert outcomes == []                          # found running where it was recorded
    assert memory.placements["solo"] == placed
    assert fleet.runner_counts() == {"first": 1, "second": 1, "solo": 1}


def test_a_start_refused_before_it_ran_leaves_no_placement(fleet):
    fleet.worker("w1").strategy("solo").write()
    transport = LosesAnswers()
    ctl = controller(fleet, transport)
    transport.lose = {"start": False}
    outcomes, memory = tick(ctl)
    assert not outcomes[0].ok and "solo" not in memory.placements
    assert fleet.runner_counts() == {}
    transport.lose = {}
    outcomes, _ = tick(ctl)
    assert [(o.action.action, o.ok) for o in outcomes] == [("start", True)]


def test_a_probe_whose_answer_was_lost_is_bounded_by_what_was_recorded_before_it_was_sent(fleet):
    fleet.worker("w1").strategy("solo").write()
    transport = LosesAnswers()
    ctl = controller(fleet, transport)
    tick(ctl)
    before = ctl.store.load().leases["w1"]

    transport.lose = {"probe": True}
    loaded = ctl.load_fleet()
    with ctl.ledger.hold(loaded.settings.monitor.lease_ttl_s):
        gathered = ctl.renew(loaded)
        memory = ctl.ledger.memory
    assert not gathered.observed.workers["w1"].reachable
    # The host did renew (the agent ran): the bound recorded before the request went out must
    # cover the lease it granted, or the controller could fail over while this copy still holds it.
    lease = fleet.read_json("solo", "lease.json")
    assert memory.leases["w1"] >= before                        # bounds only grow
    assert memory.leases["w1"] >= lease["deadline"] * 1000      # both: this machine's boot-time clock


def test_a_renewal_that_arrives_after_its_not_after_grants_nothing(fleet):
    """A request delayed past its not-after (a frozen sshd that resumed, a slow link) was already
    counted as lapsed by the controller: the agent refuses it and the lease stays as it was."""
    fleet.worker("w1").strategy("solo").write()
    transport = LosesAnswers()
    ctl = controller(fleet, transport)
    tick(ctl)
    lease = fleet.read_json("solo", "lease.json")
    placed = ctl.store.load().placements["solo"]
    agent = ctl.hosts(ctl.load_fleet()).agent_for(ctl.load_fleet().workers["w1"], "probe")
    host = agent.call("probe", {"workers": []}, 10)["host"]
    late = {"bootId": host["bootId"], "boottime": host["boottime"] - 0.5}
    other_boot = {"bootId": "another-boot", "boottime": host["boottime"] + 60}
    for not_after in (late, other_boot):
        answer = agent.call("probe", {"workers": [{"id": "w1", "workdir": str(fleet.workdir("w1"))}],
                                      "renew": {"w1": {"solo": placed.epoch}}, "leaseTtlSeconds": 300,
                                      "notAfter": not_after}, 10)
        assert answer["workers"]["w1"]["renewed"] == []
        assert answer["host"]["renewRefused"], answer["host"]
        assert fleet.read_json("solo", "lease.json") == lease
