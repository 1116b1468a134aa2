"""One apply, for `apply` and the loop's act rounds: plan (or take a saved plan), confirm, carry
it out, and the checks that refuse a plan made from another fleet's state or from what a running
loop does not apply.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Callable

from quantlab.edges.execute import Executor, Outcome, Progress, Recorder, outcome_notices
from quantlab.edges.gather import Gathered
from quantlab.core.observed import ObservedState
from quantlab.core.memory import Memory, address_key
from quantlab.core.plan import Plan
from quantlab.core.planner import PlanOptions, plan as make_plan
from quantlab.core.spec import Fleet, FleetSettings
from quantlab.edges.store import StateError

from quantlab.core.memory import remembered_worker
from .leader import LeadHeld


class StalePlan(StateError):
    pass


class PlanChanged(StateError):
    """What a plan was made from changed while apply waited for a person; nothing was done."""


@dataclass
class ApplyResult:
    fleet: Fleet
    plan: Plan
    gathered: Gathered
    outcomes: list[Outcome] = field(default_factory=list)
    cancelled: bool = False


class Applying:
    """Planning and applying (a mixin of Controller: see controller.py)."""

    def lease_warning(self, fleet: Fleet, memory: Memory) -> str | None:
        """After an apply: that strategies stop when their leases run out, unless a loop renews them."""
        monitor = fleet.settings.monitor
        if not monitor.fencing or not memory.placements or self.loop_renews(fleet.settings, memory):
            return None
        return (f"strategies stop in {monitor.lease_ttl_s:g} s unless `quantlab reconcile` runs: no reconcile "
                "loop has renewed their leases recently (see Fencing in the README).")

    def loop_renews(self, settings: FleetSettings, memory: Memory) -> bool:
        """Whether a reconcile loop renewed this state's leases recently (so it runs)."""
        recent_ms = 1000 * max(3 * settings.reconcile_interval_s, settings.monitor.lease_ttl_s / 2)
        return memory.loop_renewal is not None and self.clock.mono() - memory.loop_renewal <= recent_ms

    def loop_applies(self, fleet: Fleet, memory: Memory) -> dict[str, Any] | None:
        """What a running reconcile loop that applies commits applies (its source, ref and revision),
        or None when no such loop renews this state."""
        if memory.loop_source.get("kind") not in ("commits", "upstream") or not self.loop_renews(fleet.settings, memory):
            return None
        return dict(memory.loop_source)

    def loop_conflict(self, fleet: Fleet, memory: Memory, plan: Plan) -> str | None:
        """Why `apply` of this plan would be refused, or None: the working tree is not what a running
        loop applies (uncommitted changes, another branch, commits not pushed or not pulled), so the
        loop would undo it within a round. Actions only on what is suspended (which the loop leaves
        alone) may go: `quantlab suspend --target S`, then `quantlab apply --target S`."""
        loop = self.loop_applies(fleet, memory)
        if loop is None:
            return None
        applied, ref = loop.get("revision"), loop.get("ref")
        if fleet.uncommitted:
            differs = "has uncommitted changes"
        elif fleet.revision is None or fleet.revision != applied:
            differs = f"is at {fleet.revision or 'a commit git could not name'}, not at {applied}, the commit the loop applies"
        else:
            return None
        loose = sorted({a.strategy for a in plan.actions
                        if not any(k in memory.suspended for k in ("*", a.strategy, *a.workers) if k)})
        if not loose:
            return None
        if loop.get("kind") == "upstream" and not fleet.uncommitted:
            fix = (f"Run `git pull` to plan from what the loop applies; a change goes live when it is pushed to "
                   f"{ref}")
        else:
            fix = f"Commit{' and push' if loop.get('kind') == 'upstream' else ''} for the loop to apply it"
        return (f"the working tree of {self.fleet_dir} {differs}, and a reconcile loop that applies {ref} renews "
                f"this state: it would undo this within a round ({', '.join(loose)}). {fix}, or "
                "`quantlab suspend --target ID` first (the loop then leaves it alone) and apply with --target ID")

    def refuse_uncommitted(self, fleet: Fleet, memory: Memory, plan: Plan) -> None:
        conflict = self.loop_conflict(fleet, memory, plan)
        if conflict is not None:
            raise StateError(conflict)

    @staticmethod
    def with_leaving(fleet: Fleet, memory: Memory) -> Fleet:
        """`fleet`, plus each worker removed from it that still runs strategies and that the state
        remembers how to reach: cordoned and draining, until they have moved off. A reachable one
        gives them up like a drain — a stop that takes the final checkpoint after the copy exited,
        then a start elsewhere — instead of leaving them to be fenced; an unreachable one is waited
        out and failed over like an offline worker."""
        gone = sorted({p.worker for p in memory.placements.values()} - set(fleet.workers))
        extra = {wid: remembered_worker(wid, memory.addresses[wid], leaving=True)
                 for wid in gone if wid in memory.addresses}
        if not extra:
            return fleet
        return replace(fleet, workers=MappingProxyType(dict(sorted({**fleet.workers, **extra}.items()))))

    def foreign_state(self, fleet: Fleet, memory: Memory) -> str | None:
        """Why this state is not this fleet's (Memory.foreign_to), in words with what to do; or None."""
        desired = {wid: w for wid, w in fleet.workers.items() if not w.leaving}   # not the state's own
        where = {address_key(a) for wid, a in self.addresses(fleet).items() if wid in desired}
        why = memory.foreign_to(fleet.settings.name, set(fleet.strategies), set(desired), where)
        if why is None:
            return None
        fix = "point --state at this fleet's state"
        if fleet.settings.name and memory.fleet_name and fleet.settings.name != memory.fleet_name:
            named_in = fleet.settings.source.file if fleet.settings.source else "the Fleet document"
            fix += f", or, if this fleet was renamed, put `name: {memory.fleet_name}` back in {named_in}"
        return (f"the state {self.store.path} does not belong to the fleet {fleet.root}: {why}. Nothing is "
                f"planned or changed from it (the leases it granted are still renewed); {fix}")

    def refuse_foreign_state(self, fleet: Fleet, memory: Memory) -> None:
        """Nothing is planned from another fleet's state."""
        why = self.foreign_state(fleet, memory)
        if why is not None:
            raise StateError(why)

    def plan(self, fleet: Fleet, memory: Memory, gathered: Gathered, options: PlanOptions) -> Plan:
        self.refuse_foreign_state(fleet, memory)
        result = make_plan(fleet, gathered.observed, memory, self.clock.mono(), options)
        return result.with_provenance(fleet_revision=fleet.revision, fleet_dirty=fleet.uncommitted)

    def check_plan_file(self, saved: Plan, fleet: Fleet, memory: Memory) -> None:
        """A saved plan applies only to the state and fleet it was made from."""
        changed = []
        if saved.lineage != memory.lineage and saved.lineage is not None:
            changed.append(f"the state file is another one (lineage {memory.lineage}, plan has {saved.lineage})")
        # A plan made before any state existed still applies to the state this run has just created
        # (it records the clock it judges leases on): nothing has been decided in it yet.
        unborn = saved.lineage is None and saved.state_serial == 0 and \
            memory.placement_basis() == Memory(lineage=memory.lineage).placement_basis()
        if saved.state_serial != memory.serial and not unborn:
            changed.append(f"the state changed since (serial {memory.serial}, plan has {saved.state_serial})")
        if saved.fleet_hash != fleet.fleet_hash:
            changed.append("the fleet files changed since")
        if changed:
            raise StalePlan("saved plan is stale: " + "; ".join(changed) + ". Run `quantlab plan --out FILE` again")

    def execute(self, fleet: Fleet, plan: Plan, command: str, progress: Progress | None = None,
                observed: ObservedState | None = None) -> list[Outcome]:
        """Carry `plan` out; `observed`: what it was made from (which copy's folder each host has)."""
        revision = {"revision": plan.fleet_revision, "dirty": plan.fleet_dirty}
        recorder = Recorder(self.ledger, self.events, self.actor(command), revision, self.clock, self.checkpoints)
        outcomes = Executor(fleet, self.hosts(fleet), recorder, progress, self.may_act, observed).execute(plan)
        for blocked in plan.refused:             # a suspension is recorded once, by `suspend`
            recorder.event(event="blocked", guard=blocked.guard, reason=blocked.reason,
                           strategies=[a.strategy for a in blocked.actions])
        notices, raised = outcome_notices(plan, outcomes, self.clock.wall())
        self.notify(fleet.settings, notices + self._alerts(raised, ("failed:", "guard:")))
        for o in outcomes:
            self.counters.add("actions", action=o.action.action, outcome="ok" if o.ok else "failed")
        self.counters.add("failovers", sum(1 for n in notices if n.get("kind") == "failover"))
        return outcomes

    # --- one apply, for `apply` and the loop ---------------------------------------------------

    def apply(self, options: PlanOptions, *, command: str = "apply", fleet: Fleet | None = None,
              saved: Plan | None = None, gathered: Gathered | None = None,
              shown: Callable[[Fleet, Plan, Gathered], None] | None = None,
              confirm: Callable[[Plan], bool] | None = None, progress: Progress | None = None,
              lock_timeout: float = 0.0, background_renewals: bool = True) -> ApplyResult:
        """Plan (or take a saved plan) and carry it out. With `confirm`, the person is asked with the
        state lock released; the lock is then taken again, and the plan is carried out only if
        nothing it was made from has changed (else PlanChanged). `gathered`: plan from this
        observation instead of renewing first (the loop's act round, which loaded `fleet`)."""
        fleet = fleet or self.load_fleet()
        if command == "apply" and self.backend.shared and self.leader is None:
            try:
                with self.lead_for_run(fleet, command):      # whose timer renews the leases meanwhile
                    return self.apply(options, command=command, fleet=fleet, saved=saved, shown=shown,
                                      confirm=confirm, progress=progress, lock_timeout=lock_timeout,
                                      background_renewals=False)
            except LeadHeld as held:
                if not held.daemon:
                    raise StateError(f"{held}: wait for it to finish (only one run acts at a time)") from None
                raise                       # a daemon leads: the caller may hand the plan to it (handover.py)
        ttl = fleet.settings.monitor.lease_ttl_s
        with self.ledger.hold(ttl, lock_timeout, f"quantlab {command}"):
            fleet = self.with_leaving(fleet, self.ledger.memory)
            if saved is not None:
                self.check_plan_file(saved, fleet, self.ledger.memory)
            gathered = gathered or self.renew(fleet, person=command == "apply")
            plan = saved or self.plan(fleet, self.ledger.memory, gathered, options)
            if command == "apply":
                self.refuse_uncommitted(fleet, self.ledger.memory, plan)
            if shown is not None:
                shown(fleet, plan, gathered)
            if confirm is None or not plan.actions:
                return self._carry_out(fleet, plan, gathered, command, progress, background_renewals)
            basis = self.ledger.memory.placement_basis()
        if not confirm(plan):
            return ApplyResult(fleet, plan, gathered, cancelled=True)
        with self.ledger.hold(ttl, lock_timeout, f"quantlab {command}"):
            if self.load_fleet().fleet_hash != fleet.fleet_hash:
                raise PlanChanged("the fleet files changed while apply waited for an answer; nothing was done. "
                                  "Run apply again to see the new plan")
            if self.ledger.memory.placement_basis() != basis:
                raise PlanChanged("another run placed, moved or stopped strategies while apply waited for an "
                                  "answer; nothing was done. Run apply again to see the new plan")
            gathered = self.renew(fleet, person=command == "apply")
            if saved is None:
                fresh = self.plan(fleet, self.ledger.memory, gathered, options)
                if fresh.decision_keys() != plan.decision_keys():
                    raise PlanChanged("what runs on the hosts changed while apply waited for an answer, and the "
                                      "plan is now different; nothing was done. Run apply again to see it")
                plan = fresh
            return self._carry_out(fleet, plan, gathered, command, progress, background_renewals)

    def _carry_out(self, fleet: Fleet, plan: Plan, gathered: Gathered, command: str,
                   progress: Progress | None, background_renewals: bool) -> ApplyResult:
        renewing = self.renewing(fleet) if background_renewals and plan.actions else contextlib.nullcontext()
        started = time.monotonic()
        with renewing:
            outcomes = self.execute(fleet, plan, command, progress, gathered.observed)
            self.copy_checkpoints(fleet, gathered, {a.strategy for a in plan.actions})
            self.prune_checkpoints(fleet)
        self._last_plan = plan
        # An `apply` looks once more, so that the page never shows what was just started as not
        # running; the loop shows the outcomes until its next renewal round sees them on the hosts.
        after = self.observe(fleet, self.ledger.memory) if command == "apply" and plan.actions else None
        self.record_round("act", fleet, after or gathered, time.monotonic() - started,
                          acted=outcomes if after is None else None,
                          actions=len(plan.actions), failed=sum(1 for o in outcomes if not o.ok))
        return ApplyResult(fleet, plan, gathered, outcomes)
