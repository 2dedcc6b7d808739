"""The example chat end to end, in a real browser.

Headless Chromium from Debian (``apt-get install chromium``, which scripts/test
does) driven by Playwright's synchronous API; the chat server and the terminal
client run as processes, as a user would start them. Playwright's own browser
downloads are never used.

The test is synchronous on purpose: Playwright's sync API runs its own event
loop, and everything else here is a subprocess.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ..browser import TIMEOUT_MS, chromium
from .conftest import REPO, Example, free_port

# isort: off
# After ..browser, whose import skips this module where the browser is missing.
from playwright.sync_api import Browser, Locator, Page, expect
# isort: on

pytestmark = pytest.mark.system


@pytest.fixture
def browser() -> Iterator[Browser]:
    expect.set_options(timeout=TIMEOUT_MS)
    with chromium() as launched:
        yield launched


@pytest.fixture
def artifacts(tmp_path: Path) -> Path:
    """Where screenshots go: artifacts/ in CI (kept by the job), else pytest's tmp dir."""
    if os.environ.get("CI"):
        path = REPO / "artifacts"
        path.mkdir(exist_ok=True)
        return path
    return tmp_path


class ChatPage:
    """One browser tab with the chat, in a context of its own (its own localStorage)."""

    def __init__(self, browser: Browser, url: str, nick: str) -> None:
        self.context = browser.new_context(viewport={"width": 1120, "height": 680})
        self.context.set_default_timeout(TIMEOUT_MS)
        self.page: Page = self.context.new_page()
        self.errors: list[Any] = []
        self.page.on("pageerror", lambda error: self.errors.append(error))
        self.page.goto(url)
        self.page.fill("#nick-input", nick)
        self.page.press("#nick-input", "Enter")
        self.expect_online()

    @property
    def log(self) -> Locator:
        return self.page.locator(".log:not([hidden])")

    @property
    def members(self) -> Locator:
        return self.page.locator("#member-list .member-name")

    def say(self, text: str) -> None:
        self.page.fill("#message", text)
        self.page.press("#message", "Enter")
        # Cleared once the server has accepted it.
        expect(self.page.locator("#message")).to_have_value("")

    def expect_online(self) -> None:
        expect(self.page.locator("#status")).to_have_text("Online")

    def expect_reconnecting(self) -> None:
        expect(self.page.locator("#status")).to_have_text("Reconnecting…")


def start_chat(run_example: type[Example], port: int) -> Example:
    server = run_example(["-m", "examples.chat", "--port", str(port), "--drain-timeout", "3"])
    server.wait_for(r"chat running: open http://127\.0\.0\.1:\d+/")
    return server


def test_two_pages_and_a_terminal(browser: Browser, run_example: type[Example], artifacts: Path) -> None:
    port = free_port()  # chosen up front: the restarted server must come back on it
    server = start_chat(run_example, port)
    base = f"http://127.0.0.1:{port}"
    alice = ChatPage(browser, f"{base}/#lobby", "alice")
    bob = ChatPage(browser, f"{base}/#lobby", "bob")
    carol = run_example(["-m", "examples.chat.client", "--url", base, "--room", "lobby", "--nick", "carol"],
                        stdin=True)
    carol.wait_for(r"-- members of #lobby: alice, bob, carol")

    # The member lists follow the joins.
    for page in (alice, bob):
        expect(page.members).to_have_text(["alice", "bob", "carol"])
    expect(alice.log).to_contain_text("bob joined")
    expect(alice.log).to_contain_text("carol joined")

    # Messages flow in every direction.
    alice.say("hello from alice")
    expect(bob.log).to_contain_text("hello from alice")
    carol.wait_for(r"\[lobby\] <alice> hello from alice")
    bob.say("/me waves at everyone")
    expect(alice.log.locator("li.me").last).to_contain_text("bob")
    expect(alice.log.locator("li.me").last).to_contain_text("waves at everyone")
    carol.wait_for(r"\[lobby\] \* bob waves at everyone")
    carol.send_line("hello from the terminal")
    for page in (alice, bob):
        expect(page.log).to_contain_text("hello from the terminal")

    # Markup in a message is shown as text, and nothing in it runs.
    payload = '<img src=x onerror="window.pwned=1"><script>window.pwned=2</script><b>bold?</b>'
    bob.say(payload)
    for page in (alice, bob):
        expect(page.log.locator(".text").last).to_have_text(payload)
        expect(page.log.locator("img, script, b")).to_have_count(0)
        assert page.page.evaluate("window.pwned") is None
    carol.wait_for(re.escape(f"<bob> {payload}"))

    # Leaving updates the member lists.
    carol.send_line("/quit")
    assert carol.wait() == 0, carol.output
    for page in (alice, bob):
        expect(page.members).to_have_text(["alice", "bob"])
        expect(page.log).to_contain_text("carol left")

    # A dropped connection comes back and recovers what was missed from history.
    alice.context.set_offline(True)
    alice.page.evaluate("window.chat.ws.close()")
    alice.expect_reconnecting()
    bob.say("said while alice was offline")
    alice.context.set_offline(False)
    alice.expect_online()
    expect(alice.log).to_contain_text("said while alice was offline")
    expect(alice.log.locator(".divider")).to_have_count(0)  # recovered: no gap to report

    # The server restarts while alice is away; bob is back first and talks.
    alice.context.set_offline(True)
    assert server.stop() == 0, server.output
    for page in (alice, bob):
        page.expect_reconnecting()
    start_chat(run_example, port)
    bob.expect_online()
    expect(bob.members).to_have_text(["bob"])
    bob.say("said after the restart")
    alice.context.set_offline(False)
    alice.expect_online()
    # Its history went with the old server: alice says so and shows what was said since.
    expect(alice.log.locator(".divider")).to_have_text(re.compile("the server restarted"))
    expect(alice.log).to_contain_text("said after the restart")
    expect(alice.members).to_have_text(["alice", "bob"])
    alice.say("back again")
    expect(bob.log).to_contain_text("back again")

    alice.page.screenshot(path=artifacts / "chat.png")
    assert (artifacts / "chat.png").stat().st_size > 10_000
    for page in (alice, bob):
        assert page.errors == []


def test_nick_taken_and_slow_down(browser: Browser, run_example: type[Example]) -> None:
    port = free_port()
    start_chat(run_example, port)
    base = f"http://127.0.0.1:{port}"
    first = ChatPage(browser, f"{base}/#lobby", "sam")
    second = ChatPage(browser, f"{base}/#lobby", "Sam")
    expect(second.log.locator("li.error")).to_contain_text("Sam is already in #lobby")
    second.say("/nick samantha")
    expect(first.members).to_have_text(["sam", "samantha"])
    expect(second.page.locator("#me")).to_have_text("as samantha")

    # Eight messages in one go (faster than Playwright can type them): five get
    # through, the others are refused politely.
    first.page.evaluate("""() => {
        const input = document.getElementById("message");
        for (let i = 0; i < 8; i++) {
            input.value = `burst ${i}`;
            document.getElementById("composer").requestSubmit();
        }
    }""")
    expect(first.log.locator("li.error")).to_have_count(3)
    expect(first.log.locator("li.error").last).to_contain_text("Wait a moment")
    expect(second.log).to_contain_text("burst 4")
    expect(second.log).not_to_contain_text("burst 5")
    assert first.errors == [] and second.errors == []
