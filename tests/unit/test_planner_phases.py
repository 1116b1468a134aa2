"""Each phase of the planner on plain data: locate, classify, place, the guards."""
from __future__ import annotations

from quantlab.core.plan import Action
from quantlab.core.planner.classify import classify
from quantlab.core.planner.context import Context, Epochs, PlanOptions
from quantlab.core.planner.guards import hold_mass_stop, hold_source_change, hold_suspended
from quantlab.core.planner.locate import locate
from quantlab.core.planner.place import place
from tests.fleetkit import NOW, fleet, memory, observed, running, strategy, worker

A, B, C = strategy("a"), strategy("b"), strategy("c", desired="paused")
FLEET = fleet([A, B, C], [worker("w-1"), worker("w-2")])


def context(mem, obs, **options) -> Context:
    return Context(FLEET, obs, mem, NOW, PlanOptions(**options))


def test_locate_finds_current_placements_adopts_unknown_copies_and_marks_stale_ones():
    mem = memory({"a": ("w-1", 3)}, specs={"a": A})
    obs = observed(FLEET, {"w-1": [running(A, 3)], "w-2": [running(A, 2), running(B, 7)]})
    located = locate(context(mem, obs))
    assert (located.current["a"].worker, located.current["a"].epoch) == ("w-1", 3)
    assert located.current["b"].adopted and [(x.strategy, x.worker) for x in located.adopt] == [("b", "w-2")]
    assert [(wid, inst.strategy, inst.epoch) for wid, inst in located.stale] == [("w-2", "a", 2)]


def test_classify_gives_one_verdict_per_strategy():
    mem = memory({"a": ("w-1", 3), "c": ("w-2", 4), "gone": ("w-2", 5)}, specs={"a": A, "c": C})
    obs = observed(FLEET, {"w-1": [running(A, 3, spec_hash="sha256:older")],
                           "w-2": [running(C, 4), running(strategy("gone"), 5)]})
    ctx = context(mem, obs)
    epochs = Epochs(mem, obs)
    verdicts = {v.strategy: v for v in classify(ctx, locate(ctx), epochs)}
    assert (verdicts["a"].kind, verdicts["a"].action.action, verdicts["a"].stays) == ("act", "restart", True)
    assert (verdicts["b"].kind, verdicts["b"].place.cause) == ("place", "new")
    assert (verdicts["c"].kind, verdicts["c"].action.action) == ("act", "pause")
    assert (verdicts["gone"].kind, verdicts["gone"].action.cause) == ("stop", "removed")
    assert epochs.next == 6, "classify took no epoch: a restart keeps its copy's"


def test_place_puts_each_new_strategy_on_the_least_loaded_worker_and_takes_epochs_in_order():
    # w-1 already holds one (x): a goes to w-2; then both hold one, and ties go by id.
    mem = memory()
    obs = observed(FLEET)
    ctx = context(mem, obs)
    located = locate(ctx)
    epochs = Epochs(mem, obs)
    items = [v.place for v in classify(ctx, located, epochs) if v.place is not None]
    placed = place(ctx, located, items, {"w-1": ["x"]}, epochs, [])
    assert [(a.strategy, a.worker, a.epoch) for a in placed.actions] == [("a", "w-2", 1), ("b", "w-1", 2), ("c", "w-2", 3)]


def test_guards_hold_in_order_source_change_then_suspensions_then_mass_stop():
    mem = memory({"a": ("w-1", 1), "b": ("w-1", 2), "c": ("w-2", 3)}, specs={"a": A, "b": B, "c": C})
    mem.suspended = {"c": {"by": "ops"}}
    obs = observed(FLEET, {"w-1": [running(A, 1), running(B, 2)], "w-2": [running(C, 3)]})
    ctx = context(mem, obs, source_change="the loop now applies commits")
    stops = [Action("stop", s, "removed from fleet", "removed", worker=w, epoch=e) for s, w, e in
             (("a", "w-1", 1), ("b", "w-1", 2), ("c", "w-2", 3))]
    left, held = hold_source_change(ctx, stops)
    assert left == [] and [a.strategy for a in held[0].actions] == ["a", "b", "c"]
    ctx = context(mem, obs)
    left, held = hold_suspended(ctx, stops)
    assert [a.strategy for a in left] == ["a", "b"] and held[0].guard == "suspended"
    left, refused = hold_mass_stop(ctx, locate(ctx), left)
    assert left == [] and refused[0].guard == "mass-stop", "two of three running would stop"
