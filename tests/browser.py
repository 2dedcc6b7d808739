"""Headless Chromium from Debian, driven by Playwright's synchronous API, for the
browser tests (``apt-get install chromium``, which scripts/test does; Playwright's
own browser downloads are never used).

Importing this on a developer machine without the browser skips the importing
test module; in CI a missing browser is a failure.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]
#: Milliseconds a page action or expectation may take.
TIMEOUT_MS = 15_000

if not os.environ.get("CI"):
    pytest.importorskip("playwright.sync_api")
    if not shutil.which(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium)", allow_module_level=True)

from playwright.sync_api import Browser, sync_playwright  # noqa: E402


@contextmanager
def chromium() -> Iterator[Browser]:
    """A launched headless Chromium, closed on exit."""
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=60_000)
        try:
            yield browser
        finally:
            browser.close()
