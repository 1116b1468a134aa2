"""One controller's side of the leadership of a PostgreSQL state: the row (pgleader.Leadership), the
judgement (leadership.py) and this process's monotonic clock, put together.

A leader renews the row once per round interval, and acts only while `leading()`: its
last successful renewal was *sent* less than the lease (minus a margin) ago. A standby reads the
row on a short timer of its own (`watch`) and takes the lead once it has seen the row unchanged for
a whole lease, in a term above the row's, the state's and every term a host has reported.
"""
from __future__ import annotations

import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Callable

import contextlib
from typing import Any, Iterator

from quantlab.core.spec import Fleet, FleetSettings
from quantlab.edges.gather import Gathered
from quantlab.edges.clock import Clock
from .timers import every
from quantlab.core.leadership import (LeaderKind, Watch, inherited_leases_end_at, may_take_over, next_term,
                                      observe, still_leads)
from quantlab.edges.pgleader import Leadership
from quantlab.core.spec.models import LEADER_WATCH_S
from quantlab.edges.store import StateError

def db_errors() -> tuple[type[BaseException], ...]:
    """The faults of a database that is away. psycopg is imported only when a leader needs it (it
    costs every command's start a tenth of a second), and may be missing without the postgres extra."""
    try:
        import psycopg
    except ImportError:
        return (StateError,)
    return (StateError, psycopg.Error)


def describe_db_error(exc: BaseException) -> str:
    """A database fault in one line (psycopg's messages run over several)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@dataclass(frozen=True)
class Change:
    """What happened to this controller's lead, for the loop to say and record."""

    kind: str            # "took", "deposed", "stepped-down", "raised"
    term: int
    detail: str


class Leader:
    def __init__(self, table: Leadership, clock: Clock, lease_s: float):
        self.table = table
        self.clock = clock
        self.duration_ms = int(lease_s * 1000)
        self.term: int | None = None               # the term this process leads in, while it does
        self.last_term: int | None = None          # the term it led in last (a deposed one's commands carry it)
        self.took_at: int | None = None            # mono ms it took the lead
        self.took_wall: int | None = None          # the same, epoch ms (for people)
        self._sent: int | None = None              # mono ms the last successful renewal was sent
        self._watch = Watch()
        self.handover_asked = False
        self._quiet_until = 0                      # mono ms: no taking back the lead just handed over
        self._lock = threading.Lock()

    @staticmethod
    def name(command: str) -> str:
        return f"{command} pid {os.getpid()} on {socket.gethostname()}"

    def leading(self) -> bool:
        with self._lock:
            return self.term is not None and still_leads(self._sent, self.clock.mono(), self.duration_ms)

    def current_term(self) -> int | None:
        """The term to carry in commands: this process's while it may still act, else none."""
        with self._lock:
            if self.term is None or not still_leads(self._sent, self.clock.mono(), self.duration_ms):
                return None
            return self.term

    def renew(self) -> Change | None:
        """Renew the row (the start of a renewal round). A refused renewal means another controller
        took over: this one is deposed at once. A database that does not answer changes nothing
        here: `leading()` runs out on its own."""
        with self._lock:
            term = self.term
        if term is None:
            return None
        sent = self.clock.mono()
        try:
            renewed, handover = self.table.renew(term)
        except db_errors():
            return None
        with self._lock:
            if self.term != term:
                return None
            if not renewed:
                self.term = None
                return Change("deposed", term, "the leadership row names another holder or term: another "
                                               "controller took the lead")
            self._sent = max(self._sent or 0, sent)
            self.handover_asked = handover
        return None

    def watch(self) -> LeaseRowSeen:
        """A standby's look at the row (every LEADER_WATCH_S): the clock restarts when it changed."""
        row = self.table.read()
        with self._lock:
            self._watch = observe(self._watch, row, self.clock.mono())
            row = self._watch.row
            return LeaseRowSeen(row.holder if row else None, row.term if row else 0,
                                may_take_over(self._watch, self.clock.mono()), self._watch.since_ms,
                                row.kind if row else None)

    def take(self, state_term: int, host_terms: list[int]) -> Change | None:
        """Take the lead if the row allows it now; the Change when taken. Not for a lease after this
        process stepped down: the hand-over goes to another controller."""
        with self._lock:
            watch = self._watch
        now = self.clock.mono()
        if watch.since_ms is None or not may_take_over(watch, now) or now < self._quiet_until:
            return None
        seen = watch.row
        term = next_term(max(seen.term if seen else 0, state_term), host_terms)
        sent = self.clock.mono()
        if not self.table.take(seen, term, self.duration_ms):
            return None
        with self._lock:
            self.term, self._sent, self.took_at, self.handover_asked = term, sent, sent, False
            self.last_term, self.took_wall = term, self.clock.wall()
            self._watch = Watch()
        if seen is None or seen.holder is None:
            why = "nobody held the lead"
        else:
            why = f"{seen.holder} (term {seen.term}) had not renewed for {seen.duration_ms / 1000:g}s"
        return Change("took", term, why)

    def take_for_run(self, state_term: Callable[[], int], host_terms: list[int]) -> Change | LeaseRowSeen:
        """Lead for one run (`apply`, `reconcile --once`): at once when nobody leads, else once the
        row has stayed unchanged for a whole lease (a run that crashed left it held). The Change
        when taken; else the row of whoever leads (and renews it), and the run must not act."""
        deadline = time.monotonic() + self.duration_ms / 1000 + 2 * LEADER_WATCH_S
        first = self.watch()
        while True:
            change = self.take(state_term(), host_terms)
            if change is not None:
                return change
            seen = self.watch()
            if seen.since_ms != first.since_ms or time.monotonic() >= deadline:
                return seen
            time.sleep(LEADER_WATCH_S)

    def raise_term(self, host_terms: list[int]) -> Change | None:
        """A host reported a term above ours (a database restored from a backup, a state pushed into
        a fresh one): go on in a term above it, or hosts refuse us for ever."""
        with self._lock:
            term = self.term
        if term is None or not host_terms or max(host_terms) <= term:
            return None
        new = next_term(term, host_terms)
        if not self.table.raise_term(term, new):
            return None
        with self._lock:
            if self.term == term:
                self.term = self.last_term = new
        return Change("raised", new, f"a host had seen term {max(host_terms)}, above this leader's {term}")

    def step_down(self) -> Change | None:
        with self._lock:
            term, self.term = self.term, None
            if term is not None:
                self._quiet_until = self.clock.mono() + self.duration_ms
        if term is None:
            return None
        try:
            self.table.step_down(term)
        except db_errors():
            pass                                   # the row runs out on its own
        return Change("stepped-down", term, "handed the lead over")


