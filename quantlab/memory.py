"""What the controller remembers between runs: the content of the state file, as plain data.

The planner reads it and never changes it; the executor records outcomes into a copy. Reading and
writing the file (atomically, locked, 0600) is `store.py`'s job.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

FORMAT_VERSION = 1


class MemoryFormatError(ValueError):
    """The state file's content is not a state this version understands."""


@dataclass(frozen=True)
class Placement:
    """Where a strategy is meant to run, and which copy (epoch) is the current one there."""

    strategy: str
    worker: str
    epoch: int
    spec_hash: str
    paused: bool = False
    placed_at: int = 0                       # ms
    launched: dict[str, Any] | None = None   # launch fields it was started with, to explain restarts
    revision: str | None = None              # the fleet's git commit when it was started

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"worker": self.worker, "epoch": self.epoch, "specHash": self.spec_hash,
                               "paused": self.paused, "placedAt": self.placed_at}
        if self.launched is not None:
            out["launched"] = self.launched
        if self.revision is not None:
            out["revision"] = self.revision
        return out

    @classmethod
    def from_json(cls, strategy: str, raw: dict[str, Any]) -> "Placement":
        return cls(strategy=strategy, worker=str(raw["worker"]), epoch=int(raw["epoch"]),
                   spec_hash=str(raw["specHash"]), paused=bool(raw.get("paused", False)),
                   placed_at=int(raw.get("placedAt", 0)), launched=raw.get("launched"),
                   revision=raw.get("revision"))


@dataclass
class Memory:
    """The state file's content. `serial` and `lineage` are managed by the store."""

    lineage: str | None = None
    serial: int = 0
    began: int | None = None                                   # ms when this lineage's first state was saved
    placements: dict[str, Placement] = field(default_factory=dict)
    leases: dict[str, int] = field(default_factory=dict)       # worker -> ms until which a lease granted
                                                               # there may live (grant + TTL at that time)
    restarts: dict[str, int] = field(default_factory=dict)     # strategy -> restarts (mirrored from hosts)
    last_seen: dict[str, int] = field(default_factory=dict)    # worker -> ms of the last answered probe
    rr_cursor: str | None = None                               # worker chosen last by round-robin
    next_epoch: int = 1
    loop_renewal: int | None = None                            # ms of the reconcile loop's last lease renewal
    host_events: dict[str, int] = field(default_factory=dict)  # worker -> ms of the newest host event recorded
    # worker -> how to reach it (host, port, user, workdir, program), so leases keep being renewed even
    # while the fleet directory fails to validate
    addresses: dict[str, dict[str, Any]] = field(default_factory=dict)
    checkpoints: dict[str, int] = field(default_factory=dict)  # strategy -> ms its checkpoint was copied
    alerts: dict[str, str] = field(default_factory=dict)       # raised alerts (each told once), key -> message
    fleet_settings: dict[str, Any] = field(default_factory=dict)  # the last valid fleet's settings

    def copy(self) -> "Memory":
        return copy.deepcopy(self)

    def content_json(self) -> dict[str, Any]:
        """Everything but the serial: two states with equal content are the same state."""
        return {
            "version": FORMAT_VERSION,
            "lineage": self.lineage,
            "began": self.began,
            "nextEpoch": self.next_epoch,
            "roundRobinCursor": self.rr_cursor,
            "loopRenewal": self.loop_renewal,
            "placements": {sid: p.to_json() for sid, p in sorted(self.placements.items())},
            "leases": dict(sorted(self.leases.items())),
            "restarts": dict(sorted(self.restarts.items())),
            "lastSeen": dict(sorted(self.last_seen.items())),
            "hostEvents": dict(sorted(self.host_events.items())),
            "addresses": dict(sorted(self.addresses.items())),
            "checkpoints": dict(sorted(self.checkpoints.items())),
            "alerts": dict(sorted(self.alerts.items())),
            "fleetSettings": self.fleet_settings,
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
        if version != FORMAT_VERSION:
            raise MemoryFormatError(f"unknown state format version {version!r} (this quantlab reads {FORMAT_VERSION})")
        try:
            return cls(
                lineage=raw["lineage"],
                began=raw.get("began"),
                serial=int(raw["serial"]),
                placements={sid: Placement.from_json(sid, p) for sid, p in raw.get("placements", {}).items()},
                leases={k: int(v) for k, v in raw.get("leases", {}).items()},
                restarts={k: int(v) for k, v in raw.get("restarts", {}).items()},
                last_seen={k: int(v) for k, v in raw.get("lastSeen", {}).items()},
                rr_cursor=raw.get("roundRobinCursor"),
                next_epoch=int(raw.get("nextEpoch", 1)),
                loop_renewal=raw.get("loopRenewal"),
                host_events={k: int(v) for k, v in raw.get("hostEvents", {}).items()},
                addresses={k: dict(v) for k, v in raw.get("addresses", {}).items()},
                checkpoints={k: int(v) for k, v in raw.get("checkpoints", {}).items()},
                alerts={str(k): str(v) for k, v in raw.get("alerts", {}).items()},
                fleet_settings=dict(raw.get("fleetSettings") or {}),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise MemoryFormatError(f"malformed state: {exc!r}") from exc

    def grant_lease(self, worker: str, at_ms: int, ttl_s: float) -> None:
        """A lease was (or may have been) granted on `worker` at `at_ms`, an upper bound of when."""
        self.leases[worker] = max(self.leases.get(worker, 0), at_ms + int(ttl_s * 1000))

    def placements_on(self, worker: str) -> list[Placement]:
        return [p for p in self.placements.values() if p.worker == worker]
