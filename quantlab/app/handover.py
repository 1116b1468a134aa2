"""An interactive `apply` while a reconcile daemon leads a PostgreSQL state: the plan is made and
confirmed here, then handed to the leader through the database, which carries it out in its next
act round — only if it is not stale: the leader applies the same fleet files, nothing was placed,
moved or stopped since the plan was made, and planning again from its own fresh round gives the
same actions. `apply` waits for the outcome with a deadline; a request it gave up on is withdrawn,
and one the leader finds past its sender's wait is never carried out.
"""
from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any, Callable

from quantlab.edges.execute import Outcome, Progress
from quantlab.edges.gather import Gathered
from quantlab.core.plan import Action, Plan
from quantlab.core.planner import PlanOptions
from quantlab.core.spec import Fleet
from quantlab.edges.store import StateError

from .applying import ApplyResult, PlanChanged
from .leader import LeadHeld

if TYPE_CHECKING:
    from .controller import Controller

POLL_S = 0.25


def _options_json(options: PlanOptions) -> dict[str, Any]:
    return {"rebalance": options.rebalance, "maxMoves": options.max_moves, "targets": sorted(options.targets),
            "allowMassStop": options.allow_mass_stop}


def _options(raw: dict[str, Any]) -> PlanOptions:
    return PlanOptions(rebalance=bool(raw.get("rebalance")), max_moves=int(raw.get("maxMoves", 1)),
                       targets=frozenset(raw.get("targets") or ()), allow_mass_stop=bool(raw.get("allowMassStop")))


def _keys(plan: Plan) -> Any:
    return json.loads(json.dumps(plan.decision_keys()))     # as they come back from the database


def wait_seconds(fleet: Fleet, plan: Plan) -> float:
    """How long `apply` waits for the leader: two act rounds to take it, then every action's time."""
    settings = fleet.settings
    per_action = settings.ssh.command_timeout_s + 35.0
    return 2 * settings.reconcile_interval_s + settings.probe_deadline_s + 10.0 + per_action * len(plan.actions)


def apply_or_hand_over(ctl: "Controller", options: PlanOptions, *, saved: Plan | None = None,
                       shown: Callable[[Fleet, Plan, Gathered], None] | None = None,
                       confirm: Callable[[Plan], bool] | None = None, progress: Progress | None = None,
                       lock_timeout: float = 0.0) -> ApplyResult:
    """A person's `apply`: carried out here, or — when a reconcile daemon leads a PostgreSQL state —
    made and confirmed here and handed to the leader to carry out."""
    fleet = ctl.load_fleet()
    try:
        return ctl.apply(options, fleet=fleet, saved=saved, shown=shown, confirm=confirm, progress=progress,
                         lock_timeout=lock_timeout)
    except LeadHeld as held:
        if saved is not None:
            raise StateError(f"{held}: a saved plan cannot be handed to it (the state changes every "
                             "round). Run `quantlab apply` without a plan file, or `quantlab leader "
                             "step-down` first") from None
        return apply_through_leader(ctl, options, fleet, str(held), shown, confirm, progress)


