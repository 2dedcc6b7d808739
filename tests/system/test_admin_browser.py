"""The status page in a real browser: ``GET /admin`` of ``serve --workers 2`` in
headless Chromium (Debian's, driven by Playwright; ``playwright install`` is never
run). A wrong key is refused; the live count follows clients on both workers as
they connect and leave; the test takes the screenshot the docs show, and writes it to
docs/admin.png when TRIOSERVE_UPDATE_SCREENSHOT=1 (a plain run leaves the checkout clean).
"""

from __future__ import annotations

import contextlib
import json
import os
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.sync.client import ClientConnection, connect

from ..browser import TIMEOUT_MS, chromium
from ..examples.conftest import REPO, Example

# isort: off
# After ..browser, whose import skips this module where the browser is missing.
from playwright.sync_api import Browser, Page, expect
# isort: on

pytestmark = pytest.mark.system

KEY = "admin-key-0123456789"
SERVING = r"2 workers serving http://127\.0\.0\.1:(\d+):"
DOCS_SCREENSHOT = REPO / "docs" / "admin.png"


@pytest.fixture
def browser() -> Iterator[Browser]:
    with chromium() as launched:
        yield launched


@pytest.fixture
def port() -> Iterator[int]:
    server = Example(["-m", "trioserve", "serve", "--port", "0", "--workers", "2", "--api-key", KEY,
                      "--log-level", "info"])
    try:
        yield int(server.wait_for(SERVING).group(1))
    finally:
        server.stop()  # a drain: the workers exit with the supervisor, and the reader sees EOF
        assert server.proc.stdout is not None
        server.proc.stdout.close()


def api(port: int, path: str, body: Any) -> dict[str, Any]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", json.dumps(body).encode(),
                                     {"Authorization": f"Bearer {KEY}",
                                      "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as resp:
        result: dict[str, Any] = json.load(resp)
        return result


def client(stack: contextlib.ExitStack, port: int, *topics: str) -> ClientConnection:
    # Unbounded: these clients never read their publications, and a full queue
    # would hold up the close handshake (websockets' close_timeout, 10 s each).
    ws = stack.enter_context(connect(f"ws://127.0.0.1:{port}/ws", open_timeout=10, max_queue=None))
    for topic in topics:
        ws.send(json.dumps({"op": "subscribe", "topic": topic, "id": topic}))
        assert json.loads(ws.recv(timeout=10))["ok"] is True
    return ws


def log_in(page: Page, key: str) -> None:
    page.get_by_test_id("key").fill(key)
    page.get_by_test_id("login").click()


def test_the_status_page_follows_the_clients(browser: Browser, port: int, tmp_path: Path) -> None:
    with contextlib.ExitStack() as stack:
        check_the_page(browser, port, stack, tmp_path / "admin.png")


def check_the_page(browser: Browser, port: int, stack: contextlib.ExitStack, scratch: Path) -> None:
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[Any] = []
    page.on("pageerror", lambda error: errors.append(error))
    page.goto(f"http://127.0.0.1:{port}/admin")
    expect.set_options(timeout=TIMEOUT_MS)

    log_in(page, "wrong")
    expect(page.get_by_test_id("error")).to_contain_text("Refused")
    assert page.evaluate("() => sessionStorage.length") == 0

    log_in(page, KEY)
    count = page.get_by_test_id("connections")
    expect(count).to_have_text("1")  # the page's own stream
    clients = [client(stack, port, "room.lobby", "news") for _ in range(4)]
    clients += [client(stack, port, "news") for _ in range(3)]
    clients += [client(stack, port, f"room.{i}") for i in range(2)]
    expect(count).to_have_text("10")
    expect(page.get_by_test_id("nodes")).to_contain_text("worker 1")
    expect(page.get_by_test_id("nodes")).to_contain_text("worker 2")

    for ws in clients[:3]:
        ws.close()
    expect(count).to_have_text("7")
    # The key is kept for this tab: a reload goes straight to the figures.
    page.reload()
    expect(count).to_have_text("7")

    # Some traffic and a disconnect by the server API, for the screenshot.
    api(port, "/api/disconnect", {"user": "nobody", "code": 4010, "reason": "unused"})
    clients[3].close(code=4000 + 321, reason="left the lobby")
    expect(count).to_have_text("6")
    expect(page.get_by_test_id("disconnects")).to_contain_text("4321")
    for n in range(30):
        api(port, "/api/publish", {"topic": "news", "data": {"n": n}})
    for n in range(10):
        api(port, "/api/publish", {"topic": "room.lobby", "data": {"n": n}})
    expect(page.locator("#top-rate tr").first).to_contain_text("news")
    shot = DOCS_SCREENSHOT if os.environ.get("TRIOSERVE_UPDATE_SCREENSHOT") == "1" else scratch
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000  # a drawn page, not a blank one
    for ws in clients[4:]:
        ws.close()
    expect(count).to_have_text("1")
    assert errors == []
