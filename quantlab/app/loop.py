"""The reconcile loop, once (for cron) or as a daemon on APScheduler 3.

The daemon runs two jobs (`coalesce=True`):
- `renew`, every interval, up to two at once: a renewal round (probe every host, renew every current
  placement's lease). It waits for nothing but the hosts, each bounded by its probe deadline, and
  takes no state lock, so neither planning, acting, checkpoints, notifications nor another process's
  `apply` can delay it.
- `reconcile`, every interval, one at a time: an act round. It waits for a renewal round that began
  after the last act round ended (so it plans from what its own actions left), takes the state lock,
  plans and carries the plan out on the act lane, while `renew` keeps its own schedule.
- `git-pull`, every --git-pull-interval, one at a time (with --git-pull): fetch the upstream into
  the private mirror, fast-forwards only (see follow.py).
In a git work tree the act round applies the followed ref's newest commit, never uncommitted files
(said once per change), and applies nothing while a rebase, merge or bisect is in progress. A fleet
that does not validate changes nothing: the act round reports it once (and raises `fleet-invalid`)
and skips; renewals go on with the last valid fleet (or, at start, the workers the state file
remembers).
SIGINT/SIGTERM let the running rounds finish, then the daemon exits 0.

With a PostgreSQL state several daemons may run; one leads (leader.py: LoopLeading). A `lead` job every
second renews the leadership row once per interval while this daemon leads, or watches it while it
stands by. A standby's renewal rounds only look (read only: nothing renewed, nothing written), and
it does not act; once it takes over, it runs a renewal round at once, and counts every lease the
previous term may have granted as running for as long as the takeover rule says
(leadership.inherited_leases_end_at: nothing starts elsewhere before those are surely over). On
SIGTERM, or when `quantlab leader step-down` asks, the leader steps down between act rounds, and a
standby takes over within a second.
"""
from __future__ import annotations

import hashlib
import signal
import threading
import time
import traceback
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from typing import Any, Callable

from .controller import Controller
from .timers import quiet_scheduler_logs
from quantlab.edges.execute import Outcome
from quantlab.edges.follow import Follower, source_change
from quantlab.edges.gather import Gathered
from quantlab.edges.gitsource import GitError
from .handover import serve_handed_plans
from .leader import Leader, LoopLeading
from quantlab.core.status import not_answering
from quantlab.core.plan import SOURCE_CHANGE, Plan
from quantlab.core.planner import PlanOptions
from quantlab.core.memory import Memory
from quantlab.core.spec import Fleet, FleetInvalid, FleetSettings
from quantlab.core.spec.models import LEADER_WATCH_S
from quantlab.edges.store import LockHeld, StateError


@dataclass
class Tick:
    ok: bool
    seconds: float
    message: str
    outcomes: list[Outcome] = field(default_factory=list)


def rebalance_options(settings: FleetSettings, memory: Memory, now_ms: int) -> PlanOptions:
    """The loop's plan options: a rebalance when `reconcile.rebalance` is set and its interval has
    passed, leaving alone what the last rebalance moved (nothing moves twice in a row)."""
    every = settings.rebalance_every_s
    last = memory.rebalanced_at
    if every is None or (last is not None and 0 <= now_ms - last < every * 1000):
        return PlanOptions()
    return PlanOptions(rebalance=True, max_moves=settings.rebalance_max_moves, cooldown=frozenset(memory.rebalanced))


def not_deployed(fleet: Fleet, memory: Memory, plan: Plan) -> str | None:
    """The alert for strategies whose running copy is not what the fleet asks for, and which the
    plan leaves so (a change together with a requirement no worker meets): None when there is none."""
    stale = []
    for n in plan.notes:
        spec, placed = fleet.strategies.get(n.strategy), memory.placements.get(n.strategy)
        if spec is not None and placed is not None and placed.spec_hash != spec.spec_hash:
            stale.append(f"{n.strategy} ({n.note})")
    if not stale:
        return None
    return (f"{len(stale)} strateg{'y' if len(stale) == 1 else 'ies'} keep running a previous version because "
            f"the fleet's can be placed nowhere: {'; '.join(stale)}")


