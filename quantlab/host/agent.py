#!/usr/bin/env python3
"""quantlab host agent: shipped to every worker host, standard library only, Python 3.8+.

It imports nothing of the controller. The controller runs it with one subcommand per call, a JSON
request on stdin and a JSON answer on stdout:

  probe                 first renews the leases the request names (`renew`: epoch must match), then
                        describes every instance of every worker workdir named in the request, the
                        host's load, runtimes and clocks. Each worker's entry lists `renewed` (ids) and
                        `refused` ({id: why}) for the renewals it was asked for.
  start                 start (or replace) one strategy under its own supervisor process
  stop | pause | resume one strategy
  logs                  tail of a strategy's output (the request's `follow` keeps streaming)
  supervise DIR         (internal) the supervisor of one instance; started by `start`

`--request FILE` reads the request from a file instead of stdin (by hand, other tools).

Renewals and starts carry a not-after instant on this host's boot-time clock (`notAfter`: bootId and
boottime, from the clock this host reported in an earlier answer). A request that arrives after it,
or on another boot, grants nothing, and no lease ever reaches past not-after + leaseTtlSeconds: the
controller has counted the lease as lapsed from then on, whether or not its call returned. A lease
that has run out stays out: the agent never renews it, and neither the supervisor nor the runner takes
a later deadline once the one they know has passed (the strategy is fenced; a new start is needed).

start, stop, pause and resume of one instance are serialised by a lock on `<instance>/.lock`. A file
in the instance folder can be held by the strategy too, so it is never waited for without a deadline:
when it cannot be had within 10 s (or the request's `lockTimeoutSeconds`; a start never waits past its
not-after) the answer is {"result": "busy", "reason": ...} and nothing was done. Renewals take no lock.
Once `start` has spawned the supervisor it always answers {"result": "started", "pid": N}; bookkeeping
that failed after that (stop likewise) is listed in the answer's `problems`, and the supervisor
rewrites supervisor.pid itself at once.

Layout of a workdir:
  agent/                 this file and the reference runner, by content hash
  files/<sha256>.<ext>   strategy files, content-addressed
  secrets/<account>.env  KEY=VALUE lines added to the runner's environment
  instances/<id>/        spec.json status.json lease.json heartbeat.json output.log events.log state/

state/ is the strategy's checkpoint folder: the controller copies it (`checkpoints`, each round,
only when it differs from the controller's copy; `stop`, the final one) and puts it back on the
worker a strategy moves to (`start`).

The runner, and everything a strategy does, runs as this agent's user with the instance folder as
its working directory, so every file in that folder is hostile input here: it is opened without
following links or blocking, read only when it is a regular file under a size cap, and every field
is type-checked. A bad file is its instance's problem (reported as `problems`), never the host's.

Containment: `supervise` forks. The parent (the keeper, whose pid is in supervisor.pid) forwards
signals to the child (the supervisor proper) and, should the supervisor be killed outright, stops
what it left. Both are child subreapers (Linux), so every process a strategy starts, also a
`setsid` or double-forked one, stays below them and is killed before a restart and at the end.
"""
import hashlib
import json
import os
import stat
import sys
import time

EXIT_MISSING = 3        # files the request names are not on the host: upload them, then retry
EXIT_BAD_REQUEST = 4
LOG_CAP_BYTES = 5 * 1024 * 1024
EVENTS_CAP_BYTES = 512 * 1024
FINAL_STATES = ("stopped", "error")
ENV_PASSTHROUGH = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "TZ", "TMPDIR")

# Caps for reading files an instance can write (see "hostile files" below).
SMALL_FILE_CAP = 64 * 1024             # heartbeat, status, lease, control and pid files
SPEC_FILE_CAP = 4 * 1024 * 1024        # spec.json carries the strategy's params
EVENTS_TAIL_BYTES = 256 * 1024         # events.log is read from its tail only
TEXT_CAP = 500                         # a text field (lastError, reason) is clipped to this
PROBLEM_CAP = 200                      # one entry of an instance's `problems`
MAX_PROBLEMS = 8

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
PR_GET_CHILD_SUBREAPER = 37


# --- small helpers ---------------------------------------------------------------------------------

def now_ms():
    return int(time.time() * 1000)


def boottime():
    """Seconds on a clock that never jumps and keeps counting through suspend: leases use it."""
    clock = getattr(time, "CLOCK_BOOTTIME", None)
    return time.clock_gettime(clock) if clock is not None else time.monotonic()


def boot_id():
    """The kernel's id of this boot: boot-time seconds from another boot mean nothing here."""
    try:
        with open("/proc/sys/kernel/random/boot_id", "rb") as handle:
            return handle.read(64).decode("ascii", "replace").strip() or None
    except OSError:
        return None


def lease_limit(not_after):
    """The latest boot-time instant a lease granted for this request may reach, or (None, why) when
    the request must be refused. A request carries its not-after on this host's boot-time clock:
    one that arrives later (a frozen sshd resumed, a slow link, a call the controller gave up on)
    was already counted as lapsed by the controller and must grant nothing."""
    if not isinstance(not_after, dict):
        return None, "the request carries no not-after; refusing to grant a lease"
    deadline = not_after.get("boottime")
    if not isinstance(deadline, (int, float)) or isinstance(deadline, bool):
        return None, "the request's not-after is not a number"
    if not_after.get("bootId") != boot_id():
        return None, "the host rebooted since the controller last saw it (boot id %s, not %s)" % (
            boot_id(), not_after.get("bootId"))
    late = boottime() - deadline
    if late > 0:
        return None, "late request: it arrived %.3fs after its not-after" % late
    return float(deadline), None


def clip(text, limit=TEXT_CAP):
    return text if len(text) <= limit else text[:limit - 3] + "..."


# --- hostile files ---------------------------------------------------------------------------------
# A strategy can replace any file of its instance folder with a FIFO (an open would block), a link to
# /dev/zero (a read would never end), a directory, or garbage. Everything below reads such files.

class BadFile(Exception):
    """A file that is there but cannot be used; the message says why, briefly."""


NO_FOLLOW = getattr(os, "O_NOFOLLOW", 0)
READ_FLAGS = os.O_RDONLY | NO_FOLLOW | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)


