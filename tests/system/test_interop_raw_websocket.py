"""A hand-written RFC 6455 client: the framing cases client libraries rarely produce."""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio
from trio_websocket import open_websocket_url

from ..peers import (
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    ByteReader,
    NdjsonClient,
    RawWebSocket,
    dumps,
    encode_frame,
    open_socket,
    upgrade_head,
)

pytestmark = pytest.mark.system


async def test_frame_sent_with_the_upgrade_request_is_not_lost(start_server: Any) -> None:
    # A client may pipeline its first frame behind the handshake; those bytes
    # arrive with the request and must be handed to the WebSocket parser.
    rs = await start_server()
    with trio.fail_after(15):
        stream = await open_socket(rs.port)
        async with stream:
            head, _ = upgrade_head(rs.port)
            first = encode_frame(OP_TEXT, dumps({"op": "subscribe", "topic": "early", "id": 1}).encode())
            await stream.send_all(head + first)
            reader = ByteReader(stream)
            resp = await reader.read_until(b"\r\n\r\n")
            assert resp is not None and resp.startswith(b"HTTP/1.1 101 "), resp
            ws = RawWebSocket(stream, reader)
            assert await ws.recv_json() == {"id": 1, "ok": True, "topic": "early",
                "epoch": rs.server.hub.epoch_of("t"), "offset": 0}


async def test_fragmented_message_with_interleaved_ping(start_server: Any) -> None:
    rs = await start_server(max_message_size=1024)
    with trio.fail_after(15):
        ws = await RawWebSocket.connect(rs.port)
        async with ws.stream:
            msg = dumps({"op": "subscribe", "topic": "frag", "id": "f", "pad": "p" * 900}).encode()
            assert len(msg) <= 1024
            await ws.send_frame(OP_TEXT, msg[:300], fin=False)
            # Control frames may come between the fragments of a message.
            await ws.send_frame(OP_PING, b"mid")
            await ws.send_frame(OP_CONT, msg[300:700], fin=False)
            await ws.send_frame(OP_CONT, msg[700:], fin=True)
            pong = await ws.recv_frame()
            assert (pong.opcode, pong.payload) == (OP_PONG, b"mid")
            assert await ws.recv_json() == {"id": "f", "ok": True, "topic": "frag",
                "epoch": rs.server.hub.epoch_of("t"), "offset": 0}


async def test_client_close_is_echoed(start_server: Any) -> None:
    rs = await start_server()
    with trio.fail_after(15):
        ws = await RawWebSocket.connect(rs.port)
        async with ws.stream:
            await ws.send_close(4321, "app reason")
            frame = await ws.recv_frame()
            assert frame.opcode == OP_CLOSE and frame.close_code == 4321, frame
            assert await ws.reader.fill() is False, "server should close TCP after the handshake"


@pytest.mark.parametrize("size", [125, 126, 65535, 65536, 300_000])
async def test_publication_sizes_around_length_encodings(start_server: Any, size: int) -> None:
    # 125/126 and 65535/65536 straddle the 7-bit, 16-bit and 64-bit length forms;
    # 300 kB is over one write, so it goes out in several partial sends.
    rs = await start_server()
    data = "d" * size
    with trio.fail_after(15):
        raw = await RawWebSocket.connect(rs.port)
        tcp = await NdjsonClient.connect(rs.tcp_port)
        async with raw.stream, tcp.stream, open_websocket_url(rs.ws_url, max_message_size=1 << 20) as tws:
            await raw.send_json({"op": "subscribe", "topic": "big", "id": 1})
            assert (await raw.recv_json())["ok"] is True
            await tcp.send({"op": "subscribe", "topic": "big", "id": 1})
            assert (await tcp.recv())["ok"] is True
            await tws.send_message(dumps({"op": "subscribe", "topic": "big", "id": 1}))
            assert json.loads(await tws.get_message())["ok"] is True

            # Two in one batch, so a large batch is split without reordering.
            rs.server.hub.publish_nowait("big", data)
            rs.server.hub.publish_nowait("big", data[::-1] + "!")
            expected = [
                {"op": "pub", "topic": "big", "offset": 1, "data": data},
                {"op": "pub", "topic": "big", "offset": 2, "data": data[::-1] + "!"},
            ]
            assert [await raw.recv_json() for _ in range(2)] == expected
            assert [await tcp.recv() for _ in range(2)] == expected
            assert [json.loads(await tws.get_message()) for _ in range(2)] == expected
