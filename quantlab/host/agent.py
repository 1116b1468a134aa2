#!/usr/bin/env python3
"""quantlab host agent: shipped to every worker host, standard library only, Python 3.8+.

It imports nothing of the controller. The controller runs it with one subcommand per call, a JSON
request on stdin and a JSON answer on stdout:

  probe [--renew TTL] [--request FILE]
                        every instance of every worker workdir named in the request, the host's load,
                        runtimes and clock; renews the leases the request names (epoch must match)
  start                 start (or replace) one strategy under its own supervisor process
  stop | pause | resume one strategy
  logs                  tail of a strategy's output (--follow keeps streaming)
  supervise DIR         (internal) the supervisor of one instance; started by `start`

Layout of a workdir:
  agent/                 this file and the reference runner, by content hash
  files/<sha256>.<ext>   strategy files, content-addressed
  secrets/<account>.env  KEY=VALUE lines added to the runner's environment
  instances/<id>/        spec.json status.json lease.json heartbeat.json output.log events.log state/

state/ is the strategy's checkpoint folder: the controller copies it (probe, when asked; stop of a
move) and puts it back on the worker a strategy moves to (start).
"""
import json
import os
import sys
import time

EXIT_MISSING = 3        # files the request names are not on the host: upload them, then retry
EXIT_BAD_REQUEST = 4
LOG_CAP_BYTES = 5 * 1024 * 1024
EVENTS_CAP_BYTES = 512 * 1024
FINAL_STATES = ("stopped", "error")
ENV_PASSTHROUGH = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "TZ", "TMPDIR")


# --- small helpers ---------------------------------------------------------------------------------

def now_ms():
    return int(time.time() * 1000)


def boottime():
    """Seconds on a clock that never jumps and keeps counting through suspend: leases use it."""
    clock = getattr(time, "CLOCK_BOOTTIME", None)
    return time.clock_gettime(clock) if clock is not None else time.monotonic()


def read_json(path, default=None):
    try:
        with open(path, "rb") as handle:
            return json.loads(handle.read())
    except (OSError, ValueError):
        return default


def write_json(path, value, mode=0o600):
    """Atomic replace, so a reader never sees half a file."""
    tmp = "%s.tmp-%d" % (path, os.getpid())
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as handle:
        json.dump(value, handle, sort_keys=True)
    os.replace(tmp, path)


def append_line(path, value, cap=EVENTS_CAP_BYTES):
    try:
        if os.path.getsize(path) > cap:
            os.replace(path, path + ".1")
    except OSError:
        pass
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, (json.dumps(value, sort_keys=True) + "\n").encode())
    finally:
        os.close(fd)


