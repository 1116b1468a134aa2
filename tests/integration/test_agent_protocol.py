"""The protocol enforced on both ends, with the real agent: a request of the wrong shape is refused
(EXIT_BAD_REQUEST, one line, nothing touched); an agent that answers a stop with a result the
controller does not know (another release's, say) leaves the placement and the copy alone, and
blocks the strategy's start elsewhere, until an agent that speaks the protocol stops it."""
from __future__ import annotations

import json
import shutil

import pytest

from harness import FleetDir
from test_agent_hostile import AgentHost, agent_host  # noqa: F401 - fixture by name
from tests.support import alive

from quantlab.host.agent.qlagent.protocol import EXIT_BAD_REQUEST
from quantlab.edges.hosts import AGENT_PATH


@pytest.fixture
def fleet(node, reaper, tmp_path):
    fl = FleetDir(tmp_path / "fleet", interval=2.0)   # probes through the shim below start Python twice
    yield fl
    fl.stop_daemons()


@pytest.mark.parametrize("command, request_", [
    ("stop", {"strategy": "s1"}),
    ("stop", {"workdir": 5, "strategy": "s1"}),
    ("pause", {"workdir": "WORKDIR", "strategy": ["s1"]}),
    ("start", {"workdir": "WORKDIR", "strategy": "s1"}),
    ("probe", {"workers": [{"workdir": "WORKDIR"}]}),
    ("logs", {"workdir": "WORKDIR"}),
    ("checkpoints", {"workers": {"w1": "WORKDIR"}}),
    ("stop", ["WORKDIR", "s1"]),
])
def test_a_malformed_request_is_refused_in_one_line_and_touches_nothing(agent_host, command, request_):
    workdir = agent_host.workdir("wa")
    before = sorted(p.relative_to(workdir) for p in workdir.rglob("*"))
    request_ = json.loads(json.dumps(request_).replace("WORKDIR", str(workdir)))
    done = agent_host.run(command, request_)
    said = done.stderr.decode()
    assert done.returncode == EXIT_BAD_REQUEST and done.stdout == b"", (done.returncode, said)
    assert said.startswith(f"bad {command} request: ") and said.count("\n") == 1, said
    assert "Traceback" not in said
    assert sorted(p.relative_to(workdir) for p in workdir.rglob("*")) == before


# An agent of another release, as far as stops go: it answers them with a result this controller
# never heard of, and hands every other command to the real agent. Like a release before kept agents,
# it does not know `serve`: the controller falls back to calls of their own.
SKEWED = """
import os, sys
if sys.argv[1] == "serve":
    sys.stderr.write("unknown command 'serve'\\n")
    sys.exit(4)
if sys.argv[1] == "stop":
    sys.stdin.read()
    sys.stdout.write('{"result": "retired", "note": "from a later release"}')
    sys.exit(0)
os.execv(sys.executable, [sys.executable, "-I", "-S", REAL] + sys.argv[1:])
"""


def test_an_unknown_stop_answer_keeps_the_placement_and_the_copy(fleet):
    fleet.running("w1", ("s1", "s2"))
    pid = fleet.runner_pid("s1")
    agent = fleet.workdir("w1") / AGENT_PATH
    real = agent.with_name("real.pyz")
    shutil.copy(agent, real)
    agent.write_text(f"REAL = {str(real)!r}\n" + SKEWED)

    del fleet.strategies["s1"]
    fleet.write()
    done = fleet.apply(check=None)
    assert done.returncode == 1, done.describe()
    assert "unknown result 'retired'" in done.output and "another release" in done.output, done.describe()
    assert "Traceback" not in done.output
    assert fleet.placement("s1") is not None and fleet.placement("s1")["worker"] == "w1"
    assert alive(pid) and fleet.runner_pid("s1") == pid
    failed = [e for e in fleet.events() if e.get("event") == "stop" and e.get("strategy") == "s1"]
    assert failed and failed[-1]["outcome"] == "failed", failed

    shutil.copy(real, agent)                  # the agent that speaks this protocol stops it
    fleet.apply()
    assert fleet.placement("s1") is None and not alive(pid)
    assert fleet.runner_pid("s2") is not None