def file_kind(mode):
    for test, name in ((stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "fifo"), (stat.S_ISLNK, "symlink"),
                       (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device")):
        if test(mode):
            return name
    return "unknown kind"


def open_regular(path):
    """A read-only fd of `path`, or None when there is no such file; raises BadFile for anything but
    a regular file. Never follows a link, never blocks (a FIFO is refused before it is opened)."""
    try:
        mode = os.lstat(path).st_mode
        if not stat.S_ISREG(mode):
            raise BadFile("not a regular file (%s)" % file_kind(mode))
        fd = os.open(path, READ_FLAGS)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise BadFile(exc.strerror or str(exc))
    try:
        mode = os.fstat(fd).st_mode
    except OSError as exc:
        os.close(fd)
        raise BadFile(exc.strerror or str(exc))
    if not stat.S_ISREG(mode):               # swapped between the lstat and the open
        os.close(fd)
        raise BadFile("not a regular file (%s)" % file_kind(mode))
    return fd


def read_instance_file(path, cap=SMALL_FILE_CAP, tail=False):
    """(bytes, mtime) of a file an instance can write, or None when it is missing. Raises BadFile when
    it is not a regular file or is larger than `cap`; with `tail`, a larger file gives its last `cap`
    bytes instead. The mtime comes from the same open file as the bytes."""
    fd = open_regular(path)
    if fd is None:
        return None
    try:
        st = os.fstat(fd)
        if st.st_size > cap:
            if not tail:
                raise BadFile("too large (%d bytes, the limit is %d)" % (st.st_size, cap))
            os.lseek(fd, st.st_size - cap, os.SEEK_SET)
        chunks, size = [], 0
        while size <= cap:                   # the file may grow while we read: stop past the cap
            chunk = os.read(fd, cap + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        data = b"".join(chunks)
        if len(data) > cap:
            if not tail:
                raise BadFile("too large (more than %d bytes)" % cap)
            data = data[-cap:]
        return data, st.st_mtime
    except OSError as exc:
        raise BadFile(exc.strerror or str(exc))
    finally:
        os.close(fd)


def parse_json(data):
    """JSON from bytes a strategy may have written: raises BadFile rather than anything else."""
    try:
        return json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise BadFile("not valid JSON (%s)" % clip(str(exc), 80))


# Field kinds: a test and what it expects, in words. A trailing "?" in a field list allows null.
def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value):
    import math
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


FIELD_KINDS = {
    "count": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "int": (_is_int, "an integer"),
    "time": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
    "number": (_is_number, "a number"),
    "text": (lambda v: isinstance(v, str), "a string"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
}

HEARTBEAT_FIELDS = {"t": "time", "beats": "count", "errorCount": "count", "lastError": "text?", "paused": "bool"}
STATUS_FIELDS = {"state": "text", "epoch": "int?", "specHash": "text?", "restarts": "count", "startedAt": "time?",
                 "stoppedAt": "time?", "exitCode": "int?", "reason": "text?", "paused": "bool",
                 "stopTimeoutSeconds": "time?", "runnerPid": "count?", "lastRestartAt": "time?",
                 "containment": "text?"}
LEASE_FIELDS = {"epoch": "int?", "deadline": "number", "expiresAt": "number?"}
CONTROL_FIELDS = {"stop": "text?"}
SPEC_IDS = {"epoch": "int?", "specHash": "text?"}
SPEC_LEASE = {"leaseTtlSeconds": "number?"}
LATE_FENCE = ("; it had ended more than stopTimeoutSeconds before (the host was frozen?), so the runner was "
              "killed without st_exit: a replacement may already trade")
# What a copy is launched with: a start asking for the same epoch and all of these finds it running
# and changes nothing; any difference (a new proxy, runner, lease TTL...) replaces the copy.
LAUNCH_FIELDS = ("file", "runner", "params", "heartbeatMs", "scheduling", "region", "proxy", "account",
                 "leaseTtlSeconds")


def check_fields(value, fields):
    """(the well-typed fields of a JSON object, what is wrong with the others). Fields the list does
    not name are dropped; text is clipped."""
    if not isinstance(value, dict):
        return None, ["not a JSON object (%s)" % type(value).__name__.replace("NoneType", "null")]
    clean, problems = {}, []
    for name, kind in fields.items():
        if name not in value:
            continue
        item, nullable = value[name], kind.endswith("?")
        test, expected = FIELD_KINDS[kind.rstrip("?")]
        if item is None and nullable:
            clean[name] = None
        elif test(item):
            clean[name] = clip(item) if isinstance(item, str) else item
        else:
            problems.append("%s: expected %s, got %s" % (name, expected, clip(json.dumps(item), 40)))
    return clean, problems


def load_checked(path, fields, cap=SMALL_FILE_CAP):
    """(object, mtime, problems) of an instance's JSON file: object holds its well-typed fields, or is
    None when the file is missing or unusable; each problem names the file."""
    name = os.path.basename(path)
    try:
        found = read_instance_file(path, cap)
        if found is None:
            return None, None, []
        data, mtime = found
        clean, problems = check_fields(parse_json(data), fields)
    except BadFile as exc:
        return None, None, ["%s: %s" % (name, exc)]
    return clean, mtime, ["%s: %s" % (name, p) for p in problems]


def read_json(path, default=None, cap=SPEC_FILE_CAP):
    """A JSON file of the agent's own (versions cache, spec): same care, no field checks."""
    try:
        found = read_instance_file(path, cap)
        return default if found is None else parse_json(found[0])
    except BadFile:
        return default


def remove_entry(path):
    """Remove whatever is at `path` (a file, a link, a FIFO, a directory a strategy made there)."""
    import shutil
    try:
        if stat.S_ISDIR(os.lstat(path).st_mode):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.unlink(path)
    except OSError:
        pass


def write_atomic(path, data, mode=0o600):
    """Write-then-rename, so a reader never sees half a file. Never writes through a link or into a
    FIFO left by a strategy, and replaces a directory it put in the way."""
    tmp = "%s.tmp-%d" % (path, os.getpid())
    remove_entry(tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | NO_FOLLOW | getattr(os, "O_CLOEXEC", 0), mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)
    try:
        os.replace(tmp, path)
    except OSError:
        if not os.path.isdir(path) or os.path.islink(path):
            remove_entry(tmp)
            raise
        remove_entry(path)
        os.replace(tmp, path)


def write_json(path, value, mode=0o600):
    write_atomic(path, json.dumps(value, sort_keys=True).encode(), mode)


def open_append(path):
    """An append-only fd of one of the agent's logs. Whatever else a strategy left at that name (a
    FIFO that would block, a link, a directory) is removed and the log starts anew."""
    flags = (os.O_WRONLY | os.O_APPEND | os.O_CREAT | NO_FOLLOW | getattr(os, "O_NONBLOCK", 0)
             | getattr(os, "O_CLOEXEC", 0))
    for _ in range(2):
        try:
            fd = os.open(path, flags, 0o600)
        except OSError:
            remove_entry(path)
            continue
        if stat.S_ISREG(os.fstat(fd).st_mode):
            return fd
        os.close(fd)
        remove_entry(path)
    return os.open(path, flags | os.O_EXCL, 0o600)


def append_line(path, value, cap=EVENTS_CAP_BYTES):
    try:
        if os.lstat(path).st_size > cap:
            os.replace(path, path + ".1")
    except OSError:
        pass
    fd = open_append(path)
    try:
        os.write(fd, (json.dumps(value, sort_keys=True) + "\n").encode())
    finally:
        os.close(fd)


# --- processes -------------------------------------------------------------------------------------

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


# Beside each pid file: "<pid> <start time>", so that a reused pid is never taken for ours. The pid
# file itself holds the pid alone, for people and their tools (`kill $(cat supervisor.pid)`).
PID_IDENTITY = ".ident"


def write_pid(path, pid):
    # The identity first: a reader trusts it over the pid file.
    write_atomic(path + PID_IDENTITY, ("%d %s\n" % (pid, process_start_time(pid) or "?")).encode())
    write_atomic(path, ("%d\n" % pid).encode())


def _pid_words(path):
    found = read_instance_file(path)
    return found[0].decode("ascii", "replace").split() if found is not None else None


def read_pid_file(path):
    """(pid, start time) recorded for a pid file, or None when there is none; raises BadFile.

    A supervisor of an earlier release writes '<pid> <start time>' into the pid file itself: that
    counts (an identity file left beside it by a later release is stale). Otherwise the identity
    file counts when it names the same pid (or the pid file is gone); a bare pid whose identity
    is missing or names another pid has an unknown start time."""
    plain = _pid_words(path)
    parts = plain
    if plain is None or len(plain) == 1:
        ident = _pid_words(path + PID_IDENTITY)
        if ident is not None and (plain is None or ident[:1] == plain):
            parts = ident
        elif plain is not None:
            parts = plain + ["?"]
    if parts is None:
        return None
    if len(parts) != 2 or not parts[0].isdigit() or not (parts[1].isdigit() or parts[1] == "?"):
        raise BadFile("not '<pid> <start time>'")
    pid = int(parts[0])
    if pid < 2 or pid > 1 << 22:             # 0, 1 or a group-wide number would signal far too much
        raise BadFile("not a usable pid (%d)" % pid)
    return pid, parts[1]


def plain_pid(path, name, problems):
    """The number in the pid file people read, or None (what is wrong with it goes to `problems`)."""
    try:
        parts = _pid_words(path)
        if parts is not None and (not parts or not parts[0].isdigit()):
            raise BadFile("not a pid")
    except BadFile as exc:
        problems.append("%s: %s" % (name, exc))
        return None
    return int(parts[0]) if parts else None


def live_pid(path, problems=None):
    """The pid recorded in `path` if that very process still runs (guards against pid reuse).
    What is wrong with the file goes to `problems` (when given)."""
    try:
        found = read_pid_file(path)
    except BadFile as exc:
        if problems is not None:
            problems.append("%s: %s" % (os.path.basename(path), exc))
        return None
    if found is None:
        return None
    pid, started = found
    current = process_start_time(pid)
    if current is None or (started != "?" and current != "?" and current != started):
        return None
    return pid


def process_table():
    """{pid: (parent pid, state letter)} of every process, from /proc (empty where there is none)."""
    table = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        return table
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % name, "rb") as handle:
                fields = handle.read().rsplit(b")", 1)[1].split()
            table[int(name)] = (int(fields[1]), fields[0].decode("ascii", "replace"))
        except (OSError, IndexError, ValueError):
            continue
    return table


def descendants(table, root):
    children = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), ()):
            found.append(child)
            todo.append(child)
    return found


