"""`supervise`: the keeper and the supervisor of one instance — restarts with backoff, the health
watch of heartbeats, the output log, and the lease that fences the strategy."""
import json
import os
import select
import signal
import stat
import subprocess
import sys
import time

from .base import (
    CONTROL_FIELDS,
    ENV_PASSTHROUGH,
    LATE_FENCE,
    LEASE_FIELDS,
    PROBLEM_CAP,
    boot_id,
    boottime,
    clip,
    describe_error,
    load_checked,
    now_ms,
    remove_entry,
    write_json,
)
from .protocol import FINAL_STATES, proof_matches
from .procs import (
    PID_IDENTITY,
    become_subreaper,
    descendants,
    die_with_parent,
    end_descendants,
    keep_secrets,
    live_pid,
    lock_instance,
    log_event,
    plain_pid,
    prctl_function,
    process_start_time,
    process_table,
    reap_children,
    signal_group,
    write_pid,
)
from .health import HealthWatch, file_identity
from .output import OutputLog
from .probe import load_spec, read_status

# --- supervisor ------------------------------------------------------------------------------------

FORWARDED_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2")    # the keeper passes these on
IDLE_POLL_S = 2.0                      # the longest the supervisor's loop sleeps (a quarter heartbeat else)
SUPERVISOR_SIGNALS = FORWARDED_SIGNALS + ("SIGHUP",)
MAX_NOTED_PROBLEMS = 20                # per supervisor: a strategy writing ever-new garbage cannot flood


def signal_numbers(names):
    return [getattr(signal, name) for name in names]


