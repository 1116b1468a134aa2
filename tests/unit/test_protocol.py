"""The controller–agent protocol is closed on both ends: the agent refuses a request of the wrong
shape before it touches anything, and the controller refuses an answer whose result is not one the
command can give — an unknown stop answer leaves the placement (the copy may still run)."""
from __future__ import annotations

import json
from typing import Any

import pytest

from quantlab.host.agent.qlagent import protocol
from quantlab.host.agent.qlagent.protocol import answer_problem, request_problem
from quantlab.edges.hosts import Agent, AgentError, Fenced
from quantlab.edges.transport.base import Completed

# Requests as the controller sends them (the shapes of tests/integration/test_agent_hostile.py and
# of execute.py / gather.py / checkpoints.py), one per command.
START = {
    "worker": "w1", "workdir": "/srv/ql", "strategy": "s1", "epoch": 3, "specHash": "h",
    "file": "files/s1.mjs", "runnerFile": "agent/runner-x.mjs", "runner": ["node", "{runner}"], "params": {},
    "heartbeatMs": 1000, "scheduling": {"stopTimeoutSeconds": 5}, "region": None, "proxy": None,
    "account": None, "leaseTtlSeconds": 25, "paused": False, "notAfter": {"bootId": "b", "boottime": 1.5},
}
STOP = {"workdir": "/srv/ql", "strategy": "s1", "epoch": 3, "stopTimeoutSeconds": 5, "reason": "removed",
        "checkpoint": True, "keep": []}
GOOD = {
    "probe": {"workers": [{"id": "w1", "workdir": "/srv/ql", "program": "node"}], "renew": {}, "leaseTtlSeconds": 25},
    "start": START,
    "stop": STOP,
    "pause": {"workdir": "/srv/ql", "strategy": "s1", "epoch": 3},
    "resume": {"workdir": "/srv/ql", "strategy": "s1", "epoch": None},
    "logs": {"workdir": "/srv/ql", "strategy": "s1", "lines": 20, "follow": False},
    "checkpoints": {"workers": {"w1": {"workdir": "/srv/ql", "instances": {"s1": {"epoch": 3, "have": None}}}}},
}


@pytest.mark.parametrize("command", sorted(GOOD))
def test_the_requests_the_controller_sends_pass(command):
    assert request_problem(command, GOOD[command]) is None


def test_a_probe_without_workers_asks_for_the_host_alone():
    assert request_problem("probe", {}) is None


def without(request: dict[str, Any], name: str) -> dict[str, Any]:
    return {k: v for k, v in request.items() if k != name}


@pytest.mark.parametrize("command, request_, said", [
    ("stop", [], "the request is a list, not a JSON object"),
    ("stop", None, "the request is null"),
    ("stop", without(STOP, "workdir"), "has no 'workdir'"),
    ("stop", {**STOP, "strategy": 7}, "'strategy' is a number, not text"),
    ("stop", {**STOP, "epoch": "3"}, "'epoch' is text, not a whole number or null"),
    ("stop", {**STOP, "epoch": True}, "'epoch' is true or false"),
    ("pause", without(STOP, "strategy"), "has no 'strategy'"),
    ("start", without(START, "epoch"), "has no 'epoch'"),
    ("start", {**START, "epoch": 3.5}, "'epoch' is a number, not a whole number"),
    ("start", {**START, "runner": []}, "'runner' is not a list of text"),
    ("start", {**START, "runner": ["node", 1]}, "'runner' is not a list of text"),
    ("start", {**START, "scheduling": {}}, "no number 'stopTimeoutSeconds'"),
    ("start", {**START, "scheduling": "fast"}, "'scheduling' is text, not an object"),
    ("probe", {"workers": {"w1": {}}}, "'workers' is an object, not a list"),
    ("probe", {"workers": [{"id": "w1"}]}, "workers[0] is not an object with text 'id' and 'workdir'"),
    ("probe", {"workers": ["w1"]}, "workers[0]"),
    ("logs", {"workdir": "/srv/ql"}, "has no 'strategy'"),
    ("checkpoints", {"workers": {"w1": {"instances": {}}}}, "each with a text 'workdir'"),
    ("checkpoints", {"workers": ["w1"]}, "'workers' is not an object of workers"),
])
def test_a_request_of_the_wrong_shape_is_named(command, request_, said):
    problem = request_problem(command, request_)
    assert problem is not None and said in problem, problem


