"""The JavaScript client in a real browser: a page imports ``/trioserve.js`` from
the server and receives publications, across a reconnect.

Headless Chromium from Debian driven by Playwright's synchronous API, as in
tests/examples/test_chat_browser.py (``playwright install`` is never run); the
server is ``python -m trioserve serve`` as a process.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from ..browser import TIMEOUT_MS, chromium
from ..examples.conftest import Example, free_port

# isort: off
# After ..browser, whose import skips this module where the browser is missing.
from playwright.sync_api import Browser, Page
# isort: on

pytestmark = pytest.mark.system

LISTENING = r"listening on http://127\.0\.0\.1:(\d+) "


@pytest.fixture
def browser() -> Iterator[Browser]:
    with chromium() as launched:
        yield launched


@pytest.fixture
def serve() -> Iterator[Any]:
    """``serve(*args, port=0)`` runs ``python -m trioserve serve``; returns (process, port)."""
    started: list[Example] = []

    def start(*args: str, port: int = 0) -> tuple[Example, int]:
        server = Example(["-m", "trioserve", "serve", "--port", str(port), *args])
        started.append(server)
        return server, int(server.wait_for(LISTENING).group(1))

    yield start
    for server in started:
        server.kill()
        assert server.proc.stdout is not None
        server.proc.stdout.close()


def publish(port: int, topic: str, data: Any) -> dict[str, Any]:
    body = json.dumps({"topic": topic, "data": data}).encode()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/publish", body, timeout=10) as resp:
        result: dict[str, Any] = json.load(resp)
        return result


# Runs in the page: import the client from the server, subscribe, record everything.
SUBSCRIBE = """async (url) => {
    const { Client } = await import("/trioserve.js");
    window.events = [];
    const client = new Client(url, { minReconnectDelay: 20, maxReconnectDelay: 200 });
    window.client = client;
    client.on("state", (state) => window.events.push({ kind: "state", state }));
    const sub = client.subscribe("news", {
        onPublication: (pub) => window.events.push({ kind: "pub", offset: pub.offset, data: pub.data }),
        onGap: (gap) => window.events.push({ kind: "gap", lastOffset: gap.lastOffset, offset: gap.offset }),
        onSubscribed: (info) => window.events.push({ kind: "subscribed", resubscribed: info.resubscribed }),
    });
    await sub.ready;
    return (await client.publish("news", "from the page")).offset;
}"""


def events(page: Page, kind: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = page.evaluate("(kind) => window.events.filter((e) => e.kind === kind)",
                                                kind)
    return found


def wait_count(page: Page, kind: str, count: int) -> None:
    page.wait_for_function("([kind, count]) => window.events.filter((e) => e.kind === kind).length >= count",
                           arg=[kind, count], timeout=TIMEOUT_MS)


def restart_and_see_the_gap(page: Page, server: Any, serve: Any, port: int, *args: str) -> None:
    """Stop *server* and start a new one on *port* (in-memory hub: history gone); the
    page resubscribes by itself and is told of the gap before the next publication."""
    assert server.stop() == 0, server.output
    serve(*args, port=port)
    page.wait_for_function("() => window.events.some((e) => e.kind === 'subscribed' && e.resubscribed)",
                           timeout=TIMEOUT_MS)
    publish(port, "news", "after the restart")
    wait_count(page, "pub", 6)
    assert events(page, "gap") == [{"kind": "gap", "lastOffset": 5, "offset": 0}]
    assert events(page, "pub")[-1] == {"kind": "pub", "offset": 1, "data": "after the restart"}


def test_a_page_imports_the_client_and_receives_publications(browser: Browser, serve: Any) -> None:
    port = free_port()  # chosen up front: the restarted server comes back on it
    server, _ = serve("--client-publish", "--drain-timeout", "3", port=port)
    page = browser.new_page()
    errors: list[Any] = []
    page.on("pageerror", lambda error: errors.append(error))
    page.goto(f"http://127.0.0.1:{port}/healthz")  # any page of the server's origin
    assert page.evaluate(SUBSCRIBE, f"ws://127.0.0.1:{port}/ws") == 1
    for n in range(2, 6):
        assert publish(port, "news", {"n": n})["offset"] == n
    wait_count(page, "pub", 5)
    assert [e["offset"] for e in events(page, "pub")] == [1, 2, 3, 4, 5]
    assert events(page, "pub")[0]["data"] == "from the page"

    # The server restarts (in-memory hub): the page reconnects by itself and is told of the gap.
    restart_and_see_the_gap(page, server, serve, port, "--client-publish")
    states = [e["state"] for e in events(page, "state")]
    assert states == ["connected", "connecting", "connected"], states
    page.evaluate("() => window.client.close()")
    assert errors == []


def test_a_page_of_another_origin_may_import_it(browser: Browser, serve: Any) -> None:
    _, port = serve()
    other = serve()[1]
    page = browser.new_page()
    page.goto(f"http://127.0.0.1:{other}/healthz")
    # Another origin (another port): a module import needs the CORS header.
    kind = page.evaluate("async (src) => typeof (await import(src)).Client", f"http://127.0.0.1:{port}/trioserve.js")
    assert kind == "function"


def test_a_page_falls_back_to_sse_where_websocket_is_blocked(browser: Browser, serve: Any) -> None:
    """No WebSocket on the client's URL (as behind a proxy that refuses upgrades):
    subscriptions go over Chromium's own EventSource to /sse, publish over HTTP,
    and EventSource's reconnect (Last-Event-ID) after a restart reports the gap."""
    port = free_port()
    server, _ = serve("--drain-timeout", "3", port=port)
    page = browser.new_page()
    errors: list[Any] = []
    page.on("pageerror", lambda error: errors.append(error))
    page.goto(f"http://127.0.0.1:{port}/healthz")
    assert page.evaluate(SUBSCRIBE, f"ws://127.0.0.1:{port}/blocked") == 1
    assert page.evaluate("() => window.client.transport") == "sse"
    for n in range(2, 6):
        assert publish(port, "news", {"n": n})["offset"] == n
    wait_count(page, "pub", 5)
    assert [e["offset"] for e in events(page, "pub")] == [1, 2, 3, 4, 5]

    restart_and_see_the_gap(page, server, serve, port)
    page.evaluate("() => window.client.close()")
    assert errors == []
