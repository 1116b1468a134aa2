"""The fleet page at scale, and what serving costs the loop.

1. `/api/status` for 10,000 strategies on 1,000 workers, from a snapshot file (median of 10): the
   whole report, and one page of 100 (what the page asks for); against the floor of any server of
   that snapshot in the same run — reading and parsing the file and writing the JSON out again.
   Target: under 300 ms.
2. The page's first useful paint at that size in headless Chromium (navigation → the first strategy
   rows in the DOM), median of 5, against the same page over a 10-strategy snapshot.
3. The daemon's CPU per round while serving: `quantlab reconcile --serve` with a client asking for
   `/api/status` every 2 s (as the page does), against the same daemon without --serve, 30 rounds
   each, on 2 `local` workers with 10 running strategies.

    .venv/bin/python benchmarks/serve_scale.py

It prints a table and writes it into benchmarks/README.md between the serve_scale markers.
"""
from __future__ import annotations

import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import yaml  # noqa: E402

from benchmarks.plan_scale import make_fleet  # noqa: E402
from benchmarks.readme_block import write_block  # noqa: E402
from quantlab import snapshot  # noqa: E402
from quantlab.core.memory import Memory, Placement  # noqa: E402
from quantlab.core.planner import plan  # noqa: E402
from quantlab.edges.snapshot import SnapshotFile  # noqa: E402
from quantlab.core.status import fleet_status  # noqa: E402
from quantlab.face.web.server import Source, make_server  # noqa: E402
from tests.fleetkit import NOW, observed  # noqa: E402
from tests.support import cli_env, free_port, kill_all, wait_for  # noqa: E402


def write_snapshot(path: Path, strategies: int, workers: int) -> tuple[float, float]:
    """Writes the snapshot as a writing round would; (seconds to record it, seconds to plan the same
    fleet from empty: the baseline, measured in the same run)."""
    fl = make_fleet(strategies, workers)
    obs = observed(fl)
    began = time.perf_counter()
    made = plan(fl, obs, Memory(), NOW)
    planned = time.perf_counter() - began
    memory = Memory(placements={a.strategy: Placement(a.strategy, a.worker, i + 1, "h", placed_at=NOW)
                                for i, a in enumerate(made.actions) if a.worker})
    began = time.perf_counter()
    report = fleet_status(fl, obs, memory, NOW, 1_800_000_000_000, made)
    snap = snapshot.build(report, made, memory, NOW, 1_800_000_000_000, {"renew": {"at": 1_800_000_000_000,
                          "seconds": 1.0}}, None, [], {"intervalSeconds": 5, "leaseTtlSeconds": 25})
    SnapshotFile(path).write(snap)
    return time.perf_counter() - began, planned


def serve(path: Path):
    server = make_server("127.0.0.1:0", Source(SnapshotFile(path), lambda: [], lambda s, n: b""))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def timed_get(port: int, path: str) -> float:
    started = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", path, headers={"Host": f"127.0.0.1:{port}"})
    answer = conn.getresponse()
    answer.read()
    conn.close()
    assert answer.status == 200, answer.status
    return time.perf_counter() - started


def floor(path: Path) -> float:
    started = time.perf_counter()
    json.dumps(json.loads(path.read_bytes())["status"], separators=(",", ":")).encode()
    return time.perf_counter() - started


def first_paint(port: int, repeat: int = 5) -> float:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run",
                 "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path="/usr/bin/chromedriver"), options=options)
    times = []
    try:
        for _ in range(repeat):
            driver.get("about:blank")
            started = time.perf_counter()
            driver.get(f"http://127.0.0.1:{port}/")
            WebDriverWait(driver, 60, poll_frequency=0.01).until(
                lambda d: d.find_elements(By.CSS_SELECTOR, "#strategies tbody tr"))
            times.append(time.perf_counter() - started)
    finally:
        driver.quit()
    return statistics.median(times)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")



