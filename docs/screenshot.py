"""Regenerates docs/fleet-page.png, the fleet page's screenshot in docs/operations.md: a small fleet
of `local` workers in two regions (one strategy queued for want of a worker), its reconcile daemon
serving the page, and headless Chromium taking the picture.

    .venv/bin/python docs/screenshot.py
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import yaml  # noqa: E402

from tests.support import cli_env, kill_all, wait_for  # noqa: E402

JS = "export function st_init(){}\nexport function st_heartbeat(ctx){ ctx.state.n = (ctx.state.n ?? 0) + 1; }\n" \
     "export function st_exit(){}\n"


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="ql-shot-") as tmp:
        root = Path(tmp) / "fleet"
        (root / "strategies").mkdir(parents=True)
        (root / "strategies" / "grid.mjs").write_text(JS)
        docs = [{"apiVersion": "quantlab/v1", "kind": "Fleet", "reconcile": {"intervalSeconds": 2}}]
        for wid, region in (("tokyo-1", "JP"), ("tokyo-2", "JP"), ("virginia-1", "US")):
            docs.append({"apiVersion": "quantlab/v1", "kind": "Worker", "id": wid, "host": "local",
                         "metadata": {"region": region},
                         "capabilities": {"maxStrategies": 3, "supportedApis": ["bybit", "binance"]}})
        for sid, api, region in (("grid-btc-jp", "bybit", "JP"), ("grid-eth-jp", "bybit", "JP"),
                                 ("trend-sol-us", "binance", "US"), ("arb-btc-us", "binance", "US"),
                                 ("mm-doge-eu", "binance", "EU")):
            docs.append({"apiVersion": "quantlab/v1", "kind": "Strategy", "id": sid, "strategyFile": "strategies/grid.mjs",
                         "requirements": {"api": api, "region": region}, "heartbeatMs": 1000})
        (root / "fleet.yaml").write_text(yaml.safe_dump_all(docs, explicit_start=True))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        log = Path(tmp) / "daemon.log"
        with open(log, "wb") as out:
            daemon = subprocess.Popen([sys.executable, "-m", "quantlab", "reconcile", "--fleet", str(root), "--serve",
                                       f"127.0.0.1:{port}"], stdout=out, stderr=subprocess.STDOUT, env=cli_env())
        try:
            wait_for(lambda: log.read_text().count("tick ") >= 4, 60, "a few rounds")
            from selenium import webdriver
            from selenium.webdriver.chrome.service import Service
            from selenium.webdriver.common.by import By
            from selenium.webdriver.support.ui import WebDriverWait
            options = webdriver.ChromeOptions()
            options.binary_location = "/usr/bin/chromium"
            for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,900",
                         "--disable-background-networking", "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"):
                options.add_argument(flag)
            driver = webdriver.Chrome(service=Service(executable_path="/usr/bin/chromedriver"), options=options)
            try:
                driver.get(f"http://127.0.0.1:{port}/")
                WebDriverWait(driver, 30).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#strategies tbody tr")) == 5)
                driver.find_element(By.CSS_SELECTOR, 'tr[data-strategy="grid-btc-jp"] a.sid').click()
                time.sleep(1.5)                    # the log and events panels fill in
                driver.execute_script("window.scrollTo(0, 0)")   # the page's top, not where the log opened
                driver.save_screenshot(str(REPO / "docs" / "fleet-page.png"))
            finally:
                driver.quit()
        finally:
            daemon.terminate()
            daemon.wait(30)
            kill_all([str(root) + os.sep])


if __name__ == "__main__":
    main()
