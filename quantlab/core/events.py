"""The closed catalogue of quantlab's history: every event the controller records or the hosts'
agents report, the fields each carries, and the kinds of the notices (`notify` events).

Plain data and one pure check (`unknown_event`); docs/events.md is its reference for readers of
`quantlab events --output json` and `/api/events`, and tests/unit/test_event_catalogue.py checks
both against the code that writes events.

Two sources write history. The controller records what it decides and does. The supervisor and
the agent on each host write `events.log` in each instance folder; the controller records what it
collects from there with the `worker` and `strategy` of the folder it came from, and with
`supervisor@WORKER` as its actor. Three names are written by both sources and mean different
things (`start`, `restart`, `resumed`): a record's actor tells which one it is (`source_of`).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

Source = Literal["controller", "host"]


@dataclass(frozen=True)
class EventKind:
    """One event: its name, the fields it always carries beyond COMMON_FIELDS, those it may carry,
    what it means, and who writes it."""

    name: str
    fields: tuple[str, ...]
    optional: tuple[str, ...]
    meaning: str
    source: Source


# Every recorded event carries these: when (epoch ms), what, and who (a person's `user@host command`,
# `monitor` for what the controller noticed, a leader's name, or `supervisor@WORKER` for a host's).
COMMON_FIELDS: tuple[str, ...] = ("t", "event", "actor")

# The actor of what a host reported: `supervisor@` and the worker's id (no space, unlike a person's).
HOST_ACTOR_PREFIX = "supervisor@"

# What the executor records of each action: one event per outcome (`outcome` ok or failed; a failed
# one carries `error`), a move as one event once both its halves are done or one failed.
_ACTION = ("strategy", "worker", "epoch", "reason", "cause", "outcome", "revision", "dirty")
_MOVE = ("strategy", "from", "to", "epoch", "reason", "cause", "outcome", "revision", "dirty")


def _controller(name: str, fields: tuple[str, ...], optional: tuple[str, ...], meaning: str) -> EventKind:
    return EventKind(name, fields, optional, meaning, "controller")


def _host(name: str, fields: tuple[str, ...], optional: tuple[str, ...], meaning: str) -> EventKind:
    # What the controller adds to each line it collects: where it was found.
    return EventKind(name, ("worker", "strategy", *fields), optional, meaning, "host")


CATALOGUE: tuple[EventKind, ...] = (
    # --- recorded by the controller ---
    _controller("start", _ACTION, ("error",),
                "A new copy of the strategy was started on `worker` (`cause`: a new strategy, its copy gone, a "
                "retry, or an orphaned runner)."),
    _controller("stop", _ACTION, ("error",),
                "The copy on `worker` was stopped (`cause`: `desiredState: stopped`, removed from the fleet, a "
                "stale copy, or stop-all)."),
    _controller("restart", _ACTION, ("error",),
                "The copy on `worker` was replaced by a new one there (its spec, its worker's launch settings or "
                "its lease TTL changed)."),
    _controller("move", _MOVE, ("error",),
                "The strategy was moved from `from` to `to` (`cause` says why: its worker offline, gone, leaving, "
                "unfit or draining, its requirements, or a rebalance)."),
    _controller("pause", _ACTION, ("error",),
                "The copy on `worker` was paused (`desiredState: paused`): its heartbeats stop until it is resumed."),
    _controller("resume", _ACTION, ("error",),
                "The paused copy on `worker` was resumed (`desiredState: running`)."),
    _controller("blocked", ("guard", "reason", "strategies", "revision", "dirty"), (),
                "A guard refused these actions (`guard`: mass-stop, failover-brake or source-change); they run "
                "once it is lifted."),
    _controller("suspended", ("detail",), ("strategy", "worker"),
                "`quantlab suspend` (or `stop-all`) holds starts, stops and moves of the strategy, the worker, or "
                "everything when neither is named."),
    _controller("resumed", ("detail",), ("strategy", "worker"),
                "`quantlab resume` lifted the suspension of the strategy, the worker, or everything when neither "
                "is named."),
    _controller("retry", ("strategy", "worker", "detail"), (),
                "`quantlab retry`: the copy in error on `worker` starts again at the next round with a fresh "
                "restart budget."),
    _controller("notify", ("kind", "message"), ("strategy", "worker", "alert"),
                "A notice was told (see the notice kinds): `kind` says what, `message` says it in words."),
    _controller("leader", ("change", "term", "detail"), (),
                "This controller's lead changed (`change`: took, raised, stepped-down or deposed) in `term`; "
                "PostgreSQL state only."),
    _controller("state-pushed", ("detail",), (),
                "`quantlab state push` moved this state (and its history) here from another backend."),
    _controller("checkpoint-dropped", ("strategy", "detail"), (),
                "The strategy's checkpoint folder could not be copied; the older copy is forgotten, so a move "
                "starts it without its state."),
    _controller("checkpoint-removed", ("strategy", "detail"), (),
                "The strategy left the fleet long enough ago that its kept checkpoint copy was removed."),
    # --- reported by the hosts (the supervisor and the agent, in the instance folder's events.log) ---
    _host("start", ("detail", "epoch"), (),
          "The agent started a supervisor for copy `epoch` of the strategy."),
    _host("restart", ("detail", "epoch", "restarts"), (),
          "The supervisor restarts the strategy's runner after it exited or turned unhealthy (`restarts`: "
          "how many times so far)."),
    _host("recovered", ("detail", "epoch"), (),
          "After a healthy stretch the supervisor reset the copy's restart count."),
    _host("paused", ("epoch",), (),
          "The supervisor paused the runner."),
    _host("resumed", ("epoch",), (),
          "The supervisor resumed the paused runner."),
    _host("stopped", ("detail",), ("epoch",),
          "The copy stopped: asked to, or its supervisor was gone and the agent stopped what was left."),
    _host("lease-expired", ("detail", "epoch"), (),
          "The copy's lease ran out before it was renewed, so its supervisor stopped it (fencing)."),
    _host("error", ("detail",), ("epoch",),
          "The copy ended in error: its restarts are spent, or its supervisor failed or could not start."),
    _host("supervisor-lost", ("detail", "epoch"), (),
          "The supervisor's keeper found the supervisor killed and is stopping its strategy itself."),
    _host("instance-problem", ("detail",), ("epoch",),
          "A file of the instance could not be used, or processes of the strategy survived SIGKILL."),
)

# Every event name, with what each source means by it (one entry, or two for a name both write).
EVENTS: dict[str, tuple[EventKind, ...]] = {
    name: tuple(kind for kind in CATALOGUE if kind.name == name) for name in dict.fromkeys(k.name for k in CATALOGUE)}

# The kinds of `notify` events. Alerts are told once when raised and once when they clear (`resolved`);
# the other notices are told once.
NOTICE_KINDS: dict[str, str] = {
    "strategy-error": "A strategy's copy ended in error (its host's `error` event).",
    "lease-expired": "A strategy's copy stopped because its lease ran out (its host's `lease-expired` event).",
    "failover": "A strategy was moved off a worker that is offline or gone; `worker` is where it runs now.",
    "worker-offline": "Alert: a worker stopped answering.",
    "disk-full": "Alert: the disk of a worker's workdir is full; no new copy starts there.",
    "instance-problem": "Alert: the agent cannot use a file of a strategy's instance folder.",
    "renew-refused": "Alert: a worker's host granted no lease renewal.",
    "fence-anomaly": "Alert: a worker's workdir names a controller term of this state that none uses.",
    "foreign-state": "Alert: the state belongs to another fleet; nothing is planned from it.",
    "action-failed": "Alert: a start, stop, restart, move, pause or resume failed.",
    "guard-blocked": "Alert: a guard (mass-stop, failover-brake, source-change) refused actions.",
    "fleet-invalid": "Alert: the fleet the reconcile loop applies does not validate.",
    "git-pull-refused": "Alert: the loop's `git pull` was refused (the upstream's history diverged).",
    "not-deployed": "Alert: strategies keep running a previous version: the fleet's cannot be placed.",
    "resolved": "An alert cleared; `alert` names it (its key, such as `offline:WORKER`).",
    "notices-dropped": "A notification queue overflowed; `message` says how many notices were not delivered. "
                       "Delivered only, never recorded as an event.",
}

# What a notice of each kind names beyond `kind` and `message` (every notice carries those two).
NOTICE_FIELDS: dict[str, tuple[str, ...]] = {
    "strategy-error": ("strategy", "worker"),
    "lease-expired": ("strategy", "worker"),
    "failover": ("strategy", "worker"),
    "worker-offline": ("worker",),
    "disk-full": ("worker",),
    "instance-problem": ("worker", "strategy"),
    "renew-refused": ("worker",),
    "fence-anomaly": ("worker",),
    "foreign-state": (),
    "action-failed": ("strategy", "worker"),
    "guard-blocked": (),
    "fleet-invalid": (),
    "git-pull-refused": (),
    "not-deployed": (),
    "resolved": ("alert",),
    "notices-dropped": (),
}


def source_of(record: Mapping[str, Any]) -> Source:
    """Who wrote `record`: a host when its actor is `supervisor@WORKER`, else the controller."""
    actor = record.get("actor")
    if isinstance(actor, str) and actor.startswith(HOST_ACTOR_PREFIX) and " " not in actor:
        return "host"
    return "controller"


def event_kind(name: str, source: Source) -> EventKind | None:
    """The catalogue's entry for `name` as `source` writes it, or None."""
    return next((kind for kind in EVENTS.get(name, ()) if kind.source == source), None)


