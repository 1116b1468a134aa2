"""Reading the fleet page in the browser tests. The page redraws its table every poll, so an element
found in one call may be gone by the next: everything here is read in one script call."""
from __future__ import annotations

from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait


def text(driver, selector: str) -> str:
    """The text of the first element `selector` finds, or '' when there is none."""
    return driver.execute_script("const e = document.querySelector(arguments[0]); return e ? e.innerText : ''",
                                 selector)


def cell(driver, sid: str, column: str) -> str:
    """A strategy's cell, by its column's name (the `data-col` of its td)."""
    return text(driver, f'tr[data-strategy="{sid}"] td[data-col="{column}"]').strip()


def click_strategy(driver, sid: str) -> None:
    """Click a strategy's id (which opens its log), again if the row was redrawn under the click."""
    WebDriverWait(driver, 10, ignored_exceptions=(StaleElementReferenceException,)).until(
        lambda d: d.find_element(By.CSS_SELECTOR, f'tr[data-strategy="{sid}"] a.sid').click() or True)
