"""The embedded `local` transport: this machine, through subprocesses, with the same agent as SSH."""
from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Iterator

from ..atomicfile import atomic_write
from .base import Completed, TransportError


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

    def close(self) -> None:
        pass
