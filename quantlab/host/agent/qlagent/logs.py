"""`logs`: the tail of an instance's output, and with `follow` what comes next; with `since` and
`grep`, only the lines written since then and matching the pattern (filtered here, on the host, so
that only what is asked for crosses the network)."""
import calendar
import collections
import os
import re
import select
import signal
import stat
import sys

try:                    # not on every platform: without it a pattern's search is bounded by the call's timeout only
    import resource
except ImportError:
    resource = None

from .base import BadFile, open_regular
from .procs import instance_dir
from .protocol import EXIT_BAD_REQUEST

# Of each line, what a pattern is matched against: a strategy may write a 5 MB line.
MATCH_CAP_CHARS = 64 * 1024
# Host CPU a filtered `logs` may use in all: the log is the strategy's (hostile) text and the pattern a
# person's regular expression, whose backtracking must not keep a trading host busy.
FILTER_CPU_S = 30
# A leading ISO 8601 time, as the reference runners write on every line (UTC when no zone is given).
STAMP = re.compile(rb"(\d{4})-(\d\d)-(\d\d)[T ](\d\d):(\d\d):(\d\d)(?:[.,](\d{1,9}))?(Z|[+-]\d\d:?\d\d)?")

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


def stamp_ms(line, seconds_of=None):
    """The epoch ms of a line's leading time, or None when it has none. `seconds_of`: a cache of
    (date and time to the second, zone) -> epoch seconds (a log has many lines per second)."""
    found = STAMP.match(line)
    if found is None:
        return None
    year, month, day, hour, minute, second, fraction, zone = found.groups()
    key = (line[:19], zone)
    seconds = seconds_of.get(key) if seconds_of is not None else None
    if seconds is None:
        try:
            seconds = calendar.timegm((int(year), int(month), int(day), int(hour), int(minute), int(second), 0, 0, 0))
        except (ValueError, OverflowError):
            return None
        if zone and zone != b"Z":
            sign = -1 if zone[:1] == b"-" else 1
            digits = zone[1:].replace(b":", b"")
            seconds -= sign * (int(digits[:2]) * 3600 + int(digits[2:4]) * 60)
        if seconds_of is not None:
            if len(seconds_of) > 4096:
                seconds_of.clear()
            seconds_of[key] = seconds
    return seconds * 1000 + (int((fraction or b"0")[:3].ljust(3, b"0")))


class LineFilter(object):
    """Which lines `since` and `grep` keep. A line without a time of its own (a stack trace, a
    strategy's plain print) goes with the last line before it that had one."""

    def __init__(self, since, pattern):
        self.since, self.pattern = since, pattern
        self.stamp = None
        self.seconds_of = {}

    def keeps(self, line):
        found = stamp_ms(line, self.seconds_of) if self.since is not None else None
        if found is not None:
            self.stamp = found
        if self.since is not None and (self.stamp is None or self.stamp < self.since):
            return False
        if self.pattern is not None:
            return self.pattern.search(line[:MATCH_CAP_CHARS].decode("utf-8", "replace")) is not None
        return True


def filtered(paths, lines, keeps):
    """The last `lines` lines of `paths` (oldest file first) that `keeps` accepts; every line is read
    once (two logs of at most LOG_CAP_BYTES each)."""
    kept = collections.deque(maxlen=max(lines, 0))
    for path in paths:
        handle = open_log(path)
        if handle is None:
            continue
        with handle:
            for line in handle:
                if keeps(line):
                    kept.append(line)
    return b"".join(kept)


def limit_cpu(seconds):
    """End this process once it has used `seconds` more of CPU (SIGXCPU, then SIGKILL two seconds
    later if a match never returns to let the handler run)."""
    global _budget
    _budget = seconds
    if resource is None:
        return
    try:
        used = resource.getrusage(resource.RUSAGE_SELF)
        soft = int(used.ru_utime + used.ru_stime) + seconds
        _, hard = resource.getrlimit(resource.RLIMIT_CPU)
        if hard != resource.RLIM_INFINITY and hard < soft + 2:
            return
        signal.signal(signal.SIGXCPU, _out_of_cpu)
        resource.setrlimit(resource.RLIMIT_CPU, (soft, soft + 2))
    except (OSError, ValueError, AttributeError):
        pass


_budget = FILTER_CPU_S


def _out_of_cpu(signum, frame):
    sys.stderr.write("the search used %d s of the host's CPU and was ended; narrow it (--since, a simpler "
                     "--grep)\n" % _budget)
    sys.stderr.flush()
    os._exit(EXIT_BAD_REQUEST)


def logs(request, args):
    idir = instance_dir(request["workdir"], request["strategy"])
    path = os.path.join(idir, "output.log")
    out = sys.stdout.buffer
    lines = int(request.get("lines", 200))
    since, grep = request.get("since"), request.get("grep")
    keep = None
    if since is not None or grep is not None:
        try:
            keep = LineFilter(int(since) if since is not None else None,
                              re.compile(grep) if grep is not None else None)
        except (TypeError, ValueError, re.error) as exc:
            sys.stderr.write("logs: bad since or grep: %s\n" % exc)
            return None, EXIT_BAD_REQUEST
        limit_cpu(min(FILTER_CPU_S, max(1, int(request.get("cpuSeconds") or FILTER_CPU_S))))
        data = filtered([path + ".1", path], lines, keep.keeps)
    else:
        data = tail_bytes(path, lines)
        if len(data.split(b"\n")) <= lines:
            older = tail_bytes(path + ".1", lines - len(data.split(b"\n")) + 1)
            data = (older + data) if older else data
    out.write(data)
    out.flush()
    if not request.get("follow"):
        return None, 0
    position, inode = _position(path)
    partial = b""                                # a line not finished yet (filtering is by whole lines)
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
            position += len(chunk)
            if keep is not None:
                complete, _, partial = (partial + chunk).rpartition(b"\n")
                if len(partial) > 1 << 20:       # a line that never ends is matched as it is
                    complete, partial = complete + b"\n" + partial, b""
                whole = [line + b"\n" for line in complete.split(b"\n")] if complete else []
                chunk = b"".join(line for line in whole if keep.keeps(line))
            if chunk:
                out.write(chunk)
                out.flush()


def _position(path):
    try:
        st = os.lstat(path)
        return (st.st_size, st.st_ino) if stat.S_ISREG(st.st_mode) else (0, None)
    except OSError:
        return 0, None