def process_start_time(pid):
    """The kernel's start time of `pid`, or None when it is gone or a zombie (PID 1 may never reap)."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as handle:
            fields = handle.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        if not os.path.isdir("/proc/self"):          # no procfs (not Linux): best effort
            try:
                os.kill(pid, 0)
                return "?"
            except OSError:
                return None
        return None
    if fields[0] in (b"Z", b"X"):
        return None
    return fields[19].decode()


def write_pid(path, pid):
    with open(path, "w") as handle:
        handle.write("%d %s\n" % (pid, process_start_time(pid) or "?"))


def live_pid(path):
    """The pid recorded in `path` if that very process still runs (guards against pid reuse)."""
    try:
        with open(path) as handle:
            pid_text, started = handle.read().split()
        pid = int(pid_text)
    except (OSError, ValueError):
        return None
    current = process_start_time(pid)
    if current is None or (started != "?" and current != "?" and current != started):
        return None
    return pid


def instance_dir(workdir, strategy):
    return os.path.join(os.path.abspath(workdir), "instances", strategy)


def log_event(idir, event, detail=None, **extra):
    line = {"t": now_ms(), "event": event}
    if detail:
        line["detail"] = detail
    line.update(extra)
    append_line(os.path.join(idir, "events.log"), line)


def lock_instance(idir):
    """Serialise start/stop/pause/resume of one instance; released when the process exits."""
    import fcntl
    os.makedirs(idir, mode=0o700, exist_ok=True)
    fd = os.open(os.path.join(idir, ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


# --- probe ----------------------------------------------------------------------------------------

def host_facts():
    facts = {"cpus": os.cpu_count() or 1, "time": now_ms(), "python": "%d.%d.%d" % sys.version_info[:3]}
    try:
        facts["loadavg"] = list(os.getloadavg())
    except OSError:
        facts["loadavg"] = None
    facts["memFreeMb"] = None
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    facts["memFreeMb"] = int(line.split()[1]) // 1024
                    break
    except OSError:
        pass
    return facts


def find_program(program):
    if os.sep in program:
        return program if os.access(program, os.X_OK) else None
    for folder in os.environ.get("PATH", os.defpath).split(os.pathsep):
        candidate = os.path.join(folder or ".", program)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def program_version(program, cache_path):
    """`program --version`, cached by the binary's identity so a probe rarely runs it."""
    path = find_program(program)
    if path is None:
        return {"program": program, "path": None, "version": None}
    st = os.stat(path)
    key = "%s:%d:%d" % (os.path.realpath(path), st.st_mtime_ns, st.st_size)
    cache = read_json(cache_path, {}) or {}
    if key not in cache:
        import subprocess
        try:
            done = subprocess.run([path, "--version"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                  timeout=10, stdin=subprocess.DEVNULL)
            cache[key] = done.stdout.decode(errors="replace").strip().splitlines()[0] if done.stdout else None
        except (OSError, subprocess.SubprocessError, IndexError):
            cache[key] = None
        try:
            write_json(cache_path, cache)
        except OSError:
            pass
    return {"program": program, "path": path, "version": cache[key]}


def read_heartbeat(path):
    try:
        mtime = os.stat(path).st_mtime
    except OSError:
        return None
    beat = read_json(path, {}) or {}
    beat["ageMs"] = max(0, int((time.time() - mtime) * 1000))
    return beat


def describe_instance(idir, strategy, events_since):
    status = read_json(os.path.join(idir, "status.json"), {}) or {}
    supervisor = live_pid(os.path.join(idir, "supervisor.pid"))
    runner = live_pid(os.path.join(idir, "runner.pid"))
    state = status.get("state", "stopped")
    reason = status.get("reason")
    if supervisor is None and state not in FINAL_STATES:
        if runner is not None:
            state, reason = "orphaned", "the supervisor is gone but the runner still runs"
        else:
            state, reason = "stopped", "the supervisor is not running (host restarted, or it was killed)"
    beat = read_heartbeat(os.path.join(idir, "heartbeat.json"))
    if beat is not None and state in FINAL_STATES:
        # The last life's report: its errors explain an `error`; its age and beats are history.
        beat = {"errorCount": beat.get("errorCount", 0), "lastError": beat.get("lastError")}
    lease = read_json(os.path.join(idir, "lease.json"), {}) or {}
    out = {
        "strategy": strategy, "epoch": status.get("epoch"), "specHash": status.get("specHash"),
        "status": state, "alive": supervisor is not None or runner is not None, "reason": reason,
        "startedAt": status.get("startedAt"), "stoppedAt": status.get("stoppedAt"),
        "restarts": status.get("restarts", 0), "exitCode": status.get("exitCode"),
        "errorCount": (beat or {}).get("errorCount", 0), "lastError": (beat or {}).get("lastError"),
        "beats": (beat or {}).get("beats"), "heartbeatAgeMs": (beat or {}).get("ageMs"),
        "leaseLeftSeconds": (round(lease["deadline"] - boottime(), 3)
                             if "deadline" in lease and state not in FINAL_STATES else None),
    }
    if events_since is not None:
        out["events"] = read_events(idir, events_since)
    return out


def read_events(idir, since):
    path = os.path.join(idir, "events.log")
    try:
        if os.path.getmtime(path) * 1000 < since:
            return []
        with open(path, "rb") as handle:
            lines = handle.read().splitlines()
    except OSError:
        return []
    out = []
    for raw in lines[-200:]:
        try:
            event = json.loads(raw)
        except ValueError:
            continue
        if isinstance(event, dict) and event.get("t", 0) > since:
            out.append(event)
    return out


CHECKPOINT_CAP_BYTES = 1024 * 1024


def pack_checkpoint(idir):
    """The instance's checkpoint folder (QUANTLAB_STATE_DIR) as {relative path: base64 of zlib}, or
    None when it is larger than the cap (it then stays on the host only)."""
    import base64
    import zlib
    root = os.path.join(idir, "state")
    files, total = {}, 0
    for folder, _, names in os.walk(root):      # os.walk does not enter symlinked folders
        for name in names:
            path = os.path.join(folder, name)
            if ".tmp" in name or os.path.islink(path):   # half-written files; links lead elsewhere
                continue
            try:
                with open(path, "rb") as handle:
                    packed = zlib.compress(handle.read())
            except OSError:
                continue
            total += len(packed)
            if total > CHECKPOINT_CAP_BYTES:
                return None
            files[os.path.relpath(path, root)] = base64.b64encode(packed).decode()
    return {"files": files, "t": now_ms()}


def unpack_checkpoint(idir, checkpoint):
    """Put a checkpoint back into the instance's state folder; paths stay inside it."""
    import base64
    import shutil
    import zlib
    root = os.path.join(idir, "state")
    # The checkpoint replaces whatever an earlier placement left here (and any symlink in it).
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root, mode=0o700)
    for rel, data in sorted((checkpoint or {}).get("files", {}).items()):
        rel = os.path.normpath(rel)
        if os.path.isabs(rel) or rel == ".." or rel.startswith(".." + os.sep):
            continue
        target = os.path.join(root, rel)
        os.makedirs(os.path.dirname(target), mode=0o700, exist_ok=True)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(zlib.decompress(base64.b64decode(data)))


