"""Hosts: one transport per host, shared by the workers on it, and the agent spoken through it.

The agent and the reference runner are shipped by content hash. Calls are optimistic: the agent is
run where it should be, and uploaded only when the host answers that the file is not there, so a
warm probe costs exactly one round trip.

Calls go to a kept agent (`agent.pyz serve`, one per connection lane and agent copy: Serving and
session.py), which answers each in a child forked from an interpreter that has everything imported
already; a call of its own (`agent.pyz COMMAND`, an interpreter started for it) is the fallback for
a transport without channels and for a host where `serve` does not start, and is what
QUANTLAB_AGENT_SERVE=0 asks for.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import threading
import time
import zipfile
from dataclasses import dataclass
import functools
import importlib.util
from importlib import resources
from importlib._bootstrap_external import _code_to_hash_pyc  # type: ignore[attr-defined]   # what py_compile uses
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal

from .atomicfile import MiB, read_regular
from quantlab.host.agent.qlagent.protocol import EXIT_MISSING, FENCED_COMMANDS, answer_problem
from quantlab.core.spec import Fleet, StrategySpec, WorkerSpec
from .session import AgentSession, SessionClosed, SessionRefused
from .transport.base import Completed, Transport, TransportError

STRATEGY_FILE_CAP = 16 * MiB   # the loader refuses larger strategy files


def _shipped(name: str) -> tuple[bytes, str]:
    data = resources.files("quantlab.host").joinpath(name).read_bytes()
    return data, hashlib.sha256(data).hexdigest()[:16]


def _agent_sources(folder: str) -> tuple[tuple[str, bytes], ...]:
    """The agent's source files (path in the zip, bytes), sorted."""
    root = resources.files("quantlab.host").joinpath(folder)
    found: list[tuple[str, bytes]] = []
    pending = [(root, "")]
    while pending:
        here, prefix = pending.pop()
        for entry in here.iterdir():
            if entry.is_dir() and entry.name != "__pycache__":
                pending.append((entry, f"{prefix}{entry.name}/"))
            elif entry.name.endswith(".py"):
                found.append((prefix + entry.name, entry.read_bytes()))
    return tuple(sorted(found))


