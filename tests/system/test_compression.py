"""permessage-deflate end to end: the websockets library and Node's ``ws``
negotiate it and read every message of a burst, large and small, and publish
compressed; a zip bomb gets 1009, RSV1 without negotiation 1002, and
``compression = false`` negotiates nothing. Chromium is in
test_compression_browser.py.
"""

from __future__ import annotations

import json
import zlib
from typing import Any

import pytest
import trio
from websockets.exceptions import ConnectionClosedError
from websockets.sync.client import connect

from trioserve.net.websocket import DeflateWebSocketConnection, WebSocketConnection

from ..peers import ByteReader, RawWebSocket, dumps
from .test_interop_node import CLIENT, node  # noqa: F401 (node is a fixture)

pytestmark = pytest.mark.system

CLIENT_TIMEOUT = 10.0
DEFLATE_NODE = CLIENT.parent / "deflate.mjs"
OFFER = ("Sec-WebSocket-Extensions", "permessage-deflate; client_max_window_bits")


def big(i: int) -> dict[str, Any]:
    """About 1 KB of JSON: a leaderboard, as a game or a dashboard would push."""
    return {"type": "leaderboard", "seq": i, "entries": [
        {"rank": k + 1, "player": f"player_{(i * 37 + k * 1009) % 9999:04d}",
         "team": ["red", "blue", "gold"][k % 3],
         "score": (i * 131 + k * 977) % 99999, "kills": (i + k) % 40, "status": "alive"} for k in range(9)]}


def burst(n: int) -> list[Any]:
    return [big(i) if i % 2 == 0 else {"i": i, "small": True} for i in range(n)]