def write_lease(idir, epoch, ttl):
    """deadline: on this host's boot-time clock, what the supervisor enforces; expiresAt: the same
    moment in wall-clock ms, for the strategy (ctx.leaseExpiresAt). No TTL: no lease, no fencing."""
    lease = {"epoch": epoch, "expiresAt": None}
    if ttl > 0:
        lease.update(deadline=boottime() + ttl, expiresAt=now_ms() + int(ttl * 1000))
    write_json(os.path.join(idir, "lease.json"), lease)


def renew_lease(idir, epoch, ttl):
    """Extend the lease of the copy with this epoch, if it is the one running here."""
    status = read_json(os.path.join(idir, "status.json"), {}) or {}
    if status.get("epoch") != epoch or status.get("state") in FINAL_STATES:
        return False
    if live_pid(os.path.join(idir, "supervisor.pid")) is None:
        return False
    write_lease(idir, epoch, ttl)
    return True


def probe(request, args):
    ttl = float(args[args.index("--renew") + 1]) if "--renew" in args else None
    answer = {"host": host_facts(), "workers": {}}
    cache = None
    for spec in request.get("workers", []):
        wid, workdir = spec["id"], os.path.abspath(os.path.expanduser(spec["workdir"]))
        if cache is None:
            cache = os.path.join(workdir, "agent", "versions.json")
        worker = {"workdir": workdir, "instances": {}, "renewed": []}
        worker["runtime"] = program_version(spec.get("program") or "node", cache)
        try:
            worker["credentials"] = sorted(n[:-4] for n in os.listdir(os.path.join(workdir, "secrets"))
                                           if n.endswith(".env"))
        except OSError:
            worker["credentials"] = []
        renew = (request.get("renew") or {}).get(wid) or {}
        since = (request.get("eventsSince") or {}).get(wid)
        wanted = (request.get("checkpoints") or {}).get(wid) or {}
        root = os.path.join(workdir, "instances")
        try:
            names = sorted(os.listdir(root))
        except OSError:
            names = []
        for name in names:
            idir = os.path.join(root, name)
            try:
                if ttl is not None and name in renew and renew_lease(idir, renew[name], ttl):
                    worker["renewed"].append(name)
                worker["instances"][name] = describe_instance(idir, name, since)
                if name in wanted and worker["instances"][name]["epoch"] == wanted[name]:
                    worker["instances"][name]["checkpoint"] = pack_checkpoint(idir)
            except (OSError, ValueError) as exc:      # disk full, a file half gone: say so, go on
                worker["instances"][name] = {"strategy": name, "status": "unknown", "alive": True,
                                             "reason": "the agent could not read it: %s" % exc}
        answer["workers"][wid] = worker
    answer["host"]["answeredAt"] = now_ms()
    return answer


# --- start / stop / pause / resume ------------------------------------------------------------------

def missing_files(request):
    workdir = request["workdir"]
    names = [request["file"]]
    if any("{runner}" in part for part in request["runner"]):
        names.append(request["runnerFile"])
    return [n for n in names if not os.path.isfile(os.path.join(workdir, n))]


