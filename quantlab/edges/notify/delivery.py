"""What every sink shares: one destination's bounded queue and the daemon thread that drains it
(Sink), and the deadline of one delivery (Watchdog).

A destination (webhook.Webhook, command.Command, chats.Chat) says its name, how a log line names
its target, which secrets to scrub from an error, why a delivery that ran out of time failed, and
how to deliver one notice's JSON body within a Watchdog. The Sink does the rest, the same for all:
overflow (the oldest routine notice goes, alerts are kept), the "notices-dropped" notice that
follows, one log line per notice not delivered, and the on_failure count.
"""
from __future__ import annotations

import json
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

# Kinds that are alerts (told once when raised, once when they clear): kept when a queue overflows.
# (A failover brake is told as a guard-blocked alert.)
ALERT_KINDS = frozenset({"worker-offline", "action-failed", "guard-blocked", "resolved", "foreign-state",
                         "fleet-invalid", "instance-problem", "renew-refused", "git-pull-refused", "not-deployed",
                         "fence-anomaly", "disk-full"})

REASON_SHOWN_CHARS = 400
# The watchdog ends a delivery at its deadline; these timeouts, this much later, only back it up
# (a socket read, a command's descendant that left its group and still holds our stderr pipe).
BACKSTOP_S = 1.0

Log = Callable[[str], None]


# --- one queue and its thread -------------------------------------------------------------------

@dataclass
class Job:
    notice: dict[str, Any]
    target: Any          # the webhook URL or the command's argv, as configured when submitted


class Sink:
    """One destination's bounded queue and the daemon thread that drains it, one job at a time."""

    def __init__(self, destination: Any, capacity: int, deadline_s: float, log: Log,
                 on_failure: Callable[[str], None] = lambda sink: None):
        self._destination = destination
        self._on_failure = on_failure
        self._capacity = max(1, capacity)
        self._deadline_s = deadline_s
        self._log = log
        self._queue: deque[Job] = deque()
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None
        self._busy = False                      # a job is being delivered
        self._current: Watchdog | None = None   # its watchdog, so that stop() can cut it short
        self._stopped = False
        self.dropped = 0
        self._unreported: list[Job] = []        # dropped since the last "notices-dropped" notice

    # Called by the notifier (any thread).

    def put(self, notice: dict[str, Any], target: Any) -> None:
        with self._changed:
            if self._stopped:
                return
            if len(self._queue) >= self._capacity:
                self._drop_one()
            self._queue.append(Job(notice, target))
            self._start_thread()
            self._changed.notify_all()

    def wait_idle(self, deadline: float) -> bool:
        with self._changed:
            return self._changed.wait_for(self._idle, timeout=max(0.0, deadline - time.monotonic()))

    def stop(self) -> None:
        with self._changed:
            self._stopped = True
            left, self._queue = len(self._queue) + (1 if self._unreported else 0), deque()
            self._unreported = []
            current = self._current
            self._changed.notify_all()
        if current is not None:
            current.expire("cut short: the notifier is closing")
        if left:
            log_safely(self._log, f"notify: {self._destination.name}: {left} notices not sent (closing)")

    def join(self, deadline: float) -> None:
        if self._thread is not None:
            self._thread.join(max(0.0, deadline - time.monotonic()))

    # Under self._changed.

    def _idle(self) -> bool:
        return not self._queue and not self._busy and not self._unreported

    def _start_thread(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._drain, name=f"quantlab-notify-{self._destination.name}",
                                            daemon=True)
            self._thread.start()

    def _drop_one(self) -> None:
        """Make room: the oldest routine notice goes; the oldest alert only when all are alerts."""
        victim = next((job for job in self._queue if job.notice.get("kind") not in ALERT_KINDS), self._queue[0])
        self._queue.remove(victim)
        self.dropped += 1
        if not self._unreported:
            log_safely(self._log, f"notify: the {self._destination.name} queue is full ({self._capacity}); "
                                  "dropping the oldest routine notices")
        self._unreported.append(victim)

    def _take(self) -> tuple[Job, Watchdog] | None:
        """The next job (None once stopped), with the watchdog that bounds its delivery."""
        while not self._stopped and not self._queue and not self._unreported:
            self._changed.wait()
        if self._stopped:
            return None
        if self._unreported and len(self._queue) < self._capacity:
            job = self._dropped_notice()
        else:
            job = self._queue.popleft()
        self._busy = True
        self._current = Watchdog(self._deadline_s)
        return job, self._current

    def _dropped_notice(self) -> Job:
        newest = self._unreported[-1]
        count, self._unreported = len(self._unreported), []
        notice = {"t": newest.notice.get("t", int(time.time() * 1000)), "kind": "notices-dropped",
                  "message": f"{count} notices were dropped (the notification queue was full)"}
        return Job(notice, newest.target)

    # The sink's own thread.

    def _drain(self) -> None:
        while True:
            with self._changed:
                taken = self._take()
            if taken is None:
                return
            self._deliver(*taken)
            with self._changed:
                self._busy, self._current = False, None
                self._changed.notify_all()

    def _deliver(self, job: Job, watchdog: Watchdog) -> None:
        destination = self._destination
        try:
            body = json.dumps(job.notice, sort_keys=True, default=str).encode()
            with watchdog:
                destination.deliver(job.target, body, watchdog)
        except Exception as exc:  # noqa: BLE001 - every failure is one log line, never a crash
            if watchdog.expired:
                reason = watchdog.why or destination.timeout_reason(watchdog.seconds)
            else:
                reason = _scrub(f"{type(exc).__name__}: {exc}", destination.secrets(job.target))
            log_safely(self._log, f"notify: {destination.name} {destination.where(job.target)}: "
                                  f"{job.notice.get('kind', 'a')} notice not delivered: {reason}")
            _quietly(lambda: self._on_failure(destination.name))