def _websockets_burst(url: str, n: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with connect(url, open_timeout=CLIENT_TIMEOUT) as sub, connect(url, open_timeout=CLIENT_TIMEOUT) as pub:
        out["extensions"] = sub.response.headers.get("Sec-WebSocket-Extensions")
        sub.send(dumps({"op": "subscribe", "topic": "t", "id": "sub"}))
        assert json.loads(sub.recv(timeout=CLIENT_TIMEOUT))["ok"] is True
        # The websockets library compresses every message it sends, small ones too.
        for i, data in enumerate(burst(n)):
            pub.send(dumps({"op": "publish", "topic": "t", "data": data, "id": i}))
        out["replies"] = [json.loads(pub.recv(timeout=CLIENT_TIMEOUT)) for _ in range(n)]
        out["received"] = [json.loads(sub.recv(timeout=CLIENT_TIMEOUT))["data"] for _ in range(n)]
    return out


async def test_websockets_library_negotiates_reads_a_burst_and_publishes_compressed(
        start_server: Any) -> None:
    rs = await start_server(client_publish=True)
    n = 60
    with trio.fail_after(30):
        out = await trio.to_thread.run_sync(_websockets_burst, rs.ws_url, n)
    assert out["extensions"] == "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
    assert all(r.get("ok") for r in out["replies"]), out["replies"]
    assert out["received"] == burst(n)


def _send_bomb(url: str) -> tuple[int | None, str | None]:
    with connect(url, open_timeout=CLIENT_TIMEOUT) as ws:
        ws.send("a" * 10_000_000)  # ~10 KB on the wire
        try:
            ws.recv(timeout=CLIENT_TIMEOUT)
        except ConnectionClosedError as exc:
            assert exc.rcvd is not None
            return exc.rcvd.code, exc.rcvd.reason
    return None, None


async def test_a_zip_bomb_from_a_compressing_client_closes_1009(start_server: Any) -> None:
    rs = await start_server(max_message_size=64 * 1024)
    with trio.fail_after(30):
        code, reason = await trio.to_thread.run_sync(_send_bomb, rs.ws_url)
    assert (code, reason) == (1009, "message too big")
    # The server carries on: a new client is served.
    ws = await RawWebSocket.connect(rs.port)
    await ws.send_json({"op": "ping", "id": 1})
    assert (await ws.recv_json())["id"] == 1


def _plain_flow(url: str) -> tuple[str | None, Any]:
    with connect(url, open_timeout=CLIENT_TIMEOUT) as ws:
        ws.send(dumps({"op": "ping", "id": 1}))
        reply = json.loads(ws.recv(timeout=CLIENT_TIMEOUT))
        return ws.response.headers.get("Sec-WebSocket-Extensions"), reply


async def test_compression_off_negotiates_nothing(start_server: Any) -> None:
    rs = await start_server(compression=False)
    with trio.fail_after(30):
        header, reply = await trio.to_thread.run_sync(_plain_flow, rs.ws_url)
    assert header is None
    assert reply["id"] == 1
    # A raw offer gets no extension either, and the connection is a plain one.
    ws = await RawWebSocket.connect(rs.port, headers=[OFFER])
    await ws.send_json({"op": "ping", "id": 2})
    assert (await ws.recv_json())["id"] == 2
    assert [type(c) for c in rs.server.connections] == [WebSocketConnection]


async def test_rsv1_without_negotiation_closes_1002(start_server: Any) -> None:
    rs = await start_server()
    ws = await RawWebSocket.connect(rs.port)  # offers no extension
    body = zlib.compressobj(6, zlib.DEFLATED, -15)
    payload = body.compress(b'{"op":"ping","id":1}') + body.flush(zlib.Z_SYNC_FLUSH)
    # A masked (mask 0) text frame with RSV1.
    await ws.send_raw(bytes([0xC1, 0x80 | len(payload[:-4])]) + b"\0\0\0\0" + payload[:-4])
    frames = await ws.read_until_eof()
    assert frames[-1].close_code == 1002


async def read_frame(reader: ByteReader) -> tuple[int, bytes]:
    """One server frame as (first byte, payload), RSV bits allowed."""
    b0, b1 = await reader.read_exactly(2)
    n = b1 & 0x7F
    if n == 126:
        n = int.from_bytes(await reader.read_exactly(2), "big")
    elif n == 127:
        n = int.from_bytes(await reader.read_exactly(8), "big")
    return b0, await reader.read_exactly(n)


async def test_compressed_and_plain_subscribers_share_a_topic_and_bytes_shrink(start_server: Any) -> None:
    rs = await start_server()
    plain = await RawWebSocket.connect(rs.port)
    packed = [await RawWebSocket.connect(rs.port, headers=[OFFER]) for _ in range(3)]
    for i, ws in enumerate([plain, *packed]):
        await ws.send_json({"op": "subscribe", "topic": "t", "id": i})
        assert (await ws.recv_json())["ok"] is True
    assert sorted(type(c).__name__ for c in rs.server.connections) == \
        ["DeflateWebSocketConnection"] * 3 + ["WebSocketConnection"]
    n = 40
    for data in burst(n):
        rs.server.hub.publish_nowait("t", data)
    got_plain = [json.loads(await plain.recv_message())["data"] for _ in range(n)]
    assert got_plain == burst(n)
    for ws in packed:
        wire = raw = 0
        got = []
        for _ in range(n):
            first, body = await read_frame(ws.reader)
            assert first & 0x0F == 1 and first & 0x80
            if first & 0x40:
                text = zlib.decompressobj(-15).decompress(body + b"\0\0\xff\xff")
            else:
                text = body
            msg = json.loads(text)
            got.append(msg["data"])
            # Large publications are compressed, small ones are not.
            assert bool(first & 0x40) == (len(text) >= 256), (len(text), first)
            if first & 0x40:
                wire += len(body)
                raw += len(text)
        assert got == burst(n)
        assert wire <= 0.4 * raw, (wire, raw)
    # The hub compressed once per batch for the three of them, not once per subscriber.
    assert {c.framing for c in rs.server.connections if isinstance(c, DeflateWebSocketConnection)} \
        == {DeflateWebSocketConnection.framing}


async def test_node_ws_negotiates_reads_a_burst_and_publishes_compressed(
    node: str, start_server: Any  # noqa: F811
) -> None:
    rs = await start_server(client_publish=True)
    n = 40
    with trio.fail_after(30):
        proc = await trio.run_process([node, str(DEFLATE_NODE), rs.ws_url, "t", str(n), "20000"],
                                      capture_stdout=True, capture_stderr=True, check=False)
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    out = json.loads(proc.stdout.decode().splitlines()[-1])
    assert out["extensions"] == "permessage-deflate"
    assert out["publisherExtensions"] == "permessage-deflate"
    assert out["replies"] == n
    expected = [{"i": i, "small": True} if i % 2 else None for i in range(n)]
    assert [d["i"] for d in out["received"]] == list(range(n))
    assert all(d == e for d, e in zip(out["received"], expected, strict=True) if e is not None)
    assert all(len(d["entries"]) == 12 for d in out["received"][::2])




@pytest.mark.parametrize("offer", [
    "permessage-deflate; bogus_param",
    "permessage-deflate; server_max_window_bits=10",
    'permessage-deflate; client_max_window_bits="',
])
async def test_an_unacceptable_offer_is_declined_and_the_handshake_succeeds(
        start_server: Any, offer: str) -> None:
    rs = await start_server()
    ws = await RawWebSocket.connect(rs.port, headers=[("Sec-WebSocket-Extensions", offer)])
    await ws.send_json({"op": "ping", "id": 1})
    assert (await ws.recv_json())["id"] == 1  # recv_frame asserts that RSV bits stay 0
    assert [type(c) for c in rs.server.connections] == [WebSocketConnection]
