"""The command destination: `notify.command`, an argv never run through a shell, with the notice's
JSON on its stdin. It runs in its own session, so that at the deadline one killpg ends it and
everything it started; a non-zero exit is a failed delivery.
"""
from __future__ import annotations

import os
import signal
import subprocess

from .delivery import BACKSTOP_S, Watchdog

STDERR_SHOWN_CHARS = 200


class Command:
    """The command as a sink's destination; its target is the argv."""

    name = "command"

    @staticmethod
    def where(argv: tuple[str, ...]) -> str:
        return argv[0] if argv else "?"

    @staticmethod
    def secrets(argv: tuple[str, ...]) -> list[str]:
        # Arguments may carry a token (a chat id, an API key): never echoed back in a log line.
        return sorted({arg for arg in argv[1:] if len(arg) > 3}, key=len, reverse=True)

    @staticmethod
    def timeout_reason(seconds: float) -> str:
        return f"still running after {seconds:g}s; killed with its process group"

    @staticmethod
    def deliver(argv: tuple[str, ...], body: bytes, watchdog: Watchdog) -> None:
        run_command(argv, body, watchdog)


def run_command(argv: tuple[str, ...], body: bytes, watchdog: Watchdog) -> None:
    """Run argv (no shell) with `body` on stdin; at the deadline kill it and everything it started
    (its own session, so one killpg reaches them all). Raises on any failure, a non-zero exit included."""
    watchdog.check()
    with subprocess.Popen(list(argv), stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, start_new_session=True) as process:
        watchdog.on_expiry(lambda: _kill_group(process))
        try:
            # The watchdog's kill ends this; the timeout is a backstop for a descendant that left the
            # group (setsid) and still holds our stderr pipe.
            _, stderr = process.communicate(body, timeout=watchdog.remaining() + BACKSTOP_S)
        except subprocess.TimeoutExpired:
            _kill_group(process)
            raise
    watchdog.check()
    if process.returncode != 0:
        last_words = stderr.decode(errors="replace").strip()[-STDERR_SHOWN_CHARS:]
        raise ChildProcessError(f"exited {process.returncode}" + (f": {last_words}" if last_words else ""))


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
