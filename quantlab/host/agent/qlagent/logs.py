"""`logs`: the tail of an instance's output, and with `follow` what comes next."""
import os
import select
import stat
import sys

from .base import BadFile, open_regular
from .procs import instance_dir

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
