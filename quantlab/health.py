"""The Monitor's judgement, as pure functions: is a worker online, has a lease surely expired,
is an instance healthy. The clock is always an argument.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .memory import Memory
from .observed import Instance, ObservedState
from .spec import Fleet, MonitorSettings, StrategySpec

Liveness = Literal["online", "unreachable", "offline"]


@dataclass(frozen=True)
class WorkerLiveness:
    status: Liveness
    down_for_s: float | None = None     # since the last answered probe, when not online
    error: str | None = None            # what the failed probe said

    def describe(self, worker_id: str) -> str:
        if self.status == "online":
            return f"{worker_id} online"
        since = "never answered" if self.down_for_s is None else f"for {format_duration(self.down_for_s)}"
        return f"{worker_id} {self.status} ({since})"


def worker_liveness(worker_id: str, observed: ObservedState, memory: Memory, monitor: MonitorSettings,
                    now_ms: int) -> WorkerLiveness:
    """Online when its host answered; unreachable while silent for less than workerOfflineAfterSeconds;
    offline after that, or when it never answered at all."""
    state = observed.worker(worker_id)
    if state is not None and state.reachable:
        return WorkerLiveness("online")
    error = state.error if state is not None else None
    seen = memory.last_seen.get(worker_id)
    if seen is None:
        return WorkerLiveness("offline", None, error)
    down = max(0.0, (now_ms - seen) / 1000)
    status: Liveness = "unreachable" if down < monitor.worker_offline_after_s else "offline"
    return WorkerLiveness(status, down, error)


def failover_margin_s(monitor: MonitorSettings) -> float:
    """Slack on top of the lease for the fenced copy's supervisor to notice and for clock-rate drift."""
    return 1.0 + 0.05 * monitor.lease_ttl_s


def lease_surely_expired_at(strategy: str, worker_id: str, memory: Memory, monitor: MonitorSettings,
                            stop_timeout_s: float) -> int:
    """ms after which no copy of `strategy` can still run on `worker_id`: the latest moment a lease
    granted there may live (recorded with the TTL in force when it was granted; at worst the last
    answered probe or the placement, plus today's TTL), plus the stop grace, plus a margin."""
    placed = memory.placements.get(strategy)
    ttl_ms = int(monitor.lease_ttl_s * 1000)
    until = max(memory.leases.get(worker_id, 0), memory.last_seen.get(worker_id, 0) + ttl_ms,
                (placed.placed_at + ttl_ms) if placed is not None and placed.worker == worker_id else 0)
    if placed is not None and placed.launched:
        # The copy there was started with its own stop timeout; a shorter one now must not count.
        started_with = placed.launched.get("scheduling", {}).get("stopTimeoutSeconds", 0)
        stop_timeout_s = max(stop_timeout_s, float(started_with or 0))
    return until + int((stop_timeout_s + failover_margin_s(monitor)) * 1000)


def instance_healthy(instance: Instance, spec: StrategySpec) -> tuple[bool, str | None]:
    """(healthy, why not). A paused instance is healthy without fresh heartbeats."""
    if not instance.alive:
        return False, instance.reason or instance.status
    if instance.status in ("starting", "restarting", "stopping"):
        return False, instance.status
    if instance.error_count > spec.scheduling.max_errors:
        return False, f"errorCount {instance.error_count} > maxErrors {spec.scheduling.max_errors}"
    if instance.status == "paused":
        return True, None
    age = instance.heartbeat_age_ms
    if age is None:
        return False, "no heartbeat yet"
    if age > 3 * spec.heartbeat_ms:
        return False, f"heartbeat {format_duration(age / 1000)} old"
    return True, None


def format_duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 10:
        return f"{seconds:.1f}s".replace(".0s", "s")
    total = int(round(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def watch(fleet: Fleet, observed: ObservedState, memory: Memory, host_events: list[dict], now_ms: int
          ) -> tuple[list[dict], dict[str, dict]]:
    """The Monitor's view after a probe: one-off notices for strategies that ended in error or were
    fenced (from the supervisors' events), and the alerts that hold now (offline workers)."""
    notices = []
    for e in host_events:
        kind = {"error": "strategy-error", "lease-expired": "lease-expired"}.get(e.get("event", ""))
        if kind:
            notices.append({"t": e.get("t", now_ms), "kind": kind, "strategy": e.get("strategy"),
                            "worker": e.get("worker"), "message": e.get("detail") or kind})
    raised = {}
    for wid in fleet.workers:
        live = worker_liveness(wid, observed, memory, fleet.settings.monitor, now_ms)
        if live.status == "offline":
            raised[f"offline:{wid}"] = {"t": now_ms, "kind": "worker-offline", "worker": wid,
                                        "message": f"{live.describe(wid)}: {live.error or 'no answer'}"}
    return notices, raised


def alerts_delta(before: dict[str, str], raised: dict[str, dict], scope: str, now_ms: int
                 ) -> tuple[list[dict], dict[str, str]]:
    """Alerts are told once: a notice when one is raised, one when it clears (keys starting with
    `scope` are the ones this check decides on). Returns the notices and the alerts after."""
    notices = [notice for key, notice in sorted(raised.items()) if key not in before]
    after = {k: v for k, v in before.items() if not k.startswith(scope) or k in raised}
    for key in sorted(before):
        if key.startswith(scope) and key not in raised:
            notices.append({"t": now_ms, "kind": "resolved", "alert": key, "message": f"resolved: {before[key]}"})
    after.update({key: notice["message"] for key, notice in raised.items()})
    return notices, after
