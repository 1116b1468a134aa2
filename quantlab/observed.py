"""What a probe saw on the hosts, as plain data. Filled by `gather`, read by the planner and status."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

# Instance statuses reported by the host agent. "alive" ones have a supervisor (or a runner) running.
ALIVE_STATUSES = frozenset({"starting", "running", "paused", "restarting", "stopping"})


@dataclass(frozen=True)
class Instance:
    """One strategy's instance folder on one worker, as the agent reported it."""

    strategy: str
    epoch: int
    spec_hash: str | None
    status: str                      # starting|running|paused|restarting|stopping|stopped|error
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

    @property
    def paused(self) -> bool:
        return self.status == "paused"

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> "Instance":
        return cls(
            strategy=str(raw["strategy"]), epoch=int(raw.get("epoch") or 0), spec_hash=raw.get("specHash"),
            status=str(raw.get("status", "stopped")), alive=bool(raw.get("alive", False)),
            started_at=raw.get("startedAt"), stopped_at=raw.get("stoppedAt"),
            restarts=int(raw.get("restarts") or 0), error_count=int(raw.get("errorCount") or 0),
            last_error=raw.get("lastError"), heartbeat_age_ms=raw.get("heartbeatAgeMs"),
            beats=raw.get("beats"), lease_left_s=raw.get("leaseLeftSeconds"),
            exit_code=raw.get("exitCode"), reason=raw.get("reason"),
        )


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

    def alive_instances(self) -> list[Instance]:
        return [i for i in self.instances.values() if i.alive]


@dataclass(frozen=True)
class ObservedState:
    """Every worker of the fleet as last probed. A worker missing here was not probed at all."""

    workers: Mapping[str, WorkerState]
    taken_at: int = 0                     # ms on the controller's clock

    def worker(self, worker_id: str) -> WorkerState | None:
        return self.workers.get(worker_id)

