"""The Plan value: a closed set of actions, each with the reason kept apart from the decision.

Plain data only. Rendering lives in render.py, plan-file I/O in store.py, carrying it out in execute.py.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any, Literal, TypeGuard, get_args

FORMAT_VERSION = 1
_MISSING = object()
_KIND_WORDS = {str: "text", int: "an integer", float: "a number", bool: "true or false", list: "a list",
               dict: "an object"}

ActionName = Literal["start", "stop", "restart", "move", "pause", "resume"]
ACTIONS: tuple[str, ...] = get_args(ActionName)

# Why an action is planned, for machines (execute and the guards decide by it; people read `reason`).
Cause = Literal[
    "new",               # start: a strategy not placed yet
    "not-running",       # start: its copy is gone from its worker
    "retry",             # start: its copy is in error, and `quantlab retry` asked to start it again
    "orphaned",          # start: its supervisor is gone, its runner runs on (an earlier release's)
    "spec-changed",      # restart: its file, params, heartbeat or scheduling changed
    "worker-changed",    # restart: its worker's runner, region or proxy changed
    "lease-changed",     # restart: leaseTtlSeconds changed (a supervisor keeps the lease it started with)
    "desired-paused",    # pause
    "desired-running",   # resume
    "desired-stopped",   # stop: desiredState: stopped
    "removed",           # stop: removed from the fleet
    "stale-copy",        # stop: a copy of an older epoch
    "stop-all",          # stop: `quantlab stop-all`
    "worker-offline",    # move: its worker is offline and the lease surely expired (failover)
    "worker-removed",    # move: its worker left the fleet and cannot be reached
    "worker-leaving",    # move: its worker left the fleet but answers (a stop, then a start)
    "worker-unfit",      # move: its copy is not running, and its worker can take no new one (disk full)
    "requirements",      # move: its worker no longer fits it
    "drain",             # move: its worker drains
    "rebalance",         # move: toward even load
]
CAUSES: frozenset[str] = frozenset(get_args(Cause))


def is_action(value: object) -> TypeGuard[ActionName]:
    return isinstance(value, str) and value in ACTIONS


def is_cause(value: object) -> TypeGuard[Cause]:
    return isinstance(value, str) and value in CAUSES


def is_guard(value: object) -> TypeGuard[Guard]:
    return isinstance(value, str) and value in GUARDS


def _guard(name: str) -> Guard:
    if not is_guard(name):                                          # a plan file names no guard of its own
        raise ValueError(f"unknown guard {name!r}")
    return name


@dataclass(frozen=True)
class Action:
    action: ActionName
    strategy: str
    reason: str                        # words for people
    cause: Cause
    worker: str | None = None          # start, stop, restart, pause, resume
    source: str | None = None          # move: from
    target: str | None = None          # move: to
    epoch: int | None = None           # the copy this action creates or acts on
    spec_hash: str | None = None       # start, restart, move: what will run
    paused: bool = False               # start, restart, move: start without heartbeats

    @property
    def workers(self) -> tuple[str, ...]:
        return tuple(w for w in (self.worker, self.source, self.target) if w is not None)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"action": self.action, "strategy": self.strategy}
        if self.action == "move":
            out["from"], out["to"] = self.source, self.target
        else:
            out["worker"] = self.worker
        out["reason"] = self.reason
        out["cause"] = self.cause
        if self.epoch is not None:
            out["epoch"] = self.epoch
        if self.spec_hash is not None:
            out["specHash"] = self.spec_hash
        if self.paused:
            out["paused"] = True
        return out

    @classmethod
    def from_json(cls, raw: Any) -> "Action":
        """`raw`: an action as plan files hold it, or its _Fields (with where it is in the file)."""
        field = raw if isinstance(raw, _Fields) else _Fields(raw, "an action")
        name, cause = field.raw.get("action"), field.raw.get("cause")
        if not is_action(name):
            raise ValueError(f"unknown action {name!r}")
        if not is_cause(cause):                                     # as Terraform's planfile decoder: no guessing
            raise ValueError(f"unknown cause {cause!r} of {name} {field.raw.get('strategy')}")
        # Where it acts, as the planner writes it: a move from one worker to another, anything else
        # on one worker. A file that says otherwise was not written by `plan --out`.
        at = {key: field.get(key, str) for key in (("from", "to") if name == "move" else ("worker",))}
        return cls(
            action=name, strategy=field.get("strategy", str), reason=field.get("reason", str, default=""),
            cause=cause, worker=at.get("worker"), source=at.get("from"), target=at.get("to"),
            epoch=field.get("epoch", int, optional=True), spec_hash=field.get("specHash", str, optional=True),
            paused=field.get("paused", bool, default=False),
        )


class _Fields:
    """The fields of one object of a plan file, each of the type the planner writes: a plan file is
    carried out as it says, so a field of another type (a worker that is a number, an epoch that is
    text) is refused here, by name, rather than met half-way through an apply."""

    def __init__(self, raw: Any, where: str = ""):
        if not isinstance(raw, dict):
            raise ValueError(f"{where or 'the file'} is {_json_kind(raw)}, not an object")
        self.raw, self.where = raw, where

    def get(self, key: str, kind: type | tuple[type, ...], *, optional: bool = False, default: Any = _MISSING) -> Any:
        """The field `key`: None when `optional` and missing or null, `default` when given and missing."""
        value = self.raw.get(key)
        if value is None and (optional or default is not _MISSING):
            return None if optional else default
        kinds = kind if isinstance(kind, tuple) else (kind,)
        # bool is an int to Python, never to a plan file.
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            expected = " or ".join(_KIND_WORDS[k] for k in kinds)
            got = "missing" if key not in self.raw else "null" if value is None else f"{_json_kind(value)} {_shown(value)}"
            raise ValueError(f"{self.where + ': ' if self.where else ''}{key} is {got}, expected {expected}")
        return value

    def objects(self, key: str) -> list["_Fields"]:
        """The objects of a list field (missing: none)."""
        where = f"{self.where}.{key}" if self.where else key
        return [_Fields(item, f"{where}[{i}]") for i, item in enumerate(self.get(key, list, default=[]))]


@dataclass(frozen=True)
class Queued:
    """Wants to run, but no worker fits. `rejections` lists every worker with its reason."""

    strategy: str
    reason: str
    rejections: tuple[tuple[str, str], ...] = ()   # (worker, reason code and detail)

    def to_json(self) -> dict[str, Any]:
        return {"strategy": self.strategy, "reason": self.reason,
                "rejections": [{"worker": w, "reason": r} for w, r in self.rejections]}


@dataclass(frozen=True)
class Waiting:
    """Placed on a worker that is not online; nothing is done yet, and this says until when."""

    strategy: str
    worker: str
    reason: str
    seconds_left: float | None = None

    def to_json(self) -> dict[str, Any]:
        left = None if self.seconds_left is None else round(self.seconds_left, 1)
        return {"strategy": self.strategy, "worker": self.worker, "reason": self.reason, "secondsLeft": left}


# What holds planned actions back (Blocked.guard), closed like the actions and causes.
Guard = Literal[
    "mass-stop",        # more of the fleet would stop at once than the fleet allows: --allow-mass-stop
    "failover-brake",   # more failovers at once than the fleet allows (a split network looks like dead hosts)
    "source-change",    # the loop would apply another source than the last one: --allow-source-change
    "suspended",        # `quantlab suspend` holds them on purpose (not a refusal): `quantlab resume`
]
GUARDS: frozenset[str] = frozenset(get_args(Guard))
MASS_STOP: Guard = "mass-stop"
FAILOVER_BRAKE: Guard = "failover-brake"
SOURCE_CHANGE: Guard = "source-change"
SUSPENDED: Guard = "suspended"
# Causes that come from what the fleet files say (not from a fault): the source-change guard holds them.
DESIRED_CAUSES: frozenset[Cause] = frozenset({
    "removed", "desired-stopped", "spec-changed", "worker-changed", "lease-changed", "worker-removed",
    "worker-leaving", "requirements", "drain", "rebalance"})


@dataclass(frozen=True)
class Blocked:
    """A guard refused these actions; they run only when the guard is lifted (e.g. --allow-mass-stop)."""

    guard: Guard
    reason: str
    actions: tuple[Action, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"guard": self.guard, "reason": self.reason, "actions": [a.to_json() for a in self.actions]}


@dataclass(frozen=True)
class Note:
    """Something an operator should know that is not an action (a strategy in error, a drain stuck)."""

    strategy: str
    worker: str | None
    note: str

    def to_json(self) -> dict[str, Any]:
        return {"strategy": self.strategy, "worker": self.worker, "note": self.note}


@dataclass(frozen=True)
class Adopt:
    """A running copy the state file does not know (lost or older state): recorded, not touched."""

    strategy: str
    worker: str
    epoch: int
    spec_hash: str | None

    def to_json(self) -> dict[str, Any]:
        return {"strategy": self.strategy, "worker": self.worker, "epoch": self.epoch, "specHash": self.spec_hash}


@dataclass(frozen=True)
class Plan:
    actions: tuple[Action, ...] = ()
    queued: tuple[Queued, ...] = ()
    waiting: tuple[Waiting, ...] = ()
    blocked: tuple[Blocked, ...] = ()
    notes: tuple[Note, ...] = ()
    adopt: tuple[Adopt, ...] = ()
    # Provenance: what the plan was computed from (checked again before a saved plan is applied).
    fleet_hash: str | None = None
    fleet_revision: str | None = None
    fleet_dirty: bool = False
    lineage: str | None = None
    state_serial: int = 0
    # Memory the plan moves forward when applied.
    rr_cursor: str | None = None
    next_epoch: int = 1
    policy: str = ""

    @property
    def has_changes(self) -> bool:
        """What `--detailed-exitcode` reports as 2: actions to take, or actions a guard holds back."""
        return bool(self.actions or any(b.actions for b in self.blocked))

    @property
    def refused(self) -> tuple[Blocked, ...]:
        """What a guard refused (a run that meets one fails); actions `suspend` holds are on purpose."""
        return tuple(b for b in self.blocked if b.guard != SUSPENDED)

    def counts(self) -> dict[str, int]:
        out = {name: 0 for name in ACTIONS}
        for a in self.actions:
            out[a.action] += 1
        return out

    def decision_keys(self) -> list[tuple[Any, ...]]:
        """The plan's decisions without their words (reasons carry durations that change by the
        second): two plans with the same keys do the same."""
        keys: list[tuple[Any, ...]] = [(a.action, a.strategy, a.workers, a.cause, a.epoch, a.spec_hash, a.paused)
                                       for a in self.actions]
        return keys + [(b.guard, tuple(a.strategy for a in b.actions)) for b in self.blocked]

    def summary(self) -> str:
        """"Plan: 1 to start, 2 to stop. 1 queued." or "No changes." (the one-line form of the plan)."""
        counts = self.counts()
        verbs = {"start": "to start", "restart": "to restart", "move": "to move", "stop": "to stop",
                 "pause": "to pause", "resume": "to resume"}
        parts = [f"{counts[k]} {v}" for k, v in verbs.items() if counts[k]]
        extra = []
        if self.queued:
            extra.append(f"{len(self.queued)} queued")
        if self.waiting:
            extra.append(f"{len(self.waiting)} waiting")
        held = sum(len(b.actions) for b in self.blocked)
        if held:
            extra.append(f"{held} blocked")
        if self.notes:
            extra.append(f"{len(self.notes)} note{'s' if len(self.notes) != 1 else ''}")
        head = "Plan: " + ", ".join(parts) + "." if parts else "No changes."
        return head + (" " + ", ".join(extra) + "." if extra else "")

    def with_provenance(self, **fields: Any) -> "Plan":
        return replace(self, **fields)

    def with_guards_lifted(self) -> "Plan":
        """The plan as if every guard had allowed its actions (apply PLANFILE --allow-mass-stop)."""
        held = tuple(a for b in self.blocked for a in b.actions)
        actions = sorted(self.actions + held, key=lambda a: (a.strategy, a.action, a.workers))
        return replace(self, actions=tuple(actions), blocked=())

    def to_json(self) -> dict[str, Any]:
        return {
            "formatVersion": FORMAT_VERSION,
            "fleetRevision": self.fleet_revision,
            "fleetDirty": self.fleet_dirty,
            "fleetHash": self.fleet_hash,
            "lineage": self.lineage,
            "stateSerial": self.state_serial,
            "policy": self.policy,
            "actions": [a.to_json() for a in self.actions],
            "queued": [q.to_json() for q in self.queued],
            "waiting": [w.to_json() for w in self.waiting],
            "blocked": [b.to_json() for b in self.blocked],
            "notes": [n.to_json() for n in self.notes],
            "adopt": [a.to_json() for a in self.adopt],
            "roundRobinCursor": self.rr_cursor,
            "nextEpoch": self.next_epoch,
        }

    @classmethod
    def from_json(cls, raw: Any) -> "Plan":
        plan = _Fields(raw)
        if raw.get("formatVersion") != FORMAT_VERSION:
            raise ValueError(f"unknown plan formatVersion {raw.get('formatVersion')!r}")
        return cls(
            actions=tuple(Action.from_json(a) for a in plan.objects("actions")),
            queued=tuple(Queued(q.get("strategy", str), q.get("reason", str),
                                tuple((r.get("worker", str), r.get("reason", str)) for r in q.objects("rejections")))
                         for q in plan.objects("queued")),
            waiting=tuple(Waiting(w.get("strategy", str), w.get("worker", str), w.get("reason", str),
                                  w.get("secondsLeft", (int, float), optional=True))
                          for w in plan.objects("waiting")),
            blocked=tuple(Blocked(_guard(b.get("guard", str)), b.get("reason", str),
                                  tuple(Action.from_json(a) for a in b.objects("actions")))
                          for b in plan.objects("blocked")),
            notes=tuple(Note(n.get("strategy", str), n.get("worker", str, optional=True), n.get("note", str))
                        for n in plan.objects("notes")),
            adopt=tuple(Adopt(a.get("strategy", str), a.get("worker", str), a.get("epoch", int),
                              a.get("specHash", str, optional=True))
                        for a in plan.objects("adopt")),
            fleet_hash=plan.get("fleetHash", str, optional=True),
            fleet_revision=plan.get("fleetRevision", str, optional=True),
            fleet_dirty=plan.get("fleetDirty", bool, default=False),
            lineage=plan.get("lineage", str, optional=True),
            state_serial=plan.get("stateSerial", int, default=0),
            rr_cursor=plan.get("roundRobinCursor", str, optional=True),
            next_epoch=plan.get("nextEpoch", int, default=1),
            policy=plan.get("policy", str, default=""),
        )


def _json_kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "text", int: "a number", float: "a number", bool: "a boolean",
            type(None): "null"}.get(type(value), type(value).__name__)


def _shown(value: Any) -> str:
    """A value as the file spells it, clipped."""
    text = json.dumps(value)
    return text if len(text) <= 40 else f"{text[:40]}…"


__all__ = ["ACTIONS", "Action", "Adopt", "Blocked", "Note", "Plan", "Queued", "Waiting"]
