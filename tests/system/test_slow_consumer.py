"""Slow consumers: a client that stops reading must not hold up the others.

The slow client is a hand-made WebSocket over a socket with a tiny receive
buffer, so the kernel stops taking data soon and the server's own queue for it
fills; a trio-websocket subscriber on the same topic reads normally.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
import trio
from trio_websocket import WebSocketConnection, open_websocket_url

from trioserve import Connection, ConnectionState

from ..peers import OP_CLOSE, OP_TEXT, NdjsonClient, RawWebSocket, dumps, open_socket
from .helpers import wait_until

pytestmark = pytest.mark.system

QUEUE_MAX_BYTES = 64 * 1024
PAYLOAD = "z" * 4000
# Publications per round: 16 KB, well under the queue limit, so the reading
# subscriber's queue never comes near it while the slow one's grows.
ROUND = 4
# Upper bound on publications before the test gives up: kernel buffers on
# loopback can absorb a few MB before the server has to queue.
MAX_PUBLICATIONS = 8000
TOPIC = "firehose"


async def _connect_slow(port: int) -> RawWebSocket:
    ws = await RawWebSocket.connect(port, rcvbuf=4096)
    await ws.send_json({"op": "subscribe", "topic": TOPIC, "id": "slow"})
    reply = await ws.recv_json()
    assert reply["ok"] is True and reply["id"] == "slow" and reply["offset"] == 0
    return ws


def _server_side(rs: Any, ws: RawWebSocket) -> Connection:
    conns: list[Connection] = [c for c in rs.server.connections if c.remote == f"127.0.0.1:{ws.local_port}"]
    assert len(conns) == 1, rs.server.connections
    return conns[0]


async def _publish_round(rs: Any, fast: WebSocketConnection, offset: int) -> int:
    """Publish one round and read it back from *fast*; return the last offset."""
    for _ in range(ROUND):
        offset = rs.server.hub.publish_nowait(TOPIC, {"n": offset + 1, "pad": PAYLOAD}).offset
    # Waiting for the reader paces the publisher, instead of a sleep.
    for expected in range(offset - ROUND + 1, offset + 1):
        msg = json.loads(await fast.get_message())
        assert (msg["op"], msg["offset"], msg["data"]["n"]) == ("pub", expected, expected)
    return offset


async def _publish_until(rs: Any, fast: WebSocketConnection, done: Callable[[], bool]) -> int:
    offset = 0
    while not done():
        assert offset < MAX_PUBLICATIONS, "the slow client's queue never hit its limit"
        offset = await _publish_round(rs, fast, offset)
    return offset


async def _publish_rounds(rs: Any, fast: WebSocketConnection, rounds: int, offset: int) -> int:
    for _ in range(rounds):
        offset = await _publish_round(rs, fast, offset)
    return offset


async def test_slow_consumer_is_closed_4008_while_others_get_everything(start_server: Any) -> None:
    # close_timeout is long so the server still holds the close frame for the
    # slow client when it finally reads.
    rs = await start_server(queue_max_bytes=QUEUE_MAX_BYTES, close_timeout=20)
    with trio.fail_after(30):
        slow = await _connect_slow(rs.port)
        async with slow.stream, open_websocket_url(rs.ws_url) as fast:
            await fast.send_message(dumps({"op": "subscribe", "topic": TOPIC, "id": 1}))
            assert json.loads(await fast.get_message())["ok"] is True
            conn = _server_side(rs, slow)

            last = await _publish_until(rs, fast, lambda: conn.state is not ConnectionState.OPEN)
            stats = conn.statistics()
            assert stats.slow_consumer is True
            assert stats.close_code == 4008
            assert rs.server.hub.subscriber_count(TOPIC) == 2  # still subscribed until it is gone
            # The other subscriber keeps getting everything after the slow one is cut off.
            last = await _publish_rounds(rs, fast, 3, last)

            # The slow client catches up: whole publications, a gapless prefix, then 4008.
            offsets: list[int] = []
            while True:
                frame = await slow.recv_frame()
                if frame.opcode != OP_TEXT:
                    break
                assert frame.fin
                offsets.append(frame.json()["offset"])
            assert frame.opcode == OP_CLOSE, frame
            assert (frame.close_code, frame.close_reason) == (4008, "slow consumer")
            assert offsets == list(range(1, len(offsets) + 1))
            assert 0 < len(offsets) < last
            await slow.send_close(4008)
            await wait_until(lambda: conn not in rs.server.connections, what="slow client to be dropped")
            assert conn.state is ConnectionState.CLOSED
            assert rs.server.hub.subscriber_count(TOPIC) == 1
            assert await slow.reader.fill() is False, "expected EOF after the close handshake"

            await fast.send_message(dumps({"op": "ping", "id": 2}))
            assert json.loads(await fast.get_message()) == {"id": 2, "ok": True, "op": "pong"}


async def test_drop_oldest_keeps_the_connection_open(start_server: Any) -> None:
    rs = await start_server(queue_max_bytes=QUEUE_MAX_BYTES, slow_consumer_policy="drop-oldest")
    with trio.fail_after(30):
        slow = await _connect_slow(rs.port)
        async with slow.stream, open_websocket_url(rs.ws_url) as fast:
            await fast.send_message(dumps({"op": "subscribe", "topic": TOPIC, "id": 1}))
            assert json.loads(await fast.get_message())["ok"] is True
            conn = _server_side(rs, slow)

            last = await _publish_until(rs, fast, lambda: conn.statistics().dropped_frames > 0)
            last = await _publish_rounds(rs, fast, 3, last)
            stats = conn.statistics()
            assert stats.state == "open" and stats.slow_consumer is False
            assert stats.close_code is None
            assert stats.queued_bytes <= QUEUE_MAX_BYTES + len(PAYLOAD) * 2

            # The reply goes behind the queued publications, so reading up to it reads them all.
            await slow.send_json({"op": "ping", "id": "after"})
            offsets: list[int] = []
            while True:
                msg = await slow.recv_json()
                if msg.get("op") != "pub":
                    break
                offsets.append(msg["offset"])
            assert msg == {"id": "after", "ok": True, "op": "pong"}
            assert offsets == sorted(set(offsets)), "offsets must be strictly increasing"
            assert offsets[0] == 1 and offsets[-1] == last
            dropped = conn.statistics().dropped_frames
            assert len(offsets) + dropped == last, (len(offsets), dropped, last)

            # Caught up, it gets new publications again, and it was never disconnected.
            rs.server.hub.publish_nowait(TOPIC, {"n": last + 1, "pad": ""})
            assert (await slow.recv_json())["offset"] == last + 1
            assert conn in rs.server.connections and conn.state is ConnectionState.OPEN


async def test_slow_tcp_consumer_gets_close_line_4008_after_its_backlog(start_server: Any) -> None:
    rs = await start_server(queue_max_bytes=QUEUE_MAX_BYTES, close_timeout=20)
    with trio.fail_after(30):
        slow = NdjsonClient(await open_socket(rs.tcp_port, rcvbuf=4096))
        async with slow.stream, open_websocket_url(rs.ws_url) as fast:
            await slow.send({"op": "subscribe", "topic": TOPIC, "id": 1})
            assert (await slow.recv())["ok"] is True
            await fast.send_message(dumps({"op": "subscribe", "topic": TOPIC, "id": 1}))
            assert json.loads(await fast.get_message())["ok"] is True
            (conn,) = [c for c in rs.server.connections if c.transport_name == "tcp"]

            last = await _publish_until(rs, fast, lambda: conn.state is not ConnectionState.OPEN)
            assert conn.statistics().slow_consumer is True
            last = await _publish_rounds(rs, fast, 3, last)

            offsets: list[int] = []
            while True:
                line = await slow.recv_line()
                assert line is not None, "EOF before the close line"
                msg = json.loads(line)
                if msg["op"] != "pub":
                    break
                offsets.append(msg["offset"])
            assert msg == {"op": "close", "code": 4008, "reason": "slow consumer"}
            assert offsets == list(range(1, len(offsets) + 1))
            assert 0 < len(offsets) < last
            assert await slow.recv_line() is None
        await wait_until(lambda: conn not in rs.server.connections, what="slow client to be dropped")
