"""Load a 10,000-strategy, 1,000-worker fleet from YAML: `quantlab validate` and `quantlab plan`
against a bare pure-Python `yaml.load_all(..., Loader=yaml.SafeLoader)` of the same files, in one run.

Each figure is a whole command in a fresh process (interpreter start-up and imports included), the
way a user or a cron job meets it; median of --repeat runs.

    python benchmarks/load_scale.py [--strategies N] [--workers N] [--repeat N]
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
APIS = ["bybit", "binance", "okx", "futu", "ib"]
REGIONS = ["JP", "US", "EU", "SG", "HK"]
PROXIES = [None, "http://127.0.0.1:8890", "http://127.0.0.1:8891"]
PER_FILE = 100

STRATEGY = """apiVersion: quantlab/v1
kind: Strategy
id: {id}
name: Strategy {n}
strategyFile: strategies/{file}
params: {{symbol: {symbol}, account: {account}, gridCount: {grid}, gridSpacing: 0.004, baseQty: 0.001}}
heartbeatMs: 60000
requirements:
  api: {api}
  account: {account}
{extra}scheduling: {{autoRestart: true, maxRestarts: 5, restartDelay: 10000, maxErrors: 10}}
"""

WORKER = """apiVersion: quantlab/v1
kind: Worker
id: {id}
host: local
capabilities: {{maxStrategies: {cap}, supportedApis: [{apis}]}}
metadata: {{{meta}}}
"""


def write_fleet(root: Path, n_strategies: int, n_workers: int, seed: int = 11) -> list[Path]:
    rng = random.Random(seed)
    (root / "strategies").mkdir(parents=True)
    for name in ("grid-martingale.js", "martingale.js", "trend.mjs"):
        shutil.copy(REPO / "fleet" / "strategies" / name, root / "strategies" / name)
    (root / "fleet.yaml").write_text("apiVersion: quantlab/v1\nkind: Fleet\npolicy: load-based\n")
    files = [root / "fleet.yaml"]
    docs = []
    for i in range(n_workers):
        region, proxy = rng.choice(REGIONS), rng.choice(PROXIES)
        meta = f"region: {region}" + (f", proxy: \"{proxy}\"" if proxy else "")
        docs.append(WORKER.format(id=f"worker-{i:04d}", cap=rng.choice([8, 12, 16, 24]),
                                  apis=", ".join(rng.sample(APIS, rng.randint(1, 3))), meta=meta))
    files += _chunks(root / "workers", docs)
    docs = []
    for i in range(n_strategies):
        region = rng.choice(REGIONS + [None, None])
        extra = f"  region: {region}\n" if region else ""
        proxy = rng.choice(PROXIES) if region else None
        extra += f"  proxy: \"{proxy}\"\n" if proxy else ""
        file = rng.choice(["grid-martingale.js", "martingale.js", "trend.mjs"])
        docs.append(STRATEGY.format(id=f"strategy-{i:05d}", n=i, file=file,
                                    symbol=f"SYM{i}USDT", account=f"acct-{i}", grid=rng.randint(5, 30),
                                    api=rng.choice(APIS), extra=extra))
    files += _chunks(root / "strategies-yaml", docs)
    return files


def _chunks(folder: Path, docs: list[str]) -> list[Path]:
    folder.mkdir()
    out = []
    for start in range(0, len(docs), PER_FILE):
        path = folder / f"part-{start // PER_FILE:03d}.yaml"
        path.write_text("---\n".join(docs[start:start + PER_FILE]))
        out.append(path)
    return out


def run(argv: list[str], repeat: int, env: dict[str, str] | None = None) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        done = subprocess.run(argv, capture_output=True, env=env)
        times.append(time.perf_counter() - start)
        if done.returncode not in (0, 2):
            sys.exit(f"{argv} failed ({done.returncode}):\n{done.stderr.decode()[-2000:]}")
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--strategies", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=1_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    quantlab = [sys.executable, "-m", "quantlab"]
    with tempfile.TemporaryDirectory(prefix="quantlab-load-") as tmp:
        root = Path(tmp) / "fleet"
        files = write_fleet(root, args.strategies, args.workers)
        listing = Path(tmp) / "files.txt"
        listing.write_text("\n".join(map(str, files)))
        bare = [sys.executable, "-c",
                "import sys, yaml\n"
                "for name in open(sys.argv[1]).read().split('\\n'):\n"
                "    with open(name) as f: list(yaml.load_all(f, Loader=yaml.SafeLoader))\n", str(listing)]
        env = dict(os.environ, PYTHONPATH=str(REPO))
        size = sum(f.stat().st_size for f in files)
        bare_s = run(bare, args.repeat)
        validate_s = run(quantlab + ["validate", "--fleet", str(root)], args.repeat, env)
        plan_s = run(quantlab + ["plan", "--fleet", str(root), "--output", "json"], args.repeat, env)
    print(f"fleet: {args.strategies} strategies, {args.workers} workers in {len(files)} files, {size / 2**20:.1f} MiB")
    print(f"bare yaml.load_all(SafeLoader), pure Python: {bare_s:.2f} s   (baseline)")
    print(f"quantlab validate:                           {validate_s:.2f} s   ratio {validate_s / bare_s:.2f}x")
    print(f"quantlab plan (end to end):                  {plan_s:.2f} s   ratio {plan_s / bare_s:.2f}x")


if __name__ == "__main__":
    main()
