"""Reference competitor: a websockets (asyncio) server using ``broadcast()``.

Implements only the subset of trioserve's wire protocol the fan-out benchmark
uses: ``subscribe`` and ``publish`` on ``/ws``, one JSON object per text frame.

Run: ``python benchmarks/servers/ws_asyncio.py --host 127.0.0.1 --port 8765``
"""

from __future__ import annotations

import argparse
import asyncio
import http
import signal
from typing import Any

import orjson
from websockets.asyncio.server import ServerConnection, broadcast, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

topics: dict[str, set[ServerConnection]] = {}
offsets: dict[str, int] = {}


def dumps(obj: Any) -> str:
    return orjson.dumps(obj).decode()


def process_request(conn: ServerConnection, request: Request) -> Response | None:
    # Same readiness probe as trioserve, so the harness can treat servers alike.
    if request.path == "/healthz":
        return conn.respond(http.HTTPStatus.OK, "ok\n")
    if request.path != "/ws":
        return conn.respond(http.HTTPStatus.NOT_FOUND, "not found\n")
    return None


def handle(conn: ServerConnection, subscribed: set[str], req: dict[str, Any]) -> str:
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
        subs = topics.get(topic, set())
        # Encoded once per publication; broadcast() writes the same frame to all.
        message = dumps({"op": "pub", "topic": topic, "offset": offset, "data": req.get("data")})
        broadcast(subs, message)
        return dumps({"id": rid, "ok": True, "offset": offset, "subscribers": len(subs)})
    return dumps({"id": rid, "ok": False, "error": "unsupported op"})


async def handler(conn: ServerConnection) -> None:
    subscribed: set[str] = set()
    try:
        async for raw in conn:
            try:
                req = orjson.loads(raw)
            except orjson.JSONDecodeError:
                await conn.send(dumps({"ok": False, "error": "bad json"}))
                continue
            await conn.send(handle(conn, subscribed, req))
    except ConnectionClosed:
        pass  # the load client drops connections without a close handshake
    finally:
        for topic in subscribed:
            topics.get(topic, set()).discard(conn)


async def main(host: str, port: int, deflate: bool = False) -> None:
    stop = asyncio.get_running_loop().create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set_result, None)
    # backlog: asyncio's default of 100 would turn a burst of concurrent
    # connects into SYN retransmits, which measures the kernel, not the server.
    # --deflate: the library's permessage-deflate, a compressor per connection.
    async with serve(handler, host, port, compression="deflate" if deflate else None,
                     process_request=process_request,
                     backlog=4096):
        await stop


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--deflate", action="store_true", help="accept permessage-deflate")
    args = parser.parse_args()
    asyncio.run(main(args.host, args.port, args.deflate))
