"""Headless Chromium for the console's browser tests: Debian's ``chromium``
and ``chromium-driver``, installed with apt-get when missing (as root).

Where that is impossible the tests skip with a loud banner; under
``ORDERHOOKS_REQUIRE_BROWSER=1`` (as ``.ci/run`` sets) the skip is a failure.
Selenium is always given the driver's path, so selenium-manager never
downloads anything.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from flask import Flask
from werkzeug.serving import BaseWSGIServer, make_server

from tests.conftest import summary

if TYPE_CHECKING:
    from selenium.webdriver.chrome.webdriver import WebDriver

CHROMIUM = os.environ.get("ORDERHOOKS_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("ORDERHOOKS_TEST_CHROMEDRIVER", "/usr/bin/chromedriver")
PACKAGES = ("chromium", "chromium-driver")
#: apt-get may have to fetch about 150 MB.
_APT_TIMEOUT = 1800

#: Printed as a banner at the end of the run (tests/conftest.py).
skipped = summary("BROWSER TESTS SKIPPED")
_lock = threading.Lock()
_verdict: list[str | None] = []


def _present() -> bool:
    return os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)


def _apt_get(*args: str) -> str | None:
    """Run apt-get; the last lines of its output when it failed."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        done = subprocess.run(
            ["apt-get", *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=_APT_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{type(exc).__name__}: {exc}"
    if done.returncode == 0:
        return None
    tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
    return f"apt-get {' '.join(args)} exited {done.returncode}: " + " | ".join(tail)


def _install() -> str | None:
    """Install the packages; why not, when it cannot be done."""
    if shutil.which("apt-get") is None:
        return "apt-get is not available (not a Debian-like system)"
    if os.geteuid() != 0:
        return "not root, so apt-get cannot install packages"
    error = _apt_get("install", "-y", "--no-install-recommends", *PACKAGES)
    # The package lists may be missing or stale (a fresh container).
    if error is not None and _apt_get("update") is None:
        error = _apt_get("install", "-y", "--no-install-recommends", *PACKAGES)
    if error is None and not _present():
        return f"apt-get installed {' '.join(PACKAGES)} but {CHROMIUM} or {CHROMEDRIVER} is missing"
    return error


def why_unavailable() -> str | None:
    """``None`` when Chromium and its driver are there (installed now if
    needed), else the reason. Decided once per test run."""
    with _lock:
        if not _verdict:
            _verdict.append(None if _present() else _install())
        return _verdict[0]


def require_browser() -> None:
    """Skip loudly, or fail under ``ORDERHOOKS_REQUIRE_BROWSER=1``."""
    reason = why_unavailable()
    if reason is None:
        return
    message = (
        f"Headless Chromium is NOT AVAILABLE ({reason}); the console's browser tests did "
        f"not run. Install Debian's {' and '.join(PACKAGES)} packages."
    )
    if os.environ.get("ORDERHOOKS_REQUIRE_BROWSER") == "1":
        pytest.fail("ORDERHOOKS_REQUIRE_BROWSER=1: " + message, pytrace=False)
    skipped.append(message)
    pytest.skip(message)


@contextmanager
def serving(app: Flask) -> Iterator[str]:
    """Serve ``app`` on a free loopback port in a thread; yields its base URL."""
    server: BaseWSGIServer = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, name="console-server", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@contextmanager
def chromium(profile: Path) -> Iterator[WebDriver]:
    """A headless Chromium under chromedriver, with a fresh profile."""
    # Imported here: selenium is a test dependency, and a missing browser
    # must skip, not break collection.
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1360,1000",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(CHROMEDRIVER)
    driver = webdriver.Chrome(service=service, options=options)
    try:
        yield driver
    finally:
        driver.quit()
