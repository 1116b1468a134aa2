"""The file backend carries a controller term too: every command to the hosts carries it, and a
state whose hosts have seen a higher term of it (a copy restored from a backup) is refused there
until it goes on in a term above."""
from __future__ import annotations

import json


def test_the_file_state_carries_its_term_and_goes_on_above_a_term_the_hosts_saw(fleet):
    fleet.worker("w1").strategy("alpha").write()
    fleet.apply()
    fleet.beating("alpha")
    lineage = fleet.state()["lineage"]
    fence = fleet.workdir("w1") / "agent" / "fence.json"
    assert json.loads(fence.read_text()) == {lineage: 0}, "the first renewal round carries the file's term 0"

    # Another controller of this lineage (this file pushed elsewhere, say) reached the host in term 5.
    fence.write_text(json.dumps({lineage: 5}))
    first = fleet.ql("reconcile", "--once", check=None)
    assert "controller term is now 6: a host had seen term 5" in first.output, first.describe()
    assert fleet.state()["controllerTerm"] == 6
    refused = [e for e in fleet.events() if e.get("kind") == "renew-refused"]
    assert refused and "below term 5" in refused[-1]["message"], refused

    fleet.ql("reconcile", "--once")
    assert json.loads(fence.read_text()) == {lineage: 6}
    assert fleet.strategy_status("alpha")["status"] == "running"
    assert fleet.runner_counts() == {"alpha": 1}
