"""Telling people: a JSON POST to `notify.webhook` and/or the JSON on the stdin of `notify.command`
(an argv, never run through a shell). A notification that cannot be delivered is logged and dropped;
it never stops a tick."""
from __future__ import annotations

import json
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Callable

from .spec import NotifySettings

WEBHOOK_TIMEOUT_S = 5.0
COMMAND_TIMEOUT_S = 10.0

class Notifier:
    def __init__(self, settings: NotifySettings, log: Callable[[str], None]):
        self.settings = settings
        self.log = log

    def send(self, notices: list[dict[str, Any]]) -> None:
        """Deliver each notice; after the first webhook failure the rest of the batch skips it, so a
        dead endpoint costs one timeout per tick, not one per notice."""
        webhook_ok = bool(self.settings.webhook)
        for notice in notices:
            body = json.dumps(notice, sort_keys=True).encode()
            if webhook_ok:
                webhook_ok = self._post(body)
            if self.settings.command:
                self._run(body)

    def _post(self, body: bytes) -> bool:
        assert self.settings.webhook is not None
        request = urllib.request.Request(self.settings.webhook, data=body, method="POST",
                                         headers={"Content-Type": "application/json",
                                                  "User-Agent": "quantlab-notify"})
        try:
            with urllib.request.urlopen(request, timeout=WEBHOOK_TIMEOUT_S) as answer:
                answer.read(1024)
            return True
        except (urllib.error.URLError, OSError, ValueError) as exc:
            # The URL often carries a token: name only where it goes.
            where = urllib.parse.urlsplit(self.settings.webhook)
            self.log(f"notify: webhook {where.scheme}://{where.hostname} failed: {exc}")
            return False

    def _run(self, body: bytes) -> None:
        assert self.settings.command is not None
        argv = list(self.settings.command)
        try:
            done = subprocess.run(argv, input=body, capture_output=True, timeout=COMMAND_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as exc:
            self.log(f"notify: command {argv[0]} failed: {exc}")
            return
        if done.returncode != 0:
            self.log(f"notify: command {argv[0]} exited {done.returncode}: "
                     f"{done.stderr.decode(errors='replace').strip()[:200]}")
