"""Processes: pid files with their identity, the process table, subreapers, instance locks and events."""
import fcntl
import os
import signal
import stat
import sys
import time

try:                    # a Python built without libffi has no ctypes: no prctl then, nothing else lost
    import ctypes
except ImportError:
    ctypes = None

from .base import (
    BadFile,
    NO_FOLLOW,
    PR_GET_CHILD_SUBREAPER,
    PR_SET_CHILD_SUBREAPER,
    PR_SET_DUMPABLE,
    PR_SET_NAME,
    PR_SET_PDEATHSIG,
    _is_number,
    append_line,
    boottime,
    now_ms,
    read_instance_file,
    remove_entry,
    write_atomic,
)

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
        data = read_proc_file("/proc/%s/stat" % name, 4096)
        try:
            fields = data.rsplit(b")", 1)[1].split()
            table[int(name)] = (int(fields[1]), fields[0].decode("ascii", "replace"))
        except (AttributeError, IndexError, ValueError):
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


def read_proc_file(path, limit):
    """Up to `limit` bytes of a /proc file, or None. Read by descriptor in small steps: a host with
    thousands of processes has `start` and `stop` read every one's environment, and most are a few
    KB (a buffered read of the 1 MB cap costs four times as much)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    try:
        data = os.read(fd, 8192)
        if len(data) < 8192:
            return data
        parts, total = [data], len(data)
        while total < limit:
            more = os.read(fd, min(65536, limit - total))
            if not more:
                break
            parts.append(more)
            total += len(more)
        return b"".join(parts)
    except OSError:
        return None
    finally:
        os.close(fd)


def strays(idir):
    """Live processes started for this instance, found by the environment every runner gets: the
    last resort for copies whose supervisor and keeper are both gone (killed together)."""
    mark = ("\0QUANTLAB_HEARTBEAT_FILE=%s\0" % os.path.join(idir, "heartbeat.json")).encode()
    found = []
    try:
        names = os.listdir("/proc")
    except OSError:
        return found
    for name in names:
        if not name.isdigit() or int(name) == os.getpid():
            continue
        environ = read_proc_file("/proc/%s/environ" % name, 1 << 20)
        # (a zombie's environment reads empty; one that died since is skipped by its start time)
        if environ and mark in b"\0" + environ + b"\0" and process_start_time(int(name)) is not None:
            found.append(int(name))
    return found


def end_strays(idir, timeout=5.0):
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
        if sys.platform.startswith("linux") and ctypes is not None:
            try:
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
    flag = ctypes.c_int(0)
    ok = function(ctypes.c_int(PR_GET_CHILD_SUBREAPER), ctypes.byref(flag), ctypes.c_ulong(0),
                  ctypes.c_ulong(0), ctypes.c_ulong(0)) == 0
    return "subreaper" if ok else "process-group"


def keep_secrets():
    """This process holds a lease key: a strategy of the same uid must not read it from our memory
    (ptrace, /proc/PID/mem). False where prctl is not available."""
    return prctl(PR_SET_DUMPABLE, 0)


def set_name(name):
    """This process's name as `ps -o comm` and top show it (15 bytes at most). /proc/self/comm would
    do, but an undumpable process may not write its own /proc files."""
    function = prctl_function()
    if function is not None:
        function(ctypes.c_int(PR_SET_NAME), ctypes.c_char_p(name.encode()[:15]), ctypes.c_ulong(0),
                 ctypes.c_ulong(0), ctypes.c_ulong(0))


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


def signal_group(pid, sig):
    try:
        os.killpg(pid, sig)
    except OSError:
        try:
            os.kill(pid, sig)
        except OSError:
            pass
