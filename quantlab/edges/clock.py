"""The controller's two clocks, read only here (the core gets the time as an argument).

`mono` is this machine's boot-time clock in ms: it never jumps and keeps counting through suspend,
and it is the same clock for every process on one boot, so a lease bound written to the state file
by one run can be judged by the next. Every duration the controller judges (leases, silence,
backoffs) uses it. `wall` is epoch ms, only for what people read (events, startedAt, lastSeen).
`boot_id` names the boot, so a state written before a reboot (or on another machine) is never read
as if its boot-time values were ours.
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Callable


def wall_ms() -> int:
    return int(time.time() * 1000)


def boottime_ms() -> int:
    clock = getattr(time, "CLOCK_BOOTTIME", None)
    seconds = time.clock_gettime(clock) if clock is not None else time.monotonic()
    return int(seconds * 1000)


def read_boot_id() -> str:
    """The kernel's id of this boot; without one, an id of this process (so nothing recorded by
    another process is trusted: every lease is then taken as granted at this start)."""
    try:
        with open("/proc/sys/kernel/random/boot_id", "rb") as handle:
            text = handle.read(64).decode("ascii", "replace").strip()
        if text:
            return text
    except OSError:
        pass
    return f"process-{uuid.uuid4()}"


@dataclass(frozen=True)
class Clock:
    wall: Callable[[], int] = wall_ms
    mono: Callable[[], int] = boottime_ms
    boot_id: str = field(default_factory=read_boot_id)
