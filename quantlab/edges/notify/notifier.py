"""The Notifier, the one object the rest of quantlab holds: `submit` redacts the notices and puts
them on the queue of each configured sink — the webhook, the command, and one queue per kind of
chat behind each chat's gate — and returns at once; `close` delivers what it can in a bounded time.
Why in the background, and what happens to a notice that cannot go: see the package docstring.
"""
from __future__ import annotations

import threading
import time
from typing import Any, Callable

from quantlab.core.redact import redact_json
from quantlab.core.spec import NotifySettings
from .chats import Chat, ChatGate
from .command import Command
from .delivery import Log, Sink, log_safely
from .webhook import Webhook

CUT_SHORT_GRACE_S = 1.0         # how long close() waits, after its deadline, for a cut-short delivery to log


class Notifier:
    """Delivers notices in the background; see the package docstring. Thread-safe."""

    def __init__(self, settings: NotifySettings, log: Log, *, capacity: int = 200,
                 webhook_deadline_s: float = 5.0, command_deadline_s: float = 10.0,
                 on_failure: Callable[[str], None] = lambda sink: None, clock: Callable[[], float] = time.monotonic):
        self._settings = settings
        self._log = log
        self._lock = threading.Lock()
        self._closed = False
        self._webhook = Sink(Webhook(), capacity, webhook_deadline_s, log, on_failure)
        self._command = Sink(Command(), capacity, command_deadline_s, log, on_failure)
        # One queue per kind of chat.
        self._chats = {kind: Sink(Chat(kind), capacity, webhook_deadline_s, log, on_failure)
                       for kind in ("telegram", "slack", "discord")}
        self._clock = clock
        self._gates: dict[Any, ChatGate] = {}      # per chat: de-duplication and rate limit

    @property
    def _sinks(self) -> list[Sink]:
        return [self._webhook, self._command, *self._chats.values()]

    @property
    def dropped(self) -> int:
        """Notices dropped on overflow so far, over all sinks (one notice dropped by two counts 2)."""
        return sum(sink.dropped for sink in self._sinks)

    def update(self, settings: NotifySettings) -> None:
        """The fleet was reloaded: notices submitted from now on go where `settings` say. Notices
        already queued still go where they were meant to go when submitted."""
        with self._lock:
            self._settings = settings

    def submit(self, notices: list[dict[str, Any]]) -> None:
        """Queue the notices for every configured sink and return at once. Never raises."""
        try:
            with self._lock:
                settings, closed = self._settings, self._closed
            if closed:
                if notices and (settings.webhook or settings.command or settings.chats):
                    log_safely(self._log, f"notify: {len(notices)} notices not sent: the notifier is closed")
                return
            # Notices leave the machine (a chat, a webhook's service): a message quoting what a host or
            # strategy said (an error naming its proxy) goes without the credentials in it.
            notices = [redact_json(notice) for notice in notices]
            for notice in notices:
                if settings.webhook:
                    self._webhook.put(dict(notice), settings.webhook)
                if settings.command:
                    self._command.put(dict(notice), tuple(settings.command))
                for chat in settings.chats:
                    gate = self._gates.setdefault(chat, ChatGate(self._clock))
                    passed = gate.admit(notice, settings.chat_per_minute)
                    if passed is not None:
                        self._chats[chat.kind].put(passed, chat)
        except Exception as exc:  # noqa: BLE001 - telling people must never break the caller
            log_safely(self._log, f"notify: could not queue notices: {type(exc).__name__}: {exc}")

    def flush(self, timeout: float) -> bool:
        """Wait until everything submitted so far is delivered or given up (both sinks idle).
        True when drained within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        return all([sink.wait_idle(deadline) for sink in self._sinks])

    def close(self, timeout: float = 5.0) -> None:
        """Deliver what is queued for at most `timeout` seconds, then stop: a delivery still under way
        is cut short (its socket shut, its command's process group killed) and what is left is logged."""
        deadline = time.monotonic() + timeout
        with self._lock:
            self._closed = True
        self.flush(max(0.0, deadline - time.monotonic()))
        for sink in self._sinks:
            sink.stop()
        # A moment more for a delivery just cut short to say so, before the process may end.
        for sink in self._sinks:
            sink.join(max(deadline, time.monotonic()) + CUT_SHORT_GRACE_S)
