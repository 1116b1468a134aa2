"""Gather: one probe per host, all hosts in parallel, into the ObservedState the planner reads.

A host that does not answer makes its workers unreachable, with the error kept; it never stalls the
others (each probe is bounded by the command timeout, connections by the connect timeout).
"""
from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

from .hosts import AgentError, HostKey, Hosts
from .memory import Memory
from .observed import Instance, ObservedState, WorkerState
from .spec import Fleet, WorkerSpec
from .transport.base import TransportError

STRATEGY_ID = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")


@dataclass
class Gathered:
    observed: ObservedState
    answered_at: dict[str, int] = field(default_factory=dict)    # worker -> ms when its host answered
    renewed: dict[str, list[str]] = field(default_factory=dict)  # worker -> strategies whose lease was renewed
    maybe_renewed: dict[str, int] = field(default_factory=dict)  # worker -> ms: a probe carrying renewals
                                                                 # failed after it may have reached the host
    host_events: list[dict[str, Any]] = field(default_factory=list)
    checkpoints: dict[str, dict[str, Any] | None] = field(default_factory=dict)  # None: too large to copy
    seconds: float = 0.0


def renewals(memory: Memory) -> dict[str, dict[str, int]]:
    """Leases to renew, by worker: every current placement. A strategy the fleet no longer wants
    keeps its lease until a stop ends it, so a stop the mass-stop guard refuses is not carried out
    by fencing instead; a copy that is not the current placement never gets one."""
    out: dict[str, dict[str, int]] = {}
    for sid, p in memory.placements.items():
        out.setdefault(p.worker, {})[sid] = p.epoch
    return out


def _worker_state(worker: WorkerSpec, raw: dict[str, Any], host: dict[str, Any], at: int) -> WorkerState:
    runtime = raw.get("runtime") or {}
    error = None
    if runtime.get("path") is None:
        error = (f"{runtime.get('program', worker.runner[0])} not found on the host's PATH: install it "
                 "(Node.js 18+ for the reference runner) or set the worker's runner")
    cpus = int(host.get("cpus") or 1)
    load = host.get("loadavg") or [0.0]
    instances = {}
    for sid, inst in (raw.get("instances") or {}).items():
        # Only what could be a strategy of ours: a host's answer never names controller paths.
        if not (isinstance(inst, dict) and STRATEGY_ID.fullmatch(str(sid)) and inst.get("strategy") == sid):
            continue
        try:
            instances[sid] = Instance.from_json(inst)
        except (KeyError, TypeError, ValueError):
            continue
    return WorkerState(
        worker=worker.id, reachable=True, error=error, cpus=cpus, cpu=float(load[0]) / cpus,
        mem_free_mb=host.get("memFreeMb"), credentials=frozenset(raw.get("credentials") or ()),
        instances=instances, host_time=host.get("time"),
        clock_skew_ms=int(host["answeredAt"]) - at if isinstance(host.get("answeredAt"), (int, float)) else None,
        versions={"python": host.get("python"), runtime.get("program", "runner"): runtime.get("version")},
    )


