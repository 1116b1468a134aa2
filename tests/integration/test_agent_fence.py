"""Controller fencing on the host: every command that changes something carries the sender's term;
a workdir remembers the highest term per state lineage and refuses a lower one, with the agent run
as the controller runs it (a process per call, JSON on stdin) and real runners."""
from __future__ import annotations

import json
import os

from tests.integration.test_agent_hostile import CALM, AgentHost, agent_host, not_after  # noqa: F401 - the fixture

LINEAGE = "3f1c-lineage"


def fenced(request: dict, term: int | None, lineage: str = LINEAGE) -> dict:
    return {**request, "fence": {"lineage": lineage, "term": term}}


def probe(host: AgentHost, workdir, term: int | None, renew: dict | None = None) -> dict:
    answer, _ = host.call("probe", fenced({"workers": [{"id": workdir.name, "workdir": str(workdir), "program": "node"}],
                                           "renew": renew or {}, "leaseTtlSeconds": 30.0,
                                           "notAfter": not_after(), "eventsSince": {}}, term))
    return answer["workers"][workdir.name]


def test_a_lower_term_is_refused_for_every_command_and_renewal(agent_host):
    w = agent_host.workdir("w1")
    answer, _ = agent_host.call("start", fenced(agent_host.start_request(w, "alpha", CALM), 4))
    assert answer["result"] == "started", answer
    assert json.loads((w / "agent" / "fence.json").read_text()) == {LINEAGE: 4}

    # A newer leader's probe raises the term; the deposed one's renewals and commands are refused.
    assert probe(agent_host, w, 5)["fence"] == 5
    old = probe(agent_host, w, 4, renew={"w1": {"alpha": 1}})
    assert old["renewed"] == [] and "below term 5" in old["refused"]["alpha"] and "below term 5" in old["fenced"]
    for command, request in (("stop", {"workdir": str(w), "strategy": "alpha", "stopTimeoutSeconds": 1,
                                       "reason": "deposed"}),
                             ("pause", {"workdir": str(w), "strategy": "alpha", "epoch": 1}),
                             ("start", agent_host.start_request(w, "beta", CALM))):
        answer, _ = agent_host.call(command, fenced(request, 4))
        assert answer["result"] == "fenced" and answer["fence"] == 5, (command, answer)
    assert not (w / "instances" / "beta").exists(), "a fenced start must not even make its folder"
    assert agent_host.status(w, "alpha").get("state") in ("starting", "running"), "the fenced stop stopped nothing"

    # The current term renews; a read-only probe (term null) neither raises nor is refused.
    current = probe(agent_host, w, 5, renew={"w1": {"alpha": 1}})
    assert current["renewed"] == ["alpha"] and "fenced" not in current
    assert probe(agent_host, w, None)["fence"] == 5
    assert json.loads((w / "agent" / "fence.json").read_text()) == {LINEAGE: 5}
    answer, _ = agent_host.call("stop", fenced({"workdir": str(w), "strategy": "alpha", "stopTimeoutSeconds": 1,
                                                "reason": "done"}, 5))
    assert answer["result"] == "stopped", answer


def test_terms_are_per_lineage_and_a_request_without_a_fence_is_not_checked(agent_host):
    w = agent_host.workdir("w1")
    assert probe(agent_host, w, 9)["fence"] == 9
    lower = probe(agent_host, w, 1)
    assert lower["fence"] == 9 and "below term 9" in lower["fenced"], "a lower term is told, and raises nothing"
    answer, _ = agent_host.call("start", fenced(agent_host.start_request(w, "alpha", CALM), 1, lineage="another"))
    assert answer["result"] == "started", "another state's terms are its own"
    # A controller of the previous release sends no fence: nothing to check (an upgrade in place).
    answer, _ = agent_host.call("stop", {"workdir": str(w), "strategy": "alpha", "stopTimeoutSeconds": 1,
                                         "reason": "old controller"})
    assert answer["result"] == "stopped", answer
    assert json.loads((w / "agent" / "fence.json").read_text()) == {LINEAGE: 9, "another": 1}


def test_a_hostile_fence_file_never_hangs_or_crashes_the_agent(agent_host):
    w = agent_host.workdir("w1")
    path = w / "agent" / "fence.json"
    os.mkfifo(path)
    assert probe(agent_host, w, 3)["fence"] == 3, "a FIFO is replaced, never opened"
    path.unlink()
    path.write_text('{"3f1c-lineage": "many", "x": [1]}')
    assert probe(agent_host, w, 2)["fence"] == 2
    path.unlink()
    path.symlink_to("/dev/zero")
    assert probe(agent_host, w, 7)["fence"] == 7
    assert not path.is_symlink()