def start(request, args):
    request["workdir"] = os.path.abspath(os.path.expanduser(request["workdir"]))
    missing = missing_files(request)
    if missing:
        return {"result": "missing", "missing": missing}, EXIT_MISSING
    idir = instance_dir(request["workdir"], request["strategy"])
    lock_instance(idir)
    status = read_json(os.path.join(idir, "status.json"), {}) or {}
    supervisor = live_pid(os.path.join(idir, "supervisor.pid"))
    same = status.get("epoch") == request["epoch"] and status.get("specHash") == request["specHash"]
    if supervisor is not None and same and status.get("state") not in FINAL_STATES:
        return {"result": "already-running", "pid": supervisor}, 0
    if supervisor is not None or live_pid(os.path.join(idir, "runner.pid")) is not None:
        why = "replaced by a new start (epoch %s)" % request["epoch"]
        stop_instance(idir, why, float(status.get("stopTimeoutSeconds") or 30))
    keep_restarts = status.get("epoch") == request["epoch"] and status.get("specHash") == request["specHash"]
    os.makedirs(os.path.join(idir, "state"), mode=0o700, exist_ok=True)
    if request.get("checkpoint"):
        unpack_checkpoint(idir, request.pop("checkpoint"))   # a move: continue where it left off
    for stale in ("heartbeat.json", "runner.pid", "control.json"):
        try:
            os.unlink(os.path.join(idir, stale))
        except OSError:
            pass
    write_json(os.path.join(idir, "spec.json"), request)
    write_lease(idir, request["epoch"], float(request.get("leaseTtlSeconds") or 0))
    write_json(os.path.join(idir, "status.json"), {
        "state": "starting", "epoch": request["epoch"], "specHash": request["specHash"],
        "restarts": status.get("restarts", 0) if keep_restarts else 0, "startedAt": now_ms(),
        "paused": bool(request.get("paused")),
        "stopTimeoutSeconds": request["scheduling"]["stopTimeoutSeconds"]})
    import subprocess
    with open(os.path.join(idir, "supervisor.log"), "ab") as log:
        child = subprocess.Popen([sys.executable, "-I", "-S", os.path.abspath(__file__), "supervise", idir],
                                 stdin=subprocess.DEVNULL, stdout=log, stderr=log, close_fds=True,
                                 start_new_session=True, cwd=idir)
    write_pid(os.path.join(idir, "supervisor.pid"), child.pid)
    log_event(idir, "start", "epoch %s" % request["epoch"], epoch=request["epoch"])
    return {"result": "started", "pid": child.pid}, 0


def signal_group(pid, sig):
    try:
        os.killpg(pid, sig)
    except OSError:
        try:
            os.kill(pid, sig)
        except OSError:
            pass


