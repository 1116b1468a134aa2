"""WorkerPool: the workers a plan may place on, grouped for speed.

Workers whose constraint-relevant attributes are equal form a class (Nomad's "computed node class"),
so a strategy's static filters run once per class instead of once per worker. The free workers of
the classes that fit a kind of strategy form a candidate set, kept in a heap by load and in a
sorted id list for round-robin, and updated as the plan places.
"""
from __future__ import annotations

import bisect
import heapq
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

from ..spec import WorkerSpec

# What workers are ordered or grouped by: a tuple of comparable parts, lower is better.
Key = tuple[Any, ...]


class WorkerView:
    """A worker as the scheduler sees it during one plan. How many strategies it holds (`used`)
    changes only through `count` — the pool calls it and updates its candidate sets — which keeps
    `load`, what the worker is ranked by, current."""

    def __init__(self, spec: WorkerSpec, liveness: str, used: int = 0, cpu: float = 0.0,
                 mem_free_mb: int | None = None, credentials: frozenset[str] = frozenset(),
                 failing: bool = False, runtime_error: str | None = None, disk_free_mb: int | None = None,
                 disk_low: bool = False):
        self.spec = spec
        self.id = spec.id
        self.capacity = spec.max_strategies
        self.liveness = liveness            # online | unreachable | offline
        self.cpu = cpu                      # load average per cpu
        self.mem_free_mb = mem_free_mb
        self.credentials = credentials
        self.failing = failing              # strategies keep failing here: placed on last
        self.runtime_error = runtime_error  # the runner's program is missing on the host
        self.disk_free_mb = disk_free_mb
        self.disk_low = disk_low            # its workdir's disk is (nearly) full: no new copy there
        self._used = used
        self._load = self._key()

    def __repr__(self) -> str:
        return f"WorkerView({self.id!r}, {self.liveness}, {self._used}/{self.capacity})"

    @property
    def used(self) -> int:
        return self._used

    @property
    def load(self) -> Key:
        return self._load

    def _key(self) -> Key:
        # Lower is better: fewest strategies relative to capacity, then host cpu, then free memory.
        share = self._used / self.capacity if self.capacity else float("inf")
        return (share, round(self.cpu, 3), -(self.mem_free_mb or 0), self.id)

    def count(self, delta: int) -> None:
        self._used += delta
        self._load = self._key()

    @property
    def has_room(self) -> bool:
        return self.used < self.capacity

    def load_key(self) -> Key:
        return self.load

    def class_key(self) -> Key:
        s = self.spec
        return (self.liveness, s.cordoned, s.drain, s.supported_apis, s.region, s.proxy,
                self.credentials, self.failing, self.runtime_error is None, self.disk_low)


@dataclass
class WorkerClass:
    """Workers that every static filter treats alike. `sample` stands for all of them."""

    key: Key
    members: list[WorkerView]

    @property
    def sample(self) -> WorkerView:
        return self.members[0]

    @property
    def failing(self) -> bool:
        return self.sample.failing


class Candidates:
    """The free workers among a set of classes: by load (a heap) and by id (a sorted list)."""

    def __init__(self, members: Iterable[WorkerView]):
        self.by_id = {w.id: w for w in members}
        self.free_ids = sorted(wid for wid, w in self.by_id.items() if w.has_room)
        self.heap = [w.load for w in self.by_id.values() if w.has_room]
        heapq.heapify(self.heap)

    def __contains__(self, worker_id: str) -> bool:
        return worker_id in self.by_id

    def free_count(self) -> int:
        return len(self.free_ids)

    def free_members(self) -> Iterator[WorkerView]:
        return (self.by_id[wid] for wid in self.free_ids)

    def least_loaded(self, skip: frozenset[str] = frozenset()) -> WorkerView | None:
        """The free worker with the lowest load, dropping heap entries that are out of date."""
        held = []
        found = None
        while self.heap:
            key = self.heap[0]
            worker = self.by_id[key[-1]]
            if not worker.has_room or key != worker.load:
                heapq.heappop(self.heap)          # stale: the worker was re-pushed with its new load
                continue
            if worker.id in skip:
                held.append(heapq.heappop(self.heap))
                continue
            found = worker
            break
        for key in held:
            heapq.heappush(self.heap, key)
        return found

    def first_free_after(self, cursor: str | None, skip: frozenset[str] = frozenset()) -> WorkerView | None:
        """The first free worker whose id sorts after `cursor` (no wrap-around)."""
        start = bisect.bisect_right(self.free_ids, cursor) if cursor is not None else 0
        for wid in self.free_ids[start:]:
            if wid not in skip:
                return self.by_id[wid]
        return None

    def changed(self, worker: WorkerView) -> None:
        """Keep the heap and the id list current after `worker.used` changed."""
        index = bisect.bisect_left(self.free_ids, worker.id)
        listed = index < len(self.free_ids) and self.free_ids[index] == worker.id
        if worker.has_room:
            heapq.heappush(self.heap, worker.load)
            if not listed:
                self.free_ids.insert(index, worker.id)
        elif listed:
            del self.free_ids[index]


class WorkerPool:
    """Every worker of the fleet with its liveness and load, grouped into classes."""

    def __init__(self, views: Iterable[WorkerView]):
        self.views: dict[str, WorkerView] = {v.id: v for v in sorted(views, key=lambda v: v.id)}
        groups: dict[Key, list[WorkerView]] = {}
        for view in self.views.values():
            groups.setdefault(view.class_key(), []).append(view)
        self.classes = sorted((WorkerClass(key, members) for key, members in groups.items()),
                              key=lambda c: c.sample.id)
        self._candidates: dict[tuple[str, ...], Candidates] = {}
        self._sets_of: dict[str, list[Candidates]] = {wid: [] for wid in self.views}

    def __contains__(self, worker_id: str) -> bool:
        return worker_id in self.views

    def get(self, worker_id: str) -> WorkerView | None:
        return self.views.get(worker_id)

    def candidates(self, classes: list[WorkerClass]) -> Candidates:
        """The candidate set over `classes`, built once and then kept current (keyed by the id of
        each class's first worker, which names the class within this pool)."""
        key = tuple(c.sample.id for c in classes)
        found = self._candidates.get(key)
        if found is None:
            found = Candidates(w for c in classes for w in c.members)
            self._candidates[key] = found
            for wid in found.by_id:
                self._sets_of[wid].append(found)
        return found

    def take(self, worker_id: str) -> None:
        """Count one more strategy on the worker (placed by this plan)."""
        self._count(worker_id, +1)

    def release(self, worker_id: str) -> None:
        """Count one strategy fewer on the worker (it moves away in this plan)."""
        self._count(worker_id, -1)

    def _count(self, worker_id: str, delta: int) -> None:
        view = self.views[worker_id]
        view.count(delta)
        for cands in self._sets_of[worker_id]:
            cands.changed(view)
