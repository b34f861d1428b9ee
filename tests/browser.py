"""Headless Chromium (Debian's chromium + chromedriver) through selenium."""

from __future__ import annotations

import os
import shutil
import tempfile
import time

from tests.servers import unavailable

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


def chromium(testcase):
    """A new headless Chromium (quit at cleanup), or skip/fail when absent."""
    if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
        unavailable("chromium/chromedriver are not installed (Debian packages chromium, chromium-driver)")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        unavailable("selenium is not installed (pip install -e '.[test]')")
    profile = tempfile.mkdtemp(prefix="msgd-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--no-first-run", "--disable-quic", "--disable-sync",
                "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1000,700"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_script_timeout(20)

    def quit():
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
    testcase.addCleanup(quit)
    return driver


# the end of an async script that defines go(): run it once msgd.js is loaded
WITH_MSGD_JS = """
if (window.msgd) go();
else {
  const s = document.createElement("script");
  s.src = "/msgd.js";
  s.onload = go;
  document.head.appendChild(s);
}
"""


def wait_for(driver, script: str, timeout: float = 15.0, step: float = 0.05):
    """Poll a JS expression until it is truthy (bounded); returns its value."""
    deadline = time.monotonic() + timeout
    while True:
        value = driver.execute_script("return " + script)
        if value or time.monotonic() > deadline:
            return value
        time.sleep(step)


def open_demo(testcase, url: str):
    """Chromium on the chat demo at ``url``, once its client is connected and
    subscribed to the lobby."""
    driver = chromium(testcase)
    driver.get(url)
    testcase.assertTrue(wait_for(driver, "window.demo && demo.client.state === 'open' "
                                         "&& demo.client.channels.has('chat.lobby') "
                                         "&& demo.client.channels.get('chat.lobby').epoch !== null"))
    return driver


def send_chat(driver, text: str) -> None:
    """Type ``text`` into the demo's form and send it, as a person would."""
    driver.find_element("id", "text").send_keys(text)
    driver.find_element("css selector", "form button").click()