def reap_children(spare=None):
    """Collect this process's exited children, except `spare` (the runner, which subprocess.Popen
    collects itself): a subreaper inherits every orphan of its strategy, and their zombies."""
    flags = os.WEXITED | os.WNOHANG | getattr(os, "WNOWAIT", 0)
    while hasattr(os, "waitid"):
        try:
            info = os.waitid(os.P_ALL, 0, flags)          # look without collecting
        except (ChildProcessError, OSError):
            return
        if info is None or info.si_pid == spare:
            return
        try:
            os.waitpid(info.si_pid, os.WNOHANG)
        except ChildProcessError:
            return


def end_descendants(spare=None, timeout=5.0):
    """SIGKILL every process below this one until none is left (a zombie counts as gone), reaping
    those that are our own children. Returns the pids still there at the deadline."""
    import signal
    me = os.getpid()
    deadline = time.monotonic() + timeout
    while True:
        reap_children(spare)
        table = process_table()
        left = [pid for pid in descendants(table, me) if table[pid][1] not in ("Z", "X")]
        if not left or time.monotonic() >= deadline:
            return left
        for pid in left:                     # new ones forked meanwhile are found by the next round
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.01)


def strays(idir):
    """Live processes started for this instance, found by the environment every runner gets: the
    last resort for copies whose supervisor and keeper are both gone (killed together)."""
    mark = ("QUANTLAB_HEARTBEAT_FILE=%s" % os.path.join(idir, "heartbeat.json")).encode()
    found = []
    for pid, (_, state) in process_table().items():
        if state in ("Z", "X") or pid == os.getpid():
            continue
        try:
            with open("/proc/%d/environ" % pid, "rb") as handle:
                environ = handle.read(1 << 20)
        except OSError:
            continue
        if mark in environ.split(b"\0"):
            found.append(pid)
    return found


def end_strays(idir, timeout=5.0):
    import signal
    deadline = time.monotonic() + timeout
    while True:
        left = strays(idir)
        if not left or time.monotonic() >= deadline:
            return left
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.02)


_PRCTL = []


def prctl_function():
    """libc's prctl, or None where there is none (not Linux, no ctypes). Looked up once, before any
    fork, so a child can call it without importing anything."""
    if not _PRCTL:
        function = None
        if sys.platform.startswith("linux"):
            try:
                import ctypes
                function = ctypes.CDLL(None, use_errno=True).prctl
                function.restype = ctypes.c_int
            except (ImportError, OSError, AttributeError):
                function = None
        _PRCTL.append(function)
    return _PRCTL[0]


def prctl(option, value):
    function = prctl_function()
    if function is None:
        return False
    import ctypes
    return function(ctypes.c_int(option), ctypes.c_ulong(value), ctypes.c_ulong(0), ctypes.c_ulong(0),
                    ctypes.c_ulong(0)) == 0


def become_subreaper():
    """Orphans of our descendants (also `setsid` and double-forked ones) are reparented to us."""
    return prctl(PR_SET_CHILD_SUBREAPER, 1)


def host_containment():
    """What keeps a strategy's processes below its supervisor on this host."""
    function = prctl_function()
    if function is None:
        return "process-group"
    import ctypes
    flag = ctypes.c_int(0)
    ok = function(ctypes.c_int(PR_GET_CHILD_SUBREAPER), ctypes.byref(flag), ctypes.c_ulong(0),
                  ctypes.c_ulong(0), ctypes.c_ulong(0)) == 0
    return "subreaper" if ok else "process-group"


def die_with_parent(parent, signum):
    """For a child right after fork: `signum` when `parent` dies. False when it already has."""
    prctl(PR_SET_PDEATHSIG, signum)
    return os.getppid() == parent


def instance_dir(workdir, strategy):
    return os.path.join(os.path.abspath(workdir), "instances", strategy)


def log_event(idir, event, detail=None, **extra):
    line = {"t": now_ms(), "event": event}
    if detail:
        line["detail"] = detail
    line.update(extra)
    append_line(os.path.join(idir, "events.log"), line)


LOCK_WAIT_SECONDS = 10.0     # how long start/stop/pause/resume wait for an instance's lock by default
LOCK_POLL_SECONDS = 0.05


def lock_instance(idir, timeout=LOCK_WAIT_SECONDS):
    """Serialise start/stop/pause/resume of one instance: (fd, None) once locked (released when the
    process exits), or (None, why) when the lock is still held `timeout` seconds later. Never a
    blocking flock: .lock is in the instance folder, so the strategy can hold it too, and a blocking
    wait would pile up every later command of this instance for ever."""
    import fcntl
    os.makedirs(idir, mode=0o700, exist_ok=True)
    path = os.path.join(idir, ".lock")
    flags = os.O_RDWR | os.O_CREAT | NO_FOLLOW | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    for _ in range(2):
        try:
            fd = os.open(path, flags, 0o600)
            if stat.S_ISREG(os.fstat(fd).st_mode):
                break
            os.close(fd)
        except OSError:
            pass
        remove_entry(path)               # a link or a FIFO a strategy put there: make a real one
    else:
        fd = os.open(path, flags | os.O_EXCL, 0o600)
    deadline = time.monotonic() + max(0.0, timeout)
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd, None
        except BlockingIOError:
            if time.monotonic() >= deadline:
                break
            time.sleep(LOCK_POLL_SECONDS)
        except OSError as exc:           # e.g. no locks on this file system: say so, never block
            os.close(fd)
            return None, "the instance lock cannot be taken (%s: %s)" % (path, exc.strerror or exc)
    holder = lock_holder(fd)
    os.close(fd)
    return None, "the instance lock is held (%s%s); gave up after %gs" % (
        path, ", by pid %s" % holder if holder else "", max(0.0, timeout))