class Supervisor(object):
    """Runs one strategy's runner, judges its health from the heartbeat file, restarts it in place
    with backoff, stops it when its lease runs out (fencing), and ends every process the strategy
    started before each restart and before it ends itself."""

    def __init__(self, idir, key=None):
        self.dir = idir
        self.spec = load_spec(self.path("spec.json"))
        # The copy's lease key (hex), from `start` through our stdin; only renewals proved with it
        # extend the lease. None for a start that gave none (which then takes no renewal at all).
        self.key = key
        self.auth = bool(self.spec.get("leaseAuth"))
        self.status, _ = read_status(idir, [])
        self.sched = self.spec["scheduling"]
        self.heartbeat_s = self.spec["heartbeatMs"] / 1000.0
        # How often the loop looks when nothing wakes it: signals (stop, pause) wake it at once through
        # the wake-up pipe, and a running lease's end too (see wait_s), so this only paces the health
        # watch and the upkeep of files; it is most of an idle supervisor's CPU.
        self.poll = max(0.02, min(IDLE_POLL_S, self.heartbeat_s / 4))
        self.wake = None
        self.ttl = float(self.spec.get("leaseTtlSeconds") or 0)
        self.paused = bool(self.spec.get("paused"))
        self.stop_reason = None
        self.term_received = False
        self.pause_change = None
        # Fail closed: the lease granted at start holds until a renewal for this very epoch extends it,
        # and never past the start request's not-after + TTL.
        self.lease_deadline = None
        if self.ttl > 0:
            limit = (self.spec.get("notAfter") or {}).get("boottime")
            self.lease_deadline = boottime() + self.ttl
            if isinstance(limit, (int, float)):
                self.lease_deadline = min(self.lease_deadline, limit + self.ttl)
        self.lease_identity = None
        self.proc = None
        self.log = None
        self.keeper = None                 # our parent's pid when it keeps us (see Keeper)
        self.containment = "process-group"
        self.noted = set()
        self.status_identity = None
        self.pid_files_seen = {}           # pid file -> what it was when last found right (tend_pid_file)
        self.next_tend = time.monotonic()      # the first upkeep at once: supervisor.pid may be missing

    def path(self, name):
        return os.path.join(self.dir, name)

    def save_status(self, **fields):
        self.status.update(fields)
        self.status["paused"] = self.paused
        try:
            write_json(self.path("status.json"), self.status)
        except OSError as exc:
            self.note_problem("status.json: cannot write it: %s" % (exc.strerror or exc))
            return
        self.status_identity = file_identity(self.path("status.json"))

    def event(self, name, detail=None, **extra):
        """An events.log line. It is history: a full disk, or an events.log the strategy made
        unwritable, must never change what the supervisor does (supervisor.log says so instead)."""
        try:
            log_event(self.dir, name, detail, epoch=self.spec.get("epoch"), **extra)
        except OSError as exc:
            sys.stderr.write("quantlab-supervisor: events.log: cannot write %s: %s\n" % (name, describe_error(exc)))
            sys.stderr.flush()

    def note_problem(self, problem):
        """Say once (per distinct problem) what is wrong with a file of the instance: in events.log
        and as status.json's reason."""
        problem = clip(problem, PROBLEM_CAP)
        if problem in self.noted or len(self.noted) >= MAX_NOTED_PROBLEMS:
            return
        self.noted.add(problem)
        self.event("instance-problem", problem)
        self.save_status(reason=problem)

    # signals only set flags; the loop acts on them (a handler never reads a file: it could block)
    def on_term(self, *_):
        self.term_received = True

    def on_pause(self, *_):
        self.pause_change = True

    def on_resume(self, *_):
        self.pause_change = False

    def stop_requested(self):
        """Why the supervisor must stop now, or None."""
        if self.stop_reason is None and self.term_received:
            self.stop_reason = self.why_stopped()
        return self.stop_reason

    def why_stopped(self):
        control, _, problems = load_checked(self.path("control.json"), CONTROL_FIELDS)
        for problem in problems:
            self.note_problem(problem)
        if control and control.get("stop"):
            return control["stop"]
        if self.keeper is not None and os.getppid() != self.keeper:
            return ("its keeper process %d is gone (killed?): stopped so that nothing runs unsupervised"
                    % self.keeper)
        return "stopped by signal"

    def run(self):
        signal.signal(signal.SIGTERM, self.on_term)
        signal.signal(signal.SIGINT, self.on_term)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGUSR1, self.on_pause)
        signal.signal(signal.SIGUSR2, self.on_resume)
        self.wake = wake_up_pipe()
        # The keeper blocked these across its fork, so none could arrive before the handlers above.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, signal_numbers(SUPERVISOR_SIGNALS))
        self.log = OutputLog(self.path("output.log"))
        self.save_status(containment=self.containment)
        self.tend_files()                  # supervisor.pid at once (`start` may have failed to write it)
        restarts = int(self.status.get("restarts", 0))
        while True:
            # Fail closed: a runner life starts only under a live lease (a restart delay may have
            # outlasted it: wait() looks only while it sleeps).
            if self.lease_expired():
                self.finish(self.lease_reason("no runner was started"), event="lease-expired")
                return
            verdict, detail = self.run_runner(restarts)
            if verdict == "final":
                return
            if self.lease_expired():       # the last life's stop outlasted the lease: no restart
                self.finish(self.lease_reason("no runner was started after: %s" % detail), event="lease-expired")
                return
            restarts = int(self.status.get("restarts", 0))
            if not self.sched.get("autoRestart", True) or restarts >= self.sched.get("maxRestarts", 5):
                why = "%s; gave up after %d restarts" % (detail, restarts)
                self.event("error", why)       # before the status: whoever sees "error" finds its event
                self.save_status(state="error", reason=why, stoppedAt=now_ms())
                return
            restarts += 1
            delay = self.backoff(restarts)
            self.event("restart", "%s; restart %d in %.1fs" % (detail, restarts, delay), restarts=restarts)
            self.save_status(state="restarting", restarts=restarts, reason=detail, lastRestartAt=now_ms())
            if not self.wait(delay):
                return

    def backoff(self, restarts):
        return restart_delay(self.sched, restarts, random_jitter())

    def wait(self, seconds):
        """Sleep between restarts, still honouring stop and the lease. False when it must end."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.stop_requested() or self.lease_expired():
                requested = self.stop_requested()
                if requested:
                    self.finish(requested)
                else:
                    self.finish(self.lease_reason(), event="lease-expired")
                return False
            self.apply_pause()
            reap_children()
            self.tend_files()
            self.sleep(min(self.wait_s(), deadline - time.monotonic()))
        return True

    def wait_s(self):
        """How long the loop may sleep: a poll, or less when the lease it knows ends sooner."""
        if self.ttl <= 0 or self.lease_deadline is None:
            return self.poll
        return max(0.0, min(self.poll, self.lease_deadline - boottime() + 0.005))

    def sleep(self, seconds):
        """Up to `seconds`, or until a signal arrives (its handler wrote to the wake-up pipe)."""
        if seconds <= 0:
            return
        if self.wake is None:
            time.sleep(seconds)
            return
        try:
            ready, _, _ = select.select([self.wake], [], [], seconds)
        except (OSError, ValueError, InterruptedError):
            return
        if ready:
            drain(self.wake)

    def finish(self, reason, exit_code=None, event="stopped"):
        """The supervisor's end: `event` is "lease-expired" when its lease ran out, else "stopped"."""
        state = "stopped"
        self.event(event, reason)
        self.save_status(state=state, reason=reason, stoppedAt=now_ms(), exitCode=exit_code)
        if self.log is not None:       # `quantlab logs` says why the output ends here
            stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            self.log.write(("%s quantlab-supervisor: stopped: %s\n" % (stamp, reason)).encode())

    def apply_pause(self):
        if self.pause_change is None:
            return
        self.paused, self.pause_change = self.pause_change, None
        if self.proc is not None and self.proc.poll() is None:
            signal_group(self.proc.pid, signal.SIGUSR1 if self.paused else signal.SIGUSR2)
        self.save_status(state="paused" if self.paused else "running")
        self.event("paused" if self.paused else "resumed")

    def lease_expired(self):
        """Whether the lease has run out. Expired stays expired: once the deadline this supervisor
        knows has passed, it takes no later one, whoever wrote it. A renewal it reads only then
        (it was frozen, or busy stopping its runner) may have come after the controller counted the
        lease as lapsed and started a replacement elsewhere."""
        if self.ttl <= 0:
            return False
        if self.lease_deadline is not None and boottime() > self.lease_deadline:
            return True
        identity = file_identity(self.path("lease.json"))
        if identity != self.lease_identity:
            self.lease_identity = identity
            lease, _, problems = load_checked(self.path("lease.json"), LEASE_FIELDS)
            for problem in problems:           # an unreadable lease extends nothing: fail closed
                self.note_problem(problem)
            if self.auth:
                self.take_proved_renewal(lease)
            elif lease and lease.get("epoch") == self.spec["epoch"] and "deadline" in lease:
                # A start that gave no key (none is sent by an earlier controller release).
                # No renewal reaches further than one TTL from now, whoever wrote the file.
                deadline = min(lease["deadline"], boottime() + self.ttl)
                self.lease_deadline = max(self.lease_deadline or 0, deadline)
        return self.lease_deadline is not None and boottime() > self.lease_deadline

    def take_proved_renewal(self, lease):
        """A renewal that proves it came from the controller (with this copy's key) extends the
        lease to its not-after + TTL, judged on our own clock; anything else — the strategy can
        write lease.json at will — extends nothing. The file's own `deadline` is never believed."""
        if not lease or lease.get("epoch") != self.spec["epoch"] or self.key is None:
            return
        not_after = lease.get("notAfter")
        if not isinstance(not_after, dict) or not_after.get("bootId") != boot_id():
            return
        limit = not_after.get("boottime")
        if isinstance(limit, bool) or not isinstance(limit, (int, float)) or \
                not proof_matches(self.key, self.spec["epoch"], not_after, lease.get("proof")):
            return
        deadline = min(float(limit) + self.ttl, boottime() + self.ttl)
        self.lease_deadline = max(self.lease_deadline or 0, deadline)

    def lease_reason(self, detail=None):
        why = ("lease expired: no renewal reached this host for %gs (the reconcile loop not running, this "
               "host cut off from the controller, or this host frozen); stopped so that no second copy can "
               "run" % self.ttl)
        return "%s; %s" % (why, detail) if detail else why

    def tend_files(self):
        """At most once a second: put back the files this supervisor owns (status.json, the pid files the
        probe and `stop` rely on) when something else replaced them."""
        now = time.monotonic()
        if now < self.next_tend:
            return
        self.next_tend = now + 1.0
        if self.status_identity is not None and file_identity(self.path("status.json")) != self.status_identity:
            self.note_problem("status.json: changed by another process; rewritten")
            self.save_status()
        if self.keeper is None or os.getppid() == self.keeper:    # a dead keeper's pid is no use
            self.tend_pid_file("supervisor.pid", self.keeper or os.getpid())
        if self.proc is not None and self.proc.poll() is None:
            self.tend_pid_file("runner.pid", self.proc.pid)

    def tend_pid_file(self, name, pid):
        """Both files of a pid: its identity (what the agent trusts) and the plain number people
        read and signal, which must never name another process."""
        # Read again only when either file changed since it was last found right.
        seen = (pid, file_identity(self.path(name)), file_identity(self.path(name) + PID_IDENTITY))
        if self.pid_files_seen.get(name) == seen:
            return
        problems = []
        ident = plain_pid(self.path(name) + PID_IDENTITY, name + PID_IDENTITY, problems)
        if live_pid(self.path(name), problems) == pid and plain_pid(self.path(name), name, problems) == pid \
                and ident == pid:
            self.pid_files_seen[name] = seen
            return
        if problems or file_identity(self.path(name)) is not None:
            self.note_problem((problems or ["%s: names another process" % name])[0] + "; rewritten")
        try:
            write_pid(self.path(name), pid)
        except OSError as exc:
            self.note_problem("%s: cannot write it: %s" % (name, exc.strerror or exc))

    def environment(self):
        spec = self.spec
        env = dict((k, os.environ[k]) for k in ENV_PASSTHROUGH if k in os.environ)
        account = spec.get("account")
        if account:
            env.update(read_secrets(os.path.join(spec["workdir"], "secrets", account + ".env")))
        env.update({
            "QUANTLAB_STRATEGY_ID": spec["strategy"],
            "QUANTLAB_STRATEGY_FILE": os.path.join(spec["workdir"], spec["file"]),
            # As validation measured it (UTF-8, no padding), and as bytes: ASCII escapes would triple
            # non-ASCII text past Linux's 128 KiB cap on one variable, and a host locale that is not
            # UTF-8 must not re-encode it.
            "QUANTLAB_PARAMS": json.dumps(spec["params"], ensure_ascii=False, separators=(",", ":"),
                                          sort_keys=True).encode("utf-8", "surrogatepass"),
            "QUANTLAB_HEARTBEAT_MS": str(spec["heartbeatMs"]),
            "QUANTLAB_STATE_DIR": self.path("state"),
            "QUANTLAB_HEARTBEAT_FILE": self.path("heartbeat.json"),
            "QUANTLAB_LEASE_FILE": self.path("lease.json"),
            "QUANTLAB_WORKER_ID": spec["worker"],
            "QUANTLAB_REGION": spec.get("region") or "",
            "QUANTLAB_EPOCH": str(spec["epoch"]),
            "QUANTLAB_PROXY": spec.get("proxy") or "",
            "QUANTLAB_PAUSED": "1" if self.paused else "0",
            # The runner's own watchdog kills it this long after a stop began (st_exit stuck).
            "QUANTLAB_STOP_TIMEOUT_MS": str(max(1, int(self.stop_timeout() * 1000))),
        })
        if spec.get("proxy"):
            for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
                env[name] = spec["proxy"]
        return env

    def stop_timeout(self):
        return float(self.sched.get("stopTimeoutSeconds", 30))

    def argv(self):
        runner = os.path.join(self.spec["workdir"], self.spec["runnerFile"])
        return [part.replace("{runner}", runner) for part in self.spec["runner"]]

    def runner_setup(self):
        """Runs in the runner between fork and exec (this process has a single thread): SIGTERM when
        the supervisor dies, so st_exit runs; exit at once if the supervisor is already gone."""
        parent = os.getpid()
        prctl_function()                   # looked up before the fork, not in the child

        def setup():
            if not die_with_parent(parent, signal.SIGTERM):
                os._exit(70)
        return setup

    def run_runner(self, restarts):
        """One life of the runner: ('final', why) when the supervisor must end, ('unhealthy', why).
        Whichever way the life ends, nothing the strategy started survives it."""
        remove_entry(self.path("heartbeat.json"))      # a file left by the last life, or a trap
        try:
            self.proc = subprocess.Popen(self.argv(), env=self.environment(), cwd=self.dir,
                                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                         stderr=subprocess.STDOUT, close_fds=True, start_new_session=True,
                                         preexec_fn=self.runner_setup())
        except (OSError, subprocess.SubprocessError) as exc:
            return "unhealthy", "cannot start the runner %s: %s" % (self.argv()[0], getattr(exc, "strerror", exc))
        write_pid(self.path("runner.pid"), self.proc.pid)
        started = time.monotonic()
        self.save_status(state="paused" if self.paused else "starting", startedAt=now_ms(),
                         runnerPid=self.proc.pid, reason=None, exitCode=None)
        watch = HealthWatch(self, started, restarts)
        while True:
            self.log.pump(self.proc.stdout, self.wait_s(), self.wake)
            drain(self.wake)
            self.apply_pause()
            reap_children(spare=self.proc.pid)
            self.tend_files()
            if self.stop_requested():
                code = self.stop_runner()
                self.end_strategy_processes()
                self.finish(self.stop_reason, code)
                return "final", self.stop_reason
            if self.lease_expired():
                late = self.lease_long_gone()
                code = self.stop_runner(graceful=not late)
                self.end_strategy_processes()
                self.finish(self.lease_reason() + (LATE_FENCE if late else ""), code, event="lease-expired")
                return "final", "lease expired"
            code = self.proc.poll()
            if code is not None:
                self.log.drain(self.proc.stdout)
                self.end_strategy_processes()
                self.save_status(exitCode=code)
                return "unhealthy", exit_words(code)
            problem = watch.check()
            if problem:
                self.stop_runner()
                self.end_strategy_processes()
                return "unhealthy", problem

    def lease_long_gone(self):
        """The lease ended longer ago than the stop timeout (this host was frozen, or this process
        starved): the controller may have started a replacement by now, and an st_exit that cancels
        orders on the account would hit that copy's. Such a runner gets no st_exit."""
        return self.lease_deadline is not None and boottime() > self.lease_deadline + self.stop_timeout()

    def stop_runner(self, graceful=True):
        """SIGTERM so st_exit runs, SIGKILL after stopTimeoutSeconds (at once when not `graceful`);
        returns the exit code."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        if not graceful:
            signal_group(self.proc.pid, signal.SIGKILL)
        signal_group(self.proc.pid, signal.SIGCONT)
        signal_group(self.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout()
        while self.proc.poll() is None and time.monotonic() < deadline:
            self.log.pump(self.proc.stdout, 0.05)
            self.lease_expired()           # keep taking renewals: a long st_exit must not make us miss them
        if self.proc.poll() is None:
            signal_group(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.log.drain(self.proc.stdout)
        return self.proc.returncode

    def end_strategy_processes(self):
        """Nothing the strategy started may outlive its runner: a child left behind would trade on
        as a second copy. Its process group first (the only handle where there is no /proc), then
        every process still below this one (all of them, as a subreaper)."""
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)   # a group outlives its leader while it has members
            except OSError:
                pass
        spare = self.proc.pid if self.proc is not None and self.proc.returncode is None else None
        left = end_descendants(spare=spare)
        if left:
            self.note_problem("processes %s of the strategy survived SIGKILL" % left[:10])


class Keeper(object):
    """The supervisor's parent, whose pid is in supervisor.pid. It forwards the signals the agent
    sends (stop, pause, resume) and waits. Should the supervisor die without ending its strategy
    (SIGKILL, the OOM killer), every process the strategy started is reparented here (a subreaper):
    the keeper gives the runner its stop timeout for st_exit, then kills everything left."""

    def __init__(self, sup, child):
        self.sup, self.child, self.child_gone = sup, child, False

    def forward(self, signum, _frame):
        if not self.child_gone:
            try:
                os.kill(self.child, signum)
            except OSError:
                pass

    def run(self):
        for signum in signal_numbers(FORWARDED_SIGNALS):
            signal.signal(signum, self.forward)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, signal_numbers(SUPERVISOR_SIGNALS))
        while True:
            try:
                pid, status = os.waitpid(self.child, 0)
            except ChildProcessError:
                pid, status = self.child, 0
            if pid == self.child:
                break
        self.child_gone = True
        if os.WIFEXITED(status):          # it ended on its own terms, having ended its strategy
            end_descendants()
            return os.WEXITSTATUS(status)
        self.contain("the supervisor (pid %d) was killed by signal %d" % (self.child, os.WTERMSIG(status)))
        return 1

    def contain(self, why):
        self.record("stopping", why + "; stopping its strategy")
        runner = self.runner_below()
        if runner is not None:            # it got SIGTERM already (PDEATHSIG); its group gets it too
            signal_group(runner, signal.SIGCONT)
            signal_group(runner, signal.SIGTERM)
            deadline = time.monotonic() + self.sup.stop_timeout()
            while process_start_time(runner) is not None and time.monotonic() < deadline:
                reap_children()
                time.sleep(0.05)
        left = end_descendants()
        done = why + "; its strategy was stopped"
        if left:
            done += " (processes %s survived SIGKILL)" % left[:10]
        self.record("stopped", done)

    def runner_below(self):
        runner = live_pid(self.sup.path("runner.pid"))
        if runner is None or runner not in descendants(process_table(), os.getpid()):
            return None
        return runner

    def record(self, state, reason):
        """Status and event, unless a start or stop holds the instance (it then says what happened)."""
        try:
            log_event(self.sup.dir, "stopped" if state == "stopped" else "supervisor-lost", reason,
                      epoch=self.sup.spec.get("epoch"))
            lock, _ = lock_instance(self.sup.dir, timeout=0)
            if lock is None:
                return
            try:
                status, _ = read_status(self.sup.dir, [])
                if status.get("epoch") == self.sup.spec.get("epoch") and status.get("state") not in FINAL_STATES:
                    status.update(state=state, reason=reason)
                    if state == "stopped":
                        status["stoppedAt"] = now_ms()
                    write_json(self.sup.path("status.json"), status)
            finally:
                os.close(lock)
        except OSError:
            pass


def wake_up_pipe():
    """A pipe the signal handlers write to (signal.set_wakeup_fd), so that a stop or a pause wakes
    the loop at once from its select; its read end, or None where that cannot be had."""
    try:
        read_end, write_end = os.pipe()
        for fd in (read_end, write_end):
            os.set_blocking(fd, False)
            os.set_inheritable(fd, False)
        signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
        return read_end
    except (OSError, ValueError, AttributeError):
        return None


def drain(fd):
    """Empty the wake-up pipe (it holds a byte per signal received)."""
    if fd is None:
        return
    try:
        while os.read(fd, 512):
            pass
    except OSError:
        pass


def read_secrets(path):
    """KEY=VALUE lines (comments, blank lines and `export ` prefixes allowed; quotes stripped)."""
    out = {}
    try:
        # Followed if a link (an operator's choice), but only a regular file is read: never a FIFO.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return out
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return out
        try:
            text = handle.read(1 << 20).decode("utf-8", "replace")
        except OSError:
            return out
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        if line.startswith("export "):
            line = line[7:]
        key, value = line.split("=", 1)
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        out[key.strip()] = value
    return out


def supervise(args):
    """The supervisor of one instance. Where the kernel offers child subreapers it forks: the parent
    keeps (Keeper), the child supervises; both are subreapers, so whichever dies, the other still has
    every process the strategy started below it."""
    idir = args[0]
    key = read_key()
    try:
        sup = Supervisor(idir, key)
    except Exception as exc:              # noqa: BLE001 - a spec it cannot use: say so where `status` looks
        return record_failure(idir, "supervisor cannot start: %s" % exc)
    if not become_subreaper():
        return run_supervisor(sup)        # not Linux: the runner's process group is all it can hold
    keeper = os.getpid()
    # Blocked until each side has its handlers: a stop or pause in between must not kill either.
    signal.pthread_sigmask(signal.SIG_BLOCK, signal_numbers(SUPERVISOR_SIGNALS))
    prctl_function()
    sys.stdout.flush()
    sys.stderr.flush()
    child = os.fork()
    if child:
        return Keeper(sup, child).run()
    code = 1
    try:
        sup.keeper, sup.containment = keeper, "subreaper"
        if not die_with_parent(keeper, signal.SIGTERM):
            sup.term_received = True      # the keeper is already gone: stop at once
        become_subreaper()
        code = run_supervisor(sup)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def read_key():
    """The copy's lease key, which `start` writes into our stdin (and closes): at most a line, within
    a few seconds. Then stdin is /dev/null again, so that no descendant inherits the pipe, and this
    process is made undumpable (no ptrace or /proc/PID/mem for a strategy of the same uid); the fork
    below inherits both."""
    key = None
    try:
        if not os.isatty(0):
            ready, _, _ = select.select([0], [], [], 5.0)
            if ready:
                line = os.read(0, 128).strip().decode("ascii", "replace")
                key = line if len(line) == 64 and all(c in "0123456789abcdef" for c in line) else None
    except (OSError, ValueError):
        key = None
    try:
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
    except OSError:
        pass
    if key is not None:
        keep_secrets()
    return key


def run_supervisor(sup):
    try:
        sup.run()
    except Exception as exc:              # noqa: BLE001 - record why, never leave a silent corpse
        print_exc()
        try:
            sup.stop_runner()
            sup.end_strategy_processes()
        finally:
            sup.save_status(state="error", reason="supervisor failed: %r" % (exc,), stoppedAt=now_ms())
            sup.event("error", "supervisor failed: %r" % (exc,))
        return 1
    end_descendants()                     # the last word: nothing of the strategy outlives its supervisor
    return 0


def print_exc():
    import traceback                      # only when something failed: not worth its import at start
    traceback.print_exc()


def record_failure(idir, why):
    print_exc()
    try:
        status, _ = read_status(idir, [])
        status.update(state="error", reason=clip(why), stoppedAt=now_ms())
        write_json(os.path.join(idir, "status.json"), status)
        log_event(idir, "error", clip(why))
    except OSError:
        pass
    return 1


def exit_words(code):
    """How the runner ended, for people: a signal by its name (Popen gives it as a negative code)."""
    if code < 0:
        try:
            return "runner was killed by %s" % signal.Signals(-code).name
        except ValueError:
            return "runner was killed by signal %d" % -code
    return "runner exited with code %d" % code


def random_jitter():
    """0.5 to 1.5, at random (os.urandom: the random module is not worth its import here)."""
    return 0.5 + int.from_bytes(os.urandom(4), "big") / float(1 << 32)


def restart_delay(sched, restarts, jitter):
    """Seconds before restart number `restarts`: restartDelay doubling from the first, at most ten
    minutes, times `jitter` (0.5 to 1.5: strategies that fail together spread out)."""
    base = sched.get("restartDelay", 10000) / 1000.0
    return min(600.0, base * (2 ** (restarts - 1))) * jitter
