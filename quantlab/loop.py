"""The reconcile loop: gather → plan → apply, once (for cron) or every interval on APScheduler 3.

One job, max_instances=1 and coalesce=True, so ticks never overlap or pile up. SIGINT/SIGTERM let the
running tick finish, then the daemon exits 0. A fleet that fails validation is reported and skipped:
what runs keeps running, and its leases keep being renewed.
"""
from __future__ import annotations

import signal
import threading
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable

from .controller import Controller
from .execute import Outcome
from .planner import PlanOptions
from .render import plan_summary
from .spec import FleetInvalid
from .store import LockHeld, StateError


@dataclass
class Tick:
    ok: bool
    seconds: float
    message: str
    outcomes: list[Outcome] = field(default_factory=list)


class ReconcileLoop:
    def __init__(self, controller: Controller, log: Callable[[str], None], lock_timeout: float = 0.0):
        self.ctl = controller
        self.log = log
        self.lock_timeout = lock_timeout
        self._invalid_reported: str | None = None
        self._scheduler = None

    def tick(self) -> Tick:
        started = time.monotonic()
        try:
            with self.ctl.store.lock(self.lock_timeout, command="quantlab reconcile"):
                return self._tick(started)
        except LockHeld as exc:
            return self._done(started, False, f"skipped: {exc}")
        except StateError as exc:
            return self._done(started, False, f"error: {exc}")

    def _tick(self, started: float) -> Tick:
        memory = self.ctl.store.load()
        try:
            fleet = self.ctl.load_fleet()
        except FleetInvalid as exc:
            text = str(exc)
            if text != self._invalid_reported:        # say it once per distinct set of problems
                self.log(f"fleet {self.ctl.fleet_dir} does not validate; nothing is started or stopped, "
                         f"leases of what runs are renewed:\n{text}")
                self._invalid_reported = text
            gathered, _ = self.ctl.keep_alive(memory)
            down = sum(1 for s in gathered.observed.workers.values() if not s.reachable)
            return self._done(started, False, f"fleet invalid ({len(exc.problems)} problems); "
                                              f"renewed leases on {len(gathered.renewed)} workers, {down} not answering")
        if self._invalid_reported:
            self.log("fleet validates again")
            self._invalid_reported = None
        self._follow_interval(fleet.settings.reconcile_interval_s)
        gathered, memory = self.ctl.gather_and_remember(fleet, memory, loop=True)
        plan = self.ctl.plan(fleet, memory, gathered, PlanOptions())
        memory, outcomes = self.ctl.execute(fleet, memory, plan, "reconcile")
        failed = [o for o in outcomes if not o.ok]
        down = sum(1 for s in gathered.observed.workers.values() if not s.reachable)
        words = plan_summary(plan)
        for o in outcomes:
            mark = "ok" if o.ok else f"FAILED: {o.detail}"
            self.log(f"  {o.action.action} {o.action.strategy} {o.action.worker or o.action.target}: {mark}")
        for b in plan.blocked:
            self.log(f"  blocked ({b.guard}): {b.reason}")
        message = (f"probed {len(gathered.observed.workers)} workers in {gathered.seconds:.2f}s"
                   f"{f' ({down} not answering)' if down else ''}; {words}"
                   f"{f' {len(failed)} failed.' if failed else ''}")
        return self._done(started, not failed and not plan.blocked, message, outcomes)

    def _done(self, started: float, ok: bool, message: str, outcomes: list[Outcome] | None = None) -> Tick:
        tick = Tick(ok, time.monotonic() - started, message, outcomes or [])
        self.log(f"tick {tick.seconds:.2f}s: {message}")
        return tick

    # --- daemon ---------------------------------------------------------------------------------

    def _job(self) -> None:
        try:
            self.tick()
        except Exception:                      # noqa: BLE001 - one bad tick must not end the daemon
            self.log("tick failed unexpectedly:\n" + traceback.format_exc())

    def _follow_interval(self, seconds: float) -> None:
        job = self._scheduler.get_job("reconcile") if self._scheduler is not None else None
        if job is not None and job.trigger.interval.total_seconds() != seconds:
            from apscheduler.triggers.interval import IntervalTrigger
            job.reschedule(IntervalTrigger(seconds=seconds))
            self.log(f"reconcile interval is now {seconds:g}s")

    def run_forever(self, interval: float, stop: threading.Event | None = None) -> None:
        from apscheduler.schedulers.background import BackgroundScheduler
        from apscheduler.triggers.interval import IntervalTrigger

        stop = stop or threading.Event()
        scheduler = BackgroundScheduler(timezone=timezone.utc)
        self._scheduler = scheduler
        scheduler.add_job(self._job, IntervalTrigger(seconds=interval), id="reconcile", max_instances=1,
                          coalesce=True, next_run_time=datetime.now(timezone.utc), misfire_grace_time=None)
        previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, lambda *_: stop.set())
        self.log(f"reconcile loop started: every {interval:g}s on {self.ctl.fleet_dir}; stop with Ctrl-C or SIGTERM")
        scheduler.start()
        try:
            while not stop.wait(0.5):
                pass
            self.log("stopping: letting the running tick finish")
        finally:
            scheduler.shutdown(wait=True)
            self._scheduler = None
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.ctl.close()
        self.log("reconcile loop stopped")
