"""Each policy's two ways of choosing a worker agree: the fast path (`pick`, over a candidate set's
heap and sorted ids, kept current as the pool counts placements) and the slow path (`min` by
`rank_key` over the free workers). Generated pools, placements made one after another."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from quantlab.core.scheduling import LoadBasedPolicy, RoundRobinPolicy, WorkerPool, WorkerView
from quantlab.core.scheduling.policies import FailoverPolicy, RegionAffinityPolicy
from tests.fleetkit import worker


@st.composite
def pools(draw):
    n = draw(st.integers(1, 12))
    views = [WorkerView(worker(f"w-{i:02d}", cap=draw(st.integers(0, 4))), "online",
                        used=0, cpu=draw(st.sampled_from([0.0, 0.25, 0.5])),
                        mem_free_mb=draw(st.sampled_from([None, 512, 4096])))
             for i in range(n)]
    for view in views:
        view.count(draw(st.integers(0, view.capacity)))
    ids = [v.id for v in views]
    ranking = draw(st.sampled_from(["load-based", "round-robin"]))
    cursor = draw(st.sampled_from([None] + ids))
    excluded = draw(st.sampled_from([None] + ids))
    return views, ranking, cursor, excluded, draw(st.integers(1, 10))


@settings(max_examples=400, deadline=None)
@given(pools())
def test_pick_and_rank_key_choose_the_same_worker(case):
    views, ranking, cursor, excluded, placements = case
    pool = WorkerPool(views)
    candidates = pool.candidates(pool.classes)
    inner = RoundRobinPolicy(cursor) if ranking == "round-robin" else LoadBasedPolicy()
    policy = RegionAffinityPolicy(inner)
    if excluded is not None:
        policy = FailoverPolicy(policy, excluded)
    for _ in range(placements):
        free = [v for v in pool.views.values() if v.has_room and v.id not in policy.excluded]
        slow = min(free, key=policy.rank_key, default=None)
        fast = policy.pick(candidates)
        assert (fast.id if fast else None) == (slow.id if slow else None)
        if fast is None:
            break
        pool.take(fast.id)
        policy.placed(fast)
        assert fast.load == fast._key(), "a count keeps the load it is ranked by current"
    assert policy.keeps_cursor == (ranking == "round-robin")
