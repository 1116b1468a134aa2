"""Renewal rounds and what follows every round: the leases renewed, what the hosts said recorded,
checkpoint copies, alerts and notices, and the fleet page's snapshot.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

from quantlab.core import health
from quantlab.edges.execute import Outcome
from quantlab.edges.checkpoints import copy_round, wanted as checkpoints_wanted
from quantlab.edges.gather import Gathered, remember_into, renewals
from quantlab.core.memory import Memory
from quantlab.edges import snapshot
from quantlab.edges.snapshot import SnapshotWriter
from quantlab.core.spec import Fleet, FleetSettings
from quantlab.core.status import fleet_status
from quantlab.edges.statebackend import SnapshotsPort

from .timers import every


# How long the checkpoint of a strategy removed from the fleet is kept, in case it is added back.
CHECKPOINT_RETENTION_S = 7 * 86400
CHECKPOINT_CALL_MIN_S = 5.0      # a round's checkpoint call waits at least this for a host


class Rounds:
    """Renewal rounds and their records (a mixin of Controller: see controller.py)."""

    # --- writing (callers hold the ledger) -----------------------------------------------------

    def renew(self, fleet: Fleet, *, loop: bool = False, fallback: bool = False, person: bool = False) -> Gathered:
        """A renewal round: every lease of a current placement is renewed, the bound of each request
        recorded before it is sent, and what the hosts said recorded after. `fallback`: `fleet`
        comes from the state file (the fleet directory does not validate). `person`: the round a
        person's `apply` plans from, with its longer deadline."""
        memory = self.ledger.refresh(fleet.settings.monitor.lease_ttl_s)
        # Another fleet's state (a wrong --state, or a renamed fleet): its leases are renewed from what
        # it remembers, as while the fleet does not validate, and nothing is planned from it (plan).
        foreign = None if fallback else self.foreign_state(fleet, memory)
        if foreign is not None:
            fleet, fallback = self.fallback_fleet(memory), True
        deadline = fleet.settings.person_probe_deadline_s if person else None
        gathered = self.prober(fleet).round(fleet, memory, renew=renewals(memory), leases=self.ledger,
                                            deadline_s=deadline)
        addresses = {} if fallback else self.addresses(fleet)
        now = self.clock.mono()

        def record(m: Memory) -> None:
            remember_into(m, gathered, addresses, now if loop else None)
            if not fallback:
                m.fleet_settings = fleet.settings.snapshot()
                m.fleet_name = m.fleet_name or fleet.settings.name
        memory = self.ledger.update(record)
        self.follow_host_terms(gathered)
        self.record_host_events(gathered)
        notices, raised = health.watch(fleet, gathered.observed, memory, gathered.host_events, now,
                                       self.clock.wall())
        for wid, why in gathered.refused.items():
            raised[f"refused:{wid}"] = {"t": self.clock.wall(), "kind": "renew-refused", "worker": wid,
                                        "message": f"{wid}: its host granted no renewal: {why}"}
        for wid, term in gathered.odd_fences.items():
            raised[f"fence:{wid}"] = {
                "t": self.clock.wall(), "kind": "fence-anomaly", "worker": wid,
                "message": f"{wid}: its workdir says a controller of this state used term {term}, which none "
                           f"does; not followed, so this worker may refuse this controller (its strategies are "
                           f"then fenced and fail over). Something there (a strategy?) wrote "
                           f"{self.fence_file(fleet, wid)}: remove that file to clear it"}
        if foreign is not None:
            raised["foreign:state"] = {"t": self.clock.wall(), "kind": "foreign-state", "message": foreign}
        scopes = (("offline:", "instance:", "refused:", "fence:", "disk:", "foreign:") if not fallback
                  else ("refused:", "fence:", "foreign:"))
        self.notify(fleet.settings, notices + self._alerts(raised, scopes))
        renewed = sum(len(v) for v in gathered.renewed.values())
        self.counters.add("renewals", renewed)
        self.record_round("renew", fleet, gathered, gathered.seconds, renewed=renewed,
                          due=sum(len(v) for v in renewals(memory).values()))
        return gathered

    def fence_file(self, fleet: Fleet, wid: str) -> str:
        """Where worker `wid`'s agent keeps the controller terms it has seen (for messages)."""
        worker = fleet.workers.get(wid)
        return f"{self.hosts(fleet).workdir(worker)}/agent/fence.json" if worker is not None else "agent/fence.json"

    def _alerts(self, raised: dict[str, dict[str, Any]], scopes: tuple[str, ...]) -> list[dict[str, Any]]:
        """Alerts are told once when raised and once when they clear (see health.alerts_delta)."""
        told: list[dict[str, Any]] = []

        def change(m: Memory) -> None:
            for scope in scopes:
                notices, m.alerts = health.alerts_delta(m.alerts, {k: v for k, v in raised.items()
                                                                   if k.startswith(scope)}, scope,
                                                        self.clock.wall())
                told.extend(notices)
        if any(k.startswith(scopes) for k in raised) or any(k.startswith(scopes) for k in self.ledger.memory.alerts):
            self.ledger.update(change)
        return told

    @contextlib.contextmanager
    def renewing(self, fleet: Fleet, *, loop: bool = False) -> Iterator[None]:
        """Renewal rounds on their own timer (the real APScheduler) for as long as the caller acts,
        so a long apply never lets a lease run out."""
        def job() -> None:
            try:
                self.renew(fleet, loop=loop)      # (a run that leads keeps its lead with keep_lead)
            except Exception as exc:  # noqa: BLE001 - a round that fails is logged; the next one runs
                self.log(f"renewal round failed: {exc!r}")
        # Two rounds may overlap, as in the daemon: one waiting for a slow host never makes the next late.
        with every(fleet.settings.reconcile_interval_s, job, name="renew", overlapping=2):
            yield

    def copy_checkpoints(self, fleet: Fleet, answered: Gathered, skip: set[str]) -> None:
        """Every act round, after the renewals: the checkpoints of the current placements on the
        workers that answered the latest renewal round (a silent one would only hold this up), less
        those in `skip` (just started: nothing to copy yet), in a call of their own on the act lane
        (they may be large: never in a renewal). Only folders that changed come back and are written;
        the controller's copy of every answered one is then as fresh as this round. The state
        records when each copy last changed."""
        asked = checkpoints_wanted(fleet, self.ledger.memory, set(answered.answered_at), skip)
        budget = max(fleet.settings.probe_deadline_s, CHECKPOINT_CALL_MIN_S)
        try:
            copied = copy_round(fleet, self.hosts(fleet), self.checkpoints, asked, budget)
        except OSError as exc:
            self.log(f"warning: cannot write checkpoint copies in {self.checkpoints.folder}: {exc.strerror}")
            return
        for sid, why in sorted(copied.dropped.items()):
            if self.checkpoints.forget(sid):
                # An older copy must not be restored as if it were current.
                self.record_event({"t": self.clock.wall(), "event": "checkpoint-dropped", "strategy": sid,
                                   "actor": "monitor", "detail": f"checkpoint folder not copied ({why}); a move "
                                   "will start it without its state"})
        if copied.written:                    # when each copy last changed; unchanged ones cost no state write
            now = self.clock.mono()
            self.ledger.update(lambda m: m.checkpoints.update({sid: now for sid in copied.written}))

    def prune_checkpoints(self, fleet: Fleet) -> None:
        """A strategy gone from the fleet and from every worker keeps its last checkpoint (it holds
        positions) for CHECKPOINT_RETENTION_S, in case it comes back; then the copy is removed."""
        keep = set(fleet.strategies) | set(self.ledger.memory.placements)
        for sid in self.checkpoints.prune(keep, self.clock.wall() / 1000, CHECKPOINT_RETENTION_S):
            self.record_event({"t": self.clock.wall(), "event": "checkpoint-removed", "strategy": sid,
                               "actor": "monitor", "detail": f"removed from the fleet; its checkpoint was kept "
                               f"{CHECKPOINT_RETENTION_S // 86400} days"})

    def notify(self, settings: FleetSettings, notices: list[dict[str, Any]]) -> None:
        """Record each notice as an event and hand it to the background notifier (never waits)."""
        if not notices:
            return
        for notice in notices:
            self.record_event({**notice, "event": "notify", "actor": "monitor"})
        self.notifier(settings).submit([{**n, "fleet": str(self.fleet_dir)} for n in notices])

    def raise_alert(self, kind: str, settings: FleetSettings, problem: str | None) -> None:
        """An alert of the loop's own (`fleet-invalid`: what it applies does not validate;
        `git-pull-refused`: the upstream's history diverged): told once when raised, `resolved` once
        `problem` is None again."""
        raised = {} if problem is None else {kind: {"t": self.clock.wall(), "kind": kind, "message": problem}}
        if (kind in self.ledger.memory.alerts) == bool(raised):
            return                                   # nothing new to tell: no state write either
        self.notify(settings, self._alerts(raised, (kind,)))

    def record_host_events(self, gathered: Gathered) -> None:
        for event in gathered.host_events:
            self.record_event({**event, "actor": f"supervisor@{event['worker']}"})

    # --- the fleet page's snapshot ---------------------------------------------------------------

    def snapshot_store(self) -> SnapshotsPort:
        """Where the snapshot of the last writing run is kept: beside the state file, or in the database."""
        return self.backend.snapshots()

    def record_round(self, kind: str, fleet: Fleet, gathered: Gathered, seconds: float,
                     acted: list[Outcome] | None = None, **extra: Any) -> None:
        """Note a round's timing and hand its snapshot to the background writer (never waits, never
        raises: the page is not worth a round). A standby, which writes nothing, records none.
        `acted`: the outcomes of what the round did after `gathered` was taken, which no probe has
        seen yet: the strategies they concern are shown as the outcomes left them, in this snapshot
        and in any other whose observation began before this round ended."""
        try:
            self._record_round(kind, fleet, gathered, seconds, acted, extra)
        except Exception as exc:  # noqa: BLE001
            self.log(f"warning: the fleet page's snapshot was not recorded: {exc!r}")

    def _record_round(self, kind: str, fleet: Fleet, gathered: Gathered, seconds: float,
                      acted: list[Outcome] | None, extra: dict[str, Any]) -> None:
        if self.leader is not None and not self.leader.leading():
            return
        memory = self.ledger.known
        if memory is None:
            return
        now, wall = self.clock.mono(), self.clock.wall()
        with self._lazy_lock:                 # the renewal and act threads both come here
            self._rounds[kind] = {"at": wall, "seconds": round(seconds, 3), **extra}
            if kind == "renew" and (extra.get("renewed") or not extra.get("due")):
                self._rounds["lastRenewal"] = {"at": wall}      # renewed leases, or had none to renew
            rounds = {k: dict(v) for k, v in self._rounds.items()}
            if acted:
                self._acted = (now, snapshot.acted_marks(acted))
            # A renewal round begun while the act round acted may be recorded after it.
            marks = self._acted[1] if self._acted is not None and gathered.started <= self._acted[0] else None
        plan, leader = self._last_plan, self.leader_info()
        counters = self.counters.to_json()
        settings = {"intervalSeconds": fleet.settings.reconcile_interval_s,
                    "leaseTtlSeconds": fleet.settings.monitor.lease_ttl_s}

        def make() -> dict[str, Any]:
            report = fleet_status(fleet, gathered.observed, memory, now, wall, plan,
                                  plan.fleet_revision if plan else fleet.revision, acted=marks)
            report["leader"] = leader
            return snapshot.build(report, plan, memory, now, wall, rounds, leader, counters, settings, marks)
        with self._lazy_lock:
            if self._snapshots is None:
                self._snapshots = SnapshotWriter(self.snapshot_store(), self.log)
            writer = self._snapshots
        writer.submit(make)
