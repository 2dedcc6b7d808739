"""WebSocketConnection: wsproto's events become messages, pongs and closes;
fragments are joined and measured against max_message_size in bytes."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from trioserve import Config, Connection, WebSocketConnection
from trioserve.protocol import websocket

from ...peers import OP_BINARY, OP_CLOSE, OP_CONT, OP_PING, OP_PONG, OP_TEXT, encode_frame
from ..helpers import PairFactory, memory_pair, start_ws


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


@pytest.mark.parametrize("fragmented", [False, True])
async def test_a_header_announcing_too_much_closes_1009_before_the_payload(
    pair: PairFactory, fragmented: bool
) -> None:
    # Bounded: without the header check the server would wait for the payload.
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            conn, peer = await start_ws(nursery, pair, max_message_size=100)
            if fragmented:
                await peer.send_frame(OP_TEXT, b"a" * 60, fin=False)
            # The header of a 10 MB frame (masked, mask 0), and not a byte of its payload.
            await peer.send_raw(bytes([0x00 if fragmented else 0x81, 0x80 | 127])
                                + (10_000_000).to_bytes(8, "big") + b"\0\0\0\0")
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


# --- the connection's own contract -----------------------------------------------------------


async def test_frames_that_came_with_the_upgrade_are_read_first() -> None:
    # The bytes after the 101's request head arrive with it; they must not be lost.
    transport, _client = memory_pair()
    early = encode_frame(OP_TEXT, b"early")
    async with trio.open_nursery() as nursery:
        conn = WebSocketConnection(transport, Config(), nursery, "peer", trailing_data=early)
        with trio.fail_after(1):
            assert await conn.receive() == "early"
        stats = conn.statistics()
        assert (stats.bytes_in, stats.messages_in) == (len(early), 1)
        nursery.cancel_scope.cancel()


async def test_text_is_a_text_frame_and_bytes_a_binary_frame() -> None:
    transport, _client = memory_pair()
    async with trio.open_nursery() as nursery:
        conn = WebSocketConnection(transport, Config(), nursery, "peer")
        # Server frames: final, unmasked, the opcode chosen by the type.
        assert conn.frame("h\u00e9") == b"\x81\x03h\xc3\xa9"
        assert conn.frame(b"\x00\x01") == b"\x82\x02\x00\x01"
        assert conn.framing.frame_batch((b"a", b"bc")) == b"\x81\x01a\x81\x02bc"


async def test_binary_fragments_are_joined_as_bytes(pair: PairFactory) -> None:
    async with trio.open_nursery() as nursery:
        _, peer = await start_ws(nursery, pair)
        await peer.send_frame(OP_BINARY, b"\x01\x02", fin=False)
        await peer.send_frame(OP_CONT, b"\x03", fin=True)
        assert await peer.recv_message() == b"\x03\x02\x01"
        nursery.cancel_scope.cancel()


async def test_pings_over_the_rate_limit_get_no_pong(pair: PairFactory) -> None:
    async with trio.open_nursery() as nursery:
        _, peer = await start_ws(nursery, pair, rate_limit=1, rate_burst=2)
        # One read: all three pings arrive at the same instant, so no refill between them.
        await peer.send_raw(b"".join(encode_frame(OP_PING, p) for p in (b"1", b"2", b"3"))
                            + encode_frame(OP_TEXT, b"after"))
        assert [(await peer.recv_frame()).payload for _ in range(2)] == [b"1", b"2"]
        assert await peer.recv_message() == "AFTER"  # no third pong before it
        nursery.cancel_scope.cancel()


async def test_an_answered_close_ends_without_waiting_for_the_timeout(
        pair: PairFactory, autojump_clock: Any) -> None:
    async def close_at_once(conn: Connection) -> None:
        await conn.close(4100, "done")

    async with trio.open_nursery() as nursery:
        conn, peer = await start_ws(nursery, pair, close_at_once, close_timeout=5)
        start = trio.current_time()
        frames = await peer.read_until_eof()  # answers the close, then reads to EOF
    assert (frames[-1].close_code, frames[-1].close_reason) == (4100, "done")
    assert trio.current_time() == start
    assert conn.closed and (conn.close_code, conn.close_reason) == (4100, "done")
