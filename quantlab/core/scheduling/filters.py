"""Feasibility filters: each answers "may this strategy run on this worker?" with a reason when not.

Static filters depend only on a worker's class (see pool.py), dynamic ones on its load during the
plan. Every rejection is kept, so a queued strategy can say exactly why no worker fits.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..redact import redact_url
from ..spec import StrategySpec
from .pool import WorkerView


@dataclass(frozen=True)
class Rejection:
    worker: str
    code: str        # offline | unreachable | cordoned | draining | api | region | proxy | credentials
                     # | runtime | disk | full | memory | excluded
    detail: str = ""  # per-worker specifics, e.g. "4/4" or "US"


Check = Callable[[StrategySpec, WorkerView], "Rejection | None"]


def online(s: StrategySpec, w: WorkerView) -> Rejection | None:
    return None if w.liveness == "online" else Rejection(w.id, w.liveness)


def schedulable(s: StrategySpec, w: WorkerView) -> Rejection | None:
    if w.spec.drain:
        return Rejection(w.id, "draining")
    if w.spec.cordoned:
        return Rejection(w.id, "cordoned")
    return None


def runtime(s: StrategySpec, w: WorkerView) -> Rejection | None:
    return None if w.runtime_error is None else Rejection(w.id, "runtime")


def disk(s: StrategySpec, w: WorkerView) -> Rejection | None:
    if not w.disk_low:
        return None
    return Rejection(w.id, "disk", "unknown" if w.disk_free_mb is None else f"{w.disk_free_mb} MB free")


def api(s: StrategySpec, w: WorkerView) -> Rejection | None:
    return None if s.requirements.api in w.spec.supported_apis else Rejection(w.id, "api")


def region(s: StrategySpec, w: WorkerView) -> Rejection | None:
    want = s.requirements.region
    if want is None or w.spec.region == want:
        return None
    return Rejection(w.id, "region", w.spec.region or "none")


def proxy(s: StrategySpec, w: WorkerView) -> Rejection | None:
    want = s.requirements.proxy
    if want is None or w.spec.proxy == want:
        return None
    # The detail becomes text (plan reasons, `explain`): the worker's proxy without its credentials.
    return Rejection(w.id, "proxy", redact_url(w.spec.proxy) or "none")


def credentials(s: StrategySpec, w: WorkerView) -> Rejection | None:
    req = s.requirements
    if not req.credentials or req.account in w.credentials:
        return None
    return Rejection(w.id, "credentials")


def capacity(s: StrategySpec, w: WorkerView) -> Rejection | None:
    return None if w.has_room else Rejection(w.id, "full", f"{w.used}/{w.capacity}")


def memory(s: StrategySpec, w: WorkerView) -> Rejection | None:
    need = s.requirements.min_memory
    if not need or (w.mem_free_mb is not None and w.mem_free_mb >= need):
        return None
    have = "unknown" if w.mem_free_mb is None else f"{w.mem_free_mb} MB"
    return Rejection(w.id, "memory", have)


# Order matters only for which reason a worker reports first.
BASE_STATIC: tuple[Check, ...] = (online, schedulable, runtime, disk, api)
AFFINITY_STATIC: tuple[Check, ...] = (region, proxy)
LATE_STATIC: tuple[Check, ...] = (credentials,)
DYNAMIC: tuple[Check, ...] = (capacity, memory)


def first_rejection(checks: tuple[Check, ...], s: StrategySpec, w: WorkerView) -> Rejection | None:
    for check in checks:
        rejected = check(s, w)
        if rejected is not None:
            return rejected
    return None


def describe_group(code: str, s: StrategySpec) -> str:
    """Words for a group of workers rejected for the same reason."""
    req = s.requirements
    return {
        "offline": "offline",
        "unreachable": "unreachable",
        "cordoned": "cordoned",
        "draining": "draining",
        "runtime": "runner program missing on the host",
        "disk": "disk full",
        "api": f"no api {req.api}",
        "region": f"not in region {req.region}",
        "proxy": f"not behind proxy {redact_url(req.proxy)}",
        "credentials": f"no secrets/{req.account}.env",
        "full": "full",
        "memory": f"under {req.min_memory} MB free",
        "excluded": "the worker it leaves",
    }.get(code, code)


def remedy(r: Rejection, s: StrategySpec) -> str:
    """What would make this worker pass the filter that refused it (`quantlab explain`)."""
    req = s.requirements
    return {
        "offline": "its host answers again",
        "unreachable": "its host answers again",
        "cordoned": "the worker is uncordoned",
        "draining": "the worker stops draining",
        "runtime": "the runner program is installed on the host",
        "disk": f"space is freed on the disk of the worker's workdir (now {r.detail})",
        "api": f"the worker's capabilities.supportedApis include {req.api}",
        "region": f"the worker's metadata.region is {req.region} (or the strategy drops requirements.region)",
        "proxy": f"the worker's metadata.proxy is {redact_url(req.proxy)} (or the strategy drops requirements.proxy)",
        "credentials": f"the host has secrets/{req.account}.env in the worker's workdir",
        "full": f"a slot frees up ({r.detail}) or capabilities.maxStrategies is raised",
        "memory": f"{req.min_memory} MB are free (now {r.detail})",
    }.get(r.code, r.code)


def summarize(rejections: list[Rejection], s: StrategySpec, limit: int = 4) -> str:
    """'no api futu: worker-007; full: worker-008 (4/4)' — grouped, short, deterministic."""
    if not rejections:
        return "no workers in the fleet"
    groups: dict[str, list[Rejection]] = {}
    for r in sorted(rejections, key=lambda r: r.worker):
        groups.setdefault(r.code, []).append(r)
    parts = []
    for code, members in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        names = [f"{r.worker} ({r.detail})" if r.detail else r.worker for r in members[:limit]]
        more = f" and {len(members) - limit} more" if len(members) > limit else ""
        parts.append(f"{describe_group(code, s)}: {', '.join(names)}{more}")
    return "; ".join(parts)
