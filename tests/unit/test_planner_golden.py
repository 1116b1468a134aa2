"""The planner's golden corpus: 240 generated cases (fleet, observed state, memory, now, options) and
the plan JSON each gave when it was recorded. A change of the planner's shape must keep every plan
byte for byte; a change of behaviour shows up here as a diff, on purpose.

Each case is generated from its seed by `case(seed)` with its own `random.Random`, so the corpus
file holds only seeds and plans. To record the corpus again after an intended change of behaviour:

    QUANTLAB_RECORD_GOLDEN=1 .venv/bin/python -m pytest -q tests/unit/test_planner_golden.py
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
from pathlib import Path

import pytest

from quantlab.core.planner import PlanOptions, plan
from tests.fleetkit import JP_PROXY, NOW, fleet, memory, observed, running, strategy, worker

CORPUS = Path(__file__).resolve().parents[1] / "data" / "planner-golden.json"
CASES = 240
APIS = ["bybit", "binance", "okx"]
REGIONS = [None, None, "JP", "US"]


def case(seed: int):
    """One planner input, drawn from `seed`: every branch of the planner is reachable (placements
    to make, move, restart, stop; silent and offline workers; stale copies; drains, cordons and a
    removed worker still running strategies; suspensions, a source change, rebalancing, targets)."""
    rnd = random.Random(seed)
    workers = []
    for i in range(rnd.randint(1, 6)):
        w = worker(f"w-{i}", rnd.sample(APIS, rnd.randint(1, 3)), rnd.randint(0, 4),
                   region=rnd.choice(REGIONS), proxy=rnd.choice([None, None, JP_PROXY]),
                   cordoned=rnd.random() < 0.1, drain=rnd.random() < 0.1)
        workers.append(w)
    if rnd.random() < 0.15:
        workers.append(dataclasses.replace(worker("w-gone", (), 0), cordoned=True, drain=True, leaving=True))
    specs = []
    for i in range(rnd.randint(0, 10)):
        specs.append(strategy(f"s-{i:02d}", rnd.choice(APIS), region=rnd.choice(REGIONS),
                              proxy=rnd.choice([None, None, None, JP_PROXY]), account=f"acct-{i % 4}",
                              credentials=rnd.random() < 0.2,
                              desired=rnd.choice(["running"] * 6 + ["paused", "stopped"]),
                              params={"v": rnd.randint(1, 2)}))
    fl = fleet(specs, workers, policy=rnd.choice(["load-based", "round-robin"]),
               ttl=rnd.choice([20.0, 180.0]), auto_recover=rnd.random() < 0.9)
    down = {w.id for w in workers if rnd.random() < 0.2}
    silent_for = {wid: rnd.choice([5_000, 60_000, 400_000, 10_000_000]) for wid in sorted(down)}
    placements, instances = {}, {}
    epoch = 0
    candidates = [w.id for w in workers]
    for s in specs + [strategy("s-removed")] * (rnd.random() < 0.2):
        if rnd.random() < 0.4:
            continue
        wid = rnd.choice(candidates)
        epoch += 1
        placements[s.id] = (wid, epoch)
        if wid in down:
            continue
        roll = rnd.random()
        if roll < 0.1:
            instances.setdefault(wid, []).append(running(s, epoch, status="stopped", reason="exited"))
        elif roll < 0.15:
            instances.setdefault(wid, []).append(running(s, epoch, status="error", restarts=5, reason="crashed"))
        elif roll < 0.25:
            instances.setdefault(wid, []).append(running(s, epoch, spec_hash="sha256:older"))
        elif roll < 0.9:
            instances.setdefault(wid, []).append(running(s, epoch, status="paused" if rnd.random() < 0.1 else "running"))
        if rnd.random() < 0.08:            # a stale copy of it elsewhere
            other = rnd.choice(candidates)
            if other != wid and other not in down:
                instances.setdefault(other, []).append(running(s, max(1, epoch - 1)))
    mem = memory(placements, specs={s.id: s for s in specs},
                 last_seen={wid: NOW - silent_for[wid] for wid in down},
                 leases={wid: NOW - silent_for[wid] + 1000 for wid in down},
                 rr_cursor=rnd.choice([None] + candidates))
    ids = [s.id for s in specs] + candidates
    if rnd.random() < 0.1 and ids:
        mem.suspended = {rnd.choice(ids + ["*"]): {"by": "ops@host suspend", "reason": "test", "at": 1}}
    obs = observed(fl, instances, down=down,
                   credentials={w.id: {f"acct-{i}" for i in range(4) if rnd.random() < 0.5} for w in workers})
    options = PlanOptions(rebalance=rnd.random() < 0.2, max_moves=rnd.randint(0, 3),
                          targets=frozenset(rnd.sample(ids, 1)) if ids and rnd.random() < 0.1 else frozenset(),
                          allow_mass_stop=rnd.random() < 0.2,
                          source_change="the loop now applies the commits of refs/heads/main; before: the working "
                                        "tree" if rnd.random() < 0.1 else None)
    return fl, obs, mem, NOW + rnd.choice([0, 30_000, 600_000]), options


def plan_json(seed: int) -> str:
    fl, obs, mem, now, options = case(seed)
    return json.dumps(plan(fl, obs, mem, now, options).to_json(), sort_keys=True)


def test_the_corpus_covers_every_kind_of_decision():
    plans = [json.loads(plan_json(seed)) for seed in range(CASES)]
    kinds = {a["action"] for p in plans for a in p["actions"]}
    causes = {a.get("cause") for p in plans for a in p["actions"]}
    guards = {b["guard"] for p in plans for b in p["blocked"]}
    assert {"start", "stop", "restart", "move", "pause", "resume"} <= kinds, kinds
    assert {"new", "stale-copy", "spec-changed", "worker-offline", "drain", "worker-leaving", "removed"} <= causes, causes
    assert {"suspended", "source-change", "mass-stop"} <= guards, guards
    assert sum(1 for p in plans if p["queued"]) >= 20 and sum(1 for p in plans if p["waiting"]) >= 10


def test_every_plan_matches_the_recorded_corpus():
    plans = {str(seed): plan_json(seed) for seed in range(CASES)}
    if os.environ.get("QUANTLAB_RECORD_GOLDEN") == "1":
        CORPUS.write_text(json.dumps(plans, indent=0, sort_keys=True) + "\n")
        pytest.skip(f"recorded {len(plans)} plans into {CORPUS}")
    recorded = json.loads(CORPUS.read_text())
    assert len(recorded) >= 200
    changed = [seed for seed, text in plans.items() if recorded.get(seed) != text]
    assert not changed, f"{len(changed)} plans differ from the corpus, e.g. seed {changed[0]}:\n" \
                        f"recorded: {recorded.get(changed[0])}\nnow:      {plans[changed[0]]}"