def gather(fleet: Fleet, memory: Memory, hosts: Hosts, clock: Callable[[], int],
           renew: dict[str, dict[str, int]] | None = None,
           checkpoints: dict[str, dict[str, int]] | None = None) -> Gathered:
    """Probe every host of the fleet once, in parallel; extend the leases named in `renew` and copy
    the checkpoints named in `checkpoints` (both worker -> strategy -> epoch) on the way."""
    started = time.monotonic()
    wanted = renew if renew and fleet.settings.monitor.fencing else {}
    ttl = fleet.settings.monitor.lease_ttl_s
    groups = hosts.groups(list(fleet.workers.values()))
    result = Gathered(ObservedState({}, clock()))
    states: dict[str, WorkerState] = {}

    def probe(key: HostKey, members: list[WorkerSpec]) -> None:
        request = {
            "workers": [{"id": w.id, "workdir": hosts.workdir(w), "program": w.runner[0]} for w in members],
            "renew": {w.id: wanted[w.id] for w in members if w.id in wanted},
            "eventsSince": {w.id: memory.host_events.get(w.id, memory.last_seen.get(w.id, 0)) for w in members},
            "checkpoints": {w.id: (checkpoints or {})[w.id] for w in members if w.id in (checkpoints or {})},
        }
        args = ("--renew", f"{ttl:g}") if wanted else ()
        try:
            answer = hosts.agent(key, members).call("probe", request, fleet.settings.ssh.command_timeout_s, args)
            at = clock()
            host = answer.get("host") or {}
            answered = {w.id: _worker_state(w, (answer.get("workers") or {}).get(w.id) or {}, host, at)
                        for w in members}
        except (TransportError, AgentError, ValueError, TypeError, AttributeError, OSError) as exc:
            # Any failure is this host's alone (a bad ssh_config line, a garbled answer): never the tick's.
            for w in members:
                states[w.id] = WorkerState(w.id, False, error=str(exc) if str(exc) else type(exc).__name__)
                if getattr(exc, "maybe_ran", False) and w.id in request["renew"]:
                    result.maybe_renewed[w.id] = clock()
            return
        for w in members:
            raw = (answer.get("workers") or {}).get(w.id) or {}
            states[w.id] = answered[w.id]
            result.answered_at[w.id] = at
            if raw.get("renewed"):
                result.renewed[w.id] = [sid for sid in raw["renewed"] if sid in answered[w.id].instances]
            asked = request["checkpoints"].get(w.id, {})
            for sid, inst in (raw.get("instances") or {}).items():
                if sid not in answered[w.id].instances:
                    continue
                if sid in asked and "checkpoint" in inst and inst.get("epoch") == asked[sid]:
                    result.checkpoints[sid] = inst["checkpoint"]
                for event in inst.get("events") or ():
                    if isinstance(event, dict) and isinstance(event.get("t", 0), (int, float)):
                        result.host_events.append({**event, "worker": w.id, "strategy": sid})

    parallel = max(1, min(fleet.settings.ssh.parallelism, len(groups)))
    if parallel == 1:
        for key, members in groups.items():
            probe(key, members)
    else:
        with ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="probe") as pool:
            list(pool.map(lambda item: probe(*item), groups.items()))
    result.observed = ObservedState(dict(sorted(states.items())), clock())
    result.host_events.sort(key=lambda e: (e.get("t", 0), e["worker"], e["strategy"]))
    result.seconds = time.monotonic() - started
    return result


CHECKPOINT_EVERY_MS = 60_000   # how stale the controller's copy of a checkpoint may get


def checkpoints_due(fleet: Fleet, memory: Memory, now_ms: int) -> dict[str, dict[str, int]]:
    """Checkpoints to copy in this probe: current placements whose copy is older than a minute.
    (A move off a reachable worker takes the final one when it stops the old copy.)"""
    out: dict[str, dict[str, int]] = {}
    for sid, epoch in ((sid, p.epoch) for sid, p in memory.placements.items() if sid in fleet.strategies):
        if now_ms - memory.checkpoints.get(sid, 0) >= CHECKPOINT_EVERY_MS:
            out.setdefault(memory.placements[sid].worker, {})[sid] = epoch
    return out


def remember(memory: Memory, gathered: Gathered, addresses: dict[str, dict[str, Any]], ttl_s: float,
             loop_at: int | None = None) -> Memory:
    """The memory after a gather by a run that writes state: who answered when, until when a lease
    granted there may live (a renewal that may have happened counts too), restart counts mirrored
    from the supervisors, and how to reach every worker."""
    m = memory.copy()
    for wid, at in gathered.answered_at.items():
        m.last_seen[wid] = at
    granted = {wid: gathered.answered_at[wid] for wid in gathered.renewed}
    granted.update(gathered.maybe_renewed)
    for wid, at in granted.items():
        m.grant_lease(wid, at, ttl_s)
    for sid, p in m.placements.items():
        state = gathered.observed.worker(p.worker)
        inst = state.instances.get(sid) if state is not None and state.reachable else None
        if inst is not None and inst.epoch == p.epoch:
            m.restarts[sid] = inst.restarts
    for event in gathered.host_events:
        wid = event["worker"]
        m.host_events[wid] = max(m.host_events.get(wid, 0), int(event.get("t", 0)))
    m.addresses.update(addresses)
    for sid in gathered.checkpoints:
        m.checkpoints[sid] = gathered.observed.taken_at
    if loop_at is not None:
        m.loop_renewal = loop_at
    return m
