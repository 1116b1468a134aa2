"""The fleet page in the states an operator most needs to read right: a suspension and a stop-all, a
draining or cordoned worker, a strategy on a silent worker and one an act round just moved, the
loop's source, proxies, the load figure, a filter, and the log pane.

Each snapshot is made by the real status report and snapshot builder from a state, an observation
and (for an act round) its outcomes written here, and served by the real page server in this
process: no hosts are needed, so each state is set up in milliseconds."""
from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from quantlab.edges import snapshot
from quantlab.edges.execute import Outcome
from quantlab.edges.fleetfiles import load_fleet
from quantlab.core.memory import Launched, Memory, Placement
from quantlab.core.observed import Instance, ObservedState, WorkerState
from quantlab.core.plan import Action
from quantlab.edges.snapshot import SnapshotFile
from quantlab.core.status import fleet_status
from quantlab.face.web.server import Source, make_server
from tests.integration.harness import FleetDir
from tests.web.pagekit import cell, click_strategy, text

NOW = 50_000_000                    # the controller's boot-time clock, ms
GREEN = "rgb(26, 127, 55)"          # app.css --ok: what reads as "all is well"
SECRET = "hunter2-proxy-password"


class Page:
    """`quantlab serve`'s server in this process, over a snapshot file this test writes."""

    def __init__(self, tmp_path: Path):
        self.fleet_dir = FleetDir(tmp_path / "fleet")
        self.store = SnapshotFile(tmp_path / "snapshot.json")
        self.events: list[dict[str, Any]] = []
        self.log_lines = [f"line {n}" for n in range(1, 301)]
        self.server = make_server("127.0.0.1:0", Source(self.store, lambda: list(self.events), self.logs))
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        self.thread = threading.Thread(target=self.server.serve_forever, name="page", daemon=True)
        self.thread.start()

    def logs(self, strategy: str, lines: int) -> bytes:
        return "\n".join(self.log_lines[-lines:]).encode()

    def record(self, memory: Memory, workers: dict[str, WorkerState], acted: list[Outcome] | None = None) -> None:
        """What a round records: the status report of `workers` as observed and `memory`, and the
        outcomes of what the round did after it observed (the act round's)."""
        fleet = load_fleet(self.fleet_dir.root)
        marks = snapshot.acted_marks(acted) if acted else None
        wall = int(time.time() * 1000)
        report = fleet_status(fleet, ObservedState(workers, NOW), memory, NOW, wall, None, fleet.revision, acted=marks)
        report["leader"] = None
        self.store.write(snapshot.build(report, None, memory, NOW, wall, {}, None, [],
                                        {"intervalSeconds": 1, "leaseTtlSeconds": 60}, marks))

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def page(tmp_path):
    served = Page(tmp_path)
    yield served
    served.close()


def online(wid: str, *running: str, cpus: int = 4, load: float = 0.25) -> WorkerState:
    return WorkerState(wid, True, cpus=cpus, cpu=load, mem_free_mb=2048, clock_skew_ms=3,
                       instances={sid: Instance(sid, 1, None, "running", True, started_at=1, heartbeat_age_ms=400,
                                                lease_left_s=50.0) for sid in running})


def placed(memory: Memory, sid: str, worker: str, proxy: str | None = None) -> None:
    launched = Launched(worker={"runner": ["node"], "proxy": proxy, "region": None})
    memory.placements[sid] = Placement(sid, worker, 1, "", placed_at=1, launched=launched, revision="3f9c2ab")


def colour(driver, selector: str) -> str:
    return driver.execute_script(
        "const e = document.querySelector(arguments[0]); return e ? getComputedStyle(e).color : ''", selector)


def open_page(driver, page: Page) -> WebDriverWait:
    driver.get(page.url)
    return WebDriverWait(driver, 15, poll_frequency=0.1)


