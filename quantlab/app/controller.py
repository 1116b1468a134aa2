"""One controller's work, shared by the CLI and the reconcile loop: load the fleet, hold the state,
renew leases, plan, apply. This is where the I/O pieces are wired to the pure core.

Two kinds of round write state. A renewal round probes every host on the probe lane, renewing the
leases of the current placements and recording what it saw; it runs on its own timer and never
waits for anything but the hosts (each bounded by its deadline). An act round plans from the newest
renewal round and carries the plan out on the act lane. While a run acts, its renewal rounds go on.
"""
from __future__ import annotations

import contextlib
import getpass
import json
import logging
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Iterator

from quantlab.core import health
from quantlab.edges.clock import Clock
from quantlab.edges.follow import load_working_tree
from quantlab.edges.execute import Executor, Outcome, Progress, Recorder, outcome_notices
from quantlab.edges.checkpoints import copy_round, wanted as checkpoints_wanted
from quantlab.edges.gather import Gathered, Prober, gather, remember_into, renewals
from quantlab.edges.hosts import AgentError, Hosts
from quantlab.edges.transport.base import TransportError
from quantlab.core.leadership import inherited_leases_end_at, next_term
from quantlab.edges.ledger import Ledger
from quantlab.core.observed import ObservedState
from quantlab.core.memory import Memory, address_key
from quantlab.edges.notify import Notifier
from quantlab.core.plan import Action, Plan
from quantlab.core.planner import PlanOptions, UnknownTarget, plan as make_plan
from quantlab.edges import snapshot
from quantlab.edges.snapshot import Counters, SnapshotWriter
from quantlab.core.spec import Fleet, FleetInvalid, FleetSettings, Location, WorkerSpec
from quantlab.core.status import fleet_status
from quantlab.edges.statebackend import CheckpointsPort, EventsPort, SnapshotsPort, StateBackend, StatePort, open_backend
from quantlab.edges.store import StateError
from quantlab.edges.vcs import tracked_by_git


# How long the checkpoint of a strategy removed from the fleet is kept, in case it is added back.
CHECKPOINT_RETENTION_S = 7 * 86400
CHECKPOINT_CALL_MIN_S = 5.0      # a round's checkpoint call waits at least this for a host


def default_fleet_dir() -> Path:
    return Path(os.environ.get("QUANTLAB_FLEET") or "fleet")


def default_state_path(fleet_dir: Path) -> Path:
    return fleet_dir / ".quantlab" / "state.json"


class StalePlan(StateError):
    pass


def quiet_scheduler_logs() -> None:
    """A round still running when its next run is due is skipped by design (an act round that acts
    long, a third renewal round while two wait for slow hosts); APScheduler would warn each time."""
    logging.getLogger("apscheduler.executors.default").setLevel(logging.ERROR)
    logging.getLogger("apscheduler.scheduler").setLevel(logging.ERROR)


class PlanChanged(StateError):
    """What a plan was made from changed while apply waited for a person; nothing was done."""


class LeadHeld(StateError):
    """Another process leads this PostgreSQL state: an `apply` hands its plan to it when it is a
    reconcile daemon, and refuses otherwise (another `apply` leads for its run)."""

    def __init__(self, message: str, daemon: bool):
        super().__init__(message)
        self.daemon = daemon


@dataclass
class LogOutput:
    worker: str                 # whose log it is
    stopped: bool               # the strategy is not placed any more: its output up to its stop
    chunks: Iterator[bytes]


@dataclass
class ApplyResult:
    fleet: Fleet
    plan: Plan
    gathered: Gathered
    outcomes: list[Outcome] = field(default_factory=list)
    cancelled: bool = False


def _basis(memory: Memory) -> str:
    """What a plan's actions depend on in the state: where each copy is meant to run, and the
    epochs and cursor the plan moves forward. Renewals and answers do not change it."""
    return json.dumps([memory.lineage, {s: p.to_json() for s, p in memory.placements.items()},
                       memory.next_epoch, memory.rr_cursor], sort_keys=True)