def wait_gone(pidfile, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if live_pid(pidfile) is None:
            return True
        time.sleep(0.02)
    return live_pid(pidfile) is None


def stop_instance(idir, reason, grace):
    """Ask the supervisor to stop (st_exit runs, SIGKILL after the grace); clean up if it is gone."""
    import signal
    write_json(os.path.join(idir, "control.json"), {"stop": reason})
    supervisor = live_pid(os.path.join(idir, "supervisor.pid"))
    if supervisor is not None:
        os.kill(supervisor, signal.SIGTERM)
        if wait_gone(os.path.join(idir, "supervisor.pid"), grace + 5):
            return "stopped"
        signal_group(supervisor, signal.SIGKILL)
    runner = live_pid(os.path.join(idir, "runner.pid"))
    if runner is not None:                      # no supervisor to ask: do its job here
        signal_group(runner, signal.SIGTERM)
        if not wait_gone(os.path.join(idir, "runner.pid"), grace):
            signal_group(runner, signal.SIGKILL)
            wait_gone(os.path.join(idir, "runner.pid"), 5)
        log_event(idir, "stopped", reason + " (its supervisor was gone)")
    status = read_json(os.path.join(idir, "status.json"), {}) or {}
    if status.get("state") not in FINAL_STATES:
        status.update({"state": "stopped", "reason": reason, "stoppedAt": now_ms()})
        write_json(os.path.join(idir, "status.json"), status)
    return "stopped" if supervisor is not None or runner is not None else "not-running"


def stop(request, args):
    idir = instance_dir(request["workdir"], request["strategy"])
    if not os.path.isdir(idir):
        return {"result": "not-running"}, 0
    lock_instance(idir)
    status = read_json(os.path.join(idir, "status.json"), {}) or {}
    epoch = request.get("epoch")
    if epoch is not None and status.get("epoch") not in (None, epoch):
        # A newer copy runs here now: never stop it on behalf of an older one.
        return {"result": "epoch-mismatch", "running": status.get("epoch")}, 0
    # The longer of the two: the copy may have been started with more time for st_exit than asked now.
    grace = max(float(request.get("stopTimeoutSeconds") or 0), float(status.get("stopTimeoutSeconds") or 0)) or 30.0
    answer = {"result": stop_instance(idir, request.get("reason") or "stopped by the controller", grace)}
    if request.get("checkpoint"):                # a move: the new worker gets the final state
        answer["checkpoint"] = pack_checkpoint(idir)
    return answer, 0


def set_paused(request, paused):
    import signal
    idir = instance_dir(request["workdir"], request["strategy"])
    lock_instance(idir)
    supervisor = live_pid(os.path.join(idir, "supervisor.pid"))
    if supervisor is None:
        return {"result": "not-running"}, 0
    os.kill(supervisor, signal.SIGUSR1 if paused else signal.SIGUSR2)
    want = "paused" if paused else "running"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        status = read_json(os.path.join(idir, "status.json"), {}) or {}
        if bool(status.get("paused")) == paused and status.get("state") in (want, "restarting", "starting"):
            return {"result": want}, 0
        time.sleep(0.02)
    return {"result": "unconfirmed", "state": status.get("state")}, 1


# --- logs ------------------------------------------------------------------------------------------

def tail_bytes(path, lines):
    """The last `lines` lines of a file, reading backwards in blocks (logs may be megabytes)."""
    try:
        handle = open(path, "rb")
    except OSError:
        return b""
    with handle:
        handle.seek(0, os.SEEK_END)
        end = pos = handle.tell()
        chunks, found = [], 0
        while pos > 0 and found <= lines:
            step = min(65536, pos)
            pos -= step
            handle.seek(pos)
            chunk = handle.read(step)
            chunks.append(chunk)
            found += chunk.count(b"\n")
        data = b"".join(reversed(chunks))
        del end
    if lines < 0:
        return data
    # Like `tail -n`: a last line without its newline is a line too (not only what follows a "\n").
    keep = lines + 1 if data.endswith(b"\n") or not data else lines
    return b"\n".join(data.split(b"\n")[-keep:]) if keep else b""


def logs(request, args):
    idir = instance_dir(request["workdir"], request["strategy"])
    path = os.path.join(idir, "output.log")
    out = sys.stdout.buffer
    lines = int(request.get("lines", 200))
    data = tail_bytes(path, lines)
    if len(data.split(b"\n")) <= lines:
        older = tail_bytes(path + ".1", lines - len(data.split(b"\n")) + 1)
        data = (older + data) if older else data
    out.write(data)
    out.flush()
    if not request.get("follow"):
        return None, 0
    import select
    position, inode = _position(path)
    watch = select.poll()
    watch.register(out.fileno(), select.POLLERR | select.POLLHUP)
    while True:
        if watch.poll(200):                      # the reader went away (ssh closed, ^C): stop following
            return None, 0
        current, now_inode = _position(path)
        if now_inode != inode or current < position:
            position, inode = 0, now_inode       # rotated: read the new file from its start
        if current > position:
            with open(path, "rb") as handle:
                handle.seek(position)
                chunk = handle.read(current - position)
            out.write(chunk)
            out.flush()
            position += len(chunk)


def _position(path):
    try:
        st = os.stat(path)
        return st.st_size, st.st_ino
    except OSError:
        return 0, None


# --- supervisor ------------------------------------------------------------------------------------

class Supervisor(object):
    """Runs one strategy's runner, judges its health from the heartbeat file, restarts it in place
    with backoff, and stops it when its lease runs out (fencing)."""

    def __init__(self, idir):
        self.dir = idir
        self.spec = read_json(self.path("spec.json"))
        self.status = read_json(self.path("status.json"), {}) or {}
        self.sched = self.spec["scheduling"]
        self.heartbeat_s = self.spec["heartbeatMs"] / 1000.0
        self.poll = max(0.02, min(0.5, self.heartbeat_s / 4))
        self.ttl = float(self.spec.get("leaseTtlSeconds") or 0)
        self.paused = bool(self.spec.get("paused"))
        self.stop_reason = None
        self.pause_change = None
        # Fail closed: the lease granted at start holds until a renewal for this very epoch extends it.
        self.lease_deadline = boottime() + self.ttl if self.ttl > 0 else None
        self.lease_mtime = None
        self.proc = None
        self.log = None

    def path(self, name):
        return os.path.join(self.dir, name)

    def save_status(self, **fields):
        self.status.update(fields)
        self.status["paused"] = self.paused
        write_json(self.path("status.json"), self.status)

    # signals only set flags; the loop acts on them
    def on_term(self, *_):
        control = read_json(self.path("control.json"), {}) or {}
        self.stop_reason = control.get("stop") or "stopped by signal"

    def on_pause(self, *_):
        self.pause_change = True

    def on_resume(self, *_):
        self.pause_change = False

    def run(self):
        import signal
        signal.signal(signal.SIGTERM, self.on_term)
        signal.signal(signal.SIGINT, self.on_term)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGUSR1, self.on_pause)
        signal.signal(signal.SIGUSR2, self.on_resume)
        self.log = OutputLog(self.path("output.log"))
        restarts = int(self.status.get("restarts", 0))
        while True:
            verdict, detail = self.run_runner(restarts)
            if verdict == "final":
                return
            restarts = int(self.status.get("restarts", 0))
            if not self.sched.get("autoRestart", True) or restarts >= self.sched.get("maxRestarts", 5):
                why = "%s; gave up after %d restarts" % (detail, restarts)
                self.save_status(state="error", reason=why, stoppedAt=now_ms())
                log_event(self.dir, "error", why, epoch=self.spec["epoch"])
                return
            restarts += 1
            delay = self.backoff(restarts)
            self.save_status(state="restarting", restarts=restarts, reason=detail, lastRestartAt=now_ms())
            log_event(self.dir, "restart", "%s; restart %d in %.1fs" % (detail, restarts, delay),
                      epoch=self.spec["epoch"], restarts=restarts)
            if not self.wait(delay):
                return

    def backoff(self, restarts):
        import random
        base = self.sched.get("restartDelay", 10000) / 1000.0
        delay = min(600.0, base * (2 ** (restarts - 1)))
        return delay * random.uniform(0.5, 1.5)     # jitter: strategies that fail together spread out

    def wait(self, seconds):
        """Sleep between restarts, still honouring stop and the lease. False when it must end."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.stop_reason or self.lease_expired():
                self.finish(self.stop_reason or self.lease_reason())
                return False
            self.apply_pause()
            time.sleep(self.poll)
        return True

    def finish(self, reason, exit_code=None):
        state = "stopped"
        self.save_status(state=state, reason=reason, stoppedAt=now_ms(), exitCode=exit_code)
        event = "lease-expired" if reason.startswith("lease expired") else "stopped"
        log_event(self.dir, event, reason, epoch=self.spec["epoch"])
        if self.log is not None:       # `quantlab logs` says why the output ends here
            stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            self.log.write(("%s quantlab-supervisor: stopped: %s\n" % (stamp, reason)).encode())

    def apply_pause(self):
        if self.pause_change is None:
            return
        self.paused, self.pause_change = self.pause_change, None
        import signal
        if self.proc is not None and self.proc.poll() is None:
            signal_group(self.proc.pid, signal.SIGUSR1 if self.paused else signal.SIGUSR2)
        self.save_status(state="paused" if self.paused else "running")
        log_event(self.dir, "paused" if self.paused else "resumed", epoch=self.spec["epoch"])

    def lease_expired(self):
        if self.ttl <= 0:
            return False
        try:
            mtime = os.stat(self.path("lease.json")).st_mtime_ns
        except OSError:
            mtime = None
        if mtime != self.lease_mtime:
            self.lease_mtime = mtime
            lease = read_json(self.path("lease.json"), {}) or {}
            if lease.get("epoch") == self.spec["epoch"] and "deadline" in lease:
                self.lease_deadline = max(self.lease_deadline or 0, lease["deadline"])
        return self.lease_deadline is not None and boottime() > self.lease_deadline

    def lease_reason(self):
        return ("lease expired: the controller did not renew it for %gs (is `quantlab reconcile` "
                "running?); stopped so that no second copy can run" % self.ttl)

    def environment(self):
        spec = self.spec
        env = dict((k, os.environ[k]) for k in ENV_PASSTHROUGH if k in os.environ)
        account = spec.get("account")
        if account:
            env.update(read_secrets(os.path.join(spec["workdir"], "secrets", account + ".env")))
        env.update({
            "QUANTLAB_STRATEGY_ID": spec["strategy"],
            "QUANTLAB_STRATEGY_FILE": os.path.join(spec["workdir"], spec["file"]),
            "QUANTLAB_PARAMS": json.dumps(spec["params"]),
            "QUANTLAB_HEARTBEAT_MS": str(spec["heartbeatMs"]),
            "QUANTLAB_STATE_DIR": self.path("state"),
            "QUANTLAB_HEARTBEAT_FILE": self.path("heartbeat.json"),
            "QUANTLAB_LEASE_FILE": self.path("lease.json"),
            "QUANTLAB_WORKER_ID": spec["worker"],
            "QUANTLAB_REGION": spec.get("region") or "",
            "QUANTLAB_EPOCH": str(spec["epoch"]),
            "QUANTLAB_PROXY": spec.get("proxy") or "",
            "QUANTLAB_PAUSED": "1" if self.paused else "0",
        })
        if spec.get("proxy"):
            for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
                env[name] = spec["proxy"]
        return env

    def argv(self):
        runner = os.path.join(self.spec["workdir"], self.spec["runnerFile"])
        return [part.replace("{runner}", runner) for part in self.spec["runner"]]

    def run_runner(self, restarts):
        """One life of the runner: ('final', why) when the supervisor must end, ('unhealthy', why)."""
        import subprocess
        try:
            os.unlink(self.path("heartbeat.json"))
        except OSError:
            pass
        try:
            self.proc = subprocess.Popen(self.argv(), env=self.environment(), cwd=self.dir,
                                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                         stderr=subprocess.STDOUT, close_fds=True, start_new_session=True)
        except OSError as exc:
            return "unhealthy", "cannot start the runner %s: %s" % (self.argv()[0], exc.strerror)
        write_pid(self.path("runner.pid"), self.proc.pid)
        started = time.monotonic()
        self.save_status(state="paused" if self.paused else "starting", startedAt=now_ms(),
                         runnerPid=self.proc.pid, reason=None, exitCode=None)
        watch = HealthWatch(self, started, restarts)
        while True:
            self.log.pump(self.proc.stdout, self.poll)
            self.apply_pause()
            if self.stop_reason:
                code = self.stop_runner()
                self.finish(self.stop_reason, code)
                return "final", self.stop_reason
            if self.lease_expired():
                code = self.stop_runner()
                self.finish(self.lease_reason(), code)
                return "final", "lease expired"
            code = self.proc.poll()
            if code is not None:
                self.log.drain(self.proc.stdout)
                self.save_status(exitCode=code)
                return "unhealthy", "runner exited with code %d" % code
            problem = watch.check()
            if problem:
                self.stop_runner()
                return "unhealthy", problem

    def stop_runner(self):
        """SIGTERM so st_exit runs, SIGKILL after stopTimeoutSeconds; returns the exit code."""
        import signal
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        signal_group(self.proc.pid, signal.SIGCONT)
        signal_group(self.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + float(self.sched.get("stopTimeoutSeconds", 30))
        while self.proc.poll() is None and time.monotonic() < deadline:
            self.log.pump(self.proc.stdout, 0.05)
        if self.proc.poll() is None:
            signal_group(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        signal_group(self.proc.pid, signal.SIGKILL)      # anything the runner left in its group
        self.log.drain(self.proc.stdout)
        return self.proc.returncode


class HealthWatch(object):
    """The heartbeat file is the runner's only report: its age, error count and init signal."""

    def __init__(self, sup, started, restarts):
        self.sup = sup
        self.started = started
        self.restarts = restarts
        self.seen_mtime = None
        self.first_beat = None
        self.errors = 0
        self.last_error_at = None
        self.resumed_at = started

    def check(self):
        sup = self.sup
        now = time.monotonic()
        if sup.paused:
            self.resumed_at = now
        try:
            mtime = os.stat(sup.path("heartbeat.json")).st_mtime
        except OSError:
            mtime = None
        if mtime is None:
            limit = float(sup.sched.get("initTimeoutSeconds", 60))
            if now - self.started > limit:
                return "st_init did not finish within %gs (initTimeoutSeconds)" % limit
            return None
        if mtime != self.seen_mtime:
            self.seen_mtime = mtime
            beat = read_json(sup.path("heartbeat.json"), {}) or {}
            if self.first_beat is None:
                self.first_beat = now
                if sup.status.get("state") == "starting":
                    sup.save_status(state="paused" if sup.paused else "running")
            errors = int(beat.get("errorCount") or 0)
            if errors > self.errors:
                self.errors, self.last_error_at = errors, now
                if errors > sup.sched.get("maxErrors", 10):
                    return "errorCount %d > maxErrors %d (last error: %s)" % (
                        errors, sup.sched.get("maxErrors", 10), beat.get("lastError"))
        age = time.time() - mtime
        if not sup.paused and now - self.resumed_at > 3 * sup.heartbeat_s and age > 3 * sup.heartbeat_s:
            return "no heartbeat for %.1fs (more than 3 x heartbeatMs)" % age
        self.maybe_reset_restarts(now)
        return None

    def maybe_reset_restarts(self, now):
        """After a healthy stretch (10 heartbeats with no new error) the restart budget refills."""
        sup = self.sup
        if not sup.status.get("restarts") or self.first_beat is None:
            return
        healthy_since = max(self.first_beat, self.last_error_at or 0)
        if now - healthy_since >= max(10 * sup.heartbeat_s, 1.0):
            sup.save_status(restarts=0)
            log_event(sup.dir, "recovered", "healthy for %.0fs; restart count reset" % (now - healthy_since),
                      epoch=sup.spec["epoch"])


