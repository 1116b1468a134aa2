"""The Monitor's judgement, as pure functions: is a worker online, has a lease surely expired,
is an instance healthy, may a strategy fail over again. The clock is always an argument: `now_ms`
is the controller's boot-time clock (see quantlab/clock.py), the one the memory's judged times use.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

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
    seen = memory.answered.get(worker_id)
    if seen is None:
        return WorkerLiveness("offline", None, error)
    down = max(0.0, (now_ms - seen) / 1000)
    status: Liveness = "unreachable" if down < monitor.worker_offline_after_s else "offline"
    return WorkerLiveness(status, down, error)


def lease_surely_expired_at(strategy: str, worker_id: str, memory: Memory, monitor: MonitorSettings,
                            stop_timeout_s: float) -> int:
    """When no copy of `strategy` can still run on `worker_id`: the bound of the latest request that
    may have granted a lease there (recorded before it was sent, with the TTL of that moment; at
    worst the last answer there plus today's TTL, for a copy this state adopted), plus the stop
    grace, plus a margin."""
    placed = memory.placements.get(strategy)
    ttl_ms = int(monitor.lease_ttl_s * 1000)
    until = max(memory.leases.get(worker_id, 0), memory.answered.get(worker_id, 0) + ttl_ms)
    if placed is not None and placed.launched is not None:
        # The copy there was started with its own stop timeout; a shorter one now must not count.
        stop_timeout_s = max(stop_timeout_s, placed.launched.stop_timeout_s)
    return until + int((stop_timeout_s + monitor.failover_margin_s) * 1000)


# Reschedule backoff (like Nomad's reschedule delay): the first failover of a strategy is not
# delayed; each further one within RESCHEDULE_RESET_MS of the last waits twice as long as the one
# before, so a strategy does not flap between hosts that come and go.
RESCHEDULE_DELAY_MS = 30_000
RESCHEDULE_MAX_DELAY_MS = 600_000
RESCHEDULE_RESET_MS = 3_600_000


def next_failover_at(strategy: str, memory: Memory, now_ms: int) -> int | None:
    """When `strategy` may fail over again, or None when it may now."""
    count, last = memory.reschedules.get(strategy, (0, 0))
    if count == 0 or now_ms - last >= RESCHEDULE_RESET_MS:
        return None
    at = last + min(RESCHEDULE_MAX_DELAY_MS, RESCHEDULE_DELAY_MS * 2 ** (count - 1))
    return at if at > now_ms else None


def failover_brake(fleet: Fleet, observed: ObservedState) -> str | None:
    """Why failovers must hold, or None. When more than `failoverBrakeShare` of all workers go
    silent at once, the likelier fault is the controller's own network (Kubernetes stops evicting
    when every zone is disrupted, for the same reason): moving everything would only add churn."""
    total = len(fleet.workers)
    silent = [wid for wid in fleet.workers if not ((s := observed.worker(wid)) is not None and s.reachable)]
    share = fleet.settings.monitor.brake_share
    if total < 2 or share >= 1 or len(silent) <= share * total:
        return None
    return (f"{len(silent)} of {total} workers are silent at once (more than {share:.0%}): the controller's own "
            "network is the likelier fault, so failovers hold until more of them answer "
            "(monitor.failoverBrakeShare)")


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


def watch(fleet: Fleet, observed: ObservedState, memory: Memory, host_events: list[dict[str, Any]], now_ms: int,
          wall_ms: int) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """The Monitor's view after a probe: one-off notices for strategies that ended in error or were
    fenced (from the supervisors' events), and the alerts that hold now: offline workers, and
    instances whose files the agent could not use (`wall_ms` stamps what people read)."""
    notices = []
    for e in host_events:
        kind = {"error": "strategy-error", "lease-expired": "lease-expired"}.get(e.get("event", ""))
        if kind:
            notices.append({"t": e.get("t", wall_ms), "kind": kind, "strategy": e.get("strategy"),
                            "worker": e.get("worker"), "message": e.get("detail") or kind})
    raised = {}
    for wid in fleet.workers:
        live = worker_liveness(wid, observed, memory, fleet.settings.monitor, now_ms)
        if live.status == "offline":
            raised[f"offline:{wid}"] = {"t": wall_ms, "kind": "worker-offline", "worker": wid,
                                        "message": f"{live.describe(wid)}: {live.error or 'no answer'}"}
        state = observed.worker(wid)
        if state is not None and state.reachable and state.disk_low:
            free = "unknown" if state.disk_free_mb is None else f"{state.disk_free_mb} MB"
            raised[f"disk:{wid}"] = {"t": wall_ms, "kind": "disk-full", "worker": wid,
                                     "message": f"{wid}: the disk of its workdir is full ({free} free): no new "
                                                "copy starts there, and its strategies may not be renewed; free "
                                                "space on the host"}
        for inst in (state.instances.values() if state is not None and state.reachable else ()):
            if inst.problems:
                raised[f"instance:{wid}:{inst.strategy}"] = {
                    "t": wall_ms, "kind": "instance-problem", "worker": wid, "strategy": inst.strategy,
                    "message": f"{inst.strategy} on {wid}: {'; '.join(inst.problems)}"}
    return notices, raised


def alerts_delta(before: dict[str, str], raised: dict[str, dict[str, Any]], scope: str, now_ms: int
                 ) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Alerts are told once: a notice when one is raised, one when it clears (keys starting with
    `scope` are the ones this check decides on). Returns the notices and the alerts after."""
    notices = [notice for key, notice in sorted(raised.items()) if key not in before]
    after = {k: v for k, v in before.items() if not k.startswith(scope) or k in raised}
    for key in sorted(before):
        if key.startswith(scope) and key not in raised:
            notices.append({"t": now_ms, "kind": "resolved", "alert": key, "message": f"resolved: {before[key]}"})
    after.update({key: notice["message"] for key, notice in raised.items()})
    return notices, after