def _zip(files: Iterable[tuple[str, bytes]]) -> bytes:
    """A zip application (runnable as `python3 agent.pyz`), the same byte for byte from the same files."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for name, data in sorted(files):
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            archive.writestr(info, data)
    return buffer.getvalue()


AGENT_SOURCES = _agent_sources("agent")
# The agent is named by its sources: every controller of this release ships it under one name.
AGENT_HASH = hashlib.sha256(_zip(AGENT_SOURCES)).hexdigest()[:16]


@functools.cache
def agent_zipapp() -> bytes:
    """What is shipped as AGENT_PATH: the sources, and beside each its bytecode for this
    controller's Python. zipimport never caches bytecode, so without it every call (a probe of
    every host, every round) compiles the agent again; a host whose Python has another magic number
    takes the source instead. The bytecode is unchecked-hash based: nothing in it depends on a clock
    or on the zip's timestamps. Built on the first upload, not at every command's start."""
    files = list(AGENT_SOURCES)
    for name, source in AGENT_SOURCES:
        try:
            code = compile(source, name, "exec", dont_inherit=True)
            pyc = _code_to_hash_pyc(code, importlib.util.source_hash(source), checked=False)
        except (AttributeError, SyntaxError):       # an interpreter without it: the sources alone
            continue
        files.append((name + "c", bytes(pyc)))
    return _zip(files)


RUNNER_SOURCE, RUNNER_HASH = _shipped("runner.mjs")
AGENT_PATH = f"agent/agent-{AGENT_HASH}.pyz"
RUNNER_PATH = f"agent/runner-{RUNNER_HASH}.mjs"


class AgentError(Exception):
    """The host answered, but the agent could not do what was asked; the message says what to do.
    `maybe_ran`: what was asked may have happened all the same (the agent failed midway, or its
    answer cannot be read), so its effects — a strategy started, a lease granted — must be assumed.
    Only an answer that says so, or a call that never ran, proves that nothing happened."""

    def __init__(self, host: str, message: str, maybe_ran: bool = True):
        self.host = host
        self.maybe_ran = maybe_ran
        super().__init__(f"{host}: {message}")


@dataclass(frozen=True)
class HostKey:
    """What makes two workers share a connection: the same host, port and login."""

    host: str
    port: int | None = None
    user: str | None = None

    def __str__(self) -> str:
        who = f"{self.user}@" if self.user else ""
        port = f":{self.port}" if self.port else ""
        return f"{who}{self.host}{port}"


def host_key(worker: WorkerSpec) -> HostKey:
    return HostKey(worker.host, worker.port, worker.user)


class Fenced(AgentError):
    """The host refused the command: a newer leader of this state has reached it (see the agent's
    fence.py). Nothing was done."""

    def __init__(self, host: str, message: str):
        super().__init__(host, message, maybe_ran=False)


Fence = Callable[[], "dict[str, Any] | None"]


def no_fence() -> None:
    return None


class Agent:
    """The agent on one host, reached through its transport."""

    def __init__(self, transport: Transport, home_workdir: str, python: str, label: str, fence: Fence = no_fence,
                 serving: "Serving | None" = None):
        self.transport = transport
        self.home = home_workdir          # the workdir whose agent/ copy runs the calls for this host
        self.python = python
        self.label = label
        self.fence = fence                # {"lineage", "term"} of the controller, as of each call
        self.serving = serving            # the kept agents; None: every call is one of its own

    def argv(self, command: str, args: tuple[str, ...] = ()) -> list[str]:
        # -I -S: no site-packages, user site or PYTHON* variables of the host; the agent needs none,
        # and every probe starts a little faster.
        return [self.python, "-I", "-S", f"{self.home}/{AGENT_PATH}", command, *args]

    def run(self, command: str, request: dict[str, Any], timeout: float, args: tuple[str, ...] = ()) -> Completed:
        fence = self.fence() if command in FENCED_COMMANDS and "fence" not in request else None
        payload = json.dumps({**request, "fence": fence} if fence is not None else request).encode()
        deadline = time.monotonic() + timeout
        done = self.serving.call(self, command, args, payload, deadline) if self.serving is not None else None
        if done is None:
            done = self.transport.run(self.argv(command, args), payload, max(0.1, deadline - time.monotonic()))
            if self.agent_missing(done):
                self.ship()             # then the same call again, within what is left of its time
                done = self.transport.run(self.argv(command, args), payload, max(0.1, deadline - time.monotonic()))
        if done.returncode in (126, 127) or (done.returncode != 0 and b"python3: not found" in done.stderr):
            raise AgentError(self.label, f"cannot run {self.python} on the host (exit {done.returncode}); "
                                         "install Python 3.8+ there", maybe_ran=False)
        return done

    def agent_missing(self, done: Completed) -> bool:
        return done.returncode == 2 and b"can't open file" in done.stderr and AGENT_PATH.encode() in done.stderr

    def ship(self) -> None:
        self.transport.put_file(agent_zipapp(), f"{self.home}/{AGENT_PATH}", 0o755)

    def call(self, command: str, request: dict[str, Any], timeout: float, args: tuple[str, ...] = ()) -> dict[str, Any]:
        done = self.run(command, request, timeout, args)
        if done.returncode not in (0, EXIT_MISSING):
            tail = done.stderr.decode(errors="replace").strip().splitlines()[-3:]
            raise AgentError(self.label, f"agent {command} failed (exit {done.returncode}): {' | '.join(tail)}")
        try:
            answer = json.loads(done.stdout)
        except ValueError:
            raise AgentError(self.label, f"agent {command} answered something that is not JSON: "
                                         f"{done.stdout[:200]!r}") from None
        if not isinstance(answer, dict):
            raise AgentError(self.label, f"agent {command} answered {type(answer).__name__}, not an object")
        if answer.get("result") == "fenced":
            raise Fenced(self.label, f"{command} {answer.get('reason')}")
        problem = answer_problem(command, answer)
        if problem is not None:
            # Nothing says what happened there: a stop may not have stopped, a start may have started.
            raise AgentError(self.label, f"agent {command} answered {problem}; is the agent there from "
                                         "another release of quantlab?")
        return answer

    def stream(self, command: str, request: dict[str, Any]) -> Iterator[bytes]:
        return self.transport.stream(self.argv(command), json.dumps(request).encode())


SERVE_RETRY_S = 300.0      # after `serve` would not start on a host, its calls are their own for this long


class Serving:
    """The kept agents of a fleet's hosts: one AgentSession per transport (a host's lane) and agent
    copy, opened on its first call and kept until it ends (its connection dropped, a call timed out:
    the next call opens another) or the hosts are closed."""

    def __init__(self) -> None:
        self._sessions: dict[tuple[int, str, str], tuple[Transport, AgentSession]] = {}
        self._opening: dict[tuple[int, str, str], threading.Lock] = {}
        self._refused: dict[tuple[int, str, str], float] = {}     # -> when to try `serve` again
        self._lock = threading.Lock()

    def call(self, agent: Agent, command: str, args: tuple[str, ...], payload: bytes,
             deadline: float) -> Completed | None:
        """The call's answer from the host's kept agent; None when there is none (the caller makes
        the call on its own)."""
        for _ in range(2):
            session = self._session(agent, deadline)
            if session is None:
                return None
            try:
                return session.call(command, args, payload, deadline)
            except SessionClosed:               # it had ended before this call went out: open another
                self._forget(agent, session)
            except TransportError:
                self._forget(agent, session)
                raise
        return None

    @staticmethod
    def _key(agent: Agent) -> tuple[int, str, str]:
        return id(agent.transport), agent.home, agent.python

    def _session(self, agent: Agent, deadline: float) -> AgentSession | None:
        key = self._key(agent)
        with self._lock:
            found = self._sessions.get(key)
            if found is not None and found[0] is agent.transport and not found[1].closed:
                return found[1]
            if self._refused.get(key, 0.0) > time.monotonic() or getattr(agent.transport, "open", None) is None:
                return None
            opening = self._opening.setdefault(key, threading.Lock())
        # One opening per key at a time; the others wait for it (within their own deadline).
        if not opening.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise TransportError(agent.label, "the agent did not start within the call's deadline; the host may be "
                                              "overloaded or frozen")
        try:
            with self._lock:
                found = self._sessions.get(key)
                if found is not None and found[0] is agent.transport and not found[1].closed:
                    return found[1]
            session = self._open(agent, deadline)
            with self._lock:
                if session is None:
                    self._refused[key] = time.monotonic() + SERVE_RETRY_S
                    return None
                self._sessions[key] = (agent.transport, session)
                # The host's first worker changed (another copy is home now): its earlier agent ends.
                replaced = [k for k, (t, _) in self._sessions.items() if t is agent.transport and k != key]
                old = [self._sessions.pop(k)[1] for k in replaced]
            for earlier in old:
                earlier.close()
            return session
        finally:
            opening.release()

    def _open(self, agent: Agent, deadline: float) -> AgentSession | None:
        for attempt in (1, 2):
            pipe = agent.transport.open(agent.argv("serve"), deadline)
            try:
                return AgentSession(pipe, agent.label, deadline)
            except SessionRefused as refused:
                if attempt == 1 and agent.agent_missing(refused.ended):
                    agent.ship()
                    continue
                return None       # calls of their own then say what is wrong there (no Python, say)
        return None

    def _forget(self, agent: Agent, session: AgentSession) -> None:
        with self._lock:
            key = self._key(agent)
            if key in self._sessions and self._sessions[key][1] is session:
                del self._sessions[key]

    def close(self) -> None:
        with self._lock:
            sessions, self._sessions = [s for _, s in self._sessions.values()], {}
        for session in sessions:
            session.close()


# Each host is reached on two lanes, each with its own connection: probes (and with them every lease
# renewal) never wait behind a start or a stop, and a command that times out and drops its connection
# takes only its own lane down.
Lane = Literal["probe", "act"]


class Hosts:
    """Transports and agents for every host of a fleet, opened lazily and kept for reuse."""

    def __init__(self, fleet: Fleet, transport_factory: Any = None, accept_new_host_keys: bool = False,
                 serve: bool | None = None):
        self.fleet = fleet
        if serve is None:
            serve = os.environ.get("QUANTLAB_AGENT_SERVE", "1") != "0"
        self.serving = Serving() if serve else None
        self._first: tuple[Fleet, dict[HostKey, WorkerSpec]] | None = None
        self.accept_new_host_keys = accept_new_host_keys
        self._factory = transport_factory or self._default_transport
        self._transports: dict[tuple[HostKey, Lane], Transport] = {}
        self._lock = threading.Lock()
        # SSH handshakes cost CPU (key exchange): at most `parallelism` at once, so that a cold start
        # over hundreds of hosts makes progress instead of timing every handshake out.
        self._handshakes = threading.BoundedSemaphore(fleet.settings.ssh.parallelism)
        self.fence: Fence = no_fence         # the controller's term, carried by every command that changes things

    def _default_transport(self, key: HostKey) -> Transport:
        if key.host == "local":
            from .transport.local import LocalTransport
            return LocalTransport()
        from .transport.ssh import SshTransport    # paramiko is only imported when a host needs it
        return SshTransport.for_host(key.host, key.port, key.user, self.fleet.settings.ssh,
                                     accept_new_host_keys=self.accept_new_host_keys,
                                     handshakes=self._handshakes)

    def update(self, fleet: Fleet) -> None:
        """Point at a newer fleet (the loop reloads it). Connections are kept unless the SSH settings
        changed, in which case they are re-made with the new ones on next use."""
        changed = fleet.settings.ssh != self.fleet.settings.ssh
        self.fleet = fleet
        if changed:
            self._handshakes = threading.BoundedSemaphore(fleet.settings.ssh.parallelism)
            self.close()

    def _first_workers(self) -> dict[HostKey, WorkerSpec]:
        fleet = self.fleet
        if self._first is None or self._first[0] is not fleet:
            first: dict[HostKey, WorkerSpec] = {}
            for w in sorted(fleet.workers.values(), key=lambda w: w.id):
                first.setdefault(host_key(w), w)
            self._first = (fleet, first)
        return self._first[1]

    def workdir(self, worker: WorkerSpec) -> str:
        if worker.is_local:
            if worker.workdir is None:
                return str((self.fleet.root / ".quantlab" / "workers" / worker.id).resolve())
            path = Path(os.path.expanduser(worker.workdir))
            return str(path if path.is_absolute() else (self.fleet.root / path).resolve())
        # Relative paths start in the login's home, for commands and SFTP alike: "~" is spelled out
        # that way because SFTP would take it literally.
        if worker.workdir is None:
            return f".quantlab/{worker.id}"
        if worker.workdir == "~":
            return "."
        return worker.workdir[2:] if worker.workdir.startswith("~/") else worker.workdir

    def transport(self, key: HostKey, lane: Lane = "act") -> Transport:
        with self._lock:
            found = self._transports.get((key, lane))
            if found is None:
                found = self._factory(key)
                self._transports[(key, lane)] = found
            return found

    def groups(self, workers: list[WorkerSpec] | None = None) -> dict[HostKey, list[WorkerSpec]]:
        out: dict[HostKey, list[WorkerSpec]] = {}
        for w in sorted(workers if workers is not None else self.fleet.workers.values(), key=lambda w: w.id):
            out.setdefault(host_key(w), []).append(w)
        return out

    def agent(self, key: HostKey, workers: list[WorkerSpec], lane: Lane = "act") -> Agent:
        """The agent of host `key` (for `workers` there): run from the agent copy of the host's first
        worker in the fleet, whatever the call, so that a host has one kept agent per lane (a
        supervisor runs from its own workdir's copy all the same: see the agent's control.py)."""
        first = self._first_workers().get(key) or min(workers, key=lambda w: w.id)
        home = self.workdir(first)
        python = sys.executable if key.host == "local" else "python3"
        return Agent(self.transport(key, lane), home, python, str(key), lambda: self.fence(), self.serving)

    def agent_for(self, worker: WorkerSpec, lane: Lane = "act") -> Agent:
        return self.agent(host_key(worker), [worker], lane)

    def upload_strategy(self, worker: WorkerSpec, spec: StrategySpec) -> None:
        try:
            data = read_regular(spec.strategy_path, STRATEGY_FILE_CAP)
        except OSError as exc:
            raise AgentError(worker.id, f"cannot read {spec.strategy_file}: {exc}", maybe_ran=False) from None
        if hashlib.sha256(data).hexdigest() != spec.file_sha256:
            # Uploaded by content hash: other bytes under that name would run code nobody validated.
            raise AgentError(worker.id, f"{spec.strategy_file} changed since the fleet was read; run again",
                             maybe_ran=False)
        self.transport(host_key(worker)).put_file(data, f"{self.workdir(worker)}/{strategy_remote_path(spec)}")

    def upload_runner(self, worker: WorkerSpec) -> None:
        self.transport(host_key(worker)).put_file(RUNNER_SOURCE, f"{self.workdir(worker)}/{RUNNER_PATH}")

    def close(self) -> None:
        if self.serving is not None:
            self.serving.close()          # before their connections: each `serve` then ends on its own
        with self._lock:
            transports, self._transports = list(self._transports.values()), {}
        for t in transports:
            try:
                t.close()
            except (OSError, TransportError):
                pass


def strategy_remote_path(spec: StrategySpec) -> str:
    return f"files/{spec.file_sha256}{spec.file_ext}"
