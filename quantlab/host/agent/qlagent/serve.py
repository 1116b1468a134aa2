"""`agent.pyz serve`: the agent kept running behind one channel, answering framed requests.

A call of its own (`agent.pyz probe`, ...) starts an interpreter and imports the agent every time:
tens of milliseconds of CPU on a trading host, every host, every round. A controller instead keeps
one `serve` process per connection (and lane) and sends it requests:

  request  a header line {"id": N, "command": "probe", "args": [], "size": BYTES}, then BYTES of
           the request's JSON (what a call of its own reads on stdin)
  answer   a header line {"id": N, "code": EXIT, "out": BYTES, "err": BYTES}, then BYTES of stdout
           and BYTES of stderr (what a call of its own would have written and exited with)

The first line `serve` writes is a hello, {"serve": SERVE_VERSION, "pid": N}. Requests are
pipelined: answers come back as they finish, each with its request's id.

Each request runs in a child forked from this process, with everything already imported: the child
is exactly a call of its own (its own instance locks, released when it exits; the supervisor it
starts leaves it at once), so the commands need not know they are served. The fork is made from
this single-threaded loop (no lock of another thread can be held in the child).

`serve` exits when its input ends: the controller closed the channel, or died and the connection
went with it. Requests still running finish first (their answers go nowhere), so nothing is left
behind but the supervisors, as after calls of their own.
"""
import gc
import io
import json
import os
import select
import signal
import sys

from .procs import keep_secrets, set_name
from .protocol import EXIT_BAD_REQUEST, SERVE_MAX_HEADER, SERVE_VERSION

MAX_REQUEST = 64 * 1024 * 1024   # the largest request body (a start with a checkpoint is the largest)


def serve(args):
    from . import main as entry
    # Requests carry copies' lease keys, and children forked from here hold them: no strategy of this
    # uid may read our memory.
    keep_secrets()
    # A Ctrl-C meant for a local controller reaches its process group, this process included: the
    # calls in flight finish all the same, and the end of the input ends this loop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    loop = _Loop(sys.stdin.fileno(), sys.stdout.buffer)
    loop.say({"serve": SERVE_VERSION, "pid": os.getpid()}, b"", b"")
    return loop.run(entry)


class _Loop:
    def __init__(self, fd_in, sink):
        self.fd_in = fd_in
        self.sink = sink
        self.pending = b""            # read from the channel, not yet a whole request
        self.children = {}            # result pipe fd -> [request id, pid, bytes so far]
        self.open = True
        self.loaded = set()           # commands whose module this process has imported

    def say(self, header, out, err):
        header = dict(header, out=len(out), err=len(err)) if "id" in header else header
        try:
            self.sink.write(json.dumps(header).encode() + b"\n" + out + err)
            self.sink.flush()
        except (OSError, ValueError):
            self.open = False         # nobody reads any more: finish what runs, start nothing new

    def run(self, entry):
        while self.open or self.children:
            watched = list(self.children) + ([self.fd_in] if self.open else [])
            ready, _, _ = select.select(watched, [], [])
            for fd in ready:
                if fd == self.fd_in:
                    self._read_requests(entry)
                else:
                    self._read_result(fd)
        return 0

    def _read_requests(self, entry):
        try:
            chunk = os.read(self.fd_in, 1 << 20)
        except OSError:
            chunk = b""
        if not chunk:
            self.open = False
            return
        self.pending += chunk
        while self.open:
            newline = self.pending.find(b"\n")
            if newline < 0:
                if len(self.pending) > SERVE_MAX_HEADER:
                    self._broken("a request header longer than %d bytes" % SERVE_MAX_HEADER)
                return
            try:
                header = json.loads(self.pending[:newline])
                rid, command, size = header["id"], header["command"], int(header["size"])
                argv = [str(a) for a in header.get("args") or []]
            except (ValueError, KeyError, TypeError) as exc:
                self._broken("a request header that cannot be read (%s)" % exc)
                return
            if not 0 <= size <= MAX_REQUEST:
                self._broken("a request of %d bytes" % size)
                return
            if len(self.pending) < newline + 1 + size:
                return                # the rest of the body is still on its way
            body = self.pending[newline + 1:newline + 1 + size]
            self.pending = self.pending[newline + 1 + size:]
            if command not in entry.COMMANDS:           # never `serve` or `supervise` in a child
                self.say({"id": rid, "code": EXIT_BAD_REQUEST}, b"", ("unknown command %r\n" % command).encode())
                continue
            if command not in self.loaded:
                # Imported here, once, by the first call of its kind: its children and every later
                # one find it loaded. (A probe-only controller never loads the start and stop code.)
                try:
                    entry.preload(command)
                except Exception:       # noqa: BLE001 - the child meets the same error and says it
                    pass
                self.loaded.add(command)
                gc.freeze()             # fewer pages copied by each child's first collection
            self._fork(entry, rid, command, argv, body)

    def _broken(self, why):
        """The stream is not framed as ours: nothing more can be read from it safely."""
        sys.stderr.write("agent serve: %s; closing\n" % why)
        self.open = False

    def _fork(self, entry, rid, command, argv, body):
        read_end, write_end = os.pipe()
        try:
            pid = os.fork()
        except OSError as exc:
            os.close(read_end)
            os.close(write_end)
            self.say({"id": rid, "code": 1}, b"", ("agent serve: cannot fork: %s\n" % exc).encode())
            return
        if pid == 0:
            os.close(read_end)
            _child(entry, command, argv, body, write_end)       # never returns
        os.close(write_end)
        self.children[read_end] = [rid, pid, b""]

    def _read_result(self, fd):
        entry = self.children[fd]
        try:
            chunk = os.read(fd, 1 << 20)
        except OSError:
            chunk = b""
        if chunk:
            entry[2] += chunk
            return
        del self.children[fd]
        os.close(fd)
        rid, pid, data = entry
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
        newline = data.find(b"\n")
        try:
            result = json.loads(data[:newline])
            out_end = newline + 1 + int(result["out"])
            out, err = data[newline + 1:out_end], data[out_end:out_end + int(result["err"])]
            code = int(result["code"])
        except (ValueError, KeyError, TypeError):
            # The child died before it answered (killed, out of memory): what it did is unknown.
            code, out, err = 1, b"", b"agent serve: the call ended without an answer\n"
        self.say({"id": rid, "code": code}, out, err)


def _child(entry, command, argv, body, result_fd):
    """One call, as `agent.pyz COMMAND` would run it: the request on stdin, the answer on stdout."""
    code, out, err = 1, io.BytesIO(), io.BytesIO()
    try:
        set_name("ql-" + command)     # `ps -o comm` and top say what each child does: ql-probe, ql-start
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):          # the channel is the loop's alone: nothing of ours may hold it open
            os.dup2(devnull, fd)
        sys.stdin = io.TextIOWrapper(io.BytesIO(body))
        sys.stdout = io.TextIOWrapper(out, write_through=True)
        sys.stderr = io.TextIOWrapper(err, write_through=True)
        code = entry.main(["agent.pyz", command] + argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else EXIT_BAD_REQUEST
    except BaseException as exc:      # noqa: BLE001 - said in one line, as a call of its own would
        err.write(("agent %s failed: %s: %s\n" % (command, type(exc).__name__, exc)).encode())
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
            out_bytes, err_bytes = out.getvalue(), err.getvalue()
            data = json.dumps({"code": code, "out": len(out_bytes), "err": len(err_bytes)}).encode()
            view = memoryview(data + b"\n" + out_bytes + err_bytes)
            while view:
                view = view[os.write(result_fd, view):]
        finally:
            os._exit(0)
