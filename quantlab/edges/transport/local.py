"""The embedded `local` transport: this machine, through subprocesses, with the same agent as SSH."""
from __future__ import annotations

import subprocess
import threading
from pathlib import Path
from typing import Iterator

from ..atomicfile import atomic_write
from .base import Completed, TransportError


class LocalPipe:
    """A local command kept running with pipes to its stdin and stdout. It ends with this process:
    its stdin closes then, and a `serve` ends when its input does."""

    def __init__(self, proc: subprocess.Popen[bytes]):
        self.proc = proc
        self._stderr = bytearray()
        assert proc.stderr is not None
        # Drained as it comes, so that a chatty command never blocks on a full stderr pipe.
        self._drain = threading.Thread(target=self._drain_stderr, daemon=True, name="local stderr")
        self._drain.start()

    def _drain_stderr(self) -> None:
        assert self.proc.stderr is not None
        while chunk := self.proc.stderr.read1(65536):
            self._stderr += chunk[: max(0, 65536 - len(self._stderr))]

    def send(self, data: bytes, deadline: float) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(data)
            self.proc.stdin.flush()
        except (OSError, ValueError) as exc:
            raise TransportError("local", f"the agent's input is closed ({exc})", maybe_ran=True) from None

    def recv(self) -> bytes:
        assert self.proc.stdout is not None
        try:
            return self.proc.stdout.read1(1 << 20)
        except (OSError, ValueError):
            return b""

    def ended(self) -> Completed:
        try:
            code = self.proc.wait(5)
        except subprocess.TimeoutExpired:
            code = -1
        self._drain.join(1)
        return Completed(code, b"", bytes(self._stderr))

    CLOSE_WAIT_S = 2.0

    def close(self) -> None:
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        except OSError:
            pass
        # Its input ended: it exits once it has answered what it was asked — at once when nothing is
        # in flight, as at the end of a command, which then leaves no process behind it.
        try:
            self.proc.wait(self.CLOSE_WAIT_S)
        except subprocess.TimeoutExpired:      # still finishing a call (a stop's grace): reaped later
            threading.Thread(target=self.proc.wait, daemon=True, name="local reap").start()

    def abandon(self) -> None:
        self.proc.kill()
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        except OSError:
            pass
        threading.Thread(target=self.proc.wait, daemon=True, name="local reap").start()


class LocalTransport:
    name = "local"

    def run(self, argv: list[str], stdin: bytes = b"", timeout: float = 30.0) -> Completed:
        try:
            done = subprocess.run(argv, input=stdin, capture_output=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise TransportError(self.name, f"{argv[0]} did not answer within {timeout:g}s",
                                 maybe_ran=True) from None
        except OSError as exc:
            raise TransportError(self.name, f"cannot run {argv[0]}: {exc.strerror}") from None
        return Completed(done.returncode, done.stdout, done.stderr)

    def stream(self, argv: list[str], stdin: bytes = b"") -> Iterator[bytes]:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        try:
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write(stdin)
            proc.stdin.close()
            while True:
                chunk = proc.stdout.read1(65536)
                if not chunk:
                    break
                yield chunk
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()

    def put_file(self, data: bytes, path: str, mode: int = 0o644) -> None:
        try:
            atomic_write(Path(path), data, mode)
        except OSError as exc:
            raise TransportError(self.name, f"cannot write {path}: {exc.strerror}") from None

    def open(self, argv: list[str], deadline: float) -> LocalPipe:
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        except OSError as exc:
            raise TransportError(self.name, f"cannot run {argv[0]}: {exc.strerror}") from None
        return LocalPipe(proc)

    def close(self) -> None:
        pass
