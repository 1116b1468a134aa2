"""Builders for the pure core's tests: fleets, observations and memories as plain data, no files."""
from __future__ import annotations

import hashlib
from pathlib import Path
from types import MappingProxyType
from typing import Any, Iterable

from quantlab.core.memory import Launched, Memory, Placement
from quantlab.core.observed import Instance, ObservedState, WorkerState
from quantlab.core.spec import (
    Fleet,
    FleetSettings,
    Location,
    MonitorSettings,
    Requirements,
    SchedulingSpec,
    StrategySpec,
    WorkerSpec,
    canonical_json,
)

JP_PROXY = "http://127.0.0.1:8890"
NOW = 1_800_000_000_000          # a fixed "now", ms


def strategy(sid: str, api: str = "bybit", *, region: str | None = None, proxy: str | None = None,
             account: str | None = None, credentials: bool = False, min_memory: int | None = None,
             desired: str = "running", params: dict[str, Any] | None = None, heartbeat_ms: int = 60000,
             stop_timeout: float = 30.0, code: str = "v1") -> StrategySpec:
    return StrategySpec(
        id=sid, name=sid, strategy_file=f"strategies/{sid}.js", strategy_path=Path(f"/fleet/strategies/{sid}.js"),
        file_sha256=hashlib.sha256(code.encode()).hexdigest(), params_json=canonical_json(params or {}),
        desired_state=desired,  # type: ignore[arg-type]
        heartbeat_ms=heartbeat_ms,
        requirements=Requirements(api=api, account=account, region=region, proxy=proxy, min_memory=min_memory,
                                  credentials=credentials),
        scheduling=SchedulingSpec(stop_timeout_s=stop_timeout), source=Location("strategies.yaml", 1),
    )


def worker(wid: str, apis: Iterable[str] = ("bybit",), cap: int = 4, *, region: str | None = None,
           proxy: str | None = None, cordoned: bool = False, drain: bool = False) -> WorkerSpec:
    return WorkerSpec(id=wid, host="local", max_strategies=cap, supported_apis=frozenset(apis),
                      source=Location("workers.yaml", 1), region=region, proxy=proxy, cordoned=cordoned, drain=drain)


def fleet(strategies: Iterable[StrategySpec], workers: Iterable[WorkerSpec], *, policy: str = "load-based",
          ttl: float = 180.0, offline_after: float = 90.0, auto_recover: bool = True) -> Fleet:
    settings = FleetSettings(policy=policy,  # type: ignore[arg-type]
                             monitor=MonitorSettings(worker_offline_after_s=offline_after, lease_ttl_s=ttl,
                                                     auto_recover=auto_recover))
    return Fleet(root=Path("/fleet"), settings=settings,
                 strategies=MappingProxyType({s.id: s for s in sorted(strategies, key=lambda s: s.id)}),
                 workers=MappingProxyType({w.id: w for w in sorted(workers, key=lambda w: w.id)}),
                 fleet_hash="sha256:test", files=())


def running(spec: StrategySpec, epoch: int, *, status: str = "running", spec_hash: str | None = None,
            restarts: int = 0, reason: str | None = None) -> Instance:
    alive = status in ("running", "paused", "starting", "restarting", "stopping", "orphaned", "unknown")
    return Instance(strategy=spec.id, epoch=epoch, spec_hash=spec_hash or spec.spec_hash, status=status,
                    alive=alive, restarts=restarts, heartbeat_age_ms=1000, reason=reason)


def observed(fl: Fleet, instances: dict[str, list[Instance]] | None = None, *, down: Iterable[str] = (),
             credentials: dict[str, set[str]] | None = None, mem: dict[str, int] | None = None,
             cpu: dict[str, float] | None = None) -> ObservedState:
    """Every fleet worker answered, except those in `down`."""
    instances = instances or {}
    down = set(down)
    workers = {}
    for wid in fl.workers:
        if wid in down:
            workers[wid] = WorkerState(wid, False, error="connection refused")
            continue
        workers[wid] = WorkerState(
            wid, True, cpu=(cpu or {}).get(wid, 0.0), mem_free_mb=(mem or {}).get(wid, 4096),
            credentials=frozenset((credentials or {}).get(wid, set())),
            instances={i.strategy: i for i in instances.get(wid, [])})
    return ObservedState(workers, NOW)


def memory(placements: dict[str, tuple[str, int]] | None = None, *, specs: dict[str, StrategySpec] | None = None,
           leases: dict[str, int] | None = None, last_seen: dict[str, int] | None = None,
           rr_cursor: str | None = None, next_epoch: int | None = None) -> Memory:
    """placements: strategy -> (worker, epoch); spec hashes come from `specs` when given."""
    specs = specs or {}
    out = {}
    for sid, (wid, epoch) in (placements or {}).items():
        spec = specs.get(sid)
        out[sid] = Placement(sid, wid, epoch, spec.spec_hash if spec else "sha256:old", placed_at=NOW - 3_600_000,
                             launched=Launched.from_json(spec.launch_fields()) if spec else None)
    epochs = [e for _, e in (placements or {}).values()]
    # NOW is both clocks here: `last_seen` (shown) and `answered` (judged) get the same values.
    return Memory(lineage="test-lineage", serial=1, placements=out, leases=dict(leases or {}),
                  last_seen=dict(last_seen or {}), answered=dict(last_seen or {}), rr_cursor=rr_cursor,
                  next_epoch=next_epoch or (max(epochs) + 1 if epochs else 1))


def summary(plan) -> list[tuple]:
    """Actions as short tuples: ("start", sid, worker) or ("move", sid, from, to)."""
    out = []
    for a in plan.actions:
        out.append((a.action, a.strategy, a.source, a.target) if a.action == "move" else (a.action, a.strategy, a.worker))
    return out
