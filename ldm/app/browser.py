"""Serve the app on localhost and drive it in Debian's headless Chromium (test, screenshots)."""
from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # selenium is imported only when a browser is driven
    from selenium.webdriver.chrome.webdriver import WebDriver
    from selenium.webdriver.remote.webelement import WebElement

APP = Path(__file__).resolve().parents[2] / "scripts" / "app.py"
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


def browser_missing() -> str | None:
    """Why the browser cannot run here, or None when it can."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if missing:
        return (f"{' and '.join(missing)} not found: install Debian's packages "
                "(apt-get install chromium chromium-driver, or `make browser` as root)")
    if importlib.util.find_spec("selenium") is None:
        return "selenium is not installed (pip install -r requirements-dev.txt)"
    return None


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def serve(log: Path, timeout: float = 180) -> Iterator[str]:
    """`streamlit run scripts/app.py` on a free localhost port; yields its URL, stops it after."""
    port = free_port()
    command = [sys.executable, "-m", "streamlit", "run", str(APP), "--server.address", "127.0.0.1",
               "--server.port", str(port), "--server.headless", "true",
               "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none"]
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"streamlit exited with {process.returncode}: "
                                   f"{log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"streamlit did not answer on {url} within {timeout:.0f} s")
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def chrome(width: int = 1400, height: int = 1000) -> "WebDriver":
    """Headless Debian Chromium through its chromedriver (no browser download)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--disable-gpu", "--disable-dev-shm-usage",
                 f"--window-size={width},{height}", "--hide-scrollbars"):
        options.add_argument(flag)
    if os.geteuid() == 0:  # Chromium refuses to run as root inside its sandbox
        options.add_argument("--no-sandbox")
    return webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")
                                                              or CHROMEDRIVER))


class AppDriver:
    """The few gestures the test and the screenshots need, each waiting for the app to settle."""

    def __init__(self, driver: "WebDriver", url: str, timeout: float = 300) -> None:
        from selenium.webdriver.support.ui import WebDriverWait
        self.driver, self.timeout = driver, timeout
        self.wait = WebDriverWait(driver, timeout, poll_frequency=0.25)
        driver.get(url)
        self.settle()

    def css(self, selector: str) -> list:
        """Elements matching a CSS selector."""
        from selenium.webdriver.common.by import By
        return self.driver.find_elements(By.CSS_SELECTOR, selector)

    def settle(self) -> None:
        """Wait until the app is connected and its script has finished running."""
        self.wait.until(lambda d: self._state() == "notRunning")
        time.sleep(0.3)  # a rerun triggered just now may not have been reported yet
        self.wait.until(lambda d: self._state() == "notRunning")

    def _state(self) -> str | None:
        apps = self.css('[data-testid="stApp"]')
        if not apps or apps[0].get_attribute("data-test-connection-state") != "CONNECTED":
            return None
        return apps[0].get_attribute("data-test-script-state")

    def interact(self, action: Callable[[], None]) -> None:
        """Run `action`, wait for the rerun it causes to start (briefly) and to end."""
        action()
        with contextlib.suppress(Exception):
            from selenium.webdriver.support.ui import WebDriverWait
            WebDriverWait(self.driver, 3, poll_frequency=0.1).until(
                lambda d: self._state() != "notRunning")
        self.settle()

    def page(self, name: str) -> None:
        """Choose a page in the sidebar."""
        from selenium.webdriver.common.by import By
        label = self.driver.find_element(
            By.XPATH, f'//section[@data-testid="stSidebar"]//label[.//p[text()="{name}"]]')
        self.interact(label.click)
        self.wait.until(lambda d: any(h.text == name for h in self.css("h1")))

    def slider_value(self, label: str) -> str:
        """The value shown by the slider labelled `label`."""
        return self._slider_input(label).get_attribute("value")

    def _slider_input(self, label: str) -> "WebElement":
        from selenium.webdriver.common.by import By
        return self.driver.find_element(
            By.XPATH, '//div[@data-testid="stSlider"]//input[@type="range" and '
                      f'@aria-label="{label}"]')

    def press_slider(self, label: str, key: str, times: int) -> str:
        """Focus the slider labelled `label` (its thumb) and press `key` `times` times; returns
        its value after the app has rerun."""
        from selenium.webdriver.common.action_chains import ActionChains
        from selenium.webdriver.common.by import By
        thumb = self._slider_input(label).find_element(By.XPATH, "../..")

        def press() -> None:
            ActionChains(self.driver).click(thumb).perform()
            for _ in range(times):
                ActionChains(self.driver).send_keys(key).perform()
        self.interact(press)
        return self.slider_value(label)

    def type_number(self, label: str, value: int) -> None:
        """Replace the number in the number input labelled `label`."""
        from selenium.webdriver.common.by import By
        from selenium.webdriver.common.keys import Keys
        field = self.driver.find_element(By.XPATH, f'//input[@aria-label="{label}"]')

        def edit() -> None:
            field.send_keys(Keys.CONTROL, "a")
            field.send_keys(str(value), Keys.ENTER)
        self.interact(edit)

    def type_text(self, label: str, text: str) -> None:
        """Replace the text in the text input labelled `label`."""
        from selenium.webdriver.common.by import By
        from selenium.webdriver.common.keys import Keys
        field = self.driver.find_element(By.XPATH, f'//input[@aria-label="{label}"]')

        def edit() -> None:
            field.send_keys(Keys.CONTROL, "a")
            field.send_keys(text, Keys.ENTER)
        self.interact(edit)

    def click_button(self, text: str) -> None:
        """Click the button showing `text`."""
        from selenium.webdriver.common.by import By
        button = self.driver.find_element(By.XPATH, f'//button[.//p[text()="{text}"]]')
        self.interact(button.click)

    def click_label(self, text: str) -> None:
        """Click the label (checkbox, radio option) showing `text`."""
        from selenium.webdriver.common.by import By
        label = self.driver.find_element(By.XPATH, f'//label[.//p[text()="{text}"]]')
        self.interact(label.click)

    def captions(self) -> list[str]:
        """The captions of every image on the page."""
        return [c.text for c in self.css('[data-testid="stImageCaption"]')]

    def screenshot(self, path: Path) -> None:
        """The whole page (the window grown to the content's height) as a PNG."""
        height = self.driver.execute_script(
            "const m = document.querySelector('[data-testid=\"stMain\"]');"
            "return Math.max(document.body.scrollHeight, m ? m.scrollHeight : 0);")
        width = self.driver.get_window_size()["width"]
        self.driver.set_window_size(width, min(max(int(height) + 120, 800), 4000))
        time.sleep(0.5)
        self.driver.save_screenshot(str(path))
