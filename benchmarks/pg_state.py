"""What a PostgreSQL state costs against the JSON file, measured in the same run on the same machine.

1. A renewal round's state work at 1,000 strategies on 100 workers, as the loop does it: read the
   state if another process changed it, book the renewals' bounds (one save), settle them, record
   the answers (one save). Median of `--rounds`; and the database's write volume per round (WAL
   bytes, from pg_current_wal_lsn) beside the bytes of the file rewritten per round.
2. `plan` of 10,000 strategies on 1,000 workers (all placed, so the state is large) from each
   backend: read the state (a fresh store, as `quantlab plan` does), then plan in memory.

The server is the distribution's PostgreSQL, started in a temporary folder (tests/pg_server.py),
with fsync off — as in the tests; a production server's commit latency comes on top.

    .venv/bin/python benchmarks/pg_state.py [--rounds 50]

It prints a table and writes it into benchmarks/README.md between the pg_state markers.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.plan_scale import make_fleet  # noqa: E402
from benchmarks.readme_block import write_block  # noqa: E402
from quantlab.edges.clock import Clock  # noqa: E402
from quantlab.edges.ledger import Ledger  # noqa: E402
from quantlab.core.memory import HostClock, Memory, Placement  # noqa: E402
from quantlab.edges.pgstate import PgStore  # noqa: E402
from quantlab.core.planner import plan  # noqa: E402
from quantlab.edges.store import StateStore  # noqa: E402
from tests.fleetkit import NOW, observed  # noqa: E402
from tests.pg_server import PgServer  # noqa: E402

TTL_S = 25.0


def busy_memory(placements: dict[str, str]) -> Memory:
    """A state as a busy loop leaves it: every placement, answers, host clocks and addresses."""
    workers = sorted(set(placements.values()))
    m = Memory(clock_boot="bench", saved_at=NOW, began=NOW, next_epoch=len(placements) + 1)
    m.placements = {sid: Placement(sid, wid, i + 1, f"sha256:{i:064x}", placed_at=NOW)
                    for i, (sid, wid) in enumerate(sorted(placements.items()))}
    m.answered = {w: NOW for w in workers}
    m.last_seen = {w: 1_700_000_000_000 for w in workers}
    m.host_clocks = {w: HostClock("boot", 1000.0, NOW) for w in workers}
    m.addresses = {w: {"host": f"10.0.{i // 250}.{i % 250}", "port": 22, "user": "ops", "workdir": "~/ql",
                       "program": "node"} for i, w in enumerate(workers)}
    m.restarts = {sid: 0 for sid in placements}
    return m


def round_work(ledger: Ledger, workers: list[str], now: int) -> None:
    """The state side of one renewal round (see Controller.renew and gather.Prober)."""
    ledger.refresh(TTL_S)
    booking = ledger.request_leases({w: now + 30_000 for w in workers})
    for w in workers:
        ledger.settle_lease(booking, w, now + 25_000)

    def record(m: Memory) -> None:
        for w in workers:
            m.answered[w] = now
            m.last_seen[w] = 1_700_000_000_000 + now
        m.loop_renewal = now
    ledger.update(record)


def rounds(ledger: Ledger, workers: list[str], count: int) -> list[float]:
    times = []
    for i in range(count):
        started = time.perf_counter()
        round_work(ledger, workers, NOW + (i + 1) * 1000)
        times.append(time.perf_counter() - started)
    return times


def wal_bytes(dsn: str) -> int:
    import psycopg
    with psycopg.connect(dsn, autocommit=True) as conn:
        return int(conn.execute("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')").fetchone()[0])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=50)
    args = parser.parse_args()
    clock = Clock(wall=lambda: NOW, mono=lambda: NOW, boot_id="bench")

    with tempfile.TemporaryDirectory(prefix="ql-bench-") as tmp, PgServer(Path(tmp) / "pg") as server:
        # 1. a round at 1,000 strategies on 100 workers
        small = make_fleet(1_000, 100)
        placed = {sid: f"worker-{i % 100:04d}" for i, sid in enumerate(small.strategies)}
        workers = sorted(set(placed.values()))
        file_store = StateStore(Path(tmp) / "state.json")
        file_store.load()
        with file_store.writing():
            file_store.save(busy_memory(placed))
        pg = PgStore(server.dsn)
        pg.load()
        with pg.writing():
            pg.save(busy_memory(placed))
        file_ledger, pg_ledger = Ledger(file_store, clock), Ledger(pg, clock)
        rounds(file_ledger, workers, 3)                       # warm both
        rounds(pg_ledger, workers, 3)
        file_s = statistics.median(rounds(file_ledger, workers, args.rounds))
        before = wal_bytes(server.dsn)
        pg_times = rounds(pg_ledger, workers, args.rounds)
        wal_per_round = (wal_bytes(server.dsn) - before) / args.rounds
        pg_s = statistics.median(pg_times)
        file_bytes = 2 * (Path(tmp) / "state.json").stat().st_size     # two saves per round, whole file each

        # 2. plan 10,000 x 1,000 from each backend (every strategy placed: a large state)
        big = make_fleet(10_000, 1_000)
        obs = observed(big)
        first = plan(big, obs, Memory(), NOW)
        big_memory = busy_memory({a.strategy: a.worker for a in first.actions if a.worker})
        big_file = StateStore(Path(tmp) / "big.json")
        big_file.load()
        with big_file.writing():
            big_file.save(big_memory)
        import psycopg
        admin = server.dsn.replace(f"/{server.database}?", "/postgres?")
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute('CREATE DATABASE "big"')
        big_pg = PgStore(server.dsn.replace(f"/{server.database}?", "/big?"))
        big_pg.load()
        with big_pg.writing():
            big_pg.save(big_memory)

        def plan_from(store) -> float:
            times = []
            for _ in range(5):
                started = time.perf_counter()
                memory = store.fresh().load()
                plan(big, obs, memory, NOW)
                times.append(time.perf_counter() - started)
            return statistics.median(times)
        plan_file_s, plan_pg_s = plan_from(big_file), plan_from(big_pg)

    rows = [
        "| measured | JSON file | PostgreSQL | PostgreSQL / file |",
        "| --- | --- | --- | --- |",
        f"| a renewal round's state work, 1,000 strategies on 100 workers (median of {args.rounds}) | "
        f"{file_s * 1000:.1f} ms | {pg_s * 1000:.1f} ms | {pg_s / file_s:.2f}× |",
        f"| bytes written per round | {file_bytes / 1024:.0f} KiB (the file, rewritten twice) | "
        f"{wal_per_round / 1024:.0f} KiB of WAL | {wal_per_round / file_bytes:.2f}× |",
        f"| `plan` 10,000 strategies / 1,000 workers, all placed: read the state + plan (median of 5) | "
        f"{plan_file_s:.2f} s | {plan_pg_s:.2f} s | {plan_pg_s / plan_file_s:.2f}× |",
    ]
    table = "\n".join(rows)
    print(table)
    write_block("pg_state", "PostgreSQL state against the JSON file", table)


if __name__ == "__main__":
    main()
