"""What `status` reports, as plain data: every strategy and worker as they are now. Pure."""
from __future__ import annotations

from typing import Any

from . import health
from .redact import redact_json, redact_url
from .memory import Memory, Placement
from .observed import Instance, ObservedState
from .plan import Plan
from .spec import Fleet

_STATUS_OF = {"running": "running", "paused": "paused", "starting": "pending", "restarting": "running",
              "stopping": "running", "orphaned": "running", "error": "error", "stopped": "stopped"}


def not_answering(workers: list[str], shown: int = 5) -> str:
    """"2 not answering: w3, w7" (the first few named: the fix is on those hosts)."""
    names = ", ".join(workers[:shown]) + (f" and {len(workers) - shown} more" if len(workers) > shown else "")
    return f"{len(workers)} not answering: {names}"


def _instance(observed: ObservedState, worker: str | None, sid: str) -> Instance | None:
    state = observed.worker(worker) if worker else None
    if state is None or not state.reachable:
        return None
    return state.instances.get(sid)


def fleet_status(fleet: Fleet, observed: ObservedState, memory: Memory, now_ms: int, wall_ms: int,
                 plan: Plan | None = None, revision: str | None = None,
                 problems: list[str] | None = None,
                 acted: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """`now_ms` is the controller's boot-time clock (what it judges by), `wall_ms` epoch ms (what it shows).
    `problems`: the fleet does not validate and `fleet` is the state file's memory of it, so what
    each strategy should be is unknown. `acted`: strategy -> {"status", "reason"} for what a round
    did after `observed` was taken (see snapshot.acted_marks): `observed` cannot show it yet, so
    those strategies are shown as the round left them (a status of None keeps the judged one)."""
    queued = {q.strategy: q.reason for q in plan.queued} if plan else {}
    # What the plan cannot do for a strategy (a change no worker can take, an error it leaves alone)
    noted = {n.strategy: n.note for n in plan.notes} if plan else {}
    liveness = {wid: health.worker_liveness(wid, observed, memory, fleet.settings.monitor, now_ms)
                for wid in fleet.workers}
    strategies = []
    running_on: dict[str, list[str]] = {wid: [] for wid in fleet.workers}
    for sid in sorted(set(fleet.strategies) | set(memory.placements)):
        spec = fleet.strategies.get(sid)
        placed = memory.placements.get(sid)
        worker = placed.worker if placed else None
        inst = _instance(observed, worker, sid)
        live = liveness.get(worker) if worker else None
        desired = spec.desired_state if spec else ("unknown" if problems else "removed")
        entry: dict[str, Any] = {"id": sid, "workerId": worker, "desiredState": desired}
        if inst is not None:
            entry.update(status=_STATUS_OF.get(inst.status, inst.status), startedAt=inst.started_at,
                         stoppedAt=inst.stopped_at, errorCount=inst.error_count, lastError=inst.last_error,
                         restarts=inst.restarts, heartbeatAgeMs=inst.heartbeat_age_ms,
                         leaseLeftSeconds=_lease_left(inst, memory, worker, fleet.settings.monitor.lease_ttl_s,
                                                      now_ms),
                         reason=inst.reason, problems=list(inst.problems))
            healthy = health.instance_healthy(inst, spec)[0] if spec else False
        elif placed is not None:
            # Not seen now: its worker is not answering, or the copy is gone.
            gone = live is not None and live.status == "online"
            entry.update(status="stopped" if gone else ("paused" if placed.paused else "running"),
                         startedAt=placed.placed_at, stoppedAt=None, errorCount=None, lastError=None,
                         restarts=memory.restarts.get(sid, 0), heartbeatAgeMs=None, leaseLeftSeconds=None,
                         reason=("not running on its worker" if gone else "last known state; " + (
                             live.describe(placed.worker) if live else placed.worker + " not in fleet")))
            healthy = False
        else:
            stopped = spec is not None and spec.desired_state == "stopped"
            entry.update(status="stopped" if stopped else ("queued" if sid in queued else "pending"),
                         startedAt=None, stoppedAt=None, errorCount=None, lastError=None, restarts=0,
                         heartbeatAgeMs=None, leaseLeftSeconds=None, reason=queued.get(sid))
            healthy = stopped
        mark = (acted or {}).get(sid)
        if mark is not None:
            if mark.get("status"):
                # What the hosts said about it predates the act: none of it is about this copy.
                entry.update(status=mark["status"], heartbeatAgeMs=None, leaseLeftSeconds=None, problems=[],
                             startedAt=placed.placed_at if placed else None)
                healthy = mark["status"] == "stopped" and desired == "stopped"
            entry["reason"] = mark["reason"]
        entry["healthy"] = bool(healthy)
        entry["workerStatus"] = live.status if live else None
        entry["revision"] = placed.revision if placed else None
        entry["specHash"] = inst.spec_hash if inst is not None else (placed.spec_hash if placed else None)
        entry["desiredSpecHash"] = spec.spec_hash if spec else None
        entry["desiredRevision"] = revision
        entry["proxy"] = redact_url(_proxy_of(fleet, placed))
        entry["upToDate"] = spec is not None and entry["specHash"] == spec.spec_hash
        entry["note"] = noted.get(sid)
        if worker in running_on and entry["status"] in ("running", "paused", "pending"):
            running_on[worker].append(sid)
        strategies.append(entry)
    workers = []
    for wid, w in fleet.workers.items():
        state = observed.worker(wid)
        live = liveness[wid]
        status = live.status if live.status != "online" else ("busy" if running_on[wid] else "idle")
        workers.append({
            "id": wid, "status": status, "host": w.host, "region": w.region, "proxy": redact_url(w.proxy),
            "runningStrategies": running_on[wid], "maxStrategies": w.max_strategies,
            "cpu": state.cpu if state and state.reachable else None,
            "cpus": state.cpus if state and state.reachable else None,
            "diskFreeMb": state.disk_free_mb if state and state.reachable else None,
            "diskLow": bool(state and state.reachable and state.disk_low),
            "memory": state.mem_free_mb if state and state.reachable else None,
            "lastSeen": memory.last_seen.get(wid) if not (state and state.reachable) else wall_ms,
            "error": state.error if state else None, "cordoned": w.cordoned, "drain": w.drain,
            "clockSkewMs": state.clock_skew_ms if state and state.reachable else None,
            "versions": dict(state.versions) if state and state.reachable else {},
            "containment": state.containment if state and state.reachable else None,
        })
    # Errors, reasons and problems come from hosts and strategies, which may quote a URL with
    # credentials (an exchange client's error names its proxy): none of it is shown with them.
    report: dict[str, Any] = redact_json({"strategies": strategies, "workers": workers,
            # target ("*": everything) -> who suspended it, why and when (`quantlab suspend`)
            "suspended": {t: dict(h) for t, h in sorted(memory.suspended.items())},
            # what the reconcile loop applies, the revision it last applied and since when (epoch ms)
            "loop": dict(memory.loop_source) or None,
            "problems": list(problems or [])})
    return report


def _lease_left(inst: Instance, memory: Memory, worker: str | None, ttl_s: float, now_ms: int) -> float | None:
    """What the host says is left of the lease, never more than this controller granted (the bound
    its lease book keeps for the worker, or one TTL): the number comes from a file the strategy can
    write."""
    if inst.lease_left_s is None:
        return None
    bound = memory.leases.get(worker) if worker is not None else None
    granted = (bound - now_ms) / 1000 if bound is not None else ttl_s
    return round(max(0.0, min(inst.lease_left_s, granted)), 3)


def _proxy_of(fleet: Fleet, placed: Placement | None) -> str | None:
    """The proxy a placed strategy trades through: the one its copy was started with, else (a copy
    this state adopted, or started before that was recorded) its worker's."""
    if placed is None:
        return None
    launched = placed.launched.worker if placed.launched is not None else None
    if launched is not None:
        proxy = launched.get("proxy")
        return proxy if isinstance(proxy, str) else None
    worker = fleet.workers.get(placed.worker)
    return worker.proxy if worker is not None else None


def unhealthy(report: dict[str, Any]) -> list[str]:
    """Desired strategies that are not running healthy (for `status --detailed-exitcode`)."""
    return [s["id"] for s in report["strategies"] if s["desiredState"] in ("running", "paused") and not s["healthy"]]