# --- the deadline of one delivery ---------------------------------------------------------------

class Watchdog:
    """Ends one delivery at its deadline whatever it is blocked in: at expiry (or on stop) a timer
    runs the registered cleanups — shut a socket down, kill a process group — which wake the
    delivering thread. Used as a context manager around the delivery."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.deadline = time.monotonic() + seconds
        self.expired = False
        self.why: str | None = None            # set when cut short before the deadline
        self._cleanups: list[Callable[[], None]] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self.expire)
        self._timer.daemon = True

    def __enter__(self) -> Watchdog:
        self._timer.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._timer.cancel()

    def remaining(self) -> float:
        return max(0.0, self.deadline - time.monotonic())

    def on_expiry(self, cleanup: Callable[[], None]) -> None:
        with self._lock:
            if not self.expired:
                self._cleanups.append(cleanup)
                return
        _quietly(cleanup)          # already over: clean up at once

    def expire(self, why: str | None = None) -> None:
        with self._lock:
            if self.expired:
                return
            self.expired, self.why = True, why
            cleanups, self._cleanups = self._cleanups, []
        for cleanup in cleanups:
            _quietly(cleanup)

    def check(self) -> None:
        if self.expired:
            raise TimeoutError("deadline reached")


# --- small helpers ---------------------------------------------------------------------------------

def _scrub(text: str, secrets: list[str]) -> str:
    """One log line: no token, no line break (a server's garbage ends in one), not too long."""
    for secret in secrets:
        text = text.replace(secret, "<redacted>")
    return " ".join(text.split())[:REASON_SHOWN_CHARS]


def _quietly(cleanup: Callable[[], None]) -> None:
    try:
        cleanup()
    except Exception:  # noqa: BLE001 - a socket already closed, a process already gone
        pass


def log_safely(log: Log, line: str) -> None:
    try:
        log(line)
    except Exception:  # noqa: BLE001 - a broken log must not stop the sink's thread
        pass
