"""The smallest useful WebSocket server: every message comes back to its sender.

Run it with ``python examples/echo_ws.py`` and connect to ``ws://127.0.0.1:8000/ws``.
The handler takes the place of the push protocol on that path.

The Go version is an ``http.Handler`` that upgrades with gorilla/websocket and
runs ``for { ReadMessage(); WriteMessage() }`` in the request's goroutine, plus
a ticker goroutine for pings and an ``http.Server.Shutdown`` for SIGTERM. Here
the server makes one task per connection and the handler is the loop. What the
Go version writes by hand comes with :class:`trioserve.Server`:

- heartbeat: a client silent for ``ping_interval`` is pinged, and closed with
  4002 if the pong does not come within ``ping_timeout``;
- backpressure: ``await conn.send()`` waits while the client is slow;
- drain: SIGTERM or Ctrl-C sends 1001 "going away" to every client, waits up
  to ``drain_timeout`` for them to close, and exits 0.
"""

from __future__ import annotations

import argparse
import logging
import sys

import trio

from trioserve import Config, Connection, Server


async def echo(conn: Connection) -> None:
    # The connection closes with 1000 when this returns, 1011 if it raises.
    async for message in conn:  # str for a text message, bytes for a binary one
        await conn.send(message)


def main() -> None:
    parser = argparse.ArgumentParser(description="A WebSocket echo server.")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8000,
                        help="port; 0 picks a free one (default: %(default)s)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    server = Server(Config(host=args.host, port=args.port, drain_timeout=5.0),
                    ws_handler=echo, handle_signals=True)
    trio.run(server.serve)
    if server.forced_exit is not None:  # a second signal cut the drain short
        sys.exit(128 + server.forced_exit)


if __name__ == "__main__":
    main()