def lock_holder(fd):
    """Who holds the flock on the file of `fd`, as "pid (command)", from /proc/locks; None when it
    cannot be told (not Linux, another namespace). Only for the message: never acted upon."""
    try:
        st = os.fstat(fd)
        with open("/proc/locks", "rb") as handle:
            lines = handle.read(1 << 20).decode("ascii", "replace").splitlines()
    except OSError:
        return None
    # "1: FLOCK  ADVISORY  WRITE 4242 fd:01:123456 0 EOF"; a waiter's line has "->" after the number.
    wanted = "%02x:%02x:%d" % (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)
    for line in lines:
        fields = line.split()
        if len(fields) >= 6 and fields[1] != "->" and fields[5] == wanted and fields[4].isdigit():
            try:
                with open("/proc/%s/comm" % fields[4], "rb") as handle:
                    return "%s (%s)" % (fields[4], handle.read(64).decode("utf-8", "replace").strip())
            except OSError:
                return fields[4]
    return None


def lock_budget(request):
    """Seconds a command may wait for its instance's lock: LOCK_WAIT_SECONDS, or the request's own
    `lockTimeoutSeconds`, and for a start never past its not-after (it would be refused then)."""
    budget = request.get("lockTimeoutSeconds")
    budget = float(budget) if _is_number(budget) and budget >= 0 else LOCK_WAIT_SECONDS
    not_after = request.get("notAfter")
    limit = not_after.get("boottime") if isinstance(not_after, dict) else None
    if _is_number(limit) and float(request.get("leaseTtlSeconds") or 0) > 0:
        budget = min(budget, max(0.0, limit - boottime()))
    return budget


def busy(why):
    return {"result": "busy", "reason": why}, 0


# --- probe ----------------------------------------------------------------------------------------

def host_facts():
    facts = {"cpus": os.cpu_count() or 1, "time": now_ms(), "python": "%d.%d.%d" % sys.version_info[:3],
             "boottime": boottime(), "bootId": boot_id()}
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
    cache = read_json(cache_path, {})
    if not isinstance(cache, dict):
        cache = {}
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



KNOWN_STATES = ("starting", "running", "paused", "restarting", "stopping") + FINAL_STATES


def read_status(idir, problems):
    """(status fields, usable): the supervisor's status.json, checked; not usable when it is there
    but cannot be read (the supervisor rewrites it within a second)."""
    status, _, found = load_checked(os.path.join(idir, "status.json"), STATUS_FIELDS)
    problems.extend(found)
    if status is not None and status.get("state", "stopped") not in KNOWN_STATES:
        problems.append("status.json: state: %s is not a known state" % clip(json.dumps(status["state"]), 40))
        status = None
    usable = status is not None or not found
    status = status or {}
    if "epoch" not in status or "specHash" not in status:
        # Which copy this is, from the start request, when status.json cannot tell.
        spec, _, found = load_checked(os.path.join(idir, "spec.json"), SPEC_IDS, SPEC_FILE_CAP)
        problems.extend(found)
        for name, value in (spec or {}).items():
            status.setdefault(name, value)
    return status, usable


def read_heartbeat(path, problems=None):
    """The runner's last report, with its age, or None when there is none that can be used."""
    beat, mtime, found = load_checked(path, HEARTBEAT_FIELDS)
    if problems is not None:
        problems.extend(found)
    if beat is None:
        return None
    if found:                            # a report with wrong fields counts as no heartbeat
        return {name: beat[name] for name in ("errorCount", "lastError") if name in beat}
    # For people only (status shows it): wall clock against the file's mtime, so a clock step shows
    # here. Health is judged by the supervisor on its monotonic clock (HealthWatch), never from this.
    beat["ageMs"] = max(0, int((time.time() - mtime) * 1000))
    return beat


def whole(value):
    """Milliseconds as the controller reads them: an int, or None."""
    return None if value is None else int(value)


def describe_instance(idir, strategy, events_since):
    problems = []
    status, status_usable = read_status(idir, problems)
    supervisor = live_pid(os.path.join(idir, "supervisor.pid"), problems)
    runner = live_pid(os.path.join(idir, "runner.pid"), problems)
    state = status.get("state", "stopped")
    reason = status.get("reason")
    if not status_usable and supervisor is not None:
        state, reason = "unknown", "its status.json cannot be read; the supervisor runs and rewrites it"
    elif supervisor is None and state not in FINAL_STATES:
        if runner is not None:
            state, reason = "orphaned", "the supervisor is gone but the runner still runs"
        else:
            state, reason = "stopped", "the supervisor is not running (host restarted, or it was killed)"
    beat = read_heartbeat(os.path.join(idir, "heartbeat.json"), problems)
    if beat is not None and state in FINAL_STATES:
        # The last life's report: its errors explain an `error`; its age and beats are history.
        beat = {"errorCount": beat.get("errorCount", 0), "lastError": beat.get("lastError")}
    beat = beat or {}
    lease, _, found = load_checked(os.path.join(idir, "lease.json"), LEASE_FIELDS)
    problems.extend(found)
    lease = lease or {}
    out = {
        "strategy": strategy, "epoch": status.get("epoch"), "specHash": status.get("specHash"),
        "status": state, "alive": supervisor is not None or runner is not None, "reason": reason,
        "startedAt": whole(status.get("startedAt")), "stoppedAt": whole(status.get("stoppedAt")),
        "restarts": status.get("restarts", 0), "exitCode": status.get("exitCode"),
        "errorCount": beat.get("errorCount", 0), "lastError": beat.get("lastError"),
        "beats": beat.get("beats"), "heartbeatAgeMs": beat.get("ageMs"),
        "leaseLeftSeconds": (round(lease["deadline"] - boottime(), 3)
                             if "deadline" in lease and state not in FINAL_STATES else None),
    }
    if status.get("containment"):
        out["containment"] = status["containment"]
    # The lease its supervisor enforces is the one it was started with: the controller restarts a
    # copy whose TTL is not the fleet's.
    launched, _, found = load_checked(os.path.join(idir, "spec.json"), SPEC_LEASE, SPEC_FILE_CAP)
    problems.extend(found)
    if launched and launched.get("leaseTtlSeconds") is not None:
        out["leaseTtlSeconds"] = launched["leaseTtlSeconds"]
    if events_since is not None:
        out["events"] = read_events(idir, events_since, problems)
    if problems:
        out["problems"] = [clip(p, PROBLEM_CAP) for p in problems[:MAX_PROBLEMS]]
    return out


def clean_event(event):
    """An events.log line as the controller may read it: `t` and `event` well-typed, only plain
    values, text clipped; None for anything else (the strategy can write that file too)."""
    if not isinstance(event, dict) or not _is_number(event.get("t")) or not isinstance(event.get("event"), str):
        return None
    out = {}
    for key, value in list(event.items())[:20]:
        if isinstance(value, str):
            out[clip(str(key), 40)] = clip(value)
        elif value is None or isinstance(value, (bool, int)) or _is_number(value):
            out[clip(str(key), 40)] = value
    return out


def read_events(idir, since, problems=None):
    path = os.path.join(idir, "events.log")
    try:
        if os.lstat(path).st_mtime * 1000 < since:
            return []
        found = read_instance_file(path, EVENTS_TAIL_BYTES, tail=True)
    except BadFile as exc:
        if problems is not None:
            problems.append("events.log: %s" % exc)
        return []
    except OSError:
        return []
    if found is None:
        return []
    lines = found[0].splitlines()
    if len(found[0]) >= EVENTS_TAIL_BYTES:
        lines = lines[1:]                    # the first line is cut
    out = []
    for raw in lines[-200:]:
        try:
            event = clean_event(json.loads(raw))
        except (ValueError, RecursionError):
            continue
        if event is not None and event["t"] > since:
            out.append(event)
    return out


