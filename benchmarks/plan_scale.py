"""Plan 10,000 strategies onto 1,000 workers from empty, against a naive scheduler in the same run.

The naive baseline does what a first implementation would: for each strategy, run every filter on
every worker, then rank the survivors by load. quantlab groups workers into classes and picks from
heaps. Both make the same placements (checked on every strategy); the figures are printed as a ratio.

    python benchmarks/plan_scale.py [--strategies N] [--workers N] [--repeat N]
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quantlab.core.planner import plan  # noqa: E402
from quantlab.core.scheduling import WorkerView, filters  # noqa: E402
from tests.fleetkit import NOW, fleet, memory, observed, strategy, worker  # noqa: E402

APIS = ["bybit", "binance", "okx", "futu", "ib"]
REGIONS = ["JP", "US", "EU", "SG", "HK"]
PROXIES = [None, "http://127.0.0.1:8890", "http://127.0.0.1:8891"]


def make_fleet(n_strategies: int, n_workers: int, seed: int = 7):
    rng = random.Random(seed)
    workers = []
    for i in range(n_workers):
        apis = rng.sample(APIS, rng.randint(1, 3))
        workers.append(worker(f"worker-{i:04d}", apis, rng.choice([8, 12, 16, 24]),
                              region=rng.choice(REGIONS), proxy=rng.choice(PROXIES)))
    strategies = []
    for i in range(n_strategies):
        region = rng.choice(REGIONS + [None, None])
        strategies.append(strategy(
            f"strategy-{i:05d}", rng.choice(APIS), region=region,
            proxy=rng.choice(PROXIES) if region else None, account=f"acct-{i}",
            min_memory=rng.choice([None] * 19 + [512]),
        ))
    return fleet(strategies, workers)


def naive_plan(fl, obs) -> dict[str, str | None]:
    """For each strategy: filter every worker, then rank by load. No classes, no heaps."""
    views = {wid: WorkerView(w, "online", cpu=obs.workers[wid].cpu or 0.0,
                             mem_free_mb=obs.workers[wid].mem_free_mb) for wid, w in fl.workers.items()}
    checks = filters.BASE_STATIC + filters.AFFINITY_STATIC + filters.LATE_STATIC + filters.DYNAMIC
    out: dict[str, str | None] = {}
    for sid, s in fl.strategies.items():
        feasible = [v for v in views.values() if filters.first_rejection(checks, s, v) is None]
        best = min(feasible, key=lambda v: v.load_key(), default=None)
        if best is not None:
            best.count(1)             # the load it is ranked by next time counts this placement
        out[sid] = best.id if best else None
    return out


def timed(fn, repeat: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--strategies", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=1_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    fl = make_fleet(args.strategies, args.workers)
    obs = observed(fl)
    mem = memory()

    quantlab_s, result = timed(lambda: plan(fl, obs, mem, NOW), args.repeat)
    naive_s, naive = timed(lambda: naive_plan(fl, obs), max(1, args.repeat // 2))
    tracemalloc.start()
    plan(fl, obs, mem, NOW)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()

    placed = {a.strategy: a.worker for a in result.actions}  # type: ignore[union-attr]
    naive_placed = sum(1 for v in naive.values() if v)  # type: ignore[union-attr]
    # The baseline is the same algorithm, only slower: it must make the same decisions.
    agree = sum(1 for sid, wid in naive.items() if placed.get(sid) == wid)  # type: ignore[union-attr]
    assert agree == len(naive), f"the baseline placed {len(naive) - agree} of {len(naive)} strategies elsewhere"
    print(f"fleet: {args.strategies} strategies, {args.workers} workers; "
          f"{len(placed)} placed, {len(result.queued)} queued")  # type: ignore[union-attr]
    print(f"quantlab plan (median of {args.repeat}): {quantlab_s:.3f} s, peak traced memory {peak / 2**20:.1f} MiB")
    print(f"naive filter-every-worker baseline:      {naive_s:.3f} s")
    print(f"ratio: quantlab is {naive_s / quantlab_s:.1f}x faster than the naive baseline "
          f"(placed: quantlab {len(placed)}, naive {naive_placed})")


if __name__ == "__main__":
    main()