def unknown_event(record: Mapping[str, Any]) -> str | None:
    """Why `record` (one event as history holds it) is not one of the catalogue: an event name it
    does not know (or one only the other source writes), a notice of an unknown kind, or a field its
    kind always carries that is missing; None when it is one. Fields beyond the catalogue's are
    allowed (a host's events.log may hold more)."""
    name = record.get("event")
    if not isinstance(name, str):
        return "it has no event name" if name is None else f"its event is a {type(name).__name__}, not text"
    source = source_of(record)
    kind = event_kind(name, source)
    if kind is None:
        others = sorted({k.source for k in EVENTS.get(name, ())})
        if others:
            by = "reported by a host" if source == "host" else "recorded by the controller"
            return f"{name!r} is an event of the {others[0]} only, and this one is {by} (actor {record.get('actor')!r})"
        return f"unknown event {name!r}"
    missing = [f for f in (*COMMON_FIELDS, *kind.fields) if f not in record]
    if missing:
        return f"the {source}'s {name!r} event lacks {', '.join(missing)}"
    if name == "notify":
        notice = record.get("kind")
        if not isinstance(notice, str) or notice not in NOTICE_KINDS:
            return f"unknown notice kind {notice!r}"
        missing = [f for f in NOTICE_FIELDS[notice] if f not in record]
        if missing:
            return f"the {notice!r} notice lacks {', '.join(missing)}"
    return None
