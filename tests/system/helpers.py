"""System-test helpers that are not clients; the clients are in tests/peers.py."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import trio
import trio_websocket

from ..peers import RawWebSocket


async def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    """Poll *predicate* until it holds.

    Only for server-internal state that has no event a test could await (a
    connection leaving ``server.connections``); network replies are awaited.
    """
    with trio.move_on_after(timeout):
        while not predicate():
            await trio.sleep(0.005)
        return
    raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")


def close_code(exc: trio_websocket.ConnectionClosed) -> int | None:
    """The close code trio-websocket recorded (the one the server sent)."""
    return None if exc.reason is None else exc.reason.code


async def subscribe_reply(
    ws: RawWebSocket, topic: str, since: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Subscribe (with ``since`` for recovery) and return the reply, skipping anything before it."""
    cmd: dict[str, Any] = {"op": "subscribe", "topic": topic, "id": "sub"}
    if since is not None:
        cmd["since"] = since
    await ws.send_json(cmd)
    while True:
        msg = await ws.recv_json()
        if msg.get("id") == "sub":
            return msg  # type: ignore[no-any-return]


async def next_pub(ws: RawWebSocket) -> dict[str, Any]:
    """The next publication, skipping replies and events."""
    while True:
        msg = await ws.recv_json()
        if msg.get("op") == "pub":
            return msg  # type: ignore[no-any-return]
