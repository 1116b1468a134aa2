"""Text for people: an event line says what happened, also for notifications."""
from __future__ import annotations

from rich.text import Text

from quantlab.face.render import event_line


def plain(markup: str) -> str:
    return Text.from_markup(markup).plain


def test_a_notification_event_shows_its_kind_and_message():
    line = plain(event_line({"t": 0, "event": "notify", "actor": "monitor", "kind": "worker-offline",
                             "worker": "w-1", "message": "w-1: offline for 15s"}))
    assert "notify" in line and "w-1" in line
    assert line.rstrip().endswith("worker-offline: w-1: offline for 15s"), line


def test_an_action_event_shows_its_reason_and_outcome():
    line = plain(event_line({"t": 0, "event": "start", "strategy": "s-1", "worker": "w-1", "outcome": "ok",
                             "actor": "apply", "reason": "new"}))
    assert "start" in line and "s-1" in line and " ok " in line and line.rstrip().endswith("new"), line
