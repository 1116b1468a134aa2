"""Small helpers and the reading and writing of files an instance can write (hostile input): opened
without following links or blocking, read only when regular and under a cap, every field type-checked."""
import json
import math
import os
import stat
import time

# What runs: the zipapp (or, from a source checkout, its folder), for starting a supervisor.
APP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

LOG_CAP_BYTES = 5 * 1024 * 1024
EVENTS_CAP_BYTES = 512 * 1024
ENV_PASSTHROUGH = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "TZ", "TMPDIR")

# Caps for reading files an instance can write (see "hostile files" below).
SMALL_FILE_CAP = 64 * 1024             # heartbeat, status, lease, control and pid files
SPEC_FILE_CAP = 4 * 1024 * 1024        # spec.json carries the strategy's params
EVENTS_TAIL_BYTES = 256 * 1024         # events.log is read from its tail only
TEXT_CAP = 500                         # a text field (lastError, reason) is clipped to this
PROBLEM_CAP = 200                      # one entry of an instance's `problems`
MAX_PROBLEMS = 8

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4          # 0: no ptrace, no /proc/PID/mem or environ for others of the same uid
PR_SET_NAME = 15
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
    for test, name in ((stat.S_ISREG, "regular file"), (stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "fifo"),
                       (stat.S_ISLNK, "symlink"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
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
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


FIELD_KINDS = {
    "count": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "int": (_is_int, "an integer"),
    "time": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
    "number": (_is_number, "a number"),
    "text": (lambda v: isinstance(v, str), "a string"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "object": (lambda v: isinstance(v, dict), "an object"),
}

HEARTBEAT_FIELDS = {"t": "time", "beats": "count", "errorCount": "count", "lastError": "text?", "paused": "bool"}
STATUS_FIELDS = {"state": "text", "epoch": "int?", "specHash": "text?", "restarts": "count", "startedAt": "time?",
                 "stoppedAt": "time?", "exitCode": "int?", "reason": "text?", "paused": "bool",
                 "stopTimeoutSeconds": "time?", "runnerPid": "count?", "lastRestartAt": "time?",
                 "containment": "text?"}
LEASE_FIELDS = {"epoch": "int?", "deadline": "number", "expiresAt": "number?", "notAfter": "object?", "proof": "text?"}
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
    try:
        if stat.S_ISDIR(os.lstat(path).st_mode):
            import shutil                 # here: a supervisor or a probe seldom needs it (startup time)
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


def describe_error(exc):
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return "%s: %s" % (type(exc).__name__, exc)


# Below this much free space on a workdir's filesystem, its worker takes no new copy and a stale
# heartbeat is the disk's fault, not the runner's (the runner cannot write it).
DISK_LOW_BYTES = 16 * 2 ** 20


def disk_free_bytes(path):
    """Bytes an unprivileged process may still write on `path`'s filesystem, or None if unknown."""
    try:
        st = os.statvfs(path)
    except (OSError, AttributeError):
        return None
    return st.f_bavail * st.f_frsize
