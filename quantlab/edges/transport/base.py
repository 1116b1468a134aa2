"""The narrow interface the controller uses to reach a host: run a command, stream one, move files.

`local` (this machine, subprocesses) and `ssh` (paramiko) implement it; nothing else in quantlab
knows which one it talks to.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Protocol


@dataclass(frozen=True)
class Completed:
    returncode: int
    stdout: bytes
    stderr: bytes


class TransportError(Exception):
    """A host could not be reached or did not answer in time; the message says which step failed
    (name lookup, refused, handshake, authentication, host key, timeout, I/O). `maybe_ran`: the command may have
    reached the host before the failure (it timed out, or the connection broke mid-way), so its
    effects (a lease renewed, a strategy started) must be assumed."""

    def __init__(self, host: str, message: str, maybe_ran: bool = False):
        self.host, self.maybe_ran = host, maybe_ran
        super().__init__(f"{host}: {message}")


class Pipe(Protocol):
    """A command kept running on a host, its stdin and stdout held open (see session.py)."""

    def send(self, data: bytes, deadline: float) -> None:
        """Write all of `data` to its stdin by `deadline` (monotonic), or raise TransportError."""

    def recv(self) -> bytes:
        """The next bytes of its stdout, waiting for them; b"" once it has ended."""

    def ended(self) -> Completed:
        """Once recv gave b"": its exit code (-1 when unknown) and what it wrote on stderr."""

    def close(self) -> None:
        """End its stdin (the command ends when it has read everything)."""

    def abandon(self) -> None:
        """The host stopped answering: drop what carries the command."""


class Transport(Protocol):
    name: str

    def run(self, argv: list[str], stdin: bytes = b"", timeout: float = 30.0) -> Completed:
        """Run argv (never through a shell on our side), feed stdin, wait at most `timeout` seconds."""

    def stream(self, argv: list[str], stdin: bytes = b"") -> Iterator[bytes]:
        """Run argv and yield its stdout as it comes, until it exits or the caller stops iterating."""

    def put_file(self, data: bytes, path: str, mode: int = 0o644) -> None:
        """Create or replace `path` atomically, creating its folders."""

    def open(self, argv: list[str], deadline: float) -> Pipe:
        """Start argv (never through a shell on our side) and keep its stdin and stdout open."""

    def close(self) -> None:
        ...


def raise_open_file_limit() -> None:
    """Lift this process's soft limit on open files to its hard limit. Each host held costs
    descriptors (a socket, and a pipe per channel waited on), and the usual soft limit of 1024 is
    spent at a few hundred hosts; the hard limit is the operator's (many servers do the same)."""
    try:
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        wanted = 1 << 20 if hard == resource.RLIM_INFINITY else hard     # the kernel's usual nr_open
        if soft != resource.RLIM_INFINITY and wanted > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    except (ImportError, ValueError, OSError):
        pass                       # not raised: hosts past the limit then fail with "too many open files"
