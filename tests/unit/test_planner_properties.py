"""Properties of the planner over generated fleets (hypothesis): hard constraints always hold,
no worker is ever over capacity, and every desired strategy is exactly one of placed, queued or waiting."""
from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quantlab.core.planner import PlanOptions, plan
from tests.fleetkit import JP_PROXY, NOW, fleet, memory, observed, running, strategy, worker

APIS = ["bybit", "binance", "okx"]
REGIONS = [None, "JP", "US", "EU"]
PROXIES = [None, JP_PROXY]


@st.composite
def scenarios(draw):
    n_workers = draw(st.integers(1, 8))
    workers = []
    for i in range(n_workers):
        workers.append(worker(
            f"w-{i}", draw(st.sets(st.sampled_from(APIS), min_size=1)), draw(st.integers(0, 4)),
            region=draw(st.sampled_from(REGIONS)), proxy=draw(st.sampled_from(PROXIES)),
            cordoned=draw(st.booleans()) and draw(st.booleans()),
        ))
    n_strategies = draw(st.integers(0, 14))
    strategies = []
    for i in range(n_strategies):
        strategies.append(strategy(
            f"s-{i:02d}", draw(st.sampled_from(APIS)), region=draw(st.sampled_from(REGIONS)),
            proxy=draw(st.sampled_from(PROXIES)), account=f"acct-{i}", credentials=draw(st.booleans()),
            desired=draw(st.sampled_from(["running", "running", "running", "paused", "stopped"])),
        ))
    fl = fleet(strategies, workers, policy=draw(st.sampled_from(["load-based", "round-robin"])))
    down = {w.id for w in workers if draw(st.integers(0, 4)) == 0}
    silent_for = {wid: draw(st.sampled_from([10_000, 200_000, 10_000_000])) for wid in down}
    creds = {w.id: {f"acct-{i}" for i in range(n_strategies) if draw(st.booleans())} for w in workers}
    # Existing placements that respect every constraint and capacity (as a previous plan would have made).
    used = {w.id: 0 for w in workers}
    placements, instances = {}, {}
    epoch = 0
    for s in strategies:
        if not draw(st.booleans()):
            continue
        fits = [w for w in workers if w.id not in down and _fits(s, w, creds[w.id]) and used[w.id] < w.max_strategies]
        fits += [w for w in workers if w.id in down and used[w.id] < w.max_strategies]
        if not fits:
            continue
        w = draw(st.sampled_from(fits))
        used[w.id] += 1
        epoch += 1
        placements[s.id] = (w.id, epoch)
        if w.id not in down:
            instances.setdefault(w.id, []).append(running(s, epoch))
    mem = memory(placements, specs={s.id: s for s in strategies},
                 last_seen={wid: NOW - silent_for[wid] for wid in down},
                 leases={wid: NOW - silent_for[wid] for wid in down})
    obs = observed(fl, instances, down=down, credentials=creds)
    rebalance = draw(st.booleans())
    return fl, obs, mem, down, creds, PlanOptions(rebalance=rebalance, max_moves=draw(st.integers(0, 3)))


def _fits(s, w, creds) -> bool:
    req = s.requirements
    return (req.api in w.supported_apis and (req.region is None or req.region == w.region)
            and (req.proxy is None or req.proxy == w.proxy) and (not req.credentials or req.account in creds))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_plans_keep_every_hard_constraint_and_capacity(scenario):
    fl, obs, mem, down, creds, options = scenario
    result = plan(fl, obs, mem, NOW, options)

    # Hard constraints: every new placement is on an online, schedulable worker that fits.
    for a in result.actions:
        if a.action in ("start", "move"):
            target = a.worker if a.action == "start" else a.target
            w = fl.workers[target]
            assert target not in down
            assert _fits(fl.strategies[a.strategy], w, creds[target]), a
            if a.action == "move" or a.cause == "new":
                assert not w.cordoned and not w.drain
            if a.action == "move":
                assert a.source != a.target

    # Capacity: final placements never exceed maxStrategies.
    final = {sid: wid for sid, (wid, _) in ((sid, (p.worker, p.epoch)) for sid, p in mem.placements.items())}
    for a in result.actions:
        if a.action == "move":
            final[a.strategy] = a.target
        elif a.action == "start":
            final[a.strategy] = a.worker
        elif a.action == "stop":
            final.pop(a.strategy, None)
    for wid, w in fl.workers.items():
        assert sum(1 for v in final.values() if v == wid) <= w.max_strategies

    # Partition: each desired strategy is exactly one of placed, queued, waiting.
    queued = {q.strategy for q in result.queued}
    waiting = {w.strategy for w in result.waiting}
    acted = {a.strategy for a in result.actions}
    assert not queued & waiting and not queued & acted and not waiting & acted
    for sid, s in fl.strategies.items():
        if s.desired_state == "stopped":
            assert sid not in queued
            continue
        # Placed: an action puts or keeps it somewhere, or it stays on an online worker untouched.
        placed = sid in acted or (sid in final and final[sid] not in down and sid not in queued | waiting)
        assert [placed, sid in queued, sid in waiting].count(True) == 1, sid


@settings(max_examples=100, deadline=None)
@given(scenarios())
def test_same_input_same_plan(scenario):
    fl, obs, mem, _, _, options = scenario
    assert plan(fl, obs, mem, NOW, options).to_json() == plan(fl, obs, mem, NOW, options).to_json()