@dataclass(frozen=True)
class LeaseRowSeen:
    holder: str | None
    term: int
    may_take: bool
    since_ms: int | None          # since when the row has been as it is (changes when it changes)
    kind: LeaderKind | None = None

    @property
    def daemon(self) -> bool:
        """Whether a reconcile daemon holds it (one that carries out plans handed to it)."""
        return self.kind == "daemon"

    def words(self) -> str:
        return f"{self.holder} leads (term {self.term}) and renews its lead"


class LeadHeld(StateError):
    """Another process leads this PostgreSQL state: an `apply` hands its plan to it when it is a
    reconcile daemon, and refuses otherwise (another `apply` leads for its run)."""

    def __init__(self, message: str, daemon: bool):
        super().__init__(message)
        self.daemon = daemon


class Leading:
    """The controller's side of the leadership: the fencing token it sends, whether it may act, a
    run that leads for its duration, and what a new term inherits."""

    def defers_writes(self) -> bool:
        """A PostgreSQL leader whose database is away keeps renewing from what it holds, for as long
        as it may lead (its leadership lease): whatever lease it grants meanwhile ends before a standby
        can start anything elsewhere (see took_over). Acting waits for the database."""
        return self.backend.shared and self.leader is not None and self.leader.leading()

    def fence(self) -> dict[str, Any] | None:
        """The fencing token the commands to the hosts carry: this state's lineage and the term this
        process acts in — the file's, or the PostgreSQL leader's (none while it does not lead: then
        its probes only ask, and its other commands are not checked, like an emergency stop-all)."""
        memory = self.ledger.known
        lineage = memory.lineage if memory is not None else self._lineage
        if lineage is None:
            return None
        if not self.backend.shared:
            term: int | None = memory.term if memory is not None else None
        else:
            # A deposed leader still carries its last term: the hosts a newer one reached refuse it.
            term = self.leader.last_term if self.leader is not None else None
        return {"lineage": lineage, "term": term}

    def may_act(self) -> str | None:
        """Why this process must not start, stop or move anything now, or None (checked before each
        action: a leader that lost its lead mid-plan stops there)."""
        if self.leader is None or self.leader.leading():
            return None
        return "not done: this controller does not lead any more (its leadership lease ran out or another took over)"

    def follow_host_terms(self, gathered: Gathered) -> None:
        """A host that has seen a term of this state above ours refuses us. With the file, that is a
        state restored from a backup or left behind by `state push` (which then refuses to be read
        again): the file goes on in a term above. A PostgreSQL leader does the same in its row."""
        seen = sorted(set(gathered.fences.values()))
        if not seen:
            return
        if not self.backend.shared:
            if seen[-1] > self.ledger.memory.term:
                new = next_term(self.ledger.memory.term, seen)
                self.ledger.update(lambda m: setattr(m, "term", max(m.term, new)))
                self.log(f"controller term is now {new}: a host had seen term {seen[-1]} of this state "
                         f"(restored from a backup, or pushed elsewhere and back)")
            return
        if self.leader is not None:
            change = self.leader.raise_term(seen)
            if change is not None:
                self.leader_changed(change)

    def leader_changed(self, change: Any) -> None:
        """Say and record a change of this process's lead (leader.Change)."""
        words = {"took": "took the lead", "deposed": "lost the lead", "stepped-down": "stepped down",
                 "raised": "leads on"}[change.kind]
        self.log(f"{words} in term {change.term}: {change.detail}")
        if change.kind in ("took", "raised"):
            self.ledger.update(lambda m: setattr(m, "term", max(m.term, change.term)))
        self.record_event({"t": self.clock.wall(), "event": "leader", "change": change.kind, "term": change.term,
                           "actor": self.leader.table.name if self.leader is not None else self.actor("reconcile"),
                           "detail": f"{words} in term {change.term}: {change.detail}"})

    def took_over(self, change: Any, settings: FleetSettings) -> None:
        """A new term. The previous leader's sessions lose the state locks (it does not lead any more,
        whatever its connection still holds). Every lease the previous term may have granted counts as
        running until leadership.inherited_leases_end_at: nothing starts elsewhere before those are
        surely over."""
        ended = self.backend.break_locks()
        if ended:
            self.log(f"ended {ended} session(s) of the previous leader that still held the state's locks")
        memory = self.ledger.refresh(settings.monitor.lease_ttl_s)
        until = inherited_leases_end_at(self.clock.mono(), settings.monitor.lease_ttl_s, settings.probe_deadline_s,
                                        settings.ssh.connect_timeout_s)
        workers = set(memory.leases) | {p.worker for p in memory.placements.values()}
        self.ledger.extend_leases({w: until for w in workers})
        self.leader_changed(change)

    @contextlib.contextmanager
    def lead_for_run(self, fleet: Fleet, command: str) -> Iterator[None]:
        """With PostgreSQL, `apply` leads for its run (see Leader.take_for_run), renewing the lead on
        a timer of its own, also while a person confirms; LeadHeld when a daemon leads. The file's
        state lock is all the file needs."""
        if not self.backend.shared or self.leader is not None:
            yield
            return
        leader = Leader(self.backend.leadership(Leader.name(f"quantlab {command}"), kind="run"), self.clock,
                        fleet.settings.leader_lease)
        looked = self.observe(fleet, self.read_memory(fleet))
        taken = leader.take_for_run(lambda: self.read_memory(None).term, list(looked.fences.values()))
        if not isinstance(taken, Change):
            raise LeadHeld(taken.words(), taken.daemon)
        self.leader = leader
        try:
            self.took_over(taken, fleet.settings)
            with self.keep_lead(fleet, renew_leases=True):
                yield
        finally:
            change = leader.step_down()
            self.leader = None
            if change is not None:
                self.log(f"stepped down from term {change.term}")

    @contextlib.contextmanager
    def keep_lead(self, fleet: Fleet, renew_leases: bool) -> Iterator[None]:
        """While a run that leads (`apply`, `reconcile --once`) works or waits for a person: its own
        timer renews the lead every interval, and with `renew_leases` the strategies' leases too (no
        daemon does meanwhile: they stand by)."""
        leader = self.leader

        def job() -> None:
            try:
                change = leader.renew()
                if change is not None:
                    self.leader_changed(change)
                if renew_leases and leader.leading():
                    self.renew(fleet)
            except Exception as exc:  # noqa: BLE001 - the database is away; leading() runs out on its own
                self.log(f"renewing the lead failed: {describe_db_error(exc)}")
        with every(fleet.settings.reconcile_interval_s, job, name="lead"):
            yield


