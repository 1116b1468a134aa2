"""The health watch: a runner is judged by its heartbeat file alone, on the monotonic clock."""
import os
import time

from .base import DISK_LOW_BYTES, HEARTBEAT_FIELDS, disk_free_bytes, load_checked


def file_identity(path):
    """What changes whenever something replaces, rewrites or touches `path` (never opened): ctime
    changes with any write, chmod or utime, and no process can set it back."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_mode


class HealthWatch(object):
    """The heartbeat file is the runner's only report: its age, error count and init signal. A file
    that cannot be used (not a regular file, too large, not JSON, wrong field types) counts as no
    heartbeat, and the reason for a restart says what was wrong with it.

    A beat's age is measured on the monotonic clock from when this watch saw the file change (to
    within one poll), never from the file's mtime: mtimes are wall-clock, and a step of the host's
    wall clock would make every strategy look stale at once (or fresh for ever)."""

    def __init__(self, sup, started, restarts):
        self.sup = sup
        self.started = started
        self.restarts = restarts
        self.seen = None            # identity of the file as last read
        self.last_good = None       # monotonic time a valid beat (or, first, a bad file) was seen to arrive
        self.bad = None             # what is wrong with the file as it is now
        self.first_beat = None
        self.errors = 0
        self.last_error_at = None
        self.resumed_at = started

    def check(self, now=None):
        """A reason to restart the runner, or None. `now`: the monotonic clock (a test passes its own)."""
        sup = self.sup
        now = time.monotonic() if now is None else now
        if sup.paused:
            self.resumed_at = now
        problem = self.look(now)
        if problem:
            return problem
        if self.last_good is None:
            limit = float(sup.sched.get("initTimeoutSeconds", 60))
            if now - self.started > limit:
                return "st_init did not finish within %gs (initTimeoutSeconds)" % limit
            return None
        age = now - self.last_good
        if not sup.paused and now - self.resumed_at > 3 * sup.heartbeat_s and age > 3 * sup.heartbeat_s:
            free = disk_free_bytes(os.path.dirname(sup.path("heartbeat.json")))
            if free is not None and free < DISK_LOW_BYTES:
                # The runner cannot write its heartbeat: a restart would not help, and would spend
                # the restart budget of a healthy strategy. It runs on under its lease, which fences
                # it if this host cannot be renewed either; the host reports the disk.
                sup.note_problem("the disk is full: heartbeats cannot be written; not restarted for that")
                self.resumed_at = now
                return None
            if self.bad:
                return "no valid heartbeat for %.1fs (%s)" % (age, self.bad)
            return "no heartbeat for %.1fs (more than 3 x heartbeatMs)" % age
        self.maybe_reset_restarts(now)
        return None

    def look(self, now):
        """Read the heartbeat file when it changed; a reason to restart, or None."""
        sup = self.sup
        path = sup.path("heartbeat.json")
        identity = file_identity(path)
        if identity is None:                  # gone (deleted, or a restart's clean slate)
            self.seen = self.bad = None
            return None
        if identity == self.seen:
            return None
        self.seen = identity
        beat, _, problems = load_checked(path, HEARTBEAT_FIELDS)
        if problems:
            self.bad = "; ".join(problems)
            sup.note_problem(self.bad)
            if self.last_good is None:        # the runner wrote something: the no-heartbeat clock starts
                self.last_good = now
            return None
        if beat is None:                      # gone between the look and the read
            self.seen = None
            return None
        self.bad = None
        self.last_good = now
        if self.first_beat is None:
            self.first_beat = now
            if sup.status.get("state") == "starting":
                sup.save_status(state="paused" if sup.paused else "running")
        errors = beat.get("errorCount", 0)
        if errors > self.errors:
            self.errors, self.last_error_at = errors, now
            if errors > sup.sched.get("maxErrors", 10):
                return "errorCount %d > maxErrors %d (last error: %s)" % (
                    errors, sup.sched.get("maxErrors", 10), beat.get("lastError"))
        return None

    def maybe_reset_restarts(self, now):
        """After a healthy stretch (10 heartbeats with no new error) the restart budget refills."""
        sup = self.sup
        if not sup.status.get("restarts") or self.first_beat is None or self.bad:
            return
        healthy_since = max(self.first_beat, self.last_error_at or 0)
        if now - healthy_since >= max(10 * sup.heartbeat_s, 1.0):
            sup.save_status(restarts=0)
            sup.event("recovered", "healthy for %.0fs; restart count reset" % (now - healthy_since))
