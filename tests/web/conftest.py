"""The fleet page's tests: a real headless Chromium (Debian's chromium and chromium-driver, driven by
selenium with the driver's path pinned, so that nothing is downloaded). Missing browser: the tests
skip loudly, except under CI=true, where they fail. They run in the SSH tests' worker, one after the
other: a browser's CPU must not land on the SSH tests' timing bounds."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.support import require

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


def browser_problem() -> str | None:
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not (os.path.exists(path) or shutil.which(Path(path).name)):
            return f"{path} not found: apt-get install {package}"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed: pip install -e '.[test]'"
    return None


@pytest.fixture
def browser():
    require(browser_problem())
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # Headless, and nothing leaves this machine: no updates, sync or metrics, and every name but the
    # loopback addresses fails to resolve.
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", "--disable-default-apps", "--metrics-recording-only", "--disable-extensions",
                 "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


# tryfirst: xdist's own hook turns the group marker into the test's id suffix (what --dist loadgroup
# distributes by), so the marker must be there before it runs.
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    here = Path(__file__).resolve().parent
    for item in items:
        if here in Path(str(item.path)).resolve().parents:
            # In the SSH tests' worker, one after the other: a burst of CPU (a server's initdb, a
            # browser) must not land on their handshakes and timing bounds — and on 2 cores the suite
            # is CPU-bound, so running these beside the SSH tests made it slower, not faster
            # (12:05 against 10:52, measured back to back).
            item.add_marker(pytest.mark.xdist_group("ssh"))
