"""The console in a real browser: headless Chromium over a real HTTP server,
on every store backend.

Log in through the host's access function, filter, open a delivery, replay a
failed one and see it done; a hostile body is shown as text and runs
nothing. With ``ORDERHOOKS_UPDATE_SCREENSHOTS=1`` the SQLite run also writes
the docs' screenshots (``docs/_static/console-list.png``, ``-detail.png``).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from flask_orderhooks.provider import Delivery
from flask_orderhooks.testing import (
    SignedCallback,
    gateway_collect,
    gateway_payout,
    igv_order_status,
    sud_order_changed,
)
from tests.console.browser import chromium, require_browser, serving
from tests.console.conftest import CONSOLE, NOW, Console, ConsoleFactory

if TYPE_CHECKING:
    from selenium.webdriver.chrome.webdriver import WebDriver
    from selenium.webdriver.remote.webelement import WebElement

DOCS_STATIC = Path(__file__).resolve().parents[2] / "docs" / "_static"
HOSTILE = (
    '<img src=x onerror="window.__pwned=1;alert(1)">'
    "<script>window.__pwned=2;alert(2)</script>"
    '<svg onload="window.__pwned=3"></svg>'
)
PAGE_TIMEOUT = 30


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[WebDriver]:
    require_browser()
    with chromium(tmp_path / "profile") as driver:
        driver.set_page_load_timeout(PAGE_TIMEOUT)
        yield driver


def _seed(console: Console) -> dict[str, SignedCallback]:
    """A day of a small shop: mostly done, a failed collect (the one to
    replay), a dead iGV order, and a hostile body."""
    app = console.app
    named: dict[str, SignedCallback] = {}
    for n in range(36):
        console.clock.now = NOW - 23.5 * 3600 + n * 2300
        kind = n % 3
        if kind == 0:
            cb = igv_order_status(app=app, order_id=1689644928115700 + n)
        elif kind == 1:
            cb = gateway_collect(app=app, trans_id=f"SHOP-{5000 + n}", id=f"C{9000 + n}")
        else:
            cb = sud_order_changed(app=app, out_order_id=f"GAME-{n}")
        assert console.send(cb, fail=n in (7, 20)) == (500 if n in (7, 20) else 200)
    console.clock.now = NOW - 50 * 60
    named["dead"] = igv_order_status(app=app, order_id=1689644928115999)
    for _ in range(3):  # the platform's three attempts, all failing
        assert console.send(named["dead"], fail=True) == 500
    console.clock.now = NOW - 20 * 60
    named["hostile"] = igv_order_status(app=app, order_id=77, extra={"remark": HOSTILE})
    assert console.send(named["hostile"]) == 200
    named["hostile_ref"] = gateway_payout(app=app, trans_id=HOSTILE, id="P-77")
    assert console.send(named["hostile_ref"]) == 200
    console.clock.now = NOW - 6 * 60
    named["failed"] = gateway_collect(app=app, trans_id="SHOP-7781", id="C7781")
    assert console.send(named["failed"], fail=True) == 500
    console.clock.now = NOW - 3 * 60
    assert console.send(named["failed"], fail=True) == 500  # the gateway's one retry
    console.clock.now = NOW
    assert console.row(named["dead"]).status == "dead"
    assert console.row(named["failed"]).status == "failed"
    return named


def _nothing_ran(driver: WebDriver) -> None:
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.common.by import By

    assert driver.execute_script("return typeof window.__pwned") == "undefined"
    with pytest.raises(NoAlertPresentException):
        _ = driver.switch_to.alert.text
    assert driver.find_elements(By.TAG_NAME, "script") == []
    assert driver.find_elements(By.TAG_NAME, "img") == []
    # The chart is the page's only SVG: the payload's <svg> is text.
    assert len(driver.find_elements(By.TAG_NAME, "svg")) <= 1


def _navigate(driver: WebDriver, element: WebElement) -> None:
    """Click ``element`` and wait until the page it leads to has replaced
    this one (a click returns before the navigation ends)."""
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    old = driver.find_element(By.TAG_NAME, "html")
    element.click()
    # Mid-navigation chromedriver may answer "Node with given id does not
    # belong to the document" instead of a stale-element error: stale too.
    WebDriverWait(driver, PAGE_TIMEOUT, ignored_exceptions=[WebDriverException]).until(
        expected_conditions.staleness_of(old)
    )
    WebDriverWait(driver, PAGE_TIMEOUT).until(
        lambda d: d.execute_script("return document.readyState") == "complete"
    )


def _problems(driver: WebDriver) -> list[str]:
    """The browser's console errors, but the favicon the host does not have."""
    return [
        entry["message"]
        for entry in driver.get_log("browser")  # type: ignore[no-untyped-call]
        if entry["level"] == "SEVERE" and "favicon.ico" not in entry["message"]
    ]


