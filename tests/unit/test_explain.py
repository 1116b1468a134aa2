"""`quantlab explain`'s core: every filter asked for every worker, the feasible ones ranked by the
fleet's policy, and a remedy for each refusal; plain data, no I/O."""
from __future__ import annotations

from quantlab.core.explain import outcome, verdicts
from quantlab.core.planner import plan
from tests.fleetkit import NOW, fleet, memory, observed, strategy, worker


def test_every_refusal_is_listed_with_its_remedy_and_the_feasible_workers_are_ranked():
    jp = strategy("grid-jp", region="JP")
    fl = fleet([jp, strategy("other")], [
        worker("w-busy", region="JP", cap=2), worker("w-free", region="JP", cap=2),
        worker("w-us", ("okx",), region="US"), worker("w-full", region="JP", cap=1),
        worker("w-cordoned", region="JP", cordoned=True)])
    mem = memory({"other": ("w-busy", 1), "x": ("w-full", 2)})
    found = {v.worker: v for v in verdicts(fl, observed(fl, down=["w-cordoned"]), mem, NOW, "grid-jp")}

    assert (found["w-free"].rank, found["w-busy"].rank) == (1, 2)          # load-based: least loaded first
    assert [(r.code, r.detail) for r in found["w-us"].rejections] == [("api", ""), ("region", "US")]
    assert [(r.code, r.detail) for r in found["w-full"].rejections] == [("full", "1/1")]
    # Every filter that refuses it, not only the first (a host that comes back is still cordoned).
    assert found["w-cordoned"].rank is None
    assert [r.code for r in found["w-cordoned"].rejections] == ["offline", "cordoned"]
    us = found["w-us"].to_json(jp)
    assert us["feasible"] is False and us["wouldFitIf"] == [
        "the worker's capabilities.supportedApis include bybit",
        "the worker's metadata.region is JP (or the strategy drops requirements.region)"]
    assert "a slot frees up (1/1)" in found["w-full"].to_json(jp)["wouldFitIf"][0]

    # The outcome is the plan's: here it waits, since a worker this state never heard from may run it.
    result = plan(fl, observed(fl, down=["w-cordoned"]), mem, NOW)
    assert outcome(result, mem, "grid-jp").startswith("waiting: w-cordoned has not answered")
    assert outcome(result, mem, "other").startswith("start on w-busy: not running on w-busy")
    answered = plan(fl, observed(fl), mem, NOW)
    assert outcome(answered, mem, "grid-jp").startswith("start on w-free: new")