class ReconcileLoop(LoopLeading):
    def __init__(self, controller: Controller, log: Callable[[str], None], lock_timeout: float = 0.0,
                 follower: Follower | None = None, allow_source_change: bool = False, leader: Leader | None = None):
        self.ctl = controller
        self.leader = leader                          # PostgreSQL: this daemon's side of the leadership
        controller.leader = leader
        self._looked: Gathered | None = None          # a standby's latest read-only round (hosts' terms)
        self._renewed_lead_at: int | None = None      # mono ms this leader last renewed its row
        self.log = log
        self.lock_timeout = lock_timeout
        self.follower = follower or Follower(controller.fleet_dir, controller.state_path.parent)
        self.allow_source_change = allow_source_change
        self._idle: str = ""                          # why the act round applies nothing, when it does not
        self._said: dict[str, str] = {}               # topic -> what was said last (said once per change)
        self._pull_refused = False
        self._alerts: dict[str, str | None] = {}      # kind -> problem (None: resolved), told by the act round
        self._invalid_reported: str | None = None
        self._skip_reported: str | None = None
        self._interval: float | None = None           # the interval the fleet asks for, as last loaded
        self._fleet: Fleet | None = None              # the last fleet that validated
        self._latest: Gathered | None = None          # the newest renewal round
        self._rounds = threading.Condition()
        self._acted_at = 0                            # mono ms the last act round ended

    # --- the fleet -----------------------------------------------------------------------------

    def _say(self, topic: str, message: str | None) -> None:
        """Log `message` once per change of what there is to say on `topic` (None: nothing now)."""
        if message is not None and self._said.get(topic) != message:
            self.log(message)
        if message is None:
            self._said.pop(topic, None)
        else:
            self._said[topic] = message

    def _settings(self) -> FleetSettings:
        if self._fleet is not None:
            return self._fleet.settings
        return FleetSettings.from_snapshot(self.ctl.read_memory(None).fleet_settings)

    def _load(self, read_only: bool = False) -> Fleet | None:
        """What the loop applies now, or None with the reason in `_idle` (said once per change):
        the fleet does not validate, git cannot be read, or an operation is in progress.
        `read_only`: a standby's look, which writes nothing to the state."""
        f = self.follower
        try:
            paused = f.paused()
            self._say("paused", paused)
            if paused is not None:
                self._idle = f"paused: {paused}"
                return None
            if f.follows_commits and not read_only:
                self._say_uncommitted(f.uncommitted())
            fleet = f.load()
        except GitError as exc:
            self._idle = f"cannot read {f.source.words()}: {exc}"
            self._say("git", f"{self._idle}; nothing is started or stopped, leases of what runs are renewed")
            return None
        except FleetInvalid as exc:
            text = str(exc)
            what = f"fleet {self.ctl.fleet_dir}" + (f" at {f.source.words()}" if f.follows_commits else "")
            if text != self._invalid_reported:
                self.log(f"{what} does not validate; nothing is started or stopped, "
                         f"leases of what runs are renewed:\n{text}")
                self._invalid_reported = text
            problems = len(exc.problems)
            self._idle = f"fleet invalid ({problems} problem(s))"
            self._alerts["fleet-invalid"] = (f"{what} does not validate ({problems} problem(s), the first: "
                                             f"{exc.problems[0]}); nothing is started or stopped until it is fixed")
            return None
        self._say("git", None)
        if self._invalid_reported:
            self.log("fleet validates again")
            self._invalid_reported = None
        self._alerts["fleet-invalid"] = None
        fleet = self.ctl.with_leaving(fleet, self.ctl.read_memory(fleet))   # probed and renewed until left
        self._fleet = fleet
        return fleet

    def _say_uncommitted(self, changes: list[str]) -> None:
        """Said once per change of the uncommitted files, also across runs of `--once` (the state
        remembers a digest of what was said last)."""
        digest = hashlib.sha256("\n".join(changes).encode()).hexdigest()[:16] if changes else None
        if self.ctl.read_memory(None).loop_source.get("uncommitted") == digest:
            return
        if changes:
            shown = ", ".join(line[3:] for line in changes[:8]) + (f" and {len(changes) - 8} more" if len(changes) > 8 else "")
            self.log(f"the working tree has uncommitted changes the loop does not apply (it applies "
                     f"{self.follower.source.words()}; commit them to apply them): {shown}")

        def remember(m: Memory) -> None:
            m.loop_source = {k: v for k, v in {**m.loop_source, "uncommitted": digest}.items() if v is not None}
        self.ctl.ledger.update(remember)

    def pull(self) -> bool:
        """Fetch the upstream (--git-pull); False when it failed or was refused (said once)."""
        f = self.follower
        try:
            pulled = f.pull(min(60.0, max(10.0, 2 * self._settings().reconcile_interval_s)))
        except GitError as exc:
            self._say("pull", f"git pull from {f.source.ref} failed: {exc}; the loop applies what it pulled before")
            return False
        self._pull_refused = pulled.refused is not None
        if pulled.refused is not None:
            self._say("pull", f"git pull from {f.source.ref} refused: {pulled.refused}")
            self._alerts["git-pull-refused"] = f"{f.source.ref}: {pulled.refused}"
            return False
        self._say("pull", None)
        self._alerts["git-pull-refused"] = None
        return True

    def current_fleet(self) -> Fleet:
        """The fleet the loop applies now (the fleet page fetches logs through it; --once keeps its lead
        with it)."""
        fleet = self._fleet
        return fleet if fleet is not None else self.ctl.fallback_fleet(self.ctl.read_memory(None))

    def _renewal_fleet(self) -> tuple[Fleet, bool]:
        """What renewal rounds probe: the last fleet that validated, else the state's memory of it."""
        if self._fleet is not None:
            return self._fleet, False
        return self.ctl.fallback_fleet(self.ctl.ledger.memory), True

    # --- rounds --------------------------------------------------------------------------------

    def renew_round(self) -> Gathered:
        """Renewals need no state lock (see ledger.py): they go on while another process acts."""
        ttl = self._fleet.settings.monitor.lease_ttl_s if self._fleet is not None else 0.0
        self.ctl.ledger.refresh(ttl)
        fleet, fallback = self._renewal_fleet()
        gathered = self.ctl.renew(fleet, loop=True, fallback=fallback)
        self._say("deferred", None if self.ctl.ledger.deferred is None else
                  f"the state cannot be written ({self.ctl.ledger.deferred}); leases are renewed from memory for as "
                  "long as this daemon may lead, and nothing is started or stopped until it is back")
        self._skip_reported = None
        with self._rounds:
            # Rounds may overlap (a slow host holds one open past the next one's start): keep the newest.
            if self._latest is None or gathered.started >= self._latest.started:
                self._latest = gathered
            self._rounds.notify_all()
        return gathered

    def _fresh_round(self, timeout: float) -> Gathered | None:
        """The first renewal round that began after the last act round ended."""
        with self._rounds:
            self._rounds.wait_for(lambda: self._latest is not None and self._latest.started >= self._acted_at,
                                  timeout)
            latest = self._latest
        return latest if latest is not None and latest.started >= self._acted_at else None

    def act_round(self, fleet: Fleet | None, gathered: Gathered, started: float) -> Tick:
        settings = fleet.settings if fleet is not None else self._settings()
        for kind, problem in list(self._alerts.items()):
            self.ctl.raise_alert(kind, settings, problem)
        if fleet is None:
            # Nothing was reconciled (an invalid fleet, git unreadable, a rebase in progress): a failed
            # round, so that `--once` under cron exits 1 and its wrapper tells someone.
            down = sorted(gathered.silent)
            return self._done(started, False, f"{self._idle}; renewed leases on {len(gathered.renewed)} workers, "
                                              f"{not_answering(down) if down else '0 not answering'}")
        self._interval = fleet.settings.reconcile_interval_s       # the main thread follows it
        memory = self.ctl.ledger.memory
        options = rebalance_options(fleet.settings, memory, self.ctl.clock.mono())
        source = self.follower.source
        if not self.allow_source_change:
            options = replace(options, source_change=source_change(memory.loop_source, source))
        if self.leader is not None and self._serve_handed(fleet, gathered):
            # What runs changed since this round's observation: the next act round plans from a new one.
            return self._done(started, True, "carried out the plans handed over by apply")
        result = self.ctl.apply(options, command="reconcile", fleet=fleet, gathered=gathered,
                                lock_timeout=self.lock_timeout, background_renewals=False)
        held = any(b.guard == SOURCE_CHANGE for b in result.plan.blocked)
        moved = [o.action.strategy for o in result.outcomes if o.ok and o.action.cause == "rebalance"]
        now, wall = self.ctl.clock.mono(), self.ctl.clock.wall()

        synced = {**source.key(), "revision": fleet.revision}
        new_source = not held and {k: memory.loop_source.get(k) for k in ("kind", "ref", "revision")} != \
            {k: synced.get(k) for k in ("kind", "ref", "revision")}

        def remember(m: Memory) -> None:
            if options.rebalance:
                m.rebalanced_at, m.rebalanced = now, moved
            if new_source:                             # the source (now confirmed) and since when
                m.loop_source = {**synced, "at": wall, **{k: v for k, v in m.loop_source.items() if k == "uncommitted"}}
        if options.rebalance or new_source:
            self.ctl.ledger.update(remember)
        self.ctl.raise_alert("not-deployed", fleet.settings, not_deployed(fleet, self.ctl.ledger.memory, result.plan))
        tick = self._summary(started, gathered, result.plan, result.outcomes)
        return replace(tick, ok=tick.ok and not self._pull_refused)

    def _serve_handed(self, fleet: Fleet, gathered: Gathered) -> int:
        """Plans handed over by `apply`; a database that cannot be asked holds none up (said once)."""
        try:
            carried = serve_handed_plans(self.ctl, fleet, gathered, self.lock_timeout)
        except StateError as exc:
            self._say("handed", f"plans handed over by apply cannot be read now: {exc}")
            return 0
        self._say("handed", None)
        return carried

    def _summary(self, started: float, gathered: Gathered, plan: Plan, outcomes: list[Outcome]) -> Tick:
        failed = [o for o in outcomes if not o.ok]
        down = sorted(gathered.silent)
        for o in outcomes:
            mark = "ok" if o.ok else f"FAILED: {o.detail}"
            self.log(f"  {o.action.action} {o.action.strategy} {o.action.worker or o.action.target}: {mark}")
        for b in plan.blocked:
            self.log(f"  blocked ({b.guard}): {b.reason}")
            for a in b.actions:
                self.log(f"    held: {a.action} {a.strategy} on {a.worker or a.source}: {a.reason}")
        # What the plan cannot do and why (a change no worker can take, a strategy in error): said
        # once per change, not every round.
        self._say("notes", "\n".join(f"  note: {n.strategy}{f' on {n.worker}' if n.worker else ''}: {n.note}"
                                     for n in plan.notes) or None)
        unrecorded = self.ctl.events.failure
        message = (f"probed {len(gathered.observed.workers)} workers in {gathered.seconds:.2f}s"
                   f"{f' ({not_answering(down)})' if down else ''}; {plan.summary()}"
                   f"{f' {len(failed)} failed.' if failed else ''}{f' {unrecorded}.' if unrecorded else ''}")
        return self._done(started, not failed and not plan.refused and not unrecorded, message, outcomes)

    def _done(self, started: float, ok: bool, message: str, outcomes: list[Outcome] | None = None) -> Tick:
        tick = Tick(ok, time.monotonic() - started, message, outcomes or [])
        self.log(f"tick {tick.seconds:.2f}s: {message}")
        return tick

    def _say_skipped(self, message: str) -> None:
        if message != self._skip_reported:          # once per holder, not every interval
            self.log(message)
            self._skip_reported = message

    # --- once (cron) ---------------------------------------------------------------------------

    def tick(self) -> Tick:
        """One renewal round, then one act round, with renewals on their own timer while it acts.
        With --git-pull the upstream is fetched after the renewal round (a slow upstream never
        delays it), and a second round probes the workers a pulled commit adds."""
        started = time.monotonic()
        try:
            self.ctl.require_fleet_dir()
            if self.leader is None:
                return self._tick(started)
            busy = self._lead_once()
            if busy is not None:
                return self._done(started, True, busy)
            # The lead is renewed on a timer of its own from here (the round may wait for hosts).
            with self.ctl.keep_lead(self.current_fleet(), renew_leases=False):
                return self._tick(started)
        except StateError as exc:
            return self._done(started, False, f"error: {exc}")
        finally:
            self.step_down()

    def _tick(self, started: float) -> Tick:
        mirror = self.follower.mirror
        try:
            fleet = self._load() if mirror is None or self.follower.pulled_before() else None
            gathered = self.renew_round()
            if mirror is not None:
                self.pull()
                pulled = self._load()
                if pulled is None:
                    # The newest commit cannot be applied: as in the daemon, nothing is planned from
                    # the one before it either (the round reports why and fails).
                    fleet = None
                elif fleet is None or pulled.fleet_hash != fleet.fleet_hash:
                    fleet = pulled
                    if set(fleet.workers) - set(gathered.observed.workers):
                        gathered = self.renew_round()
            if fleet is None:
                return self.act_round(None, gathered, started)
            with self.ctl.renewing(fleet, loop=True):
                return self.act_round(fleet, gathered, started)
        except LockHeld as exc:
            return self._done(started, False, f"renewed leases, then skipped acting: {exc}")
        except StateError as exc:
            return self._done(started, False, f"error: {exc}")

    # --- daemon ---------------------------------------------------------------------------------

    def _renew_job(self) -> None:
        try:
            if not self.leads():
                self._standby_round()
                return
            self._say("standby", None)
            self.renew_round()
        except StateError as exc:
            # Renewals are booked on disk before they are sent: without a writable state, none goes out.
            self._say_skipped(f"renewal round failed, nothing renewed: {exc}")
        except Exception:                      # noqa: BLE001 - one bad round must not end the daemon
            self.log("renewal round failed unexpectedly:\n" + traceback.format_exc())

    def _act_job(self) -> None:
        started = time.monotonic()
        if self.leader is not None:
            if self.leader.leading() and self.leader.handover_asked:
                self.step_down()                 # between act rounds: nothing of ours is half done
            if not self.leader.leading():
                try:
                    self._load(read_only=True)   # the fleet a takeover would renew
                except StateError as exc:
                    self._say("standby-load", f"standing by, cannot read the state: {exc}")
                return
        try:
            fleet = self._fleet
            settings = fleet.settings if fleet is not None else None
            wait_s = 2 * (settings.reconcile_interval_s + settings.probe_deadline_s + settings.ssh.connect_timeout_s) \
                if settings else 60.0
            gathered = self._fresh_round(wait_s)
            if gathered is None:
                self._done(started, False, "skipped: no renewal round has answered since the last act round")
                return
            self.act_round(self._load(), gathered, started)
        except LockHeld as exc:
            self._say_skipped(f"act round skipped: {exc}")
        except StateError as exc:
            self._done(started, False, f"error: {exc}")
        except Exception:                      # noqa: BLE001
            self.log("act round failed unexpectedly:\n" + traceback.format_exc())
        finally:
            self._acted_at = self.ctl.clock.mono()

    def _follow_interval(self, scheduler: Any, current: float) -> float:
        """Reschedule both jobs when the fleet's interval changed. Called from the main thread only:
        a job that calls into the scheduler can deadlock with its shutdown."""
        seconds = self._interval
        if seconds is None or seconds == current:
            return current
        from apscheduler.triggers.interval import IntervalTrigger
        for job_id in ("renew", "reconcile"):
            scheduler.reschedule_job(job_id, trigger=IntervalTrigger(seconds=seconds))
        self.log(f"reconcile interval is now {seconds:g}s")
        return seconds

    def _pull_job(self) -> None:
        try:
            self.pull()
        except Exception:                      # noqa: BLE001 - a failed pull must not end the daemon
            self.log("git pull failed unexpectedly:\n" + traceback.format_exc())

    def run_forever(self, interval: float, stop: threading.Event | None = None, pull_interval: float = 60.0) -> None:
        from apscheduler.schedulers.background import BackgroundScheduler
        from apscheduler.triggers.interval import IntervalTrigger

        quiet_scheduler_logs()

        stop = stop or threading.Event()
        self._load()
        scheduler = BackgroundScheduler(timezone=timezone.utc)
        now = datetime.now(timezone.utc)
        # Two renewal rounds may run at once: a round still waiting for a slow host must not make the
        # next one late for the others (each host has at most one probe outstanding anyway).
        for job_id, fn, first, overlap in (("renew", self._renew_job, now, 2),
                                           ("reconcile", self._act_job, now + timedelta(milliseconds=10), 1)):
            scheduler.add_job(fn, IntervalTrigger(seconds=interval), id=job_id, max_instances=overlap,
                              coalesce=True, next_run_time=first, misfire_grace_time=None)
        if self.leader is not None:            # the row, watched or renewed, off the renewal lane
            scheduler.add_job(self._lead_job, IntervalTrigger(seconds=LEADER_WATCH_S), id="lead", max_instances=1,
                              coalesce=True, next_run_time=now, misfire_grace_time=None)
        if self.follower.mirror is not None:   # fetching waits on the network: its own job, off both lanes
            scheduler.add_job(self._pull_job, IntervalTrigger(seconds=pull_interval), id="git-pull",
                              max_instances=1, coalesce=True, next_run_time=now, misfire_grace_time=None)
        previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, lambda *_: stop.set())
        self.log(f"reconcile loop started: every {interval:g}s on {self.ctl.fleet_dir}, applying "
                 f"{self.follower.source.words()}; stop with Ctrl-C or SIGTERM")
        scheduler.start()
        try:
            while not stop.wait(0.5):
                interval = self._follow_interval(scheduler, interval)
            self.log("stopping: letting the running rounds finish")
        finally:
            scheduler.shutdown(wait=True)
            self.step_down()                  # a standby takes over within a second, not a lease
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.ctl.close()
        self.log("reconcile loop stopped")