CHECKPOINT_CAP_BYTES = 1024 * 1024
CHECKPOINT_FILE_CAP = 16 * 1024 * 1024        # read from disk, before compression
CHECKPOINT_MAX_FILES = 10000
CHECKPOINT_RAW_CAP = 64 * 1024 * 1024         # all files together, before compression (read every round)


class CheckpointTooLarge(Exception):
    pass


def checkpoint_files(idir):
    """(relative path, bytes) of each regular file in the instance's checkpoint folder
    (QUANTLAB_STATE_DIR), in path order; None when it is not a plain folder (it then stays on the
    host only). Links, FIFOs and other non-regular entries are skipped without being opened, and
    half-written files (".tmp" in the name) left out. Raises CheckpointTooLarge."""
    root = os.path.join(idir, "state")
    try:
        if not stat.S_ISDIR(os.lstat(root).st_mode):
            return None
    except FileNotFoundError:
        return []
    except OSError:
        return None
    found, total = [], 0
    for folder, dirs, names in os.walk(root):   # os.walk does not enter symlinked folders
        dirs.sort()
        for name in sorted(names):
            path = os.path.join(folder, name)
            if ".tmp" in name:
                continue
            if len(found) >= CHECKPOINT_MAX_FILES:
                raise CheckpointTooLarge()
            try:
                read = read_instance_file(path, min(CHECKPOINT_FILE_CAP, CHECKPOINT_RAW_CAP - total))
            except BadFile as exc:
                if str(exc).startswith("too large"):
                    raise CheckpointTooLarge()
                continue                        # a link, a FIFO, a device: not state
            if read is not None:
                total += len(read[0])
                found.append((os.path.relpath(path, root), read[0]))
    return found


def checkpoint_hash(files):
    digest = hashlib.sha256()
    for rel, data in files:
        digest.update(("%s\0%d\0" % (rel, len(data))).encode("utf-8", "surrogateescape"))
        digest.update(data)
    return "sha256:" + digest.hexdigest()


def pack_checkpoint(idir, files=None):
    """The instance's checkpoint folder as {"files": {relative path: base64 of zlib}, "hash", "t"},
    or None when it cannot be copied (not a plain folder, or larger than the cap compressed)."""
    import base64
    import zlib
    try:
        files = checkpoint_files(idir) if files is None else files
    except CheckpointTooLarge:
        return None
    if files is None:
        return None
    packed, total = {}, 0
    for rel, data in files:
        squeezed = zlib.compress(data)
        total += len(squeezed)
        if total > CHECKPOINT_CAP_BYTES:
            return None
        packed[rel] = base64.b64encode(squeezed).decode()
    return {"files": packed, "hash": checkpoint_hash(files), "t": now_ms()}


def copy_checkpoints(request, args):
    """Checkpoints the controller asks for, in a call of their own: for each instance, its folder
    comes back only when it differs from the controller's copy (`have`, the hash of that copy)."""
    answer = {"workers": {}}
    for wid, asked in sorted((request.get("workers") or {}).items()):
        workdir, out = asked.get("workdir"), {}
        for name, want in sorted((asked.get("instances") or {}).items()):
            try:
                out[name] = checkpoint_of(os.path.join(workdir, "instances", name), want)
            except Exception as exc:      # noqa: BLE001 - one instance's trouble is its own
                out[name] = {"result": "error", "error": clip(describe_error(exc))}
        answer["workers"][wid] = out
    return answer


def checkpoint_of(idir, want):
    try:
        if not stat.S_ISDIR(os.lstat(idir).st_mode):
            return {"result": "missing"}
    except FileNotFoundError:
        return {"result": "missing"}
    status, _ = read_status(idir, [])
    if status.get("epoch") != want.get("epoch"):
        return {"result": "other-epoch", "epoch": status.get("epoch")}
    try:
        files = checkpoint_files(idir)
    except CheckpointTooLarge:
        return {"result": "too-large"}
    if files is None:
        return {"result": "too-large"}
    if checkpoint_hash(files) == want.get("have"):
        return {"result": "unchanged"}
    packed = pack_checkpoint(idir, files)
    return {"result": "copied", "checkpoint": packed} if packed is not None else {"result": "too-large"}


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


def write_lease(idir, epoch, ttl, limit):
    """deadline: on this host's boot-time clock, what the supervisor enforces, never past the
    request's not-after + TTL; expiresAt: the same moment in wall-clock ms, for the strategy
    (ctx.leaseExpiresAt). No TTL: no lease, no fencing."""
    lease = {"epoch": epoch, "expiresAt": None}
    if ttl > 0:
        now = boottime()
        deadline = min(now + ttl, limit + ttl)
        lease.update(deadline=deadline, expiresAt=now_ms() + int((deadline - now) * 1000))
    write_json(os.path.join(idir, "lease.json"), lease)


def renew_lease(idir, epoch, ttl, not_after):
    """Extend the lease of the copy with this epoch: None when renewed, else why not. Only the copy
    running here, only a lease that has not run out yet (expired stays expired: its supervisor may
    not have noticed yet, and the controller may already start a replacement elsewhere), and only
    when the request is not late (checked right before writing: this agent may have been frozen)."""
    status, _ = read_status(idir, [])
    if status.get("epoch") != epoch:
        return "it runs epoch %s here, not %s" % (status.get("epoch"), epoch)
    if status.get("state") in FINAL_STATES:
        return "it is %s" % status["state"]
    if live_pid(os.path.join(idir, "supervisor.pid")) is None:
        return "its supervisor is not running"
    lease, _, problems = load_checked(os.path.join(idir, "lease.json"), LEASE_FIELDS)
    if problems or lease is None or lease.get("epoch") != epoch:
        # Fail closed: without the lease this copy holds, there is no telling whether it ran out.
        return "its lease cannot be checked (%s)" % (
            "; ".join(problems) if problems else "lease.json is missing" if lease is None
            else "lease.json holds epoch %s's lease" % lease.get("epoch"))
    if "deadline" in lease:               # no deadline: started without fencing, nothing can run out
        overdue = boottime() - lease["deadline"]
        if overdue > 0:
            return ("its lease ran out at %.3f on the boot-time clock, %.3fs ago; a lease that ran out "
                    "is never renewed" % (lease["deadline"], overdue))
    limit, late = lease_limit(not_after)
    if limit is None:
        return late
    write_lease(idir, epoch, ttl, limit)
    return None


def describe_unreadable(name, why, alive=True):
    # "unknown": the planner leaves it alone (acting blind could run it twice); only this instance.
    return {"strategy": name, "status": "unknown", "alive": alive, "reason": clip(why)}


def instance_names(workdir):
    try:
        return sorted(os.listdir(os.path.join(workdir, "instances")))
    except OSError:
        return []


