"""Naive competitor: trio-websocket, awaiting ``send_message`` per subscriber.

This is the straightforward way to fan out with trio-websocket: the publishing
connection's task loops over the subscribers and awaits each send in turn, so
one slow subscriber stalls the whole publication. It implements only the
subset of trioserve's wire protocol the fan-out benchmark uses.

Run: ``python benchmarks/servers/trio_websocket_naive.py --host 127.0.0.1 --port 8765``
"""

from __future__ import annotations

import argparse
from functools import partial
from typing import Any

import orjson
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest, serve_websocket

topics: dict[str, set[WebSocketConnection]] = {}
offsets: dict[str, int] = {}


def dumps(obj: Any) -> str:
    return orjson.dumps(obj).decode()


async def fan_out(topic: str, message: str) -> int:
    subs = topics.get(topic, set())
    for sub in list(subs):
        try:
            await sub.send_message(message)
        except ConnectionClosed:
            subs.discard(sub)
    return len(subs)


async def handle(conn: WebSocketConnection, subscribed: set[str], req: dict[str, Any]) -> str:
    """Apply one client request; return the reply frame."""
    op, topic, rid = req.get("op"), req.get("topic"), req.get("id")
    if not isinstance(topic, str):
        return dumps({"id": rid, "ok": False, "error": "bad topic"})
    if op == "subscribe":
        topics.setdefault(topic, set()).add(conn)
        subscribed.add(topic)
        return dumps({"id": rid, "ok": True, "topic": topic})
    if op == "publish":
        offset = offsets.get(topic, 0) + 1
        offsets[topic] = offset
        # Encoded once per publication, then sent subscriber by subscriber.
        message = dumps({"op": "pub", "topic": topic, "offset": offset, "data": req.get("data")})
        count = await fan_out(topic, message)
        return dumps({"id": rid, "ok": True, "offset": offset, "subscribers": count})
    return dumps({"id": rid, "ok": False, "error": "unsupported op"})


async def handler(request: WebSocketRequest) -> None:
    if request.path != "/ws":
        await request.reject(404, body=b"not found\n")
        return
    conn = await request.accept()
    subscribed: set[str] = set()
    try:
        while True:
            raw = await conn.get_message()
            try:
                req = orjson.loads(raw)
            except orjson.JSONDecodeError:
                await conn.send_message(dumps({"ok": False, "error": "bad json"}))
                continue
            await conn.send_message(await handle(conn, subscribed, req))
    except ConnectionClosed:
        pass
    finally:
        for topic in subscribed:
            topics.get(topic, set()).discard(conn)


async def main(host: str, port: int) -> None:
    await serve_websocket(handler, host, port, ssl_context=None)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args()
    try:
        trio.run(partial(main, args.host, args.port))
    except KeyboardInterrupt:
        pass
