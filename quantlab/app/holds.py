"""A person's holds on the fleet: suspend and resume, the emergency stop-all, retry of a copy in
error. Each is recorded with only the short write lock, so it holds at once, also while a round acts;
stop-all then waits for the state lock to carry out its stops.
"""
from __future__ import annotations

from typing import Any

from quantlab.edges.execute import Outcome, Progress
from quantlab.core.memory import Memory
from quantlab.core.plan import Action, Plan
from quantlab.core.planner import UnknownTarget
from quantlab.core.spec import Fleet, FleetInvalid, FleetSettings
from quantlab.edges.store import StateError


class Holds:
    """Suspend, resume, stop-all and retry (a mixin of Controller: see controller.py)."""

    # --- suspend and resume ------------------------------------------------------------------

    def suspend(self, targets: list[str], reason: str | None) -> None:
        """Hold starts, stops and moves for `targets` ("*": everything) from the next plan on. Only
        the short write lock is taken, so it holds at once, also while a round acts."""
        _, strategies = self._memory_for_writing(targets)
        by, at = self.actor("suspend"), self.clock.wall()

        def change(m: Memory) -> None:
            for t in targets:
                # A stop-all's "renew nothing" ends only with `resume`, never with another suspend.
                kept = {"stopAll": True} if m.suspended.get(t, {}).get("stopAll") else {}
                m.suspended[t] = {"by": by, "reason": reason, "at": at, **kept}
        self.ledger.update(change)
        for t in targets:
            self.record_event(self._hold_event("suspended", t, strategies, by, at, reason))

    def resume(self, targets: list[str] | None) -> list[str]:
        """Lift the suspensions of `targets` (all of them when None); the targets lifted."""
        memory, strategies = self._memory_for_writing(list(targets or ()))
        lifted = sorted(memory.suspended if targets is None else set(targets) & set(memory.suspended))
        by, at = self.actor("resume"), self.clock.wall()
        self.ledger.update(lambda m: [m.suspended.pop(t, None) for t in lifted])
        for t in lifted:
            self.record_event(self._hold_event("resumed", t, strategies, by, at, None))
        return lifted

    def stop_all(self, reason: str | None, lock_timeout: float, progress: Progress | None = None) -> list[Outcome]:
        """The emergency brake. At once, without waiting for a running round: everything is suspended
        (no plan starts, stops or moves anything) and no lease is renewed any more. Then, with the
        state lock: every strategy reachable now is stopped, with st_exit, whatever the guards say.
        The fleet files are untouched; `quantlab resume` brings everything back."""
        _, strategies = self._memory_for_writing([])
        by, at, why = self.actor("stop-all"), self.clock.wall(), reason or "emergency stop"
        self.ledger.update(lambda m: m.suspended.update({"*": {"by": by, "reason": why, "at": at, "stopAll": True}}))
        self.record_event(self._hold_event("suspended", "*", strategies, by, at, f"{why}; no lease is renewed"))
        try:
            fleet = self.load_fleet()
        except FleetInvalid:
            fleet = self.fallback_fleet(self.ledger.memory)
        with self.ledger.hold(fleet.settings.monitor.lease_ttl_s, lock_timeout, "quantlab stop-all"):
            memory = self.ledger.memory
            stops = tuple(Action("stop", sid, f"quantlab stop-all: {why}", "stop-all", worker=p.worker, epoch=p.epoch)
                          for sid, p in sorted(memory.placements.items()) if p.worker in fleet.workers)
            plan = Plan(actions=stops, lineage=memory.lineage, state_serial=memory.serial,
                        rr_cursor=memory.rr_cursor, next_epoch=memory.next_epoch, policy="stop-all")
            return self.execute(fleet, plan, "stop-all", progress)

    def retry(self, strategies: list[str], reason: str | None) -> dict[str, str]:
        """Ask the next plan to start each strategy's copy that is in error again, with a fresh restart
        budget (strategy -> its worker). All or nothing: each must be in error on a worker that answers
        now. Only the short write lock is taken, so it works while a loop runs; a PostgreSQL leader
        reads the request from the shared state at its next act round."""
        self.require_fleet_dir()
        fleet, problems = self.fleet_or_fallback()
        memory = self.read_memory(None if problems else fleet)
        unknown = sorted(s for s in set(strategies) if s not in fleet.strategies and s not in memory.placements)
        if unknown:
            raise UnknownTarget(f"unknown strateg{'y' if len(unknown) == 1 else 'ies'} {', '.join(unknown)}: not in "
                                f"the fleet {self.fleet_dir} nor its state; `quantlab status` lists them")
        try:
            observed = self.observe(fleet, memory).observed
        finally:
            self.close()
        asked: dict[str, dict[str, Any]] = {}
        for sid in dict.fromkeys(strategies):
            placed = memory.placements.get(sid)
            if placed is None:
                raise StateError(f"{sid} is not placed on any worker (see `quantlab status`): there is no copy in "
                                 "error to retry")
            state = observed.worker(placed.worker)
            if state is None or not state.reachable:
                raise StateError(f"{placed.worker}, where {sid} is placed, is not answering "
                                 f"({state.error if state else 'no answer'}): retry once it answers")
            inst = state.instances.get(sid)
            if inst is None or inst.epoch != placed.epoch or inst.status != "error":
                now = inst.status if inst is not None and inst.epoch == placed.epoch else "not there"
                raise StateError(f"{sid} is {now} on {placed.worker}, not in error: nothing to retry")
            asked[sid] = {"epoch": placed.epoch, "worker": placed.worker}
        by, at = self.actor("retry"), self.clock.wall()

        def change(m: Memory) -> None:
            for sid, what in asked.items():
                m.retry[sid] = {"epoch": what["epoch"], "by": by, "reason": reason, "at": at}
        self.ledger.update(change)
        for sid, what in asked.items():
            self.record_event({"t": at, "event": "retry", "strategy": sid, "worker": what["worker"], "actor": by,
                               "detail": f"started again with a fresh restart budget{': ' + reason if reason else ''}"})
        return {sid: what["worker"] for sid, what in asked.items()}

    def _memory_for_writing(self, targets: list[str]) -> tuple[Memory, set[str]]:
        """The state, read with the lease TTL in force (so a state from another boot is judged right),
        after checking that every target names a strategy or worker known here."""
        self.require_fleet_dir()
        try:
            fleet: Fleet | None = self.load_fleet()
        except FleetInvalid:
            fleet = None                       # at 3 a.m. a broken commit must not stop a suspend
        settings = fleet.settings if fleet else FleetSettings.from_snapshot(self.ledger.read(0.0).fleet_settings)
        memory = self.ledger.refresh(settings.monitor.lease_ttl_s)
        strategies = set(memory.placements) | set(fleet.strategies if fleet else ())
        workers = {p.worker for p in memory.placements.values()} | set(fleet.workers if fleet else ())
        unknown = sorted(set(targets) - strategies - workers - {"*"})
        if unknown:
            raise UnknownTarget(f"--target {', '.join(unknown)}: no strategy or worker has this id in the fleet "
                                "or the state; `quantlab status` lists them")
        return memory, strategies

    @staticmethod
    def _hold_event(name: str, target: str, strategies: set[str], by: str, at: int, reason: str | None) -> dict[str, Any]:
        what = "everything" if target == "*" else target
        event: dict[str, Any] = {"t": at, "event": name, "actor": by,
                                 "detail": f"{what}{': ' + reason if reason else ''}"}
        if target in strategies:
            event["strategy"] = target
        elif target != "*":
            event["worker"] = target
        return event
