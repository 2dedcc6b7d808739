"""A connection that negotiated permessage-deflate: compressed messages in and
out, and no zlib state kept while idle (what keeps RSS per idle compressed
connection within 9 KB; the fan-out benchmark measures the RSS itself)."""

from __future__ import annotations

import gc
import tracemalloc

import trio
from wsproto import ConnectionType
from wsproto.connection import Connection as WSConnection
from wsproto.events import TextMessage
from wsproto.extensions import PerMessageDeflate

from trioserve import Config
from trioserve.net.websocket import WEBSOCKET_DEFLATE, DeflateWebSocketConnection, WebSocketConnection

from ..helpers import PairFactory, echo, memory_pair, serve_conn

RESPONSE = "permessage-deflate; server_no_context_takeover; client_no_context_takeover"


def client() -> WSConnection:
    ext = PerMessageDeflate(client_no_context_takeover=True)
    ext.finalize(RESPONSE)
    return WSConnection(ConnectionType.CLIENT, [ext])


async def read_messages(ws: WSConnection, stream: trio.abc.Stream, n: int) -> tuple[list[str], bytes]:
    """*n* messages inflated by the client, and the raw bytes they came in."""
    out: list[str] = []
    raw = b""
    while len(out) < n:
        data = await stream.receive_some()
        raw += data
        ws.receive_data(data)
        out.extend(e.data for e in ws.events() if isinstance(e, TextMessage))
    return out, raw


async def test_compressed_messages_in_and_out(pair: PairFactory) -> None:
    transport, stream = pair(None)
    ws = client()
    long = "hello deflate " * 100
    async with trio.open_nursery() as nursery:
        conn = await nursery.start(serve_conn, DeflateWebSocketConnection, transport, Config(), echo)
        assert conn.framing is WEBSOCKET_DEFLATE
        data = ws.send(TextMessage(data=long)) + ws.send(TextMessage(data="short"))
        assert data[0] & 0x40  # the client compressed
        await stream.send_all(data)
        got, raw = await read_messages(ws, stream, 2)
        assert got == [long.upper(), "SHORT"]
        assert raw[0] == 0xC1  # the long reply went back compressed
        assert conn.send_encoded(b'{"op":"pub","x":1}')  # small: uncompressed
        got, raw = await read_messages(ws, stream, 1)
        assert raw[0] == 0x81 and got == ['{"op":"pub","x":1}']
        nursery.cancel_scope.cancel()


def _allocated(cls: type[WebSocketConnection], nursery: trio.Nursery, n: int,
               feed: bytes = b"") -> tuple[int, list[WebSocketConnection]]:
    gc.collect()
    before = tracemalloc.get_traced_memory()[0]
    conns = []
    for _ in range(n):
        transport, _stream = memory_pair()
        conn = cls(transport, Config(), nursery, "peer")
        if feed:
            conn._feed(feed)
        conns.append(conn)
    gc.collect()
    return tracemalloc.get_traced_memory()[0] - before, conns


async def test_an_idle_compressed_connection_holds_no_zlib_state() -> None:
    n = 200
    ws = client()
    compressed = ws.send(TextMessage(data="x" * 5000))
    assert compressed[0] & 0x40 and len(compressed) < 200
    tracemalloc.start()
    try:
        async with trio.open_nursery() as nursery:
            plain, keep1 = _allocated(WebSocketConnection, nursery, n)
            packed, keep2 = _allocated(DeflateWebSocketConnection, nursery, n)
            # After inflating a message (32 KB window, ~7 KB state while it lasts).
            _, keep3 = _allocated(DeflateWebSocketConnection, nursery, n, compressed)
            for conn in keep3:
                assert conn.receive_nowait() == "x" * 5000
            gc.collect()
            after_use_idle = tracemalloc.get_traced_memory()[0]
            del keep3
            gc.collect()
            after_use_idle -= tracemalloc.get_traced_memory()[0]
            nursery.cancel_scope.cancel()
    finally:
        tracemalloc.stop()
    assert keep1 and keep2
    # The extension object and wsproto's lists of it: a few hundred bytes, no zlib object.
    extra = (packed - plain) / n
    assert extra < 600, extra
    # Nothing of the message's decompressor stays (a kept one would be > 7 KB each).
    assert after_use_idle / n < packed / n + 1024, (after_use_idle / n, packed / n)
