"""Chromium's WebSocket negotiates permessage-deflate with trioserve by itself,
reads a burst of large and small publications, and publishes compressed.

Synchronous: Playwright's sync API runs its own loop, and the server is a
``python -m trioserve`` process.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from ..browser import TIMEOUT_MS, chromium
from ..serverproc import LISTENING

pytestmark = pytest.mark.system

PAGE_SCRIPT = """
async ([n]) => {
  const url = `ws://${location.host}/ws`;
  const open = (ws) => new Promise((ok, fail) => { ws.onopen = ok; ws.onerror = fail; });
  const sub = new WebSocket(url), pub = new WebSocket(url);
  await Promise.all([open(sub), open(pub)]);
  const big = (i) => ({ i, entries: Array.from({ length: 12 }, (_, k) => ({
    rank: k + 1, player: `player_${(i * 37 + k) % 9999}`, team: ['red', 'blue'][k % 2],
    score: (i * 131 + k * 977) % 99999, status: 'alive' })) });
  const received = [];
  await new Promise((done) => {
    sub.onmessage = (ev) => {
      const msg = JSON.parse(ev.data);
      if (msg.id === 'sub') {
        for (let i = 0; i < n; i++) {
          pub.send(JSON.stringify({ op: 'publish', topic: 'b', id: i, data: i % 2 ? { i } : big(i) }));
        }
      } else if (msg.op === 'pub') {
        received.push(msg.data);
        if (received.length === n) done();
      }
    };
    sub.send(JSON.stringify({ op: 'subscribe', topic: 'b', id: 'sub' }));
  });
  const result = { sub: sub.extensions, pub: pub.extensions, received };
  sub.close(); pub.close();
  return result;
}
"""


def _serve(*args: str) -> Iterator[int]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIOSERVE_")}
    proc = subprocess.Popen([sys.executable, "-m", "trioserve", "serve", "--port", "0", "--client-publish",
                             *args], stderr=subprocess.PIPE, env=env)
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            match = LISTENING.search(line)
            if match:
                yield int(match.group(1))
                return
        raise AssertionError("the server exited before listening")
    finally:
        proc.terminate()
        proc.wait(timeout=20)


@pytest.fixture
def port() -> Iterator[int]:
    yield from _serve()


@pytest.fixture
def plain_port() -> Iterator[int]:
    yield from _serve("--no-compression")


def _run_page(port: int, n: int) -> dict[str, Any]:
    with chromium() as browser:
        page = browser.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(f"http://127.0.0.1:{port}/healthz")
        result: dict[str, Any] = page.evaluate(PAGE_SCRIPT, [n])
        return result


def test_chromium_negotiates_and_reads_every_message(port: int) -> None:
    n = 40
    result = _run_page(port, n)
    assert re.fullmatch(r"permessage-deflate; server_no_context_takeover; client_no_context_takeover",
                        result["sub"]), result["sub"]
    assert result["pub"] == result["sub"]
    assert [d["i"] for d in result["received"]] == list(range(n))
    assert all(len(d["entries"]) == 12 for d in result["received"][::2])


def test_chromium_without_compression_still_works(plain_port: int) -> None:
    result = _run_page(plain_port, 4)
    assert result["sub"] == ""
    assert [d["i"] for d in result["received"]] == list(range(4))
