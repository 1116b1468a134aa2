"""Telling people: a JSON POST to `notify.webhook` and/or the JSON on the stdin of `notify.command`
(an argv, never run through a shell), and plain-text messages to Telegram, Slack or Discord chats.

Why in the background: the reconcile loop's tick also renews every strategy's lease, and those
renewals are every strategy's lifeline — a lease that is not renewed in time stops its strategy. A
webhook that answers one byte at a time, or a notify command that hangs, must never delay them. So
`submit` only puts the notices on a bounded queue per sink (webhook, command) and returns at once;
one daemon thread per sink delivers them, each notice within a total deadline (for a webhook: DNS,
connect, send and the whole reply; for a command: the whole run, after which it is killed with its
process group). The two sinks never wait for each other.

A notice that cannot be delivered is logged once and given up; nothing here raises into the caller.
Log lines name a webhook as `scheme://host[:port]` only: tokens live in the path, query or userinfo
(Telegram, Slack). When a queue is full, the oldest routine notice is dropped (alerts are kept as
long as there is anything else to drop), and one "notices-dropped" notice with the count follows as
soon as there is room.

The package, by job (each destination knows only how to deliver one notice; the queue knows
nothing of webhooks, commands or chats):
  notifier.py   Notifier, what the rest of quantlab calls: submit, update, flush, close
  delivery.py   one sink's bounded queue and its thread (Sink), one delivery's deadline (Watchdog)
  webhook.py    the webhook destination and the bounded HTTP POST that chats use too
  chats.py      the chat destination: the gate (de-duplication, rate limit), each chat's format, secrets
  command.py    the command destination: run with the notice on stdin, killed with its group at the deadline
"""
from .notifier import Notifier

__all__ = ["Notifier"]
