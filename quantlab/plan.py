"""The Plan value: a closed set of actions, each with the reason kept apart from the decision.

Plain data only. Rendering lives in render.py, plan-file I/O in store.py, carrying it out in execute.py.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Literal

FORMAT_VERSION = 1

ActionName = Literal["start", "stop", "restart", "move", "pause", "resume"]
ACTIONS: tuple[str, ...] = ("start", "stop", "restart", "move", "pause", "resume")

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
CAUSES: frozenset[str] = frozenset(Cause.__args__)  # type: ignore[attr-defined]


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
    def from_json(cls, raw: dict[str, Any]) -> "Action":
        if raw.get("action") not in ACTIONS:
            raise ValueError(f"unknown action {raw.get('action')!r}")
        if raw.get("cause") not in CAUSES:     # as Terraform's planfile decoder: no guessing
            raise ValueError(f"unknown cause {raw.get('cause')!r} of {raw.get('action')} {raw.get('strategy')}")
        return cls(
            action=raw["action"], strategy=raw["strategy"], reason=raw.get("reason", ""),
            cause=raw["cause"], worker=raw.get("worker"), source=raw.get("from"),
            target=raw.get("to"), epoch=raw.get("epoch"), spec_hash=raw.get("specHash"),
            paused=bool(raw.get("paused", False)),
        )


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


# The guard name of actions held by `quantlab suspend`: held on purpose, so not a refusal.
SUSPENDED = "suspended"
SOURCE_CHANGE = "source-change"
# Causes that come from what the fleet files say (not from a fault): the source-change guard holds them.
DESIRED_CAUSES: frozenset[Cause] = frozenset({
    "removed", "desired-stopped", "spec-changed", "worker-changed", "lease-changed", "worker-removed",
    "worker-leaving", "requirements", "drain", "rebalance"})


@dataclass(frozen=True)
class Blocked:
    """A guard refused these actions; they run only when the guard is lifted (e.g. --allow-mass-stop)."""

    guard: str
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
    def from_json(cls, raw: dict[str, Any]) -> "Plan":
        if raw.get("formatVersion") != FORMAT_VERSION:
            raise ValueError(f"unknown plan formatVersion {raw.get('formatVersion')!r}")
        return cls(
            actions=tuple(Action.from_json(a) for a in raw.get("actions", [])),
            queued=tuple(Queued(q["strategy"], q["reason"],
                                tuple((r["worker"], r["reason"]) for r in q.get("rejections", [])))
                         for q in raw.get("queued", [])),
            waiting=tuple(Waiting(w["strategy"], w["worker"], w["reason"], w.get("secondsLeft"))
                          for w in raw.get("waiting", [])),
            blocked=tuple(Blocked(b["guard"], b["reason"], tuple(Action.from_json(a) for a in b.get("actions", [])))
                          for b in raw.get("blocked", [])),
            notes=tuple(Note(n["strategy"], n.get("worker"), n["note"]) for n in raw.get("notes", [])),
            adopt=tuple(Adopt(a["strategy"], a["worker"], int(a["epoch"]), a.get("specHash"))
                        for a in raw.get("adopt", [])),
            fleet_hash=raw.get("fleetHash"), fleet_revision=raw.get("fleetRevision"),
            fleet_dirty=bool(raw.get("fleetDirty", False)), lineage=raw.get("lineage"),
            state_serial=int(raw.get("stateSerial", 0)), rr_cursor=raw.get("roundRobinCursor"),
            next_epoch=int(raw.get("nextEpoch", 1)), policy=raw.get("policy", ""),
        )


__all__ = ["ACTIONS", "Action", "Adopt", "Blocked", "Note", "Plan", "Queued", "Waiting"]
