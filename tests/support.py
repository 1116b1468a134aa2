"""Shared by the integration and SSH tests: polling with deadlines, processes seen through /proc,
the CLI's environment, and whether Node.js is there for the reference runner.

Every wait polls with a deadline and fails saying what it waited for; nothing sleeps to synchronise.
Zombies count as gone: PID 1 on the test machines may never reap orphans.
"""
from __future__ import annotations

import os
import socket
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable


def wait_for(predicate: Callable[[], Any], timeout: float, what: str | None = None, interval: float = 0.05) -> Any:
    """Poll `predicate` until it returns something truthy, and return that; fail after `timeout`
    seconds with a message that says what was awaited (and what the predicate saw last)."""
    deadline = time.monotonic() + timeout
    while True:
        last = predicate()
        if last:
            return last
        if time.monotonic() >= deadline:
            name = what or getattr(predicate, "__name__", "a condition")
            raise AssertionError(f"timed out after {timeout:g}s waiting for {name} (last value: {last!r})")
        time.sleep(interval)


def hold_for(seconds: float, invariant: Callable[[], Any], what: str, interval: float = 0.05) -> None:
    """Check `invariant` every `interval` for `seconds`; fail at the first poll where it is false.
    (Asserting that something *stays* true for a while is an observation over time, not a sleep.)"""
    deadline = time.monotonic() + seconds
    while True:
        ok = invariant()
        if not ok:
            raise AssertionError(f"{what} stopped holding after {seconds - (deadline - time.monotonic()):.2f}s "
                                 f"(value: {ok!r})")
        if time.monotonic() >= deadline:
            return
        time.sleep(interval)


@dataclass(frozen=True)
class Proc:
    pid: int
    pgid: int
    uid: int
    state: str
    argv: tuple[str, ...]

    @property
    def cmdline(self) -> str:
        return " ".join(self.argv)

    def environ(self) -> dict[str, str]:
        try:
            raw = Path(f"/proc/{self.pid}/environ").read_bytes()
        except OSError:
            return {}
        out = {}
        for item in raw.split(b"\0"):
            if b"=" in item:
                key, value = item.split(b"=", 1)
                out[key.decode(errors="replace")] = value.decode(errors="replace")
        return out


def proc_info(pid: int) -> Proc | None:
    """The process `pid`, or None when it is gone. Zombies come back with state 'Z' and no argv."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
        argv = Path(f"/proc/{pid}/cmdline").read_bytes()
        uid = os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None
    fields = stat.rsplit(b")", 1)[1].split()
    return Proc(pid, int(fields[2]), uid, fields[0].decode(),
                tuple(a.decode(errors="replace") for a in argv.split(b"\0") if a))


def alive(pid: int | None) -> bool:
    """True when `pid` runs and is not a zombie."""
    if pid is None:
        return False
    info = proc_info(pid)
    return info is not None and info.state not in ("Z", "X")


def _markers(markers: str | Iterable[str]) -> list[str]:
    return [markers] if isinstance(markers, str) else [m for m in markers if m]


def processes(markers: str | Iterable[str]) -> list[Proc]:
    """Live (non-zombie) processes, other than this one, whose command line mentions a marker."""
    wanted = _markers(markers)
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        info = proc_info(int(entry))
        if info is not None and info.state not in ("Z", "X") and any(m in info.cmdline for m in wanted):
            out.append(info)
    return out


def kill_all(markers: str | Iterable[str], timeout: float = 10.0) -> list[Proc]:
    """SIGKILL (by process group when the process leads its own, else by pid) every process that
    mentions a marker, until none is left; never this process's group. Returns what was left."""
    wanted = _markers(markers)
    own_group = os.getpgrp()
    deadline = time.monotonic() + timeout
    while True:
        found = processes(wanted)
        if not found or time.monotonic() >= deadline:
            return found
        # Supervisors first, so none of them restarts its runner in between.
        for p in sorted(found, key=lambda p: "supervise" not in p.argv):
            try:
                if p.pgid == p.pid and p.pgid != own_group:
                    os.killpg(p.pgid, signal.SIGKILL)
                else:
                    os.kill(p.pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.05)


def cli_env() -> dict[str, str]:
    """The environment for `python -m quantlab` subprocesses: none of the caller's QUANTLAB_* settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUANTLAB_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def node_problem(path: str | None = None) -> str | None:
    """Why the reference runner cannot run here (node missing or older than 18), or None.
    `path` is the PATH to search (the sshd hosts' login user gets sshd's default one)."""
    node = shutil.which("node", path=path)
    where = "on PATH" if path is None else f"on the hosts' PATH ({path})"
    if node is None:
        return f"node is not {where} (the reference runner needs Node.js 18+)"
    version = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=10).stdout.strip()
    if int(version.lstrip("v").split(".")[0] or 0) < 18:
        return f"node {version} is too old (the reference runner needs Node.js 18+)"
    return None


def require(problem: str | None) -> None:
    """Skip loudly when something a test needs is missing (`problem` says what), except under
    CI=true, where that is a failure."""
    if problem is None:
        return
    import pytest

    if os.environ.get("CI") == "true":
        pytest.fail(f"{problem}; CI=true, so this is a failure, not a skip")
    pytest.skip(problem)


def free_port() -> int:
    """A loopback port nothing listens on now (to listen on, or to be refused at)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
