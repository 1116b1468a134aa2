"""What a probe saw on the hosts, as plain data. Filled by `gather`, read by the planner and status."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, TypeGuard, get_args

# Every instance status the host agent reports (whether one is alive, the agent says with it); any
# other value from a host makes that instance "unknown", which the planner leaves alone (acting on
# what it cannot read could run a strategy twice).
InstanceStatus = Literal["starting", "running", "paused", "restarting", "stopping", "stopped", "error",
                         "orphaned", "unknown"]
KNOWN_STATUSES: frozenset[str] = frozenset(get_args(InstanceStatus))


def is_status(value: str) -> TypeGuard[InstanceStatus]:
    return value in KNOWN_STATUSES


@dataclass(frozen=True)
class Instance:
    """One strategy's instance folder on one worker, as the agent reported it."""

    strategy: str
    epoch: int
    spec_hash: str | None
    status: InstanceStatus
    alive: bool                      # a supervisor or a runner process of it is running
    started_at: int | None = None    # ms
    stopped_at: int | None = None    # ms
    restarts: int = 0
    error_count: int = 0
    last_error: str | None = None
    heartbeat_age_ms: int | None = None
    beats: int | None = None
    lease_left_s: float | None = None
    exit_code: int | None = None
    reason: str | None = None        # why it stopped or failed, in words
    problems: tuple[str, ...] = ()   # files of the instance the agent could not use (written by the strategy)
    lease_ttl_s: float | None = None  # the lease TTL its supervisor was started with (None: not reported)

    @property
    def paused(self) -> bool:
        return self.status == "paused"

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> "Instance":
        said, reason = str(raw.get("status", "stopped")), _text(raw.get("reason"))
        status: InstanceStatus = "unknown"
        if is_status(said):
            status = said
        else:
            reason = f"the host reported status {said[:40]!r}, which this controller does not know"
        problems = raw.get("problems") or ()
        return cls(
            strategy=str(raw["strategy"]), epoch=_int(raw.get("epoch")), spec_hash=_text(raw.get("specHash")),
            status=status, alive=bool(raw.get("alive", False)) or status == "unknown",
            started_at=_opt_int(raw.get("startedAt")), stopped_at=_opt_int(raw.get("stoppedAt")),
            restarts=_int(raw.get("restarts")), error_count=_int(raw.get("errorCount")),
            last_error=_text(raw.get("lastError")), heartbeat_age_ms=_opt_int(raw.get("heartbeatAgeMs")),
            beats=_opt_int(raw.get("beats")), lease_left_s=_opt_float(raw.get("leaseLeftSeconds")),
            exit_code=_opt_int(raw.get("exitCode")), reason=reason,
            problems=tuple(_text(p) or "" for p in problems) if isinstance(problems, list) else (),
            lease_ttl_s=_opt_float(raw.get("leaseTtlSeconds")),
        )


# Readers for values a host sends: a wrong type raises (the instance becomes "unknown"), never a
# silent reinterpretation; text is clipped, so a strategy cannot flood the controller's output.
def _int(value: Any) -> int:
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected an integer, got {type(value).__name__}")
    return value


def _opt_int(value: Any) -> int | None:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return None if value is None else _int(value)


def _opt_float(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"expected a number, got {type(value).__name__}")
    return float(value)


def _text(value: Any, limit: int = 500) -> str | None:
    if value is None:
        return None
    return str(value)[:limit]


@dataclass(frozen=True)
class WorkerState:
    """One worker as seen by the last probe of its host."""

    worker: str
    reachable: bool
    error: str | None = None              # why the host did not answer, or what is missing on it
    cpus: int | None = None
    cpu: float | None = None              # 1-minute load average per cpu
    mem_free_mb: int | None = None
    credentials: frozenset[str] = frozenset()   # accounts with a secrets/<account>.env file
    instances: Mapping[str, Instance] = field(default_factory=dict)
    host_time: int | None = None          # ms, the host's wall clock when it answered
    clock_skew_ms: int | None = None      # host clock minus the controller's, about (within a round trip)
    versions: Mapping[str, str | None] = field(default_factory=dict)   # python, node
    containment: str | None = None        # how a supervisor keeps what a strategy starts: subreaper, ...
    disk_free_mb: int | None = None       # free space on the workdir's filesystem (None: not reported)
    disk_low: bool = False                # too little of it for a new copy (the host's judgement)


@dataclass(frozen=True)
class ObservedState:
    """Every worker of the fleet as last probed. A worker missing here was not probed at all."""

    workers: Mapping[str, WorkerState]
    taken_at: int = 0                     # ms on the controller's clock

    def worker(self, worker_id: str) -> WorkerState | None:
        return self.workers.get(worker_id)

