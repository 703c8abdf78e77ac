"""Screenshot of the serve web page for docs/serve.md: the app on 127.0.0.1 (a thread, stopped at the end),
headless Chromium through Selenium (as tests/test_serve_page.py drives it), one generation, a PNG.

    python scripts/serve_screenshot.py [--engines engines/default] [--out docs/serve-page.png]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from serve_helpers import running  # noqa: E402
from test_serve_page import chrome, set_value  # noqa: E402

from ddt_export.serve.app import create_app  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engines", type=Path, default=ROOT / "engines/default")
    ap.add_argument("--out", type=Path, default=ROOT / "docs/serve-page.png")
    args = ap.parse_args()
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    with running(create_app(args.engines)) as url, tempfile.TemporaryDirectory() as profile:
        browser = chrome(Path(profile))
        try:
            browser.get(url + "/")
            while len(browser.find_elements(By.CSS_SELECTOR, "#class option")) < 10:
                time.sleep(0.05)
            Select(browser.find_element(By.ID, "class")).select_by_visible_text("8")
            set_value(browser, "num", 8)
            set_value(browser, "seed", 7)
            browser.find_element(By.ID, "generate").click()
            while len(browser.find_elements(By.CSS_SELECTOR, "#gallery img")) < 8:
                time.sleep(0.05)
            time.sleep(0.3)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            browser.save_screenshot(str(args.out))
        finally:
            browser.quit()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
