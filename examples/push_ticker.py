"""A price ticker: one task publishes, WebSocket and TCP subscribers receive.

Run it with ``python examples/push_ticker.py``. It serves the push protocol
(WebSocket on ``--port``, NDJSON over TCP on ``--tcp-port``), publishes prices
to the topic ``prices`` from a task of its own, and starts three subscribers
in the same process to show what happens:

- ``ws``: a :mod:`trioserve.client` subscriber that keeps up;
- ``tcp``: a raw TCP subscriber that keeps up;
- ``stalled``: a TCP subscriber that stops reading for ``--stall`` seconds, as a
  phone in a tunnel would. The kernel's socket buffers fill first, then the
  server's outbound queue for it, which is bounded (``--queue-kb``). When it
  overflows, the server closes that one connection with 4008 "slow consumer"
  (or, with ``--policy drop-oldest``, drops its oldest queued prices) and the
  other subscribers never notice.

Every second it prints what each connection has been sent and how much is
queued for it, from ``Connection.statistics()``.

In Go this is a ``time.Ticker`` goroutine sending on a channel per
subscriber, with a ``select { case ch <- p: default: }`` to drop on a full
channel or a close of the slow subscriber. Here the hub is that fan-out: a
publication is encoded once and written to each subscriber's socket, and the
per-connection bound is configuration.

Try your own subscribers while it runs::

    printf '{"op":"subscribe","topic":"prices"}\\n' | nc 127.0.0.1 9000
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import socket
import sys
import time
from collections.abc import Sequence
from typing import Any

import attrs
import trio

import trioserve.client
from trioserve import Config, HubClosed, Server, SlowConsumerPolicy

TOPIC = "prices"
START = {"BTC": 64000.0, "ETH": 3100.0, "SOL": 150.0, "TRIO": 1.0}


def out(line: str) -> None:
    print(line, flush=True)


@attrs.define
class Counters:
    published: int = 0
    ws: int = 0
    tcp: int = 0
    stalled_port: int | None = None


async def producer(server: Server, rate: float, counters: Counters) -> None:
    """Publish *rate* prices a second: a random walk with a small order book each."""
    prices = dict(START)
    ticks_per_second = 50  # several prices per tick: the hub sends each tick as one write
    per_tick = max(1, round(rate / ticks_per_second))
    deadline = trio.current_time()
    while True:
        for _ in range(per_tick):
            symbol = random.choice(list(prices))
            price = prices[symbol] = max(0.01, prices[symbol] * (1 + random.gauss(0, 0.0005)))
            step = price * 0.0001
            book = {
                "bids": [[round(price - step * i, 4), random.randint(1, 500)] for i in range(1, 6)],
                "asks": [[round(price + step * i, 4), random.randint(1, 500)] for i in range(1, 6)],
            }
            try:
                # await: if the hub's inbox is full, the producer waits (backpressure).
                await server.hub.publish(TOPIC, {"symbol": symbol, "price": round(price, 4),
                                                 "book": book, "ts": time.time()})
            except HubClosed:  # the server is draining
                return
            counters.published += 1
        deadline += 1 / ticks_per_second
        await trio.sleep_until(deadline)


async def ws_subscriber(url: str, counters: Counters) -> None:
    async with trioserve.client.connect(url) as client, client.subscribe(TOPIC, buffer_size=4096) as sub:
        async for _pub in sub:
            counters.ws += 1


async def subscribe_tcp(port: int, rcvbuf: int | None = None) -> trio.SocketStream:
    sock = trio.socket.socket()
    if rcvbuf is not None:
        # Before connect(), so the small window is what the server sees.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    await sock.connect(("127.0.0.1", port))
    stream = trio.SocketStream(sock)
    await stream.send_all(json.dumps({"op": "subscribe", "topic": TOPIC}).encode() + b"\n")
    return stream


async def lines(stream: trio.SocketStream) -> Any:
    buffer = b""
    while True:
        data = await stream.receive_some(65536)
        if not data:
            return
        buffer += data
        *complete, buffer = buffer.split(b"\n")
        for line in complete:
            yield json.loads(line)


async def tcp_subscriber(port: int, counters: Counters) -> None:
    async with await subscribe_tcp(port) as stream:
        async for msg in lines(stream):
            if msg.get("op") == "pub":
                counters.tcp += 1


async def stalled_subscriber(port: int, stall: float, counters: Counters) -> None:
    stream = await subscribe_tcp(port, rcvbuf=4096)
    counters.stalled_port = stream.socket.getsockname()[1]
    async with stream:
        out(f"stalled: subscribed, and now not reading for {stall:g}s")
        await trio.sleep(stall)
        out("stalled: reading again")
        received = gaps = 0
        last: int | None = None
        async for msg in lines(stream):
            if msg.get("op") == "close":
                out(f"stalled: read {received} prices, then the server's close line "
                    f"{msg['code']} {msg['reason']!r}")
                return
            if msg.get("op") == "pub":
                received += 1
                if last is not None and msg["offset"] != last + 1:
                    gaps += msg["offset"] - last - 1
                last = msg["offset"]
                if gaps and received % 2000 == 0:
                    out(f"stalled: {received} prices read, {gaps} dropped by the server meanwhile")
        out(f"stalled: the server closed the connection after {received} prices")


async def report(server: Server, counters: Counters) -> None:
    """Once a second: what each connection was sent and what is queued for it."""
    start = trio.current_time()
    slow_closes = 0
    while True:
        await trio.sleep(1)
        parts = []
        for conn in sorted(server.connections, key=lambda c: c.id):
            stats = conn.statistics()
            name = "ws" if conn.transport_name == "websocket" else "tcp"
            if counters.stalled_port is not None and stats.remote == f"127.0.0.1:{counters.stalled_port}":
                name = "stalled"
            dropped = f", dropped {stats.dropped_frames}" if stats.dropped_frames else ""
            parts.append(f"{name} sent {stats.messages_out} queued {stats.queued_bytes // 1024} KB{dropped}")
        elapsed = trio.current_time() - start
        out(f"t={elapsed:3.0f}s published {counters.published}; received ws {counters.ws}, "
            f"tcp {counters.tcp}; server side: {'; '.join(parts)}")
        closed = server.statistics().disconnects_total.get(4008, 0)
        if closed != slow_closes:
            slow_closes = closed
            out(f"server: closed {closed} connection(s) with 4008 slow consumer; the others carry on")


async def run(args: argparse.Namespace) -> None:
    config = Config(
        host=args.host,
        port=args.port,
        tcp_port=args.tcp_port,
        queue_max_bytes=args.queue_kb * 1024,
        queue_max_frames=100_000,  # bound the queue by bytes alone here
        slow_consumer_policy=SlowConsumerPolicy(args.policy),
        drain_timeout=5.0,
    )
    server = Server(config, handle_signals=True)
    counters = Counters()
    async with trio.open_nursery() as nursery:

        async def serve(*, task_status: trio.TaskStatus[Server]) -> None:
            await server.serve(task_status=task_status)
            # Drained (SIGTERM or Ctrl-C): the producer and the demo subscribers go too.
            nursery.cancel_scope.cancel()

        await nursery.start(serve)
        port = server.addresses["ws+http"][0][1]
        tcp_port = server.addresses["tcp"][0][1]
        out(f"ticker: ws://127.0.0.1:{port}/ws and tcp://127.0.0.1:{tcp_port}, topic {TOPIC!r}, "
            f"{args.rate:g} prices/s; Ctrl-C stops it")
        nursery.start_soon(producer, server, args.rate, counters)
        if not args.no_demo:
            nursery.start_soon(ws_subscriber, f"ws://127.0.0.1:{port}/ws", counters)
            nursery.start_soon(tcp_subscriber, tcp_port, counters)
            nursery.start_soon(stalled_subscriber, tcp_port, args.stall, counters)
            nursery.start_soon(report, server, counters)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="A price ticker on trioserve's hub.")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8000, help="WebSocket + HTTP port (default: %(default)s)")
    parser.add_argument("--tcp-port", type=int, default=9000, help="NDJSON port (default: %(default)s)")
    parser.add_argument("--rate", type=float, default=2000, help="prices per second (default: %(default)s)")
    parser.add_argument("--stall", type=float, default=8.0,
                        help="seconds the stalled subscriber does not read (default: %(default)s)")
    parser.add_argument("--queue-kb", type=int, default=256,
                        help="outbound queue limit per connection, KiB (default: %(default)s)")
    parser.add_argument("--policy", choices=[p.value for p in SlowConsumerPolicy], default="disconnect",
                        help="what to do with a subscriber whose queue overflows (default: %(default)s)")
    parser.add_argument("--no-demo", action="store_true",
                        help="publish only; start no subscribers of our own")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    trio.run(run, args)


if __name__ == "__main__":
    main(sys.argv[1:])