def daemon_cpu_per_round(root: Path, serving: bool, rounds: int = 30) -> float:
    port = free_port()
    args = [sys.executable, "-m", "quantlab", "reconcile", "--fleet", str(root)]
    if serving:
        args += ["--serve", f"127.0.0.1:{port}"]
    log = root.parent / f"daemon-{'serve' if serving else 'plain'}.log"
    with open(log, "wb") as out:
        daemon = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=cli_env())
    stop = threading.Event()
    try:
        wait_for(lambda: log.read_text().count("tick ") >= 3, 60, "the daemon's first rounds")
        if serving:
            def client() -> None:
                while not stop.wait(2.0):
                    try:
                        timed_get(port, "/api/status?offset=0&limit=100")
                    except (OSError, AssertionError):
                        pass
            threading.Thread(target=client, daemon=True).start()
        before, ticks = cpu_seconds(daemon.pid), log.read_text().count("tick ")
        wait_for(lambda: log.read_text().count("tick ") >= ticks + rounds, rounds * 5, "the measured rounds")
        return (cpu_seconds(daemon.pid) - before) / rounds
    finally:
        stop.set()
        daemon.terminate()
        daemon.wait(30)


def write_small_fleet(root: Path) -> None:
    (root / "strategies").mkdir(parents=True)
    (root / "strategies" / "calm.mjs").write_text("export function st_init(){}\nexport function st_heartbeat(){}\n"
                                                  "export function st_exit(){}\n")
    docs = [{"apiVersion": "quantlab/v1", "kind": "Fleet", "reconcile": {"intervalSeconds": 1},
             "monitor": {"leaseTtlSeconds": 30, "controllerRestartSeconds": 1}}]
    docs += [{"apiVersion": "quantlab/v1", "kind": "Worker", "id": f"w{i}", "host": "local",
              "capabilities": {"maxStrategies": 8, "supportedApis": ["paper"]}} for i in (1, 2)]
    docs += [{"apiVersion": "quantlab/v1", "kind": "Strategy", "id": f"s{i:02d}", "strategyFile": "strategies/calm.mjs",
              "requirements": {"api": "paper"}, "heartbeatMs": 1000} for i in range(10)]
    (root / "fleet.yaml").write_text(yaml.safe_dump_all(docs, explicit_start=True))


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="ql-serve-") as tmp:
        tmp_path = Path(tmp)
        big, small = tmp_path / "big" / "snapshot.json", tmp_path / "small" / "snapshot.json"
        big.parent.mkdir()
        small.parent.mkdir()
        record_s, plan_s = write_snapshot(big, 10_000, 1_000)
        write_snapshot(small, 10, 3)
        big_server, small_server = serve(big), serve(small)
        big_port, small_port = big_server.server_address[1], small_server.server_address[1]
        whole = statistics.median(timed_get(big_port, "/api/status") for _ in range(10))
        page = statistics.median(timed_get(big_port, "/api/status?offset=0&limit=100") for _ in range(10))
        floor_s = statistics.median(floor(big) for _ in range(10))
        size = big.stat().st_size
        paint_big, paint_small = first_paint(big_port), first_paint(small_port)
        big_server.shutdown()
        small_server.shutdown()

        root = tmp_path / "fleet"
        write_small_fleet(root)
        try:
            plain = daemon_cpu_per_round(root, serving=False)
            served = daemon_cpu_per_round(root, serving=True)
        finally:
            kill_all([str(root) + os.sep])
    rows = [
        "| measured | quantlab | baseline in the same run | ratio |",
        "| --- | --- | --- | --- |",
        f"| `/api/status`, 10,000 strategies / 1,000 workers, whole report ({size / 2**20:.1f} MiB snapshot), "
        f"median of 10 | {whole * 1000:.0f} ms | read + parse + write the JSON: {floor_s * 1000:.0f} ms | "
        f"{whole / floor_s:.2f}× (target < 300 ms) |",
        f"| same, one page of 100 (what the page asks for) | {page * 1000:.0f} ms | same floor | {page / floor_s:.2f}× |",
        f"| first useful paint in headless Chromium, 10,000 strategies (median of 5) | {paint_big * 1000:.0f} ms | "
        f"the same page, 10 strategies: {paint_small * 1000:.0f} ms | {paint_big / paint_small:.1f}× |",
        f"| recording one snapshot of 10,000 strategies / 1,000 workers (status, build, write; on the "
        f"background thread, about twice a round) | {record_s * 1000:.0f} ms | planning the same fleet from empty: "
        f"{plan_s * 1000:.0f} ms | {record_s / plan_s:.1f}× |",
        f"| daemon CPU per round while serving a client polling every 2 s (30 rounds, 10 strategies) | "
        f"{served * 1000:.1f} ms | not serving: {plain * 1000:.1f} ms | {served / plain:.2f}× |",
    ]
    table = "\n".join(rows)
    print(table)
    write_block("serve_scale", "The fleet page at scale", table)


if __name__ == "__main__":
    main()