def test_console_in_a_browser(
    make_console: ConsoleFactory, browser: WebDriver, backend: str, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    console = make_console()
    sent = _seed(console)
    shots = tmp_path / "shots"
    shots.mkdir()
    with serving(console.app) as base:
        # Not logged in: the host's access function sends the browser to its login.
        browser.get(base + CONSOLE + "/")
        assert browser.current_url.startswith(base + "/login?next=")
        assert browser.title == "Shop login"
        _navigate(browser, browser.find_element(By.ID, "login"))
        assert browser.current_url.rstrip("?") == base + CONSOLE + "/"
        assert browser.find_element(By.TAG_NAME, "h1").text == "Deliveries"
        rows = browser.find_elements(By.CSS_SELECTOR, "tr.oc-row")
        assert len(rows) == 40
        # The stylesheet came from the blueprint and applies under the CSP.
        done = browser.find_element(By.CSS_SELECTOR, ".oc-status-done")
        assert done.value_of_css_property("background-color") == "rgba(46, 139, 87, 1)"
        bars = browser.find_elements(By.CSS_SELECTOR, "#oc-chart rect[data-status]")
        assert sum(int(b.get_attribute("data-count") or "") for b in bars) == 40
        _nothing_ran(browser)
        browser.save_screenshot(str(shots / "console-list.png"))

        # Filter: failed ones only.
        Select(browser.find_element(By.ID, "oc-status")).select_by_value("failed")
        _navigate(browser, browser.find_element(By.ID, "oc-apply"))
        assert "status=failed" in browser.current_url
        statuses = {
            r.get_attribute("data-status")
            for r in browser.find_elements(By.CSS_SELECTOR, "tr.oc-row")
        }
        assert statuses == {"failed"}
        keys = [
            r.get_attribute("data-key") for r in browser.find_elements(By.CSS_SELECTOR, "tr.oc-row")
        ]
        assert keys[0] == sent["failed"].key
        assert len(keys) == 3

        # Open it: two failed attempts, the body, the replay buttons.
        _navigate(browser, browser.find_element(By.LINK_TEXT, sent["failed"].key))
        assert browser.find_element(By.ID, "oc-status-value").text == "failed"
        failures = browser.find_elements(By.CSS_SELECTOR, "#oc-failures tbody tr")
        assert len(failures) == 2
        assert '"trans_id": "SHOP-7781"' in browser.find_element(By.ID, "oc-body").text
        browser.save_screenshot(str(shots / "console-detail.png"))

        # Replay it and see it done.
        _navigate(browser, browser.find_element(By.CSS_SELECTOR, "#oc-replay button"))
        assert browser.find_element(By.ID, "oc-outcome").text == (
            "Replay: replayed, attempt 3: done."
        )
        assert browser.find_element(By.ID, "oc-status-value").text == "done"
        assert console.row(sent["failed"]).status == "done"
        assert browser.find_elements(By.ID, "oc-replay") == []

        # The hostile body: text, and nothing ran.
        browser.get(base + CONSOLE + "/?q=77")
        _navigate(browser, browser.find_element(By.LINK_TEXT, sent["hostile"].key))
        body = browser.find_element(By.ID, "oc-body").text
        assert "<script>window.__pwned=2;alert(2)</script>" in body
        assert '<img src=x onerror=\\"window.__pwned=1;alert(1)\\">' in body
        _nothing_ran(browser)
        # The hostile order id: in the list, in the search box, on its page.
        browser.get(base + CONSOLE + "/")
        browser.find_element(By.ID, "oc-q").send_keys(HOSTILE)
        _navigate(browser, browser.find_element(By.ID, "oc-apply"))
        cells = browser.find_elements(By.CSS_SELECTOR, "tr.oc-row td:nth-child(5)")
        assert [c.text for c in cells] == [HOSTILE]
        assert browser.find_element(By.ID, "oc-q").get_attribute("value") == HOSTILE
        _nothing_ran(browser)
        _navigate(browser, browser.find_element(By.LINK_TEXT, sent["hostile_ref"].key))
        _nothing_ran(browser)
        assert _problems(browser) == []

    for name in ("console-list.png", "console-detail.png"):
        assert (shots / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        if backend == "sqlite" and os.environ.get("ORDERHOOKS_UPDATE_SCREENSHOTS") == "1":
            DOCS_STATIC.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(shots / name, DOCS_STATIC / name)


def test_post_from_another_page_is_refused(
    make_console: ConsoleFactory, browser: WebDriver, tmp_path: Path
) -> None:
    """A form on another origin that posts to the console (a CSRF attack) is
    refused with 400 and changes nothing, even with the staff cookie."""
    from selenium.webdriver.common.by import By

    console = make_console()
    target = gateway_collect(app=console.app, trans_id="VICTIM")
    assert console.send(target, fail=True) == 500
    attacker = tmp_path / "attack.html"
    with serving(console.app) as base:
        browser.get(base + "/login")
        _navigate(browser, browser.find_element(By.ID, "login"))
        attacker.write_text(
            "<!doctype html><title>win a prize</title>"
            f'<form method="post" action="{base}{CONSOLE}/delivery/gateway/collect/replay">'
            f'<input name="key" value="{target.key}"><button id="go">go</button></form>'
        )
        browser.get(attacker.as_uri())
        _navigate(browser, browser.find_element(By.ID, "go"))
        assert "did not come from the console" in browser.find_element(By.ID, "oc-refused").text
    row = console.row(target)
    assert (row.status, row.attempts) == ("failed", 1)


def test_hidden_characters_of_a_text_body_in_a_browser(
    make_console: ConsoleFactory, browser: WebDriver
) -> None:
    """A body that is not JSON, holding a right-to-left override, a
    zero-width space, a NUL and an escape sequence: the browser shows each
    as a marked escape, so the order id reads as what the row holds."""
    from selenium.webdriver.common.by import By

    console = make_console()
    body = f"order=C1\u202e99&ref=A\u200b1&x=\x00\x1b[2J{HOSTILE}".encode()
    with console.app.app_context():
        console.hooks.store.claim(Delivery("igv", "order-status", "odd-text", body, {}, ()))
    with serving(console.app) as base:
        # The host's login sends the browser back to the page asked for.
        browser.get(base + CONSOLE + "/delivery/igv/order-status?key=odd-text")
        _navigate(browser, browser.find_element(By.ID, "login"))
        shown = browser.find_element(By.ID, "oc-body").text
        assert shown == f"order=C1\\u202e99&ref=A\\u200b1&x=\\u0000\\u001b[2J{HOSTILE}"
        assert browser.find_element(By.ID, "oc-body-escaped").text == "4"
        escapes = browser.find_elements(By.CSS_SELECTOR, "#oc-body .oc-escape")
        assert [e.text for e in escapes] == ["\\u202e", "\\u200b", "\\u0000\\u001b"]
        # Marked apart from the body's own text by the stylesheet.
        assert escapes[0].value_of_css_property("background-color") == "rgba(253, 233, 196, 1)"
        _nothing_ran(browser)
        assert _problems(browser) == []