class LoopLeading:
    """The reconcile loop's side of the leadership (a mixin of loop.ReconcileLoop): a standby looks
    at the hosts and watches the row; the leader renews it once per interval on the `lead` job;
    `--once` leads for its run; a new term begins with a fresh look and renewals at once."""

    def _lead_once(self) -> str | None:
        """`--once` with PostgreSQL leads for its run (see Leader.take_for_run): None once it leads,
        else who does, and this run does nothing."""
        assert self.leader is not None
        self._load(read_only=True)
        self._standby_round()
        assert self._looked is not None
        taken = self.leader.take_for_run(lambda: self.ctl.read_memory(None).term, list(self._looked.fences.values()))
        if not isinstance(taken, Change):
            return f"{taken.words()}: this run does nothing"
        self._took_over(taken, renew=False)
        return None

    def leads(self) -> bool:
        return self.leader is None or self.leader.leading()

    def _standby_round(self) -> None:
        """A standby looks at every host (read only), ready to take over with the hosts' terms."""
        memory = self.ctl.read_memory(self._fleet)
        fleet = self._fleet if self._fleet is not None else self.ctl.fallback_fleet(memory)
        self._looked = self.ctl.observe(fleet, memory)
        who = self.leader.watch() if self.leader is not None else None
        others = who is not None and who.holder is not None and who.holder != self.leader.table.name
        self._say("standby", f"standing by: {who.holder} leads (term {who.term}); looking at the hosts, "
                             "renewing nothing" if others else None)

    def _lead_job(self) -> None:
        """Every LEADER_WATCH_S: the leader renews its row once per interval; a standby watches it
        and takes over once it has seen it unchanged for a whole lease (after one look at the hosts,
        so that its term is above every term they have seen)."""
        leader = self.leader
        assert leader is not None
        try:
            if leader.term is not None:
                now = self.ctl.clock.mono()
                every = self._settings().reconcile_interval_s * 1000
                if self._renewed_lead_at is None or now - self._renewed_lead_at >= every - 500:
                    self._renewed_lead_at = now
                    change = leader.renew()
                    if change is not None:
                        self.ctl.leader_changed(change)
                if leader.term is not None and not leader.leading():
                    self._say("lead", "the leadership row could not be renewed for a whole lease: acting "
                                      "stops until this daemon leads again")
                return
            seen = leader.watch()
            if not seen.may_take or self._looked is None:
                return
            change = leader.take(self.ctl.read_memory(None).term, list(self._looked.fences.values()))
            if change is None:
                return
            self._renewed_lead_at = self.ctl.clock.mono()
            self._took_over(change)
        except Exception as exc:               # noqa: BLE001 - the database is away: said once, tried again
            self._say("lead", f"leadership: {describe_db_error(exc)}")
            return
        self._say("lead", None)

    def _took_over(self, change: Any, renew: bool = True) -> None:
        """A new term begins: if it cannot begin properly (the database went away meanwhile), the lead
        is handed back rather than held half-taken."""
        try:
            self.ctl.took_over(change, self._settings())
        except StateError:
            self.step_down()
            raise
        with self._rounds:                    # nothing observed before this term is planned from
            self._latest = None
            self._acted_at = self.ctl.clock.mono()
        self._say("standby", None)
        if renew:
            # The renewals go out at once, on a thread of their own: a cold round may wait for a hung
            # host longer than the lead may go unrenewed, and the lead job renews it.
            threading.Thread(target=self._renew_job, name="takeover-renewal", daemon=True).start()

    def step_down(self) -> None:
        if self.leader is not None:
            change = self.leader.step_down()
            if change is not None:
                self.ctl.leader_changed(change)