class OutputLog(object):
    """The runner's stdout and stderr, relayed into output.log and rotated at a size cap."""

    def __init__(self, path, cap=LOG_CAP_BYTES):
        self.path, self.cap = path, cap
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self.size = os.fstat(self.fd).st_size

    def write(self, data):
        if self.size + len(data) > self.cap and self.size:
            os.close(self.fd)
            os.replace(self.path, self.path + ".1")
            self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            self.size = 0
        os.write(self.fd, data)
        self.size += len(data)

    def pump(self, pipe, timeout):
        import select
        try:
            ready, _, _ = select.select([pipe], [], [], timeout)
        except (OSError, ValueError, InterruptedError):
            return
        if ready:
            data = os.read(pipe.fileno(), 65536)
            if data:
                self.write(data)
            else:
                time.sleep(timeout)              # EOF: the runner closed its output

    def drain(self, pipe):
        import select
        while True:
            try:
                ready, _, _ = select.select([pipe], [], [], 0)
                data = os.read(pipe.fileno(), 65536) if ready else b""
            except (OSError, ValueError):
                return
            if not data:
                return
            self.write(data)


def read_secrets(path):
    """KEY=VALUE lines (comments, blank lines and `export ` prefixes allowed; quotes stripped)."""
    out = {}
    try:
        with open(path) as handle:
            for line in handle:
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
    except OSError:
        pass
    return out


