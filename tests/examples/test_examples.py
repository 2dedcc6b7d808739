"""Smoke tests: each example starts as ``python examples/NAME.py``, works, and stops cleanly."""

from __future__ import annotations

import json
import re
import signal

import pytest
import trio
import trio_websocket

import trioserve.client

from .conftest import Example

pytestmark = pytest.mark.system

LISTENING_HTTP = r"listening on http://127\.0\.0\.1:(\d+)"
LISTENING_TCP = r"listening on tcp://127\.0\.0\.1:(\d+)"


async def wait_for(example: Example, pattern: str, since: int = 0) -> re.Match[str]:
    # In a thread: the test's own trio tasks (clients) keep running meanwhile.
    return await trio.to_thread.run_sync(lambda: example.wait_for(pattern, since=since))


def test_pipeline_channels(run_example: type[Example]) -> None:
    example = run_example(["examples/pipeline_channels.py"])
    assert example.wait() == 0, example.output
    out = example.output
    assert "unbuffered: 0 sends completed before a receiver came" in out
    assert "buffer 3:   3 sends completed, then the producer waited" in out
    assert "received 12 items from 3 producers: a0 a1 a2 a3 b0 b1 b2 b3 c0 c1 c2 c3" in out
    assert re.search(r"100 results; the producer waited for a free slot \d+ times", out)
    assert "the deadline cancelled every task" in out


def test_pipeline_channels_stops_on_sigterm(run_example: type[Example]) -> None:
    example = run_example(["examples/pipeline_channels.py", "--timeout", "60"])
    example.wait_for(r"^3\. worker pool")
    assert example.stop(signal.SIGTERM) == 0, example.output
    assert "SIGTERM: stopping" in example.output
    assert "Traceback" not in example.output


async def test_echo_ws(run_example: type[Example]) -> None:
    example = run_example(["examples/echo_ws.py", "--port", "0"])
    port = int((await wait_for(example, LISTENING_HTTP)).group(1))
    with trio.fail_after(10):
        async with trio_websocket.open_websocket_url(f"ws://127.0.0.1:{port}/ws") as ws:
            await ws.send_message("hello")
            assert await ws.get_message() == "hello"
            await ws.send_message(b"\x00\xff")
            assert await ws.get_message() == b"\x00\xff"
            # Drain for free: SIGTERM closes every client with 1001 before the exit.
            example.proc.send_signal(signal.SIGTERM)
            with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                await ws.get_message()
    assert closed.value.reason is not None and closed.value.reason.code == 1001
    assert await trio.to_thread.run_sync(example.wait) == 0
    assert "drained 1, forced 0" in example.output


async def test_echo_tcp(run_example: type[Example]) -> None:
    example = run_example(["examples/echo_tcp.py", "--port", "0"])
    port = int((await wait_for(example, LISTENING_TCP)).group(1))
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all("héllo\nworld\n".encode())
            received = b""
            while received.count(b"\n") < 2:
                received += await stream.receive_some(1024)
            assert received.decode() == "héllo\nworld\n"
            example.proc.send_signal(signal.SIGTERM)
            rest = b""
            while chunk := await stream.receive_some(1024):
                rest += chunk
    assert json.loads(rest) == {"op": "close", "code": 1001, "reason": "going away"}
    assert await trio.to_thread.run_sync(example.wait) == 0


async def test_push_ticker(run_example: type[Example]) -> None:
    example = run_example(["examples/push_ticker.py", "--port", "0", "--tcp-port", "0",
                           "--rate", "4000", "--stall", "3"])
    ticker = await wait_for(example, r"ticker: ws://127\.0\.0\.1:(\d+)/ws and tcp://127\.0\.0\.1:(\d+)")
    port, tcp_port = int(ticker.group(1)), int(ticker.group(2))
    with trio.fail_after(15):
        # A subscriber of our own on each transport receives prices.
        async with trioserve.client.connect(f"ws://127.0.0.1:{port}/ws") as client, \
                client.subscribe("prices", buffer_size=100_000) as sub:
            async for pub in sub:
                assert pub.data["symbol"] in {"BTC", "ETH", "SOL", "TRIO"} and pub.data["price"] > 0
                break
        stream = await trio.open_tcp_stream("127.0.0.1", tcp_port)
        async with stream:
            await stream.send_all(b'{"op":"subscribe","topic":"prices"}\n')
            received = b""
            while received.count(b"\n") < 2:
                received += await stream.receive_some(65536)
            reply, pub = (json.loads(line) for line in received.split(b"\n")[:2])
            assert reply["ok"] is True and pub["op"] == "pub" and pub["topic"] == "prices"
    # The stalled subscriber's queue overflows and only it is closed.
    await wait_for(example, r"stalled: read \d+ prices, then the server's close line 4008 'slow consumer'")
    await wait_for(example, r"server: closed 1 connection\(s\) with 4008")
    line = (await wait_for(example, r"received ws (\d+), tcp (\d+)", since=example.mark())).group(0)
    assert "stalled" not in line.partition("server side:")[2]
    assert await trio.to_thread.run_sync(example.stop) == 0, example.output
    assert "Traceback" not in example.output
