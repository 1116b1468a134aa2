"""Memory.foreign_to: which state belongs to another fleet (pure; see tests/integration/test_fleet_identity.py)."""
from __future__ import annotations

import pytest

from quantlab.core.memory import Memory, MemoryFormatError, Placement


def _memory(name=None, **placed: str) -> Memory:
    """A state with these placements, each worker remembered at host-<worker>:22, /work."""
    return Memory(lineage="l", serial=3, fleet_name=name,
                  placements={sid: Placement(sid, wid, 1, "h") for sid, wid in placed.items()},
                  addresses={wid: {"host": f"host-{wid}", "port": 22, "workdir": "/work"} for wid in placed.values()})


NOWHERE: set = set()


@pytest.mark.parametrize("memory, name, strategies, workers, says", [
    (_memory("beta", s1="w1"), "alpha", {"s1"}, {"w1"}, "named 'beta', not 'alpha'"),
    (_memory(None, s1="w1"), None, {"a1"}, {"wa"}, "name no strategy, no worker and no worker address"),
    (_memory("beta", s1="w1"), None, {"a1"}, {"wa"}, "name no strategy, no worker and no worker address"),
], ids=["names-differ", "unnamed-disjoint", "name-removed-disjoint"])
def test_another_fleets_state_is_recognised(memory, name, strategies, workers, says):
    assert says in (memory.foreign_to(name, strategies, workers, NOWHERE) or "")


@pytest.mark.parametrize("memory, name, strategies, workers", [
    (_memory("beta", s1="w1"), "beta", {"a1"}, {"wa"}),               # the same name decides
    (_memory(None, s1="w1", s2="w2"), None, {"s1"}, {"wx"}),          # one strategy in common
    (_memory(None, s1="w1"), None, {"s9"}, {"w1"}),                   # one worker in common
    (_memory(None), None, {"a1"}, {"wa"}),                            # a state with nothing placed
    (_memory(None, s1="w1"), "alpha", {"s1"}, {"w1"}),                # a state from before names adopts one
    (_memory(None, s1="w1"), None, set(), set()),                     # an empty fleet: the mass-stop guard's case
], ids=["same-name", "strategy-shared", "worker-shared", "nothing-placed", "adopts", "empty-fleet"])
def test_this_fleets_state_is_accepted(memory, name, strategies, workers):
    assert memory.foreign_to(name, strategies, workers, NOWHERE) is None


def test_renaming_every_strategy_and_worker_keeps_the_state_while_the_hosts_are_the_same():
    """The workers are where the state remembers its workers: the same fleet, renamed."""
    memory = _memory(None, s1="w1")
    assert memory.foreign_to(None, {"a1"}, {"wa"}, {("host-w1", 22, "/work")}) is None
    assert memory.foreign_to(None, {"a1"}, {"wa"}, {("host-w1", 22, "/elsewhere")}) is not None


def test_the_name_round_trips_and_is_left_out_when_unset():
    assert Memory.from_json(_memory("beta").to_json()).fleet_name == "beta"
    assert "fleet" not in _memory(None).to_json()
    with pytest.raises(MemoryFormatError):
        Memory.from_json({**_memory(None).to_json(), "fleet": 7})
