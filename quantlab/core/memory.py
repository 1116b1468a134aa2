"""What the controller remembers between runs: the content of the state file, as plain data.

The planner reads it and never changes it; the executor records outcomes into a copy. Reading and
writing the file (atomically, locked, 0600) is `store.py`'s job.

Times the controller judges (lease bounds, answers, backoffs) are ms on its boot-time clock, valid
only on the boot named by `clock_boot`; `rebase` re-reads a state written on another boot (or by a
version that used wall-clock times) as if every lease had been granted at this run's start. Times
people read (`last_seen`, `placed_at`) are epoch ms.
"""
from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from .redact import seal_launch
from .spec.models import Location, WorkerSpec

FORMAT_VERSION = 2
# Written instead of 2 while something is suspended: the previous release reads version 2 and would
# ignore the suspension (act on what it holds, renew what stop-all let lapse, and drop it on save).
SUSPENDED_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)  # 1: judged times were wall-clock ms; read, then rebased


def _lease_key(raw: Any) -> str | None:
    """A lease key as stored (64 hex digits), or None: one of another shape is made again."""
    return raw if isinstance(raw, str) and len(raw) == 64 and all(c in "0123456789abcdef" for c in raw) else None


def address_key(address: dict[str, Any]) -> tuple[Any, ...]:
    """Where a worker is, as the state remembers it (Memory.addresses): one host's workdir."""
    return (address.get("host"), address.get("port"), address.get("workdir"))


def _fleet_name(raw: Any) -> str | None:
    if raw is None or isinstance(raw, str):
        return raw or None
    raise TypeError(f"fleet name {raw!r} is not a string")


def _optional_int(raw: Any) -> int | None:
    return None if raw is None else int(raw)


def _fleet_settings(raw: Any) -> dict[str, Any]:
    """The settings a state remembers, with the shape `rebase` and FleetSettings.from_snapshot read
    checked here (a TypeError or ValueError makes the state malformed, never a traceback later)."""
    from .spec.models import FleetSettings       # the reader of these settings (plain data, no I/O)

    settings = dict(raw or {})
    for part in ("monitor", "ssh", "notify"):
        if not isinstance(settings.get(part) or {}, dict):
            raise TypeError(f"fleetSettings.{part} is not an object")
    float((settings.get("monitor") or {}).get("lease_ttl_s") or 0)
    FleetSettings.from_snapshot(settings)
    return settings


def launch_salt(lineage: str | None) -> str:
    """The salt of the proxy digests a state keeps (redact.seal_launch): its lineage, so that the
    same proxy gives another digest in every state."""
    return lineage or "quantlab"


_CONTAINERS = (dict, list, set)


def _copied(value: Any) -> Any:
    """Containers copied all the way down; anything else (numbers, strings, frozen records) shared.
    Most maps hold only numbers or records: copied in C, then only their containers again."""
    if isinstance(value, dict):
        out = dict(value)
        for k, v in out.items():
            if isinstance(v, _CONTAINERS):
                out[k] = _copied(v)
        return out
    if isinstance(value, list):
        return [_copied(v) if isinstance(v, _CONTAINERS) else v for v in value]
    if isinstance(value, set):
        return set(value)
    return value


class MemoryFormatError(ValueError):
    """The state file's content is not a state this version understands."""