def probe(request, args):
    """Renewals first, for every worker of the request, and only then everything else: describing
    instances, `node --version` (up to 10 s after a runtime upgrade) and credentials must never make a
    renewal late."""
    ttl = request.get("leaseTtlSeconds")
    not_after = request.get("notAfter")
    answer = {"host": host_facts(), "workers": {}}
    renewals = request.get("renew") or {}
    if ttl is not None and renewals:
        _, refused = lease_limit(not_after)
        if refused:                   # said once for the host; every renewal below is refused too
            answer["host"]["renewRefused"] = refused
    workers = []
    for spec in request.get("workers", []):
        wid, workdir = spec["id"], os.path.abspath(os.path.expanduser(spec["workdir"]))
        worker = {"workdir": workdir, "instances": {}, "renewed": [], "refused": {}}
        renew_worker(workdir, renewals.get(wid) or {}, ttl, not_after, worker)
        workers.append((wid, spec, worker))
    containment = host_containment()
    cache = None
    for wid, spec, worker in workers:
        workdir = worker["workdir"]
        if cache is None:
            cache = os.path.join(workdir, "agent", "versions.json")
        worker["containment"] = containment
        worker["runtime"] = program_version(spec.get("program") or "node", cache)
        try:
            worker["credentials"] = sorted(n[:-4] for n in os.listdir(os.path.join(workdir, "secrets"))
                                           if n.endswith(".env"))
        except OSError:
            worker["credentials"] = []
        since = (request.get("eventsSince") or {}).get(wid)
        root = os.path.join(workdir, "instances")
        for name in instance_names(workdir):
            worker["instances"][name] = probe_instance(os.path.join(root, name), name, since)
        answer["workers"][wid] = worker
    answer["host"]["answeredAt"] = now_ms()
    return answer


def renew_worker(workdir, renew, ttl, not_after, worker):
    """The renewals asked for one worker: each id goes to `renewed` or, with why, to `refused`.
    Whatever goes wrong with one instance is that instance's alone."""
    present = set(instance_names(workdir))
    for name in sorted(renew):
        idir = os.path.join(workdir, "instances", name)
        try:
            if ttl is None:
                why = "the request carries no leaseTtlSeconds"
            elif name not in present or not stat.S_ISDIR(os.lstat(idir).st_mode):
                why = "no such instance here"
            else:
                why = renew_lease(idir, renew[name], float(ttl), not_after)
        except Exception as exc:          # noqa: BLE001 - disk full, a file half gone, a bug: say so, go on
            why = "the agent could not renew it: %s" % describe_error(exc)
        if why is None:
            worker["renewed"].append(name)
        else:
            worker["refused"][name] = clip(why)


def describe_error(exc):
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return "%s: %s" % (type(exc).__name__, exc)


def probe_instance(idir, name, since):
    """Describe one instance of a probe. Whatever goes wrong here is this instance's alone: the
    host's answer never fails because of one instance."""
    try:
        if not stat.S_ISDIR(os.lstat(idir).st_mode):
            described = describe_unreadable(name, "not an instance folder", alive=False)
            described["problems"] = ["%s: not a directory (%s)" % (name, file_kind(os.lstat(idir).st_mode))]
            return described
        return describe_instance(idir, name, since)
    except Exception as exc:              # noqa: BLE001 - disk full, a file half gone, a bug: say so, go on
        return describe_unreadable(name, "the agent could not read it: %s: %s" % (type(exc).__name__, exc))


# --- start / stop / pause / resume ------------------------------------------------------------------

def missing_files(request):
    workdir = request["workdir"]
    names = [request["file"]]
    if any("{runner}" in part for part in request["runner"]):
        names.append(request["runnerFile"])
    return [n for n in names if not os.path.isfile(os.path.join(workdir, n))]


def launched_as_asked(idir, request):
    """Whether the copy in `idir` was started with the launch `request` asks for."""
    try:
        running = load_spec(os.path.join(idir, "spec.json"))
    except ValueError:
        return False
    return all(running.get(name) == request.get(name) for name in LAUNCH_FIELDS)


def start(request, args):
    request["workdir"] = os.path.abspath(os.path.expanduser(request["workdir"]))
    ttl = float(request.get("leaseTtlSeconds") or 0)
    if ttl > 0:
        _, refused = lease_limit(request.get("notAfter"))
        if refused:
            return {"result": "refused", "reason": refused}, 0
    missing = missing_files(request)
    if missing:
        return {"result": "missing", "missing": missing}, EXIT_MISSING
    idir = instance_dir(request["workdir"], request["strategy"])
    lock, held = lock_instance(idir, lock_budget(request))
    if lock is None:
        return busy(held)
    problems = []                     # bookkeeping that failed; said in the answer, never fatal once spawned
    status, _ = read_status(idir, [])
    supervisor = live_pid(os.path.join(idir, "supervisor.pid"))
    same = status.get("epoch") == request["epoch"] and status.get("specHash") == request["specHash"]
    if supervisor is not None and same and status.get("state") not in FINAL_STATES \
            and launched_as_asked(idir, request):
        return {"result": "already-running", "pid": supervisor}, 0
    if supervisor is not None or live_pid(os.path.join(idir, "runner.pid")) is not None:
        why = "replaced by a new start (epoch %s)" % request["epoch"]
        stop_instance(idir, why, float(status.get("stopTimeoutSeconds") or 30), problems)
    end_strays(idir)                  # nothing of an earlier copy may run beside the new one
    keep_restarts = status.get("epoch") == request["epoch"] and status.get("specHash") == request["specHash"]
    if os.path.islink(os.path.join(idir, "state")):
        remove_entry(os.path.join(idir, "state"))           # the checkpoint folder is a real folder
    os.makedirs(os.path.join(idir, "state"), mode=0o700, exist_ok=True)
    if request.get("checkpoint"):
        unpack_checkpoint(idir, request.pop("checkpoint"))   # a move: continue where it left off
    # A stopped copy's pid files name nothing: the new supervisor must not take them for its own.
    for stale in ("heartbeat.json", "runner.pid", "runner.pid" + PID_IDENTITY, "supervisor.pid",
                  "supervisor.pid" + PID_IDENTITY, "control.json"):
        remove_entry(os.path.join(idir, stale))
    limit = None
    if ttl > 0:
        # Checked again: stopping a copy it replaces may have taken a while.
        limit, refused = lease_limit(request.get("notAfter"))
        if refused:
            return {"result": "refused", "reason": refused}, 0
    write_json(os.path.join(idir, "spec.json"), request)
    write_lease(idir, request["epoch"], ttl, limit)
    write_json(os.path.join(idir, "status.json"), {
        "state": "starting", "epoch": request["epoch"], "specHash": request["specHash"],
        "restarts": status.get("restarts", 0) if keep_restarts else 0, "startedAt": now_ms(),
        "paused": bool(request.get("paused")),
        "stopTimeoutSeconds": request["scheduling"]["stopTimeoutSeconds"]})
    import subprocess
    log = open_append(os.path.join(idir, "supervisor.log"))
    try:
        child = subprocess.Popen([sys.executable, "-I", "-S", os.path.abspath(__file__), "supervise", idir],
                                 stdin=subprocess.DEVNULL, stdout=log, stderr=log, close_fds=True,
                                 start_new_session=True, cwd=idir)
    finally:
        try:
            os.close(log)
        except OSError:
            pass
    # From here on a copy runs: the answer must say "started" whatever else fails (a full disk, an
    # events.log the strategy made unwritable), or the controller would believe nothing runs here.
    # The supervisor writes supervisor.pid itself as soon as it runs, and keeps it.
    bookkeeping(problems, "supervisor.pid", write_pid, os.path.join(idir, "supervisor.pid"), child.pid)
    bookkeeping(problems, "events.log", log_event, idir, "start", "epoch %s" % request["epoch"],
                epoch=request["epoch"])
    answer = {"result": "started", "pid": child.pid}
    if problems:
        answer["problems"] = [clip(p, PROBLEM_CAP) for p in problems[:MAX_PROBLEMS]]
    return answer, 0


def bookkeeping(problems, name, action, *args, **kwargs):
    """One write the agent keeps for itself (a pid file, an event, a status): a failure is added to
    `problems` (for the answer) instead of raised, once the real work has been done."""
    try:
        action(*args, **kwargs)
    except Exception as exc:          # noqa: BLE001 - a full disk, a directory in the way, anything
        problems.append("%s: cannot write it: %s" % (name, describe_error(exc)))


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