def supervise(args):
    idir = args[0]
    sup = Supervisor(idir)
    try:
        sup.run()
    except Exception as exc:              # noqa: BLE001 - record why, never leave a silent corpse
        import traceback
        traceback.print_exc()
        try:
            sup.stop_runner()
        finally:
            sup.save_status(state="error", reason="supervisor failed: %r" % (exc,), stoppedAt=now_ms())
            log_event(idir, "error", "supervisor failed: %r" % (exc,))
        return 1
    return 0


# --- entry point ------------------------------------------------------------------------------------

COMMANDS = {
    "probe": probe,
    "start": start,
    "stop": stop,
    "pause": lambda request, args: set_paused(request, True),
    "resume": lambda request, args: set_paused(request, False),
    "logs": logs,
}


def main(argv):
    if len(argv) < 2:
        sys.stderr.write("usage: agent.py probe|start|stop|pause|resume|logs|supervise ...\n")
        return EXIT_BAD_REQUEST
    command, args = argv[1], argv[2:]
    if command == "supervise":
        return supervise(args)
    if command not in COMMANDS:
        sys.stderr.write("unknown command %r\n" % command)
        return EXIT_BAD_REQUEST
    try:
        if "--request" in args:        # the request from a file instead of stdin (by hand, other tools)
            with open(args[args.index("--request") + 1], "rb") as handle:
                request = json.loads(handle.read())
        else:
            request = json.loads(sys.stdin.buffer.read() or b"{}")
    except (OSError, IndexError) as exc:
        sys.stderr.write("cannot read the request: %s\n" % exc)
        return EXIT_BAD_REQUEST
    except ValueError as exc:
        sys.stderr.write("request is not JSON: %s\n" % exc)
        return EXIT_BAD_REQUEST
    result = COMMANDS[command](request, args)
    answer, code = result if isinstance(result, tuple) else (result, 0)
    if answer is not None:
        sys.stdout.write(json.dumps(answer))
        sys.stdout.flush()
    return code


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv))
    except BrokenPipeError:
        sys.exit(0)
