"""The output log: a runner's stdout and stderr, relayed into output.log and rotated at a size cap."""
import os
import select
import time

from .base import LOG_CAP_BYTES, open_append, remove_entry

# After the runner's output ends, how long until its exit is looked at again: a runner that closed
# its stdout and runs on must not make its supervisor spin.
EOF_WAIT_S = 0.2


class OutputLog(object):
    """The runner's stdout and stderr, relayed into output.log and rotated at a size cap. A full disk
    (any strategy on the host may fill it) costs output, never the supervisor: what cannot be written
    is dropped, counted, and said in the log once it can be written again."""

    def __init__(self, path, cap=LOG_CAP_BYTES):
        self.path, self.cap = path, cap
        self.fd = open_append(path)
        self.size = os.fstat(self.fd).st_size
        self.dropped = 0

    def write(self, data):
        try:
            if self.size + len(data) > self.cap and self.size:
                self.rotate()
            if self.dropped:
                note = ("[quantlab] %d bytes of output were dropped: the disk was full\n" % self.dropped).encode()
                os.write(self.fd, note)
                self.size += len(note)
                self.dropped = 0
            os.write(self.fd, data)
            self.size += len(data)
        except OSError:
            self.dropped += len(data)

    def rotate(self):
        os.close(self.fd)
        try:
            os.replace(self.path, self.path + ".1")
        except OSError:
            remove_entry(self.path + ".1")       # e.g. a directory a strategy put there
            remove_entry(self.path)
        self.fd = open_append(self.path)
        self.size = os.fstat(self.fd).st_size

    def pump(self, pipe, timeout, wake=None):
        """Relay what the runner wrote, waiting up to `timeout` seconds for it, or less when `wake`
        (a descriptor: the supervisor's signal wake-up pipe) becomes readable."""
        try:
            ready, _, _ = select.select([pipe] + ([wake] if wake is not None else []), [], [], timeout)
        except (OSError, ValueError, InterruptedError):
            return
        if pipe in ready:
            data = os.read(pipe.fileno(), 65536)
            if data:
                self.write(data)
            elif wake is None or wake not in ready:
                # EOF: the runner closed its output, and most likely ended (its exit is seen then).
                time.sleep(min(timeout, EOF_WAIT_S))

    def drain(self, pipe):
        while True:
            try:
                ready, _, _ = select.select([pipe], [], [], 0)
                data = os.read(pipe.fileno(), 65536) if ready else b""
            except (OSError, ValueError):
                return
            if not data:
                return
            self.write(data)