def _action_keys(plan: Plan) -> list[tuple]:
    """A plan's decisions without their words (reasons carry durations that change by the second)."""
    return [(a.action, a.strategy, a.workers, a.cause, a.epoch, a.spec_hash, a.paused) for a in plan.actions] + \
           [(b.guard, tuple(a.strategy for a in b.actions)) for b in plan.blocked]


def _remembered_worker(wid: str, address: dict[str, Any], leaving: bool = False) -> WorkerSpec:
    """A worker as the state remembers it (how to reach it, nothing it may run)."""
    return WorkerSpec(id=wid, host=address["host"], port=address.get("port"), user=address.get("user"),
                      workdir=address.get("workdir"), runner=(address.get("program") or "node",),
                      max_strategies=0, supported_apis=frozenset(), source=Location("state", 0),
                      cordoned=leaving, drain=leaving, leaving=leaving)


@dataclass
class Controller:
    fleet_dir: Path
    state_path: Path
    clock: Clock = field(default_factory=Clock)
    accept_new_host_keys: bool = False
    state_dsn: str | None = None      # postgresql://…: the state lives there (state_path: local files only)
    log: Callable[[str], None] = field(default=lambda line: print(line, file=sys.stderr))
    backend: StateBackend = field(init=False)
    store: StatePort = field(init=False)
    ledger: Ledger = field(init=False)
    events: EventsPort = field(init=False)
    checkpoints: CheckpointsPort = field(init=False)
    _hosts: Hosts | None = field(default=None, init=False)
    _prober: Prober | None = field(default=None, init=False)
    _notifier: Notifier | None = field(default=None, init=False)
    _lazy_lock: threading.RLock = field(default_factory=threading.RLock, init=False)
    _events_failure_said: str | None = field(default=None, init=False)
    # With PostgreSQL: this process's side of the leadership, while it may lead (the loop, or an
    # apply that leads for its duration). Its term is the fencing token of every command it sends.
    leader: Any = field(default=None, init=False)
    _lineage: str | None = field(default=None, init=False)
    # For the fleet page and /metrics: counts since start, the last rounds, the last plan.
    counters: Counters = field(default_factory=Counters, init=False)
    _rounds: dict[str, dict[str, Any]] = field(default_factory=dict, init=False)
    _last_plan: Plan | None = field(default=None, init=False)
    _snapshots: SnapshotWriter | None = field(default=None, init=False)
    # The last act round that acted: when it ended (mono ms) and what it left each strategy as
    # (snapshot.acted_marks), shown over every observation taken before then.
    _acted: tuple[int, dict[str, dict[str, Any]]] | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.backend = open_backend(self.state_path, self.state_dsn)
        self.store, self.events, self.checkpoints = self.backend.store, self.backend.events, self.backend.checkpoints
        self.ledger = Ledger(self.store, self.clock)
        self.ledger.may_defer = self.defers_writes

    def defers_writes(self) -> bool:
        """A PostgreSQL leader whose database is away keeps renewing from what it holds, for as long
        as it may lead (its leadership lease): whatever lease it grants meanwhile ends before a standby
        can start anything elsewhere (see took_over). Acting waits for the database."""
        return self.backend.shared and self.leader is not None and self.leader.leading()

    # --- pieces --------------------------------------------------------------------------------

    def load_fleet(self) -> Fleet:
        """The working tree's fleet (plan, apply and the other commands; the loop has its Follower)."""
        return load_working_tree(self.fleet_dir)

    def hosts(self, fleet: Fleet) -> Hosts:
        with self._lazy_lock:             # the renewal and act threads of a daemon both come here
            if self._hosts is None:
                self._hosts = Hosts(fleet, accept_new_host_keys=self.accept_new_host_keys)
                self._hosts.fence = self.fence
            else:
                self._hosts.update(fleet)
            return self._hosts

    def prober(self, fleet: Fleet) -> Prober:
        """The probe lane's prober, kept for the life of this controller (it remembers which host
        still has a probe outstanding, and each host's clock)."""
        hosts = self.hosts(fleet)
        with self._lazy_lock:
            if self._prober is None or self._prober.hosts is not hosts:
                self._prober = Prober(hosts, self.clock)
            return self._prober

    def notifier(self, settings: FleetSettings) -> Notifier:
        with self._lazy_lock:
            if self._notifier is None:
                self._notifier = Notifier(settings.notify, self.log, on_failure=lambda sink: self.counters.add(
                    "notification-failures", sink=sink))
            else:
                self._notifier.update(settings.notify)
            return self._notifier

    def close(self, flush_s: float = 5.0) -> None:
        """Close the connections; deliver what notices are queued for at most `flush_s`."""
        with self._lazy_lock:
            writer, self._snapshots = self._snapshots, None
        if writer is not None:
            writer.close(flush_s)
        if self._notifier is not None:
            self._notifier.close(flush_s)
            self._notifier = None
        if self._hosts is not None:
            self._hosts.close()
            self._hosts = None
            self._prober = None

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
        from .leader import Change, Leader
        leader = Leader(self.backend.leadership(Leader.name(f"quantlab {command}")), self.clock,
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
        from apscheduler.schedulers.background import BackgroundScheduler
        from apscheduler.triggers.interval import IntervalTrigger

        from .leader import describe_db_error
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
        quiet_scheduler_logs()
        scheduler = BackgroundScheduler(timezone=timezone.utc)
        scheduler.add_job(job, IntervalTrigger(seconds=fleet.settings.reconcile_interval_s), id="lead",
                          max_instances=1, coalesce=True, misfire_grace_time=None)
        scheduler.start()
        try:
            yield
        finally:
            scheduler.shutdown(wait=True)

    def actor(self, command: str) -> str:
        try:
            user = getpass.getuser()
        except (KeyError, OSError):
            user = str(os.getuid())
        return f"{user}@{socket.gethostname()} {command}"

    def addresses(self, fleet: Fleet) -> dict[str, dict[str, Any]]:
        hosts = self.hosts(fleet)
        return {w.id: {"host": w.host, "port": w.port, "user": w.user, "workdir": hosts.workdir(w),
                       "program": w.runner[0]} for w in fleet.workers.values()}

    def fallback_fleet(self, memory: Memory) -> Fleet:
        """While the fleet directory does not validate: the workers as the state file remembers them
        (addresses and the last valid fleet's settings, so cron runs have them too), no strategies.
        Renewing from it keeps what runs running; nothing is planned from it."""
        settings = FleetSettings.from_snapshot(memory.fleet_settings)
        workers = {wid: _remembered_worker(wid, a) for wid, a in memory.addresses.items()}
        return Fleet(root=self.fleet_dir, settings=settings, strategies=MappingProxyType({}),
                     workers=MappingProxyType(dict(sorted(workers.items()))), fleet_hash="", files=())

    def lease_warning(self, fleet: Fleet, memory: Memory) -> str | None:
        """After an apply: that strategies stop when their leases run out, unless a loop renews them."""
        monitor = fleet.settings.monitor
        if not monitor.fencing or not memory.placements or self.loop_renews(fleet.settings, memory):
            return None
        return (f"strategies stop in {monitor.lease_ttl_s:g} s unless `quantlab reconcile` runs: no reconcile "
                "loop has renewed their leases recently (see Fencing in the README).")

    def logs(self, fleet: Fleet, strategy: str, lines: int, follow: bool, since_ms: int | None = None,
             grep: str | None = None) -> "LogOutput":
        """A strategy's output from the worker it runs on (a stopped one's from the worker it last
        ran on, up to its stop): the tail of `lines` lines, then with `follow` what comes next. With
        `since_ms` (epoch ms) and `grep` (a regular expression), only the lines written since then
        that match, filtered on the host."""
        placed = self.read_memory(fleet).placements.get(strategy)
        where = placed.worker if placed is not None else self.last_worker(strategy)
        if where is None:
            if strategy not in fleet.strategies:
                raise UnknownTarget(f"unknown strategy {strategy}: not in the fleet {self.fleet_dir} nor its "
                                    "state (`quantlab status` lists them)")
            raise UnknownTarget(f"{strategy} has never been placed on a worker, so it has no output yet "
                                "(`quantlab plan` says why)")
        worker = fleet.workers.get(where)
        if worker is None:
            raise UnknownTarget(f"{strategy} was on worker {where}, which is not in the fleet any more")
        hosts = self.hosts(fleet)
        agent = hosts.agent_for(worker)
        request: dict[str, Any] = {"workdir": hosts.workdir(worker), "strategy": strategy, "lines": lines,
                                   "follow": follow}
        if since_ms is not None:
            request["since"] = since_ms
        if grep is not None:
            request["grep"] = grep
        if since_ms is not None or grep is not None:
            # Host CPU the search may take: no more than the call waits for (the agent caps it, too).
            request["cpuSeconds"] = max(1, int(fleet.settings.ssh.command_timeout_s)) if not follow else None

        def chunks() -> Iterator[bytes]:
            if follow:
                yield from agent.stream("logs", request)
                return
            done = agent.run("logs", request, fleet.settings.ssh.command_timeout_s)
            if done.returncode != 0:
                raise AgentError(worker.id, f"logs failed: {done.stderr.decode(errors='replace').strip()}")
            yield done.stdout
        return LogOutput(where, placed is None, chunks())

    def unrecorded_host_events(self) -> tuple[list[dict[str, Any]], list[str]]:
        """What the supervisors logged on the hosts since the last run that writes state recorded it
        (restarts, errors, a lease that ran out while no reconcile ran), and the fleet's problems
        when it does not validate (then from the workers the state remembers). Read only: the next
        apply or reconcile records them for good. Nothing from a host that does not answer."""
        fleet, problems = self.fleet_or_fallback()
        try:
            gathered = self.observe(fleet, self.read_memory(fleet))
        except (TransportError, AgentError):
            return [], problems
        return [{**e, "actor": f"supervisor@{e['worker']}"} for e in gathered.host_events], problems

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
        extra = {wid: _remembered_worker(wid, memory.addresses[wid], leaving=True)
                 for wid in gone if wid in memory.addresses}
        if not extra:
            return fleet
        return replace(fleet, workers=MappingProxyType(dict(sorted({**fleet.workers, **extra}.items()))))

    def stored_state(self) -> Memory:
        """The state as stored: nothing rebased, locked or written (`quantlab state pull`)."""
        return self.store.fresh().load()

    def push_state(self, dest: "Controller", lock_timeout: float) -> Memory:
        """Move this state into `dest`, which must hold none yet: placements, leases, restart
        counts, history and checkpoint copies, under this state's lock (nothing acts meanwhile).
        Then this state is marked migrated, so that no controller acts on it any more."""
        stored = self.ledger.read(0.0)
        where = str(dest.store.path)
        if not stored.serial:
            # Most likely the direction is mistaken (`push` names where the state goes, `--state`
            # where it is now): pushing nothing would leave an empty state that looks like a move.
            raise StateError(f"{self.store.path} holds no state (nothing was ever applied with it), so there is "
                             f"nothing to push. To move the state of another backend into it, run `quantlab state "
                             f"push {self.store.path} --state WHERE-IT-IS-NOW`")
        settings = FleetSettings.from_snapshot(stored.fleet_settings)
        with self.ledger.hold(settings.monitor.lease_ttl_s, lock_timeout, "quantlab state push"):
            memory = self.ledger.memory
            existing = dest.store.fresh().load()
            if existing.serial:
                raise StateError(f"{where} already holds a state (lineage {existing.lineage}, serial "
                                 f"{existing.serial}): push only into an empty one")
            dest.store.load()
            with dest.store.writing():
                moved = dest.store.save(memory)
            for event in self.events.read():
                dest.events.append(event)
            for sid in self.checkpoints.names():
                copy = self.checkpoints.load(sid)
                if copy is not None:
                    dest.checkpoints.save(sid, copy)
            self.ledger.update(lambda m: setattr(m, "migrated_to", where))
        dest.record_event({"t": self.clock.wall(), "event": "state-pushed", "actor": self.actor("state push"),
                           "detail": f"from {self.store.path} (lineage {memory.lineage})"})
        return moved

    def fleet_or_fallback(self) -> tuple[Fleet, list[str]]:
        """The working tree's fleet; when it does not validate, the fleet as the state file remembers
        it (see fallback_fleet) and the problems, so that status, logs and events keep working."""
        try:
            return self.load_fleet(), []
        except FleetInvalid as exc:
            return self.fallback_fleet(self.read_memory(None)), [str(p) for p in exc.problems]

    def require_fleet_dir(self) -> None:
        """Nothing is written beside a folder that is not a fleet: a reconcile run by cron from the
        wrong working directory must say so, not start a state of its own there."""
        root = self.fleet_dir
        try:
            os.listdir(root)
        except FileNotFoundError:
            raise StateError(f"{root}: fleet directory not found; pass --fleet DIR or set QUANTLAB_FLEET") from None
        except NotADirectoryError:
            raise StateError(f"{root}: fleet directory is not a directory; pass --fleet DIR or set "
                             "QUANTLAB_FLEET") from None
        except OSError as exc:
            raise StateError(f"{root}: cannot read the fleet directory: {exc.strerror}; fix its permissions") from None
        if os.path.lexists(self.state_path) or self.state_path.parent != root / ".quantlab":
            return
        for _, dirs, files in os.walk(root):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            if any(f.endswith((".yaml", ".yml")) for f in files):
                return
        raise StateError(f"{root} holds no *.yaml fleet files, so no state was created there; pass --fleet DIR "
                         "or set QUANTLAB_FLEET (or run `quantlab init DIR` for a new fleet)")

    # --- reading -------------------------------------------------------------------------------

    def read_memory(self, fleet: Fleet | None) -> Memory:
        """The state as on disk, judged on this process's clock; nothing locked or written."""
        ttl = fleet.settings.monitor.lease_ttl_s if fleet is not None else 0.0
        memory = self.ledger.read(ttl)
        self._lineage = memory.lineage or self._lineage     # what read-only probes ask the hosts about
        return memory

    def observe(self, fleet: Fleet, memory: Memory, *, person: bool = False) -> Gathered:
        """Probe every host without renewing anything (plan, status; `person`: for a person's command,
        with its longer deadline, see FleetSettings.person_probe_deadline_s)."""
        deadline = fleet.settings.person_probe_deadline_s if person else None
        return gather(fleet, memory, self.hosts(fleet), self.clock, deadline_s=deadline)

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
        from apscheduler.schedulers.background import BackgroundScheduler
        from apscheduler.triggers.interval import IntervalTrigger

        def job() -> None:
            try:
                self.renew(fleet, loop=loop)      # (a run that leads keeps its lead with keep_lead)
            except Exception as exc:  # noqa: BLE001 - a round that fails is logged; the next one runs
                self.log(f"renewal round failed: {exc!r}")
        interval = fleet.settings.reconcile_interval_s
        quiet_scheduler_logs()
        scheduler = BackgroundScheduler(timezone=timezone.utc)
        # Two rounds may overlap, as in the daemon: one waiting for a slow host never makes the next late.
        scheduler.add_job(job, IntervalTrigger(seconds=interval), id="renew", max_instances=2, coalesce=True,
                          misfire_grace_time=None,
                          next_run_time=datetime.now(timezone.utc) + timedelta(seconds=interval))
        scheduler.start()
        try:
            yield
        finally:
            scheduler.shutdown(wait=True)

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

    def state_warning(self) -> str | None:
        """A warning when the state folder (leases, checkpoints with positions) could be committed."""
        folder = self.state_path.parent
        if not folder.is_dir() or not tracked_by_git(self.fleet_dir, folder):
            return None
        return (f"{folder} is not ignored by git, and it holds leases and checkpoints (positions): add "
                f"`{folder.name}/` to a .gitignore so that it is never committed")

    def last_worker(self, strategy: str) -> str | None:
        """The worker the history last names for `strategy` (where its stopped copy's log stays)."""
        last = None
        for event in self.events.read():
            if event.get("strategy") == strategy and event.get("outcome") in (None, "ok") and "kind" not in event:
                last = event.get("to") or event.get("worker") or last
        return last

    def record_event(self, event: dict[str, Any]) -> None:
        """Into the events log; a log that cannot be written is said once, and stops nothing. What
        hosts and strategies said (an error naming the proxy it trades through) goes in without
        credentials."""
        from quantlab.core.redact import redact_json

        if not self.events.append(redact_json(event)) and self.events.failure != self._events_failure_said:
            self.log(f"warning: {self.events.failure}; history is not recorded until it is fixed")
            self._events_failure_said = self.events.failure

    def record_host_events(self, gathered: Gathered) -> None:
        for event in gathered.host_events:
            self.record_event({**event, "actor": f"supervisor@{event['worker']}"})

    def check_plan_file(self, saved: Plan, fleet: Fleet, memory: Memory) -> None:
        """A saved plan applies only to the state and fleet it was made from."""
        changed = []
        if saved.lineage != memory.lineage and saved.lineage is not None:
            changed.append(f"the state file is another one (lineage {memory.lineage}, plan has {saved.lineage})")
        # A plan made before any state existed still applies to the state this run has just created
        # (it records the clock it judges leases on): nothing has been decided in it yet.
        unborn = saved.lineage is None and saved.state_serial == 0 and \
            _basis(memory) == _basis(Memory(lineage=memory.lineage))
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
                if saved is not None:
                    raise StateError(f"{held}: a saved plan cannot be handed to it (the state changes every "
                                     "round). Run `quantlab apply` without a plan file, or `quantlab leader "
                                     "step-down` first") from None
                from .handover import apply_through_leader
                return apply_through_leader(self, options, fleet, str(held), shown, confirm, progress)
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
            basis = _basis(self.ledger.memory)
        if not confirm(plan):
            return ApplyResult(fleet, plan, gathered, cancelled=True)
        with self.ledger.hold(ttl, lock_timeout, f"quantlab {command}"):
            if self.load_fleet().fleet_hash != fleet.fleet_hash:
                raise PlanChanged("the fleet files changed while apply waited for an answer; nothing was done. "
                                  "Run apply again to see the new plan")
            if _basis(self.ledger.memory) != basis:
                raise PlanChanged("another run placed, moved or stopped strategies while apply waited for an "
                                  "answer; nothing was done. Run apply again to see the new plan")
            gathered = self.renew(fleet, person=command == "apply")
            if saved is None:
                fresh = self.plan(fleet, self.ledger.memory, gathered, options)
                if _action_keys(fresh) != _action_keys(plan):
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

    def leader_info(self) -> dict[str, Any] | None:
        """Who leads, as this process knows without asking the database (None with the file)."""
        if self.leader is None:
            return None
        return {"holder": self.leader.table.name, "term": self.leader.last_term, "leading": self.leader.leading(),
                "since": self.leader.took_wall}