def supervisor_children(keeper):
    """The supervisor proper below a keeper (or nothing, for a supervisor of an earlier release)."""
    found = []
    for pid, (ppid, state) in process_table().items():
        if ppid != keeper or state in ("Z", "X"):
            continue
        try:
            with open("/proc/%d/cmdline" % pid, "rb") as handle:
                if b"supervise" in handle.read(65536).split(b"\0"):
                    found.append(pid)
        except OSError:
            continue
    return found


def stop_instance(idir, reason, grace, problems):
    """Ask the supervisor to stop (st_exit runs, SIGKILL after the grace); clean up if it is gone.
    Writes that fail are added to `problems`: they never keep the copy from being stopped."""
    import signal
    # Only tells the supervisor why; without it the stop still happens ("stopped by signal").
    bookkeeping(problems, "control.json", write_json, os.path.join(idir, "control.json"), {"stop": reason})
    supervisor_pid = os.path.join(idir, "supervisor.pid")
    supervisor = live_pid(supervisor_pid)
    if supervisor is not None:
        try:
            os.kill(supervisor, signal.SIGTERM)
        except OSError:
            pass
        if wait_gone(supervisor_pid, grace + 5):
            return "stopped"
        # Stuck past the grace: kill the supervisor proper and the runner; its keeper (still alive, so
        # every process the strategy started is below it) then kills the rest and exits.
        for pid in supervisor_children(supervisor):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:               # gone meanwhile
                pass
        stuck_runner = live_pid(os.path.join(idir, "runner.pid"))
        if stuck_runner is not None:
            signal_group(stuck_runner, signal.SIGKILL)
        if not wait_gone(supervisor_pid, 5):
            signal_group(supervisor, signal.SIGKILL)
    runner = live_pid(os.path.join(idir, "runner.pid"))
    if runner is not None:                      # no supervisor to ask: do its job here
        signal_group(runner, signal.SIGTERM)
        if not wait_gone(os.path.join(idir, "runner.pid"), grace):
            signal_group(runner, signal.SIGKILL)
            wait_gone(os.path.join(idir, "runner.pid"), 5)
        bookkeeping(problems, "events.log", log_event, idir, "stopped", reason + " (its supervisor was gone)")
    left = end_strays(idir)
    status, usable = read_status(idir, [])
    if status.get("state") not in FINAL_STATES or not usable:
        status.update({"state": "stopped", "reason": reason, "stoppedAt": now_ms()})
        bookkeeping(problems, "status.json", write_json, os.path.join(idir, "status.json"), status)
    if left:
        bookkeeping(problems, "events.log", log_event, idir, "instance-problem",
                    "processes %s of this strategy survived SIGKILL" % left)
    return "stopped" if supervisor is not None or runner is not None else "not-running"


def stop(request, args):
    idir = instance_dir(request["workdir"], request["strategy"])
    if not os.path.isdir(idir):
        return {"result": "not-running"}, 0
    lock, held = lock_instance(idir, lock_budget(request))
    if lock is None:
        return busy(held)
    status, _ = read_status(idir, [])
    epoch = request.get("epoch")
    if epoch is not None and status.get("epoch") not in (None, epoch):
        # A newer copy runs here now: never stop it on behalf of an older one.
        return {"result": "epoch-mismatch", "running": status.get("epoch")}, 0
    # The longer of the two: the copy may have been started with more time for st_exit than asked now.
    grace = max(float(request.get("stopTimeoutSeconds") or 0), float(status.get("stopTimeoutSeconds") or 0)) or 30.0
    problems = []
    answer = {"result": stop_instance(idir, request.get("reason") or "stopped by the controller", grace, problems)}
    if request.get("checkpoint"):                # a move: the new worker gets the final state
        answer["checkpoint"] = pack_checkpoint(idir)
    if problems:
        answer["problems"] = [clip(p, PROBLEM_CAP) for p in problems[:MAX_PROBLEMS]]
    os.close(lock)
    if isinstance(request.get("keep"), list):    # the controller names what is placed on this worker
        keep = set(request["keep"]) | {request["strategy"]}
        answer["pruned"] = prune_instances(request["workdir"], keep, request.get("keepStopped", KEEP_STOPPED))
    return answer, 0


# Stopped instance folders (logs, final checkpoint) kept per worker beyond those placed there.
KEEP_STOPPED = 20


def prune_instances(workdir, keep, retain):
    """Remove the folders of stopped instances beyond the newest `retain`: never one in `keep`,
    never one with a live supervisor or runner, never one whose lock is held. The names removed."""
    import shutil
    root = os.path.join(os.path.abspath(workdir), "instances")
    stopped = []
    for name in instance_names(workdir):
        idir = os.path.join(root, name)
        try:
            if name in keep or not stat.S_ISDIR(os.lstat(idir).st_mode):
                continue
        except OSError:
            continue
        if live_pid(os.path.join(idir, "supervisor.pid")) or live_pid(os.path.join(idir, "runner.pid")):
            continue
        status, _ = read_status(idir, [])
        stopped_at = status.get("stoppedAt")
        stopped.append((stopped_at if isinstance(stopped_at, (int, float)) else 0, name))
    removed = []
    for _, name in sorted(stopped, reverse=True)[max(0, int(retain)):]:
        idir = os.path.join(root, name)
        lock, _ = lock_instance(idir, 0)
        if lock is None:
            continue
        try:
            shutil.rmtree(idir)                 # does not follow the links a strategy may have left
            removed.append(name)
        except OSError:
            pass
        finally:
            os.close(lock)
    return removed


def set_paused(request, paused):
    import signal
    idir = instance_dir(request["workdir"], request["strategy"])
    lock, held = lock_instance(idir, lock_budget(request))
    if lock is None:
        return busy(held)
    supervisor = live_pid(os.path.join(idir, "supervisor.pid"))
    if supervisor is None:
        return {"result": "not-running"}, 0
    os.kill(supervisor, signal.SIGUSR1 if paused else signal.SIGUSR2)
    want = "paused" if paused else "running"
    deadline = time.monotonic() + 10
    status = {}
    while time.monotonic() < deadline:
        status, _ = read_status(idir, [])
        if bool(status.get("paused")) == paused and status.get("state") in (want, "restarting", "starting"):
            return {"result": want}, 0
        time.sleep(0.02)
    return {"result": "unconfirmed", "state": status.get("state")}, 1


# --- logs ------------------------------------------------------------------------------------------

def open_log(path):
    """A file object of one of the instance's logs, or None when it is missing or not a regular file."""
    try:
        fd = open_regular(path)
    except BadFile:
        return None
    return None if fd is None else os.fdopen(fd, "rb")


def tail_bytes(path, lines):
    """The last `lines` lines of a file, reading backwards in blocks (logs may be megabytes)."""
    handle = open_log(path)
    if handle is None:
        return b""
    with handle:
        handle.seek(0, os.SEEK_END)
        pos = handle.tell()
        chunks, found = [], 0
        while pos > 0 and found <= lines:
            step = min(65536, pos)
            pos -= step
            handle.seek(pos)
            chunk = handle.read(step)
            chunks.append(chunk)
            found += chunk.count(b"\n")
        data = b"".join(reversed(chunks))
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
            handle = open_log(path)
            if handle is None:
                continue
            with handle:
                handle.seek(position)
                chunk = handle.read(min(current - position, 1 << 20))
            out.write(chunk)
            out.flush()
            position += len(chunk)