def test_a_suspension_and_a_stop_all_head_the_page(page, browser):
    page.fleet_dir.worker("w1").strategy("s1").strategy("s2").write()
    memory = Memory(answered={"w1": NOW})
    placed(memory, "s1", "w1")
    placed(memory, "s2", "w1")
    memory.suspended = {"s2": {"by": "alice@desk", "reason": "exchange maintenance", "at": int(time.time() * 1000)}}
    page.record(memory, {"w1": online("w1", "s1", "s2")})

    wait = open_page(browser, page)
    wait.until(lambda d: "SUSPENDED s2" in text(d, "#held"))
    held = text(browser, "#held")
    assert "alice@desk" in held and "exchange maintenance" in held and "quantlab resume" in held, held
    assert browser.execute_script("return !document.getElementById('held').hidden")
    assert "suspended" in cell(browser, "s2", "status") and "suspended" not in cell(browser, "s1", "status")

    # The emergency brake shows without a reload, as what it is.
    memory.suspended = {"*": {"by": "bob@ops", "reason": "runaway orders", "at": int(time.time() * 1000),
                              "stopAll": True}}
    memory.placements.clear()
    page.record(memory, {"w1": online("w1")})
    wait.until(lambda d: "STOP-ALL" in text(d, "#held"))
    held = text(browser, "#held")
    assert "bob@ops" in held and "runaway orders" in held and "no lease is renewed" in held, held
    assert colour(browser, "#held .stopall") != GREEN

    memory.suspended = {}
    page.record(memory, {"w1": online("w1")})
    wait.until(lambda d: d.execute_script("return document.getElementById('held').hidden"))


def test_held_and_silent_workers_and_a_moved_strategy_are_not_shown_as_well(page, browser):
    page.fleet_dir.worker("w1", drain=True).worker("w2", cordoned=True).worker("w3").worker("w4")
    page.fleet_dir.strategy("alpha").strategy("beta").write()
    memory = Memory(answered={"w1": NOW, "w2": NOW, "w3": NOW - 600_000, "w4": NOW})
    placed(memory, "alpha", "w1")
    placed(memory, "beta", "w3")
    workers = {"w1": online("w1", "alpha"), "w2": online("w2"), "w3": WorkerState("w3", False, error="timed out"),
               "w4": online("w4")}
    page.record(memory, workers)

    wait = open_page(browser, page)
    wait.until(lambda d: "draining" in text(d, '[data-worker="w1"]'))
    assert "cordoned" in text(browser, '[data-worker="w2"] .badge')
    for wid in ("w1", "w2"):
        assert colour(browser, f'[data-worker="{wid}"] .badge') != GREEN, wid
    assert "idle" not in text(browser, '[data-worker="w2"] .badge')
    assert "nothing new is placed here" in text(browser, '[data-worker="w2"]')
    assert text(browser, '[data-worker="w4"] .badge') == "idle"

    # What the hosts last said of a strategy on a silent worker is not a green "running".
    status = cell(browser, "beta", "status")
    assert "offline" in status and status != "running", status
    assert colour(browser, 'tr[data-strategy="beta"] .badge') != GREEN

    # The act round moves it: the page shows where it went at once, not what it saw before acting.
    move = Action("move", "beta", "w3 offline for 10m", "worker-offline", source="w3", target="w4", epoch=2)
    placed(memory, "beta", "w4")
    page.events.append({"t": int(time.time() * 1000), "event": "move", "strategy": "beta", "from": "w3",
                        "to": "w4", "outcome": "ok"})
    page.record(memory, workers, acted=[Outcome(move, True, "started")])
    wait.until(lambda d: cell(d, "beta", "worker") == "w4")
    assert cell(browser, "beta", "status") == "pending"
    assert "moved from w3 to w4" in cell(browser, "beta", "why")
    assert colour(browser, 'tr[data-strategy="beta"] .badge') != GREEN
    assert text(browser, '[data-worker="w4"] .badge') == "busy"
    wait.until(lambda d: "move" in text(d, "#events"))


