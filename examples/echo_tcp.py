"""The smallest useful TCP server: every line comes back to its sender.

Run it with ``python examples/echo_tcp.py`` and try ``nc 127.0.0.1 9000``.

The Go version is ``for { conn, _ := ln.Accept(); go handle(conn) }`` with a
``bufio.Scanner`` loop in ``handle``, and deadlines and a shutdown path added
by hand. Here the server accepts, makes one task per connection, splits lines
(up to ``max_message_size``), and brings what Go leaves to you:

- heartbeat: after ``ping_interval`` of silence the server sends the line
  ``{"op":"ping"}``; any line back counts, and a client silent for
  ``ping_timeout`` more is sent ``{"op":"close","code":4002,...}`` and closed;
- backpressure: ``await conn.send()`` waits while the client is slow;
- drain: SIGTERM or Ctrl-C sends the close line with 1001 to every client,
  waits up to ``drain_timeout`` for them, and exits 0.
"""

from __future__ import annotations

import argparse
import logging
import sys

import trio

from trioserve import Config, Connection, Server


async def echo(conn: Connection) -> None:
    async for line in conn:  # one line at a time, without its "\n"
        await conn.send(line)  # sent back with a "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description="A line echo server over TCP.")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=9000, help="TCP port; 0 picks a free one "
                        "(default: %(default)s)")
    parser.add_argument("--http-port", type=int, default=0,
                        help="the server always has an HTTP port too, for /healthz and /readyz; "
                             "0 picks a free one (default: %(default)s)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config = Config(host=args.host, port=args.http_port, tcp_port=args.port, drain_timeout=5.0)
    server = Server(config, tcp_handler=echo, handle_signals=True)
    trio.run(server.serve)
    if server.forced_exit is not None:  # a second signal cut the drain short
        sys.exit(128 + server.forced_exit)


if __name__ == "__main__":
    main()
