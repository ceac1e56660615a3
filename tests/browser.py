"""A real headless Chromium for tests (Debian's chromium + chromium-driver, driven by Selenium)."""

from __future__ import annotations

import os
import shutil

import pytest

ARTIFACTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "artifacts")


def chromium():
    """A headless Chromium WebDriver, or a loud skip naming what is missing."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.options import Options
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("SKIPPED LOUDLY: selenium is not installed (pip install -e '.[test]')")
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (binary and driver):
        pytest.skip("SKIPPED LOUDLY: no chromium/chromedriver on PATH; .ci/run installs Debian's "
                    "'chromium chromium-driver' — install them to run the browser tests")
    options = Options()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1600"):
        options.add_argument(arg)
    options.binary_location = binary
    return webdriver.Chrome(options=options, service=Service(driver))


def screenshot(driver, name: str) -> str:
    os.makedirs(ARTIFACTS, exist_ok=True)
    path = os.path.join(ARTIFACTS, name)
    driver.save_screenshot(path)
    return path


def wait_for(driver, predicate, timeout: float = 60.0, what: str = "condition"):
    """Poll ``predicate(driver)`` until true (pages render asynchronously; a loaded CI box is slow)."""
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate(driver)
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def wait_for_dashboard(url: str, proc) -> None:
    """Wait up to a minute for optuna-dashboard at ``url`` to answer; fail with its output if it exits."""
    import time
    import urllib.request

    for _ in range(120):
        try:
            urllib.request.urlopen(url + "/dashboard", timeout=2)
            return
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.5)
    pytest.fail("dashboard did not start: " + (proc.stdout.read(2000) if proc.poll() is not None else "timeout"))
