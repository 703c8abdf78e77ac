"""The web page (GET /) in a real headless Chromium through Selenium: the form is built from /v1/info, the live
progress bar moves while the request runs, the gallery shows the images the API gives for the same settings,
a refused request shows the server's message and no older images, an emptied field means the default (never
0), and /docs renders Swagger UI. The browser resolves no host but 127.0.0.1 (no internet, no CDN)."""
from __future__ import annotations

import io
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("selenium")

from serve_helpers import png_pixels, running  # noqa: E402

from ddt_export.serve.app import create_app  # noqa: E402

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
pytestmark = [pytest.mark.timeout(240),
              pytest.mark.skipif(not (CHROMIUM.exists() or shutil.which("chromium")) or not (
                  CHROMEDRIVER.exists() or shutil.which("chromedriver")),
                  reason="needs Debian's chromium and chromium-driver (.ci/run installs them)")]
CHROME_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-dev-shm-usage",
                "--window-size=1180,820",
                "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1")  # offline: a CDN would not load


def chrome(profile: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    for flag in (*CHROME_FLAGS, f"--user-data-dir={profile}"):  # a fresh profile per run
        opts.add_argument(flag)
    opts.binary_location = str(CHROMIUM if CHROMIUM.exists() else shutil.which("chromium"))
    driver = str(CHROMEDRIVER if CHROMEDRIVER.exists() else shutil.which("chromedriver"))
    return webdriver.Chrome(service=Service(driver), options=opts)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    d = chrome(tmp_path_factory.mktemp("chrome-profile"))
    d.set_page_load_timeout(60)
    yield d
    d.quit()


def set_value(browser, element_id: str, value) -> None:
    """Set a form control as a user would (range inputs included) and fire its input event."""
    browser.execute_script("const e = document.getElementById(arguments[0]); e.value = arguments[1];"
                           "e.dispatchEvent(new Event('input')); e.dispatchEvent(new Event('change'));",
                           element_id, str(value))


def wait(browser, cond, timeout=60.0, poll=0.03, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(poll)
    raise AssertionError(f"timed out waiting for {what}")


class Gate:
    """The real engines, except that decoder call number `at` waits until `release` is set (a test holds a
    request halfway to look at it, instead of betting on timing)."""

    def __init__(self, engines, at: int):
        self.engines, self.at, self.calls = engines, at, 0
        self.armed, self.held, self.release = False, threading.Event(), threading.Event()

    def __getattr__(self, name):
        return getattr(self.engines, name)

    def run(self, graph, feeds):
        if graph == "decoder" and self.armed:  # counted from the test's request on (not the start-up timings)
            self.calls += 1
            if self.calls == self.at:
                self.held.set()
                assert self.release.wait(60), "the test never released the gate"
        return self.engines.run(graph, feeds)


def test_page_generates_with_live_progress(digits_engines, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    from ddt_export.runtime import load_engines

    gate = {}

    def open_engines(folder):
        gate["g"] = Gate(load_engines(folder), at=76)  # steps 1..75 done, the 76th held
        return gate["g"]

    with running(create_app(digits_engines, open_engines=open_engines)) as url:
        browser.get(url + "/")
        wait(browser, lambda: len(browser.find_elements(By.CSS_SELECTOR, "#class option")) == 10, what="classes")
        assert "ddt-tiny-digits" in browser.find_element(By.ID, "model").text
        assert browser.find_element(By.ID, "steps").get_attribute("value") == "50"  # the manifest's default
        Select(browser.find_element(By.ID, "class")).select_by_visible_text("7")
        set_value(browser, "steps", 150)
        set_value(browser, "num", 3)
        set_value(browser, "seed", 42)
        Select(browser.find_element(By.ID, "schedule-kind")).select_by_value("uniform")
        set_value(browser, "schedule-value", 2)
        assert browser.find_element(By.ID, "steps-out").text == "150"
        gate["g"].armed = True
        browser.find_element(By.ID, "generate").click()
        progress = "return document.getElementById('progress').value"
        wait(browser, lambda: gate["g"].held.is_set() and browser.execute_script(progress) == 75,
             what="the bar at step 75 of 150, while the request is held there")
        gate["g"].release.set()
        wait(browser, lambda: len(browser.find_elements(By.CSS_SELECTOR, "#gallery img")) == 3, what="the gallery")
        assert browser.execute_script("const p = document.getElementById('progress'); return [p.value, p.max]") == [
            150, 150]
        assert "3 images of 7" in browser.find_element(By.ID, "status").text
        srcs = [img.get_attribute("src") for img in browser.find_elements(By.CSS_SELECTOR, "#gallery img")]
        api = httpx.post(url + "/v1/generate", json={"class": 7, "num": 3, "seed": 42, "steps": 150,
                                                     "schedule": "uniform:2"}, timeout=120).json()
        for src, b64 in zip(srcs, api["images"]):
            assert src.startswith("data:image/png;base64,")
            assert np.array_equal(png_pixels(src.split(",", 1)[1]), png_pixels(b64))
        shot = tmp_path / "page.png"
        browser.save_screenshot(str(shot))
        from PIL import Image

        assert Image.open(io.BytesIO(shot.read_bytes())).size[0] > 500


def test_page_shows_the_servers_message(digits_engines, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    with running(create_app(digits_engines)) as url:
        browser.get(url + "/")
        wait(browser, lambda: len(browser.find_elements(By.CSS_SELECTOR, "#class option")) == 10, what="classes")
        set_value(browser, "steps", 5)
        Select(browser.find_element(By.ID, "schedule-kind")).select_by_value("dp")
        set_value(browser, "schedule-value", 9)
        browser.find_element(By.ID, "generate").click()
        msg = wait(browser, lambda: browser.find_element(By.ID, "error").text, what="the error")
        assert msg == "422: schedule: expected dp:K with K <= 5 (the steps), got dp:9"


def test_emptied_cfg_means_the_default_and_an_error_clears_the_gallery(digits_engines, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    def gallery() -> int:
        return len(browser.find_elements(By.CSS_SELECTOR, "#gallery img"))

    with running(create_app(digits_engines)) as url:
        browser.get(url + "/")
        wait(browser, lambda: len(browser.find_elements(By.CSS_SELECTOR, "#class option")) == 10, what="classes")
        assert browser.find_element(By.ID, "cfg").get_attribute("placeholder") == "default 1.5"
        set_value(browser, "cfg", "")  # the user clears the field: not cfg 0 (no guidance)
        set_value(browser, "steps", 4)
        set_value(browser, "num", 2)
        browser.find_element(By.ID, "generate").click()
        wait(browser, lambda: gallery() == 2, what="the gallery")
        status = browser.find_element(By.ID, "status").text
        assert status.startswith("2 images of 0 (cfg 1.5, 4 steps, seed 0)"), status  # the manifest's cfg ran
        set_value(browser, "cfg", 0)  # an explicit 0 is sent as 0
        browser.find_element(By.ID, "generate").click()
        wait(browser, lambda: "(cfg 0," in browser.find_element(By.ID, "status").text, what="cfg 0")
        Select(browser.find_element(By.ID, "schedule-kind")).select_by_value("dp")
        set_value(browser, "schedule-value", 9)  # refused: dp:9 > 4 steps
        browser.find_element(By.ID, "generate").click()
        msg = wait(browser, lambda: browser.find_element(By.ID, "error").text, what="the error")
        assert msg == "422: schedule: expected dp:K with K <= 4 (the steps), got dp:9"
        assert gallery() == 0  # the last answer's images are not left under the message


def test_docs_render_with_no_internet(digits_engines, browser):
    from selenium.webdriver.common.by import By

    with running(create_app(digits_engines)) as url:
        browser.get(url + "/docs")
        paths = wait(browser, lambda: [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")
                                       if e.text], what="Swagger UI's operations")
        assert "/v1/generate" in paths and "/health" in paths, paths
        assert browser.execute_script("return typeof SwaggerUIBundle") == "function"
