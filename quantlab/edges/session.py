"""A kept agent on a host: one `agent.pyz serve` process behind one channel, answering framed calls.

A call of its own starts an interpreter on the host every time (a probe of every host, every round).
An AgentSession sends the same request to a `serve` process that stays (see the agent's serve.py for
the framing) and gets back what the call of its own would have printed and exited with, so the
callers (hosts.Agent) cannot tell the two apart. Calls are pipelined: each waits for its own answer,
by id, on a reader thread that is the only one reading the channel.

Failure is what it would be for a call of its own: a call not answered by its deadline drops what
carries the session (the host may be frozen) and may have run; a session that ends while calls are
in flight fails them as "connection lost" (they may have run); a call that never went out did not.
"""
from __future__ import annotations

import itertools
import json
import threading
import time
from dataclasses import dataclass, field

from quantlab.host.agent.qlagent.protocol import SERVE_MAX_HEADER, SERVE_VERSION
from .transport.base import Completed, Pipe, TransportError



class SessionClosed(Exception):
    """The session had ended before the call went out: nothing was sent, a new one may be opened."""


class SessionRefused(Exception):
    """`serve` did not start: `ended` is its exit code and stderr (the agent file may be missing)."""

    def __init__(self, ended: Completed):
        self.ended = ended
        super().__init__(ended.stderr.decode(errors="replace").strip() or f"exit {ended.returncode}")


@dataclass
class _Slot:
    done: threading.Event = field(default_factory=threading.Event)
    answer: Completed | None = None


class AgentSession:
    def __init__(self, pipe: Pipe, label: str, deadline: float):
        """Wait for `serve`'s hello until `deadline` (monotonic): SessionRefused when it ended
        without one, TransportError when it said nothing in time."""
        self.pipe, self.label = pipe, label
        self._ids = itertools.count(1)
        self._pending: dict[int, _Slot] = {}
        self._lock = threading.Lock()          # _pending and the end of the session
        self._send_lock = threading.Lock()     # one request's bytes at a time on the channel
        self._hello = threading.Event()
        self.closed = False
        self.pid: int | None = None            # the serve process's, on its host
        self._buffer = bytearray()
        self._reader = threading.Thread(target=self._read, name=f"session {label}", daemon=True)
        self._reader.start()
        if not self._hello.wait(max(0.0, deadline - time.monotonic())):
            self.abandon()
            raise TransportError(label, "the agent did not start within its deadline; the host may be "
                                        "overloaded or frozen", maybe_ran=False)
        if self.pid is None:
            raise SessionRefused(self.pipe.ended())

    # --- calls ---------------------------------------------------------------------------------

    def call(self, command: str, args: tuple[str, ...], payload: bytes, deadline: float) -> Completed:
        slot, budget = _Slot(), deadline - time.monotonic()
        with self._lock:
            if self.closed:
                raise SessionClosed()
            rid = next(self._ids)
            self._pending[rid] = slot
        header = json.dumps({"id": rid, "command": command, "args": list(args), "size": len(payload)}).encode()
        # Another call's request may still be going out (a large one, a slow host): wait for it only
        # within this call's own deadline.
        if not self._send_lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            with self._lock:
                self._pending.pop(rid, None)
            raise TransportError(self.label, f"agent {command} could not be sent within {round(budget, 1):g}s; the "
                                             "host may be overloaded or frozen", maybe_ran=False)
        try:
            self.pipe.send(header + b"\n" + payload, deadline)
        except TransportError as exc:
            self.abandon()
            exc.maybe_ran = True               # part of it may have gone out, and be run
            raise
        finally:
            self._send_lock.release()
        if not slot.done.wait(max(0.0, deadline - time.monotonic())):
            # Like a call of its own that hangs: the connection cannot be trusted any more.
            self.abandon()
            raise TransportError(self.label, f"agent {command} did not finish within {round(budget, 1):g}s; the host "
                                             "may be overloaded or frozen", maybe_ran=True)
        if slot.answer is None:
            raise TransportError(self.label, f"connection lost during agent {command}", maybe_ran=True)
        return slot.answer

    # --- the reader ----------------------------------------------------------------------------

    def _read(self) -> None:
        try:
            while True:
                chunk = self.pipe.recv()
                if not chunk:
                    break
                self._buffer += chunk
                if not self._frames():
                    break
        except (OSError, TransportError):
            pass
        finally:
            self._end()

    def _frames(self) -> bool:
        """Deliver every whole frame in the buffer; False when the stream is not ours."""
        while True:
            newline = self._buffer.find(b"\n")
            if newline < 0:
                return len(self._buffer) <= SERVE_MAX_HEADER
            try:
                header = json.loads(self._buffer[:newline])
                if self.pid is None:                      # the hello comes first
                    if header.get("serve") != SERVE_VERSION or not isinstance(header.get("pid"), int):
                        return False
                    self.pid = header["pid"]
                    del self._buffer[:newline + 1]
                    self._hello.set()
                    continue
                rid, code, out, err = header["id"], int(header["code"]), int(header["out"]), int(header["err"])
            except (ValueError, KeyError, TypeError, AttributeError):
                return False
            end = newline + 1 + out + err
            if out < 0 or err < 0:
                return False
            if len(self._buffer) < end:
                return True
            body = bytes(self._buffer[newline + 1:end])
            del self._buffer[:end]
            with self._lock:
                slot = self._pending.pop(rid, None) if isinstance(rid, int) else None
            if slot is not None:                          # (an abandoned call's answer goes nowhere)
                slot.answer = Completed(code, body[:out], body[out:])
                slot.done.set()

    def _end(self) -> None:
        with self._lock:
            self.closed = True
            pending, self._pending = list(self._pending.values()), {}
        for slot in pending:                              # lost: they may have run
            slot.done.set()
        self._hello.set()

    # --- the end -------------------------------------------------------------------------------

    def abandon(self) -> None:
        """The host stopped answering: drop what carries the session (a new one is made on next use)."""
        with self._lock:
            self.closed = True
        self.pipe.abandon()

    def close(self) -> None:
        """End the session: `serve` finishes the calls it has, then exits."""
        with self._lock:
            self.closed = True
        self.pipe.close()
