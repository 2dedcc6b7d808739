"""WebSocketConnection: wsproto's events become messages, pongs and closes;
fragments are joined and measured against max_message_size in bytes."""

from __future__ import annotations

import pytest
import trio

from trioserve.protocol import websocket

from ...peers import OP_CLOSE, OP_CONT, OP_PING, OP_PONG, OP_TEXT
from ..helpers import PairFactory, start_ws


async def test_fragmented_message_is_joined(pair: PairFactory) -> None:
    async with trio.open_nursery() as nursery:
        _, peer = await start_ws(nursery, pair)
        await peer.send_frame(OP_TEXT, b"ab", fin=False)
        await peer.send_frame(OP_CONT, b"cd", fin=True)
        assert await peer.recv_message() == "ABCD"
        nursery.cancel_scope.cancel()


async def test_server_answers_pings(pair: PairFactory) -> None:
    async with trio.open_nursery() as nursery:
        _, peer = await start_ws(nursery, pair)
        await peer.send_frame(OP_PING, b"abc")
        frame = await peer.recv_frame()
        assert frame.opcode == OP_PONG and frame.payload == b"abc"
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("fragmented", [False, True])
async def test_message_too_big_closes_1009(pair: PairFactory, fragmented: bool) -> None:
    async with trio.open_nursery() as nursery:
        conn, peer = await start_ws(nursery, pair, max_message_size=100)
        await peer.send_text("ok")
        assert await peer.recv_message() == "OK"
        if fragmented:
            await peer.send_frame(OP_TEXT, b"a" * 60, fin=False)
            await peer.send_frame(OP_CONT, b"a" * 60, fin=True)
        else:
            await peer.send_text("a" * 101)
        frames = await peer.read_until_eof()
    assert frames[-1].opcode == OP_CLOSE and frames[-1].close_code == 1009
    assert conn.close_code == 1009


async def test_multibyte_text_is_measured_in_bytes(pair: PairFactory) -> None:
    async with trio.open_nursery() as nursery:
        _, peer = await start_ws(nursery, pair, max_message_size=100)
        await peer.send_text("é" * 50)  # 100 bytes: at the limit
        assert await peer.recv_message() == "É" * 50
        await peer.send_text("é" * 51)  # 102 bytes
        frames = await peer.read_until_eof()
    assert frames[-1].opcode == OP_CLOSE and frames[-1].close_code == 1009


async def test_invalid_utf8_closes_1007(pair: PairFactory) -> None:
    async with trio.open_nursery() as nursery:
        conn, peer = await start_ws(nursery, pair)
        # A masked text frame (mask 0) whose payload is not UTF-8.
        await peer.send_raw(b"\x81\x82\x00\x00\x00\x00\xff\xfe")
        frames = await peer.read_until_eof()
    assert frames[-1].opcode == OP_CLOSE and frames[-1].close_code == 1007
    assert conn.close_code == 1007


async def test_unmasked_client_frame_closes_1002(pair: PairFactory) -> None:
    async with trio.open_nursery() as nursery:
        conn, peer = await start_ws(nursery, pair)
        await peer.send_raw(websocket.text_frame(b"hi"))  # server-style: no mask
        frames = await peer.read_until_eof()
    assert frames[-1].opcode == OP_CLOSE and frames[-1].close_code == 1002
    assert conn.close_code == 1002
