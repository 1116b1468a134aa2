"""What the last writing run saw and did, for the fleet page and /metrics (`quantlab serve`).

Every writing run — `apply`, each renewal and act round of `reconcile` — records a snapshot: the
status report (the CLI's `status --output json` shape), each strategy's plan reason and checkpoint
age, the last rounds' times, the leader, and the counters /metrics exports. `serve` only reads it, so
a page at any fleet size costs the hosts nothing. Snapshots are built and written by one background
thread that keeps only the newest, so recording never delays a renewal round.
"""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from .atomicfile import atomic_write
from quantlab.core.memory import Memory
from quantlab.core.plan import Plan

if TYPE_CHECKING:
    from .execute import Outcome

FORMAT = 1


class Counters:
    """Counts since this process started (Prometheus counters reset on restart). Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, float] = {}

    def add(self, name: str, amount: float = 1.0, **labels: str) -> None:
        key = json.dumps([name, sorted(labels.items())])
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def to_json(self) -> list[dict[str, Any]]:
        with self._lock:
            items = sorted(self._values.items())
        return [{"name": json.loads(k)[0], "labels": dict(json.loads(k)[1]), "value": v} for k, v in items]


def plan_reasons(plan: Plan | None) -> dict[str, dict[str, str]]:
    """strategy -> why it waits, is queued, is held or what the plan does with it."""
    if plan is None:
        return {}
    out: dict[str, dict[str, str]] = {}
    for a in plan.actions:
        out[a.strategy] = {"kind": a.action, "reason": a.reason}
    for b in plan.blocked:
        for a in b.actions:
            out[a.strategy] = {"kind": "held", "reason": f"{b.guard}: {b.reason}"}
    for w in plan.waiting:
        out[w.strategy] = {"kind": "waiting", "reason": w.reason}
    for q in plan.queued:
        out[q.strategy] = {"kind": "queued", "reason": q.reason}
    for n in plan.notes:
        out.setdefault(n.strategy, {"kind": "note", "reason": n.note})
    return out


def acted_marks(outcomes: list["Outcome"]) -> dict[str, dict[str, str | None]]:
    """strategy -> {"status", "reason"}: what an act round left each strategy it acted on as, for a
    snapshot whose observation was taken before the round acted (status.fleet_status's `acted`).
    A copy just started is `pending` until a probe sees it run; a failed action keeps the status
    judged from the state and says what failed."""
    marks: dict[str, dict[str, str | None]] = {}
    for o in outcomes:
        a = o.action
        where = a.target if a.action == "move" else a.worker
        if a.action == "stop" and a.cause == "stale-copy":
            continue                  # an old copy went; the strategy's current one runs elsewhere
        if not o.ok:
            marks[a.strategy] = {"status": None, "reason": f"{a.action} {'to' if a.action == 'move' else 'on'} "
                                                           f"{where} failed: {o.detail}"}
        elif a.action == "move":
            marks[a.strategy] = {"status": "pending",
                                 "reason": f"moved from {a.source} to {a.target}; not seen running there yet"}
        elif a.action in ("start", "restart"):
            marks[a.strategy] = {"status": "pending", "reason": f"{a.action}ed on {where}; not seen running yet"}
        elif a.action == "stop":
            marks[a.strategy] = {"status": "stopped", "reason": f"stopped on {where}: {a.reason}"}
        else:                         # pause, resume: the agent confirmed it
            marks[a.strategy] = {"status": "paused" if a.action == "pause" else "running",
                                 "reason": f"{a.action}d on {where}"}
    return marks


def build(report: dict[str, Any], plan: Plan | None, memory: Memory, now_ms: int, wall_ms: int,
          rounds: dict[str, Any], leader: dict[str, Any] | None, counters: list[dict[str, Any]],
          settings: dict[str, Any], acted: dict[str, Any] | None = None) -> dict[str, Any]:
    """The snapshot of a round (pure): the status report with each strategy's plan reason and
    checkpoint age added. `acted`: the strategies the round carried its plan out on, whose plan
    reason is done with (their status says what came of it)."""
    reasons = plan_reasons(plan)
    for s in report["strategies"]:
        s["plan"] = None if acted and s["id"] in acted else reasons.get(s["id"])
        changed = memory.checkpoints.get(s["id"])
        s["checkpointAgeSeconds"] = round(max(0, now_ms - changed) / 1000, 1) if changed else None
    return {"format": FORMAT, "at": wall_ms, "status": report, "rounds": rounds, "leader": leader,
            "counters": counters, "settings": settings}


class SnapshotFile:
    """The snapshot beside a state file (mode 0600: it names hosts and strategies)."""

    def __init__(self, path: Path):
        self.path = path

    def write(self, snapshot: dict[str, Any]) -> None:
        atomic_write(self.path, json.dumps(snapshot, separators=(",", ":")).encode(), mode=0o600)

    def read(self) -> dict[str, Any] | None:
        try:
            with open(self.path, "rb") as handle:
                raw = json.loads(handle.read())
        except (OSError, ValueError):
            return None
        return raw if isinstance(raw, dict) and raw.get("format") == FORMAT else None

    def version(self) -> str | None:
        """Something that changes whenever the snapshot does (an ETag)."""
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return f"{st.st_mtime_ns:x}-{st.st_size:x}"


class SnapshotWriter:
    """Builds and writes snapshots on a thread of its own; a newer one replaces one not written yet.
    A failure is said once per kind and never reaches the caller."""

    def __init__(self, store: Any, log: Callable[[str], None]):
        self.store = store
        self.log = log
        self._pending: Callable[[], dict[str, Any]] | None = None
        self._cond = threading.Condition()
        self._closed = False
        self._said: str | None = None
        self._thread = threading.Thread(target=self._run, name="snapshot", daemon=True)
        self._thread.start()

    def submit(self, make: Callable[[], dict[str, Any]]) -> None:
        with self._cond:
            self._pending = make
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending is not None or self._closed)
                make, self._pending = self._pending, None
                if make is None:
                    return
            try:
                self.store.write(make())
                self._said = None
            except Exception as exc:  # noqa: BLE001 - the page goes stale; the fleet does not care
                what = f"warning: the fleet page's snapshot cannot be written: {exc}"
                if what != self._said:
                    self.log(what)
                    self._said = what

    def close(self, timeout: float = 5.0) -> None:
        """Write what is pending (for at most `timeout`), then stop."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout)