def test_the_loop_source_proxies_and_the_load_say_what_they_are(page, browser):
    proxy = f"http://trader:{SECRET}@10.0.0.7:8890"
    page.fleet_dir.worker("w1", proxy=proxy).strategy("s1").write()
    memory = Memory(answered={"w1": NOW})
    placed(memory, "s1", "w1", proxy=proxy)
    memory.loop_source = {"kind": "commits", "ref": "refs/heads/main", "revision": "3f9c2ab41d2e", "at": 1}
    page.record(memory, {"w1": online("w1", "s1", cpus=8, load=4.78)})

    wait = open_page(browser, page)
    wait.until(lambda d: cell(d, "s1", "proxy"))
    assert cell(browser, "s1", "proxy") == "http://***@10.0.0.7:8890"
    assert "proxy http://***@10.0.0.7:8890" in text(browser, '[data-worker="w1"]')
    loop = text(browser, "#loop")
    assert "the commits of refs/heads/main" in loop and "synced revision 3f9c2ab41d2e" in loop, loop
    load = text(browser, '[data-worker="w1"] .load')
    assert "4.78 per core" in load and "1-min load average 38.24 on 8 cores" in load, load
    assert "every core is busy" in browser.execute_script(
        "return document.querySelector('[data-worker=\"w1\"] .load').title")
    whole = browser.execute_script("return document.documentElement.outerHTML")
    assert "478" not in text(browser, "#regions") and SECRET not in whole


def test_a_filter_narrows_the_list_not_the_fleet(page, browser):
    page.fleet_dir.worker("w1", max_strategies=20)
    for n in range(12):
        page.fleet_dir.strategy(f"alpha-{n:02d}")
    page.fleet_dir.strategy("beta").write()
    memory = Memory(answered={"w1": NOW})
    ids = [f"alpha-{n:02d}" for n in range(12)] + ["beta"]
    for sid in ids:
        placed(memory, sid, "w1")
    page.record(memory, {"w1": online("w1", *ids)})

    wait = open_page(browser, page)
    wait.until(lambda d: text(d, "#summary").startswith("13 strategies"))
    assert "13 running" in text(browser, "#summary")
    search = browser.find_element(By.ID, "filter")
    search.send_keys("beta")
    wait.until(lambda d: "1 of 13" in text(d, "#count"))
    assert text(browser, "#summary").startswith("13 strategies")
    search.send_keys("-none")
    wait.until(lambda d: "0 of 13" in text(d, "#count"))
    assert text(browser, "#summary").startswith("13 strategies"), text(browser, "#summary")
    assert "no strategy matches" in text(browser, "#pageinfo")


def test_the_log_opens_at_its_newest_lines_and_keeps_the_reader_where_they_scrolled(page, browser):
    page.fleet_dir.worker("w1").strategy("s1").write()
    memory = Memory(answered={"w1": NOW})
    placed(memory, "s1", "w1")
    page.record(memory, {"w1": online("w1", "s1")})
    wait = open_page(browser, page)
    click_strategy(browser, "s1")
    wait.until(lambda d: "line 300" in text(d, "#log"))
    at_bottom = "const l = document.getElementById('log'); return l.scrollHeight - l.scrollTop - l.clientHeight < 2"
    assert browser.execute_script("const l = document.getElementById('log'); return l.scrollHeight > l.clientHeight")
    wait.until(lambda d: d.execute_script(at_bottom))

    def refresh(newest: int) -> None:
        page.log_lines.append(f"line {newest}")
        page.server.limiter.last.clear()          # the server allows one fetch per strategy per 2 s
        browser.find_element(By.ID, "logrefresh").click()
        wait.until(lambda d: f"line {newest}" in text(d, "#log"))

    # Scrolled up to read: a refresh leaves the reader there.
    browser.execute_script("document.getElementById('log').scrollTop = 0")
    refresh(301)
    assert browser.execute_script("return document.getElementById('log').scrollTop") == 0
    # Back at the end: a refresh follows the newest lines.
    browser.execute_script("const l = document.getElementById('log'); l.scrollTop = l.scrollHeight")
    refresh(302)
    assert browser.execute_script(at_bottom)
