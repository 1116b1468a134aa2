"""Child-process programs for tests/unit/test_store.py: real processes that use StateStore.

    python state_child.py hold-lock STATE COMMAND
        Takes the state lock (as COMMAND), prints "locked PID", holds it until its stdin is closed,
        then releases it and prints "released".
    python state_child.py write-loop STATE
        Takes the state lock, prints "ready N" (N = the version found), then writes versions N+1,
        N+2, ... for ever, printing "about N" before and "wrote N" after each save. Stops when its
        output pipe is closed (or when killed, which is what the test does).

Every line is written with one os.write on an unbuffered fd, so a SIGKILL never cuts one in two.
The test also imports this file (by path) to run `write_loop` in a forked child and to compute
the expected content of each version with `version`.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the project root, for `quantlab`

from quantlab.core.memory import Launched, Memory, Placement  # noqa: E402
from quantlab.edges.store import StateStore  # noqa: E402


def version(n: int, lineage: str | None = None, serial: int = 0) -> Memory:
    """The memory of version n: every field depends on n, and its size varies, so a torn or mixed
    write could never pass for a real version."""
    placements = {
        f"strat-{i:02d}": Placement(strategy=f"strat-{i:02d}", worker=f"worker-{(n + i) % 5:03d}",
                                   epoch=n * 10 + i, spec_hash=f"sha256:{n:08x}{i:02x}",
                                   paused=bool((n + i) % 2), placed_at=1_700_000_000_000 + n,
                                   launched=Launched(params={"n": n, "pad": "x" * ((n * 37 + i) % 200)}))
        for i in range(n % 7)
    }
    return Memory(lineage=lineage, serial=serial, placements=placements,
                  leases={"worker-000": 1_700_000_000_000 + n}, restarts={"counter": n},
                  last_seen={f"worker-{i:03d}": n + i for i in range(n % 4)},
                  rr_cursor=f"worker-{n % 5:03d}", next_epoch=n * 10 + 8, loop_renewal=n * 1000)


def say(fd: int, text: str) -> None:
    os.write(fd, (text + "\n").encode())


def write_loop(path: str, out_fd: int, limit: int = 1_000_000) -> None:
    store = StateStore(path)
    with store.lock(timeout=5, command="write-loop"):
        memory = store.load()
        n = memory.restarts.get("counter", 0)
        say(out_fd, f"ready {n}")
        for n in range(n + 1, n + 1 + limit):
            nxt = version(n, lineage=memory.lineage)
            say(out_fd, f"about {n}")
            memory = store.save(nxt)
            say(out_fd, f"wrote {n}")


def hold_lock(path: str, command: str) -> None:
    store = StateStore(path)
    with store.lock(command=command):
        say(1, f"locked {os.getpid()}")
        while os.read(0, 4096):      # until the test closes our stdin
            pass
    say(1, "released")


if __name__ == "__main__":
    mode, state = sys.argv[1], sys.argv[2]
    try:
        if mode == "hold-lock":
            hold_lock(state, sys.argv[3])
        elif mode == "write-loop":
            write_loop(state, 1)
        else:
            sys.exit(f"unknown mode {mode!r}")
    except BrokenPipeError:          # the test stopped listening
        sys.exit(0)