def _position(path):
    try:
        st = os.lstat(path)
        return (st.st_size, st.st_ino) if stat.S_ISREG(st.st_mode) else (0, None)
    except OSError:
        return 0, None


# --- supervisor ------------------------------------------------------------------------------------

FORWARDED_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2")    # the keeper passes these on
SUPERVISOR_SIGNALS = FORWARDED_SIGNALS + ("SIGHUP",)
MAX_NOTED_PROBLEMS = 20                # per supervisor: a strategy writing ever-new garbage cannot flood


def signal_numbers(names):
    import signal
    return [getattr(signal, name) for name in names]


def load_spec(path):
    """spec.json as the supervisor needs it (written by `start`, but in a folder a strategy can write)."""
    try:
        found = read_instance_file(path, SPEC_FILE_CAP)
        spec = parse_json(found[0]) if found is not None else None
    except BadFile as exc:
        raise ValueError("spec.json: %s" % exc)
    if not isinstance(spec, dict) or not isinstance(spec.get("scheduling"), dict):
        raise ValueError("spec.json: not the spec of a start request")
    if not _is_number(spec.get("heartbeatMs")) or spec["heartbeatMs"] <= 0:
        raise ValueError("spec.json: heartbeatMs is not a number > 0")
    if not isinstance(spec.get("runner"), list) or not all(isinstance(p, str) for p in spec["runner"]):
        raise ValueError("spec.json: runner is not a list of strings")
    return spec


def file_identity(path):
    """What changes whenever something replaces or rewrites `path` (never opened)."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size, st.st_mode


class Supervisor(object):
    """Runs one strategy's runner, judges its health from the heartbeat file, restarts it in place
    with backoff, stops it when its lease runs out (fencing), and ends every process the strategy
    started before each restart and before it ends itself."""

    def __init__(self, idir):
        self.dir = idir
        self.spec = load_spec(self.path("spec.json"))
        self.status, _ = read_status(idir, [])
        self.sched = self.spec["scheduling"]
        self.heartbeat_s = self.spec["heartbeatMs"] / 1000.0
        self.poll = max(0.02, min(0.5, self.heartbeat_s / 4))
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
        import signal
        signal.signal(signal.SIGTERM, self.on_term)
        signal.signal(signal.SIGINT, self.on_term)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGUSR1, self.on_pause)
        signal.signal(signal.SIGUSR2, self.on_resume)
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
        import random
        base = self.sched.get("restartDelay", 10000) / 1000.0
        delay = min(600.0, base * (2 ** (restarts - 1)))
        return delay * random.uniform(0.5, 1.5)     # jitter: strategies that fail together spread out

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
            time.sleep(self.poll)
        return True

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
        import signal
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
            if lease and lease.get("epoch") == self.spec["epoch"] and "deadline" in lease:
                # No renewal reaches further than one TTL from now, whoever wrote the file.
                deadline = min(lease["deadline"], boottime() + self.ttl)
                self.lease_deadline = max(self.lease_deadline or 0, deadline)
        return self.lease_deadline is not None and boottime() > self.lease_deadline

    def lease_reason(self, detail=None):
        why = ("lease expired: the controller did not renew it for %gs (is `quantlab reconcile` "
               "running?); stopped so that no second copy can run" % self.ttl)
        return "%s; %s" % (why, detail) if detail else why

    def tend_files(self):
        """Once a second: put back the files this supervisor owns (status.json, the pid files the
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
        problems = []
        ident = plain_pid(self.path(name) + PID_IDENTITY, name + PID_IDENTITY, problems)
        if live_pid(self.path(name), problems) == pid and plain_pid(self.path(name), name, problems) == pid \
                and ident == pid:
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
        import signal
        parent = os.getpid()
        prctl_function()                   # looked up before the fork, not in the child

        def setup():
            if not die_with_parent(parent, signal.SIGTERM):
                os._exit(70)
        return setup

    def run_runner(self, restarts):
        """One life of the runner: ('final', why) when the supervisor must end, ('unhealthy', why).
        Whichever way the life ends, nothing the strategy started survives it."""
        import subprocess
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
            self.log.pump(self.proc.stdout, self.poll)
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
                return "unhealthy", "runner exited with code %d" % code
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
        import signal
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
        import signal
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)   # a group outlives its leader while it has members
            except OSError:
                pass
        spare = self.proc.pid if self.proc is not None and self.proc.returncode is None else None
        left = end_descendants(spare=spare)
        if left:
            self.note_problem("processes %s of the strategy survived SIGKILL" % left[:10])


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

    def check(self):
        sup = self.sup
        now = time.monotonic()
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


class OutputLog(object):
    """The runner's stdout and stderr, relayed into output.log and rotated at a size cap."""

    def __init__(self, path, cap=LOG_CAP_BYTES):
        self.path, self.cap = path, cap
        self.fd = open_append(path)
        self.size = os.fstat(self.fd).st_size

    def write(self, data):
        if self.size + len(data) > self.cap and self.size:
            self.rotate()
        os.write(self.fd, data)
        self.size += len(data)

    def rotate(self):
        os.close(self.fd)
        try:
            os.replace(self.path, self.path + ".1")
        except OSError:
            remove_entry(self.path + ".1")       # e.g. a directory a strategy put there
            remove_entry(self.path)
        self.fd = open_append(self.path)
        self.size = os.fstat(self.fd).st_size

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
        import signal
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
        import signal
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
    import signal
    idir = args[0]
    try:
        sup = Supervisor(idir)
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


def run_supervisor(sup):
    try:
        sup.run()
    except Exception as exc:              # noqa: BLE001 - record why, never leave a silent corpse
        import traceback
        traceback.print_exc()
        try:
            sup.stop_runner()
            sup.end_strategy_processes()
        finally:
            sup.save_status(state="error", reason="supervisor failed: %r" % (exc,), stoppedAt=now_ms())
            sup.event("error", "supervisor failed: %r" % (exc,))
        return 1
    end_descendants()                     # the last word: nothing of the strategy outlives its supervisor
    return 0


def record_failure(idir, why):
    import traceback
    traceback.print_exc()
    try:
        status, _ = read_status(idir, [])
        status.update(state="error", reason=clip(why), stoppedAt=now_ms())
        write_json(os.path.join(idir, "status.json"), status)
        log_event(idir, "error", clip(why))
    except OSError:
        pass
    return 1


# --- entry point ------------------------------------------------------------------------------------

COMMANDS = {
    "probe": probe,
    "start": start,
    "stop": stop,
    "pause": lambda request, args: set_paused(request, True),
    "resume": lambda request, args: set_paused(request, False),
    "logs": logs,
    "checkpoints": copy_checkpoints,
}


def main(argv):
    if len(argv) < 2:
        sys.stderr.write("usage: agent.py probe|start|stop|pause|resume|logs|checkpoints|supervise ...\n")
        return EXIT_BAD_REQUEST
    command, args = argv[1], argv[2:]
    if command == "supervise":
        return supervise(args)
    if command not in COMMANDS:
        sys.stderr.write("unknown command %r\n" % command)
        return EXIT_BAD_REQUEST
    if args and (args[0] != "--request" or len(args) != 2):
        # Everything else travels in the request (a renewal needs its notAfter, say).
        sys.stderr.write("unexpected arguments %s: the only option is --request FILE\n" % " ".join(args))
        return EXIT_BAD_REQUEST
    try:
        if args:                       # the request from a file instead of stdin (by hand, other tools)
            with open(args[1], "rb") as handle:
                request = json.loads(handle.read())
        else:
            request = json.loads(sys.stdin.buffer.read() or b"{}")
    except OSError as exc:
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
