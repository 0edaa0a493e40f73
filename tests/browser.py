"""Headless Chromium from the machine's package manager, for the HTML pages' tests."""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import subprocess
from collections.abc import Iterator
from typing import Any

from tests.local_servers import needs, require

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
NO_CHROMIUM = "no chromium (apt-get install -y chromium; scripts/install.sh does it as root)"
needs_chromium = needs(CHROMIUM is not None, NO_CHROMIUM)


ARTIFACTS = pathlib.Path(os.environ.get("TEST_ARTIFACTS_DIR") or pathlib.Path(__file__).resolve().parents[1] / "test-artifacts")


def artifact(name: str) -> str:
    """Where a test keeps a file for people to look at after the run (screenshots of the pages):
    test-artifacts/ in the checkout (git-ignored), or $TEST_ARTIFACTS_DIR for CI to collect."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return str(ARTIFACTS / name)


def chromium_dom(url: str, budget_ms: int, tmp_path, screenshot: str | None = None) -> tuple[str, str]:
    """(rendered DOM, browser log) after `budget_ms` of virtual time (timers run that far); with
    `screenshot`, a PNG of the page is kept as that test artifact too (a second render)."""
    require(CHROMIUM is not None, NO_CHROMIUM)
    base = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
            f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0", f"--virtual-time-budget={budget_ms}"]
    out = subprocess.run([*base, "--dump-dom", url], capture_output=True, text=True, timeout=90)
    if screenshot:
        subprocess.run([*base, "--window-size=1280,2400", f"--screenshot={artifact(screenshot)}", url],
                       capture_output=True, text=True, timeout=90)
    return out.stdout, out.stderr


def console_errors(log: str) -> list[str]:
    return [line for line in log.splitlines() if "CONSOLE" in line and ("Uncaught" in line or "Error" in line)]


PAGE_TIMEOUT_MS = 120_000


@contextlib.contextmanager
def browser_page() -> Iterator[tuple[Any, list[str], list[str]]]:
    """A page in the machine's Chromium driven by Playwright (never Playwright's own browsers), for
    tests that click: (page, every URL it requested, its console errors)."""
    require(CHROMIUM is not None, NO_CHROMIUM)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page()
            # Beside the e2e worker's engine start-ups a 2-core machine gives Chromium little CPU: a
            # click on Swagger UI waited past Playwright's default 30 s there (and passed alone in 30 s).
            page.set_default_timeout(PAGE_TIMEOUT_MS)
            requested: list[str] = []
            errors: list[str] = []
            page.on("request", lambda r: requested.append(r.url))
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            yield page, requested, errors
        finally:
            browser.close()