def apply_through_leader(ctl: "Controller", options: PlanOptions, fleet: Fleet, held: str,
                         shown: Callable[[Fleet, Plan, Gathered], None] | None,
                         confirm: Callable[[Plan], bool] | None, progress: Progress | None) -> ApplyResult:
    memory = ctl.read_memory(fleet)
    fleet = ctl.with_leaving(fleet, memory)
    gathered = ctl.observe(fleet, memory)
    plan = ctl.plan(fleet, memory, gathered, options)
    ctl.refuse_uncommitted(fleet, memory, plan)
    ctl.log(f"{held}: the plan is handed to it once confirmed")
    if shown is not None:
        shown(fleet, plan, gathered)
    if not plan.actions:
        return ApplyResult(fleet, plan, gathered)
    if confirm is not None and not confirm(plan):
        return ApplyResult(fleet, plan, gathered, cancelled=True)
    wait_s = wait_seconds(fleet, plan)
    requests = ctl.backend.plan_requests()
    body = {"plan": plan.to_json(), "options": _options_json(options), "basis": memory.placement_basis(),
            "fleetHash": fleet.fleet_hash, "keys": _keys(plan), "waitSeconds": wait_s}
    request = requests.submit(ctl.actor("apply"), body)
    deadline = time.monotonic() + wait_s
    while True:
        status, answer = requests.read(request)
        if status == "done" and answer is not None:
            break
        if status == "pending" and time.monotonic() >= deadline and requests.withdraw(request):
            raise PlanChanged(f"the leader did not take the plan within {wait_s:g} s (is it stuck?); it was "
                              "withdrawn and nothing was done")
        if status in ("expired", "withdrawn", "gone"):
            raise PlanChanged(f"the plan was {status} before the leader took it; nothing was done")
        if time.monotonic() >= deadline + wait_s:
            raise StateError(f"the leader took the plan but has not answered within {2 * wait_s:g} s; "
                             "see `quantlab events` for what it did")
        time.sleep(POLL_S)
    if answer.get("refused"):
        raise PlanChanged(f"the leader did not carry the plan out: {answer['refused']}. Run apply again to see "
                          "the plan now")
    carried = Plan.from_json(answer["plan"]) if answer.get("plan") else plan
    by_key = {(a.action, a.strategy): a for a in carried.actions}
    outcomes = []
    for raw in answer.get("outcomes") or []:
        action = by_key.get((raw.get("action"), raw.get("strategy"))) or \
            Action(str(raw.get("action")), str(raw.get("strategy")), "carried out by the leader", "new")
        outcome = Outcome(action, bool(raw.get("ok")), str(raw.get("detail") or ""))
        if progress is not None:
            progress("done", action, outcome)
        outcomes.append(outcome)
    return ApplyResult(fleet, carried, gathered, outcomes)


def serve_handed_plans(ctl: "Controller", fleet: Fleet, gathered: Gathered, lock_timeout: float) -> int:
    """The leader's side, at the start of an act round: carry out each plan handed over, if it is
    not stale, and answer with the outcomes (or why not). How many were carried out."""
    requests = ctl.backend.plan_requests()
    carried = 0
    while (taken := requests.take()) is not None:
        request, by, body = taken
        try:
            answer = _carry_out(ctl, fleet, gathered, by, body, lock_timeout)
        except StateError as exc:
            answer = {"refused": str(exc)}
        except (KeyError, TypeError, ValueError) as exc:
            answer = {"refused": f"the request cannot be read ({exc!r})"}
        requests.answer(request, answer)
        carried += "outcomes" in answer
        what = "refused: " + answer["refused"] if "refused" in answer else f"{len(answer['outcomes'])} action(s) done"
        ctl.log(f"plan handed over by {by}: {what}")
    return carried


def _carry_out(ctl: "Controller", fleet: Fleet, gathered: Gathered, by: str, body: dict[str, Any],
               lock_timeout: float) -> dict[str, Any]:
    if body["fleetHash"] != fleet.fleet_hash:
        return {"refused": f"the plan was made from other fleet files than the leader applies "
                           f"({fleet.revision or 'its working tree'}): commit and push for the loop to apply them"}
    ttl = fleet.settings.monitor.lease_ttl_s
    with ctl.ledger.hold(ttl, lock_timeout, f"quantlab apply (handed over by {by})"):
        memory = ctl.ledger.memory
        if memory.placement_basis() != body["basis"]:
            return {"refused": "another run placed, moved or stopped strategies since the plan was made"}
        leaving = ctl.with_leaving(fleet, memory)
        fresh = ctl.plan(leaving, memory, gathered, _options(body["options"]))
        if _keys(fresh) != body["keys"]:
            return {"refused": "what runs on the hosts changed since the plan was made, and the plan is now different"}
        outcomes = ctl.execute(leaving, fresh, f"apply (handed over by {by})", observed=gathered.observed)
    return {"plan": fresh.to_json(),
            "outcomes": [{"strategy": o.action.strategy, "action": o.action.action, "ok": o.ok, "detail": o.detail}
                         for o in outcomes]}
