"""`quantlab serve` end to end: a running fleet (real processes on `local` workers, the real reconcile
daemon serving the page) looked at in a real headless browser."""
from __future__ import annotations

import os
import struct
import zlib

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from tests.integration.harness import FleetDir
from tests.support import free_port, kill_all, node_problem, processes, require, wait_for
from tests.web.pagekit import cell, click_strategy



def png_colours(png: bytes) -> int:
    """How many distinct byte values the image data holds (a single-colour image: a handful)."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    data, at = b"", 8
    while at < len(png):
        length, kind = struct.unpack(">I4s", png[at:at + 8])
        if kind == b"IDAT":
            data += png[at + 8:at + 8 + length]
        at += 12 + length
    return len(set(zlib.decompress(data)))


@pytest.fixture
def fleet(tmp_path):
    require(node_problem())
    fl = FleetDir(tmp_path / "fleet", interval=1)
    yield fl
    fl.stop_daemons()
    marker = str(tmp_path) + os.sep
    left = kill_all(marker)
    assert not left and not processes(marker)


def test_the_page_shows_the_fleet_live_in_a_browser(fleet, browser, tmp_path):
    fleet.worker("w1", region="JP", max_strategies=2).worker("w2", region="US", max_strategies=2)
    fleet.strategy("alpha").strategy("beta", requirements={"region": "EU"}).write()   # beta: no EU worker
    port = free_port()
    log = tmp_path / "daemon.log"
    fleet.spawn("reconcile", "--serve", f"127.0.0.1:{port}", log=log)
    wait_for(lambda: "serving the fleet page" in log.read_text(), 20, "the daemon to serve")
    fleet.beating("alpha", beats=1)

    browser.get(f"http://127.0.0.1:{port}/")
    wait = WebDriverWait(browser, 20, poll_frequency=0.1)
    wait.until(lambda d: cell(d, "alpha", "status") == "running")
    page = browser.execute_script("return document.body.innerText")
    for name in ("alpha", "beta", "w1", "w2", "JP", "US"):
        assert name in page, f"{name} is not on the page:\n{page}"
    assert cell(browser, "alpha", "worker") == "w1" or cell(browser, "alpha", "worker") == "w2"
    why = cell(browser, "beta", "why")
    assert why.startswith("queued:") and "EU" in why, why

    # A change of status shows without navigating: the page is the same document throughout.
    browser.execute_script("window.stillHere = 42;")
    fleet.strategies["alpha"]["desiredState"] = "paused"
    fleet.write()
    wait.until(lambda d: cell(d, "alpha", "status") == "paused")
    assert browser.execute_script("return window.stillHere;") == 42

    # A strategy's log lines and events, on demand.
    click_strategy(browser, "alpha")
    wait.until(lambda d: "fetching" not in d.find_element(By.ID, "log").text and d.find_element(By.ID, "log").text)
    wait.until(lambda d: "start" in d.find_element(By.ID, "events").text)

    # Readable on a phone: nothing wider than the screen but the strategies' own scrolling table.
    browser.set_window_size(390, 844)
    wait.until(lambda d: d.execute_script("return window.innerWidth") <= 400)
    assert browser.execute_script("return document.documentElement.scrollWidth <= window.innerWidth + 1")
    assert cell(browser, "alpha", "strategy") == "alpha"
    browser.set_window_size(1280, 900)

    shot = browser.get_screenshot_as_png()
    (tmp_path / "page.png").write_bytes(shot)
    assert png_colours(shot) > 16, "the screenshot is a single colour"