@dataclass(frozen=True)
class Launched:
    """What a placement's copy was started with: the strategy's launch fields and its worker's (see
    StrategySpec.launch_fields and worker_launch), to explain a restart and to honour the stop
    timeout it was started with. Read tolerantly: a field of another shape is left out."""

    file: str | None = None
    params: dict[str, Any] | None = None
    heartbeat_ms: int | None = None
    scheduling: dict[str, Any] = field(default_factory=dict)
    account: str | None = None
    worker: dict[str, Any] | None = None     # runner, proxy, region

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"file": self.file, "params": self.params, "heartbeatMs": self.heartbeat_ms,
                               "scheduling": self.scheduling, "account": self.account}
        if self.worker is not None:
            out["worker"] = self.worker
        return out

    @classmethod
    def from_json(cls, raw: Any) -> "Launched | None":
        if not isinstance(raw, dict) or not raw:
            return None

        def typed(key: str, kind: type | tuple[type, ...]) -> Any:
            value = raw.get(key)
            return value if isinstance(value, kind) and not isinstance(value, bool) else None
        return cls(file=typed("file", str), params=typed("params", dict), heartbeat_ms=typed("heartbeatMs", int),
                   scheduling=typed("scheduling", dict) or {}, account=typed("account", str),
                   worker=typed("worker", dict))

    def sealed(self, salt: str) -> "Launched":
        """This record with its worker's proxy credentials kept as redact.seal_launch keeps them
        (a state written by an earlier release holds them in clear)."""
        if self.worker is None:
            return self
        kept = seal_launch(self.worker, salt)
        return self if kept == self.worker else dataclasses.replace(self, worker=kept)

    @property
    def stop_timeout_s(self) -> float:
        value = self.scheduling.get("stopTimeoutSeconds")
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


@dataclass(frozen=True)
class Placement:
    """Where a strategy is meant to run, and which copy (epoch) is the current one there."""

    strategy: str
    worker: str
    epoch: int
    spec_hash: str
    paused: bool = False
    placed_at: int = 0                       # ms
    launched: Launched | None = None         # what it was started with, to explain restarts
    revision: str | None = None              # the fleet's git commit when it was started

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"worker": self.worker, "epoch": self.epoch, "specHash": self.spec_hash,
                               "paused": self.paused, "placedAt": self.placed_at}
        if self.launched is not None:
            out["launched"] = self.launched.to_json()
        if self.revision is not None:
            out["revision"] = self.revision
        return out

    @classmethod
    def from_json(cls, strategy: str, raw: dict[str, Any]) -> "Placement":
        return cls(strategy=strategy, worker=str(raw["worker"]), epoch=int(raw["epoch"]),
                   spec_hash=str(raw["specHash"]), paused=bool(raw.get("paused", False)),
                   placed_at=int(raw.get("placedAt", 0)), launched=Launched.from_json(raw.get("launched")),
                   revision=raw.get("revision"))


@dataclass(frozen=True)
class HostClock:
    """One host's boot-time clock as its last answer showed it: `boottime` seconds on the boot
    `boot_id`, read no later than `at` (ms on the controller's boot-time clock). Requests to the host
    carry their not-after on this clock."""

    boot_id: str
    boottime: float
    at: int

    def to_json(self) -> dict[str, Any]:
        return {"bootId": self.boot_id, "boottime": self.boottime, "at": self.at}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> "HostClock":
        return cls(str(raw["bootId"]), float(raw["boottime"]), int(raw["at"]))


