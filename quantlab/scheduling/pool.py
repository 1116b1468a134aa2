"""WorkerPool: the workers a plan may place on, grouped into classes for speed.

Workers whose constraint-relevant attributes are equal form a class (Nomad's "computed node class"),
so a strategy's static filters run once per class instead of once per worker. Inside a class, free
workers are kept in a heap by load and in a sorted id list for round-robin.
"""
from __future__ import annotations

import bisect
import heapq
from dataclasses import dataclass, field
from typing import Iterable, Iterator

from ..spec import WorkerSpec


@dataclass
class WorkerView:
    """A worker as the scheduler sees it during one plan. `used` grows as the plan places."""

    spec: WorkerSpec
    liveness: str                       # online | unreachable | offline
    used: int = 0
    cpu: float = 0.0                    # load average per cpu
    mem_free_mb: int | None = None
    credentials: frozenset[str] = frozenset()
    failing: bool = False               # strategies keep failing here: placed on last

    @property
    def id(self) -> str:
        return self.spec.id

    @property
    def capacity(self) -> int:
        return self.spec.max_strategies

    @property
    def has_room(self) -> bool:
        return self.used < self.capacity

    def load_key(self) -> tuple:
        """Lower is better: fewest strategies relative to capacity, then host cpu, then free memory."""
        share = self.used / self.capacity if self.capacity else float("inf")
        return (share, round(self.cpu, 3), -(self.mem_free_mb or 0), self.id)

    def class_key(self) -> tuple:
        s = self.spec
        return (self.liveness, s.cordoned, s.drain, s.supported_apis, s.region, s.proxy,
                self.credentials, self.failing)


@dataclass
class WorkerClass:
    """Workers that every static filter treats alike. `sample` stands for all of them."""

    key: tuple
    members: list[WorkerView]
    _heap: list[tuple[tuple, str]] = field(default_factory=list)
    _free_ids: list[str] = field(default_factory=list)
    _by_id: dict[str, WorkerView] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.members.sort(key=lambda w: w.id)
        self._by_id = {w.id: w for w in self.members}
        self._free_ids = [w.id for w in self.members if w.has_room]
        self._heap = [(w.load_key(), w.id) for w in self.members if w.has_room]
        heapq.heapify(self._heap)

    @property
    def sample(self) -> WorkerView:
        return self.members[0]

    @property
    def failing(self) -> bool:
        return self.sample.failing

    def free_count(self) -> int:
        return len(self._free_ids)

    def free_members(self) -> Iterator[WorkerView]:
        return (self._by_id[i] for i in self._free_ids)

    def least_loaded(self, skip: frozenset[str] = frozenset()) -> WorkerView | None:
        """The free member with the lowest load key, ignoring stale heap entries and `skip`."""
        held: list[tuple[tuple, str]] = []
        found = None
        while self._heap:
            key, wid = self._heap[0]
            worker = self._by_id[wid]
            if not worker.has_room or key != worker.load_key():
                heapq.heappop(self._heap)      # stale: the worker was re-pushed with a newer key
                continue
            if wid in skip:
                held.append(heapq.heappop(self._heap))
                continue
            found = worker
            break
        for entry in held:
            heapq.heappush(self._heap, entry)
        return found

    def first_free_after(self, cursor: str | None, skip: frozenset[str] = frozenset()) -> WorkerView | None:
        """The first free member whose id sorts after `cursor` (no wrap-around)."""
        start = bisect.bisect_right(self._free_ids, cursor) if cursor is not None else 0
        for wid in self._free_ids[start:]:
            if wid not in skip:
                return self._by_id[wid]
        return None

    def take(self, worker: WorkerView) -> None:
        """Count one more strategy on `worker` (a placement made by this plan)."""
        worker.used += 1
        if worker.has_room:
            heapq.heappush(self._heap, (worker.load_key(), worker.id))
        else:
            index = bisect.bisect_left(self._free_ids, worker.id)
            if index < len(self._free_ids) and self._free_ids[index] == worker.id:
                del self._free_ids[index]


    def release(self, worker: WorkerView) -> None:
        """Count one strategy fewer on `worker` (it moves away in this plan)."""
        had_room = worker.has_room
        worker.used -= 1
        heapq.heappush(self._heap, (worker.load_key(), worker.id))
        if not had_room and worker.has_room:
            bisect.insort(self._free_ids, worker.id)


class WorkerPool:
    """Every worker of the fleet with its liveness and load, grouped into classes."""

    def __init__(self, views: Iterable[WorkerView]):
        self.views: dict[str, WorkerView] = {v.id: v for v in sorted(views, key=lambda v: v.id)}
        groups: dict[tuple, list[WorkerView]] = {}
        for view in self.views.values():
            groups.setdefault(view.class_key(), []).append(view)
        self.classes = [WorkerClass(key, members) for key, members in groups.items()]
        self._class_of = {w.id: c for c in self.classes for w in c.members}
        self.classes.sort(key=lambda c: c.sample.id)

    def __contains__(self, worker_id: str) -> bool:
        return worker_id in self.views

    def get(self, worker_id: str) -> WorkerView | None:
        return self.views.get(worker_id)

    def class_of(self, worker_id: str) -> WorkerClass:
        return self._class_of[worker_id]

    def take(self, worker_id: str) -> None:
        self._class_of[worker_id].take(self.views[worker_id])

    def release(self, worker_id: str) -> None:
        self._class_of[worker_id].release(self.views[worker_id])