# Answers as the agent gives them (control.py, procs.busy, main.py's fence refusal).
RECORDED = [
    ("start", {"result": "started", "pid": 4242}),
    ("start", {"result": "already-running", "pid": 4242}),
    ("start", {"result": "missing", "missing": ["files/s1.mjs"]}),
    ("start", {"result": "refused", "reason": "the disk of /srv/ql is full (12 KB free): free space there"}),
    ("start", {"result": "busy", "reason": "its lock is held by pid 77"}),
    ("stop", {"result": "stopped", "checkpoint": None, "pruned": []}),
    ("stop", {"result": "not-running"}),
    ("stop", {"result": "epoch-mismatch", "running": 4}),
    ("stop", {"result": "busy", "reason": "its lock is held by pid 77"}),
    ("pause", {"result": "paused"}),
    ("resume", {"result": "running"}),
    ("resume", {"result": "not-running"}),
]


@pytest.mark.parametrize("command, answer", RECORDED)
def test_every_answer_the_agent_gives_is_understood(command, answer):
    assert answer_problem(command, answer) is None


@pytest.mark.parametrize("command, answer", [
    ("stop", {}), ("stop", {"result": "gone"}), ("stop", {"result": ["stopped"]}), ("stop", {"result": None}),
    ("start", {"result": "stopped"}), ("pause", {"result": "started"}), ("stop", {"result": "x" * 500}),
])
def test_an_answer_outside_the_closed_set_is_named(command, answer):
    problem = answer_problem(command, answer)
    assert problem is not None and "unknown result" in problem and len(problem) < 200, problem


def test_commands_without_a_result_are_not_judged_by_one():
    assert answer_problem("probe", {"host": {}, "workers": {}}) is None
    assert answer_problem("checkpoints", {"workers": {}}) is None


def test_the_result_sets_are_the_ones_the_controller_acts_on():
    # execute.py acts on these results by name; a new one must be added here and there together.
    assert set(protocol.RESULTS) == set(protocol.FENCED_COMMANDS) == {"start", "stop", "pause", "resume"}
    assert "fenced" in protocol.STOP_RESULTS and "stopped" in protocol.STOP_RESULTS


class Answering:
    """A transport whose agent answers `answer` with `code`."""

    name = "fake"

    def __init__(self, answer: Any, code: int = 0):
        self.out = json.dumps(answer).encode()
        self.code = code

    def run(self, argv: list[str], stdin: bytes = b"", timeout: float = 30.0) -> Completed:
        return Completed(self.code, self.out, b"")


def test_an_unknown_stop_answer_is_an_error_that_may_have_left_the_copy_running():
    agent = Agent(Answering({"result": "vanished"}), "/srv/ql", "python3", "host-01")   # type: ignore[arg-type]
    with pytest.raises(AgentError) as raised:
        agent.call("stop", STOP, 5)
    assert raised.value.maybe_ran and "unknown result 'vanished'" in str(raised.value), raised.value
    assert "another release" in str(raised.value)


def test_an_empty_answer_to_a_stop_is_not_a_stop():
    agent = Agent(Answering({}), "/srv/ql", "python3", "host-01")                        # type: ignore[arg-type]
    with pytest.raises(AgentError) as raised:
        agent.call("stop", STOP, 5)
    assert raised.value.maybe_ran


def test_a_fence_refusal_stays_a_fence_refusal():
    agent = Agent(Answering({"result": "fenced", "reason": "below term 4", "fence": 4}), "/srv/ql", "python3",
                  "host-01")                                                                   # type: ignore[arg-type]
    with pytest.raises(Fenced) as raised:
        agent.call("stop", STOP, 5)
    assert not raised.value.maybe_ran


def test_a_known_answer_comes_back_as_it_was_given():
    answer = {"result": "epoch-mismatch", "running": 4}
    agent = Agent(Answering(answer), "/srv/ql", "python3", "host-01")                    # type: ignore[arg-type]
    assert agent.call("stop", STOP, 5) == answer