@dataclass
class Memory:
    """The state file's content. `serial` and `lineage` are managed by the store."""

    lineage: str | None = None
    serial: int = 0
    clock_boot: str | None = None                              # the boot the judged times below are on
    saved_at: int | None = None                                # when this state was written
    began: int | None = None                                   # when this lineage's first state was saved
    placements: dict[str, Placement] = field(default_factory=dict)
    leases: dict[str, int] = field(default_factory=dict)       # worker -> until when a lease granted there
                                                               # may live (kept by ledger.LeaseBook)
    restarts: dict[str, int] = field(default_factory=dict)     # strategy -> restarts (mirrored from hosts)
    answered: dict[str, int] = field(default_factory=dict)     # worker -> when its host last answered
    last_seen: dict[str, int] = field(default_factory=dict)    # worker -> the same, epoch ms (for people)
    rr_cursor: str | None = None                               # worker chosen last by round-robin
    next_epoch: int = 1
    loop_renewal: int | None = None                            # the reconcile loop's last lease renewal
    host_events: dict[str, int] = field(default_factory=dict)  # worker -> host's ms of the newest event recorded
    # worker -> how to reach it (host, port, user, workdir, program), so leases keep being renewed even
    # while the fleet directory fails to validate
    addresses: dict[str, dict[str, Any]] = field(default_factory=dict)
    host_clocks: dict[str, HostClock] = field(default_factory=dict)  # worker -> its host's clock
    checkpoints: dict[str, int] = field(default_factory=dict)  # strategy -> when its copy last changed
    reschedules: dict[str, tuple[int, int]] = field(default_factory=dict)  # strategy -> (failovers, last at)
    alerts: dict[str, str] = field(default_factory=dict)       # raised alerts (each told once), key -> message
    fleet_settings: dict[str, Any] = field(default_factory=dict)  # the last valid fleet's settings
    # target (strategy or worker id, or "*" for everything) -> {"by", "reason", "at"}: held by `suspend`
    suspended: dict[str, dict[str, Any]] = field(default_factory=dict)
    # strategy -> {"epoch", "by", "reason", "at"}: `quantlab retry` asked to start its copy of that
    # epoch again, which is in error (its restart budget spent); the next plan does, with a fresh budget
    retry: dict[str, dict[str, Any]] = field(default_factory=dict)
    # The loop's own rebalancing (reconcile.rebalance): when it last ran, on the judged clock, and
    # what it moved then (those stay put at the next one)
    rebalanced_at: int | None = None
    rebalanced: list[str] = field(default_factory=list)
    # What the reconcile loop applies ({"kind", "ref"}, see follow.Source), the revision it last
    # applied ("revision") and since when ("at", epoch ms): a change of source is guarded
    loop_source: dict[str, Any] = field(default_factory=dict)
    # Set by `quantlab state push` on the state it moved away: no controller acts on it any more.
    migrated_to: str | None = None
    # The controller term its commands to the hosts carry (a fencing token, see host fence.py): the
    # file's, or with PostgreSQL the leader's, kept here for `state pull` and a later push.
    term: int = 0
    # The secret (hex) from which each copy's lease key derives (protocol.instance_key): only
    # renewals proved with it extend a lease on a host. Made by the store at the first save.
    lease_key: str | None = None
    # The name of the fleet this state belongs to (the Fleet document's `name`), recorded by the first
    # round that saw a named fleet: see foreign_to.
    fleet_name: str | None = None

    def copy(self) -> "Memory":
        """A copy to change: every dict, list and set in it is new; the frozen records (Placement,
        HostClock) are shared, as nothing changes them in place. (A deep copy was most of a save's
        CPU with hundreds of strategies, and every start saves.)"""
        out = copy.copy(self)
        for f in dataclasses.fields(self):
            setattr(out, f.name, _copied(getattr(self, f.name)))
        return out

    def content_json(self) -> dict[str, Any]:
        """Everything but the serial: two states with equal content are the same state."""
        return {
            "version": SUSPENDED_VERSION if self.suspended else FORMAT_VERSION,
            "lineage": self.lineage,
            "clockBoot": self.clock_boot,
            "savedAt": self.saved_at,
            "began": self.began,
            "nextEpoch": self.next_epoch,
            "roundRobinCursor": self.rr_cursor,
            "loopRenewal": self.loop_renewal,
            "placements": {sid: p.to_json() for sid, p in sorted(self.placements.items())},
            "leases": dict(sorted(self.leases.items())),
            "restarts": dict(sorted(self.restarts.items())),
            "answered": dict(sorted(self.answered.items())),
            "lastSeen": dict(sorted(self.last_seen.items())),
            "hostEvents": dict(sorted(self.host_events.items())),
            "addresses": dict(sorted(self.addresses.items())),
            "hostClocks": {wid: c.to_json() for wid, c in sorted(self.host_clocks.items())},
            "checkpoints": dict(sorted(self.checkpoints.items())),
            "reschedules": {sid: list(r) for sid, r in sorted(self.reschedules.items())},
            "alerts": dict(sorted(self.alerts.items())),
            "fleetSettings": self.fleet_settings,
            # Only when set: a state that never suspended anything stays as the previous release wrote it.
            **({"suspended": dict(sorted(self.suspended.items()))} if self.suspended else {}),
            **({"retry": dict(sorted(self.retry.items()))} if self.retry else {}),
            **({"rebalancedAt": self.rebalanced_at, "rebalanced": sorted(self.rebalanced)}
               if self.rebalanced_at is not None else {}),
            **({"loopSource": dict(sorted(self.loop_source.items()))} if self.loop_source else {}),
            **({"migratedTo": self.migrated_to} if self.migrated_to else {}),
            **({"controllerTerm": self.term} if self.term else {}),
            **({"leaseKey": self.lease_key} if self.lease_key else {}),
            **({"fleet": self.fleet_name} if self.fleet_name else {}),
        }

    def to_json(self) -> dict[str, Any]:
        out = self.content_json()
        out["serial"] = self.serial
        return out

    @classmethod
    def from_json(cls, raw: Any) -> "Memory":
        if not isinstance(raw, dict):
            raise MemoryFormatError("expected a JSON object")
        version = raw.get("version")
        if type(version) is not int or version not in READABLE_VERSIONS:     # true == 1 in Python
            raise MemoryFormatError(f"unknown state format version {version!r} (this quantlab reads "
                                    f"{', '.join(map(str, READABLE_VERSIONS))}); use a newer quantlab")
        try:
            last_seen = {k: int(v) for k, v in raw.get("lastSeen", {}).items()}
            return cls(
                lineage=raw["lineage"],
                # Version 1 judged by the wall clock: no boot, so `rebase` takes it as granted now.
                clock_boot=raw.get("clockBoot") if version >= FORMAT_VERSION else None,
                saved_at=_optional_int(raw.get("savedAt")) if version >= FORMAT_VERSION else None,
                began=raw.get("began"),
                serial=int(raw["serial"]),
                placements=_sealed({sid: Placement.from_json(sid, p) for sid, p in raw.get("placements", {}).items()},
                                   raw["lineage"]),
                leases={k: int(v) for k, v in raw.get("leases", {}).items()},
                restarts={k: int(v) for k, v in raw.get("restarts", {}).items()},
                answered={k: int(v) for k, v in raw.get("answered", last_seen).items()},
                last_seen=last_seen,
                rr_cursor=raw.get("roundRobinCursor"),
                next_epoch=int(raw.get("nextEpoch", 1)),
                loop_renewal=raw.get("loopRenewal"),
                host_events={k: int(v) for k, v in raw.get("hostEvents", {}).items()},
                addresses={k: dict(v) for k, v in raw.get("addresses", {}).items()},
                host_clocks={k: HostClock.from_json(v) for k, v in raw.get("hostClocks", {}).items()},
                checkpoints={k: int(v) for k, v in raw.get("checkpoints", {}).items()},
                reschedules={k: (int(v[0]), int(v[1])) for k, v in raw.get("reschedules", {}).items()},
                alerts={str(k): str(v) for k, v in raw.get("alerts", {}).items()},
                fleet_settings=_fleet_settings(raw.get("fleetSettings")),
                suspended={str(k): dict(v) for k, v in raw.get("suspended", {}).items()},
                retry={str(k): dict(v) for k, v in raw.get("retry", {}).items()},
                rebalanced_at=raw.get("rebalancedAt") if version >= FORMAT_VERSION else None,
                rebalanced=[str(s) for s in raw.get("rebalanced", [])],
                loop_source=dict(raw.get("loopSource") or {}),
                migrated_to=raw.get("migratedTo"),
                term=int(raw.get("controllerTerm") or 0),
                lease_key=_lease_key(raw.get("leaseKey")),
                fleet_name=_fleet_name(raw.get("fleet")),
            )
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
            raise MemoryFormatError(f"malformed state: {exc!r}") from exc

    def placement_basis(self) -> str:
        """What a plan's actions depend on in the state: where each copy is meant to run, and the
        epochs and cursor the plan moves forward. Renewals and answers do not change it (a plan a
        person confirmed is carried out only if this is still the same)."""
        return json.dumps([self.lineage, {s: p.to_json() for s, p in self.placements.items()},
                           self.next_epoch, self.rr_cursor], sort_keys=True)

    def foreign_to(self, name: str | None, strategies: set[str], workers: set[str],
                   addresses: set[tuple[Any, ...]]) -> str | None:
        """Why this state belongs to another fleet than the one named `name`, with these strategy and
        worker ids and these worker addresses (host, port, workdir), or None. Planned against another
        fleet's state, every placement it holds would look deleted and be stopped on that fleet's
        hosts. When both have a name, the names decide. Else a state whose placements name none of
        these strategies, none of these workers and none of their addresses is another fleet's."""
        if name and self.fleet_name:
            return None if name == self.fleet_name else f"it belongs to the fleet named {self.fleet_name!r}, not {name!r}"
        placed = {sid: p.worker for sid, p in self.placements.items()}
        where = {address_key(self.addresses[w]) for w in placed.values() if w in self.addresses}
        if placed and (strategies or workers) and not (set(placed) & strategies) \
                and not (set(placed.values()) & workers) and not (where & addresses):
            some = ", ".join(sorted(placed)[:3]) + (", …" if len(placed) > 3 else "")
            return (f"its {len(placed)} placement(s) ({some}) name no strategy, no worker and no worker address "
                    "of this fleet, so it is another fleet's state")
        return None

    def rebase(self, now_ms: int, boot_id: str, ttl_s: float) -> "Memory":
        """This state as seen by a controller on boot `boot_id` at `now_ms`. Judged times recorded on
        another boot cannot be compared with ours, and how much time passed in between is unknown
        (maybe none): every lease is taken as granted now (with the longer of `ttl_s` and the TTL
        recorded with the fleet's settings), or as living as long from now as it had left when the
        state was written, whichever is later; every worker that ever answered is taken as answered
        now, and host clocks are forgotten (the next answer gives them again)."""
        if self.clock_boot == boot_id:
            return self
        m = self.copy()
        recorded = float((m.fleet_settings.get("monitor") or {}).get("lease_ttl_s") or 0)
        ttl_ms = int(max(ttl_s, recorded) * 1000)
        workers = set(m.leases) | {p.worker for p in m.placements.values()}
        left = {w: max(0, until - m.saved_at) for w, until in m.leases.items()} if m.saved_at is not None else {}
        m.leases = {w: now_ms + max(ttl_ms, left.get(w, 0)) for w in sorted(workers)}
        m.leases = {w: until for w, until in m.leases.items() if until > now_ms}
        m.answered = {w: now_ms for w in m.answered}
        m.began = now_ms
        m.loop_renewal = None
        m.host_clocks = {}
        m.checkpoints = {sid: 0 for sid in m.checkpoints}            # due at once
        m.reschedules = {sid: (count, now_ms) for sid, (count, _) in m.reschedules.items()}
        if m.rebalanced_at is not None:
            m.rebalanced_at = now_ms                                  # the cooldown starts again
        m.clock_boot = boot_id
        m.saved_at = now_ms
        return m


def remembered_worker(wid: str, address: dict[str, Any], leaving: bool = False) -> WorkerSpec:
    """A worker as the state remembers it (how to reach it, nothing it may run)."""
    return WorkerSpec(id=wid, host=address["host"], port=address.get("port"), user=address.get("user"),
                      workdir=address.get("workdir"), runner=(address.get("program") or "node",),
                      max_strategies=0, supported_apis=frozenset(), source=Location("state", 0),
                      cordoned=leaving, drain=leaving, leaving=leaving)


def _sealed(placements: dict[str, Placement], lineage: str | None) -> dict[str, Placement]:
    """Placements read from a state with the proxies their copies were launched with sealed: a state
    of an earlier release kept their credentials in clear, and loses them at its next save."""
    salt = launch_salt(lineage)
    for sid, p in placements.items():
        if p.launched is not None:
            kept = p.launched.sealed(salt)
            if kept is not p.launched:
                placements[sid] = dataclasses.replace(p, launched=kept)
    return placements
