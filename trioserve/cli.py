"""Command line: parse options, build a Config, run the server. Nothing more."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

import click
import trio

from . import __version__
from .config import Config, ConfigError, SlowConsumerPolicy
from .server import Server

_DEFAULTS = Config()


def _option(name: str, **kwargs: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A ``serve`` option that can also be set as ``TRIOSERVE_<NAME>``."""
    env = "TRIOSERVE_" + name.split("/")[0].lstrip("-").replace("-", "_").upper()
    return click.option(name, envvar=env, show_envvar=True, show_default=True, **kwargs)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="trioserve")
def main() -> None:
    """trioserve: a WebSocket and TCP push server on Trio."""


@main.command()
@_option("--host", default=_DEFAULTS.host,
         help="Address to listen on. The default is loopback only; use 0.0.0.0 or :: to expose it.")
@_option("--port", type=click.IntRange(0, 65535), default=_DEFAULTS.port,
         help="HTTP + WebSocket port (WebSocket at /ws). 0 picks a free port.")
@_option("--tcp-port", type=click.IntRange(0, 65535), default=None,
         help="Also serve newline-delimited JSON over raw TCP on this port.  [default: off]")
@_option("--client-publish/--no-client-publish", default=_DEFAULTS.client_publish,
         help='Let connected clients publish with {"op":"publish"}. The HTTP API can always publish.')
@_option("--api-key", default=None,
         help="Require 'Authorization: Bearer KEY' on POST /api/publish.  [default: none, open]")
@_option("--max-connections", type=click.IntRange(1), default=None,
         help="Client connections at once; more get HTTP 503 / a close line.  "
              "[default: what the fd limit allows]")
@_option("--max-message-size", type=click.IntRange(1), default=_DEFAULTS.max_message_size,
         help="Largest client message, TCP line or HTTP body, in bytes (over it: close 1009 / 413).")
@_option("--ping-interval", type=click.FloatRange(min=0, min_open=True), default=_DEFAULTS.ping_interval,
         help="Seconds of silence from a client before the server pings it.")
@_option("--ping-timeout", type=click.FloatRange(min=0, min_open=True), default=_DEFAULTS.ping_timeout,
         help="Further seconds without data or pong before closing with 4002.")
@_option("--handshake-timeout", type=click.FloatRange(min=0, min_open=True),
         default=_DEFAULTS.handshake_timeout,
         help="Seconds a client has to send a complete HTTP request or upgrade.")
@_option("--drain-timeout", type=click.FloatRange(min=0, min_open=True), default=_DEFAULTS.drain_timeout,
         help="On SIGTERM/SIGINT, seconds to wait for clients to close before forcing them.")
@_option("--queue-max-bytes", type=click.IntRange(1), default=_DEFAULTS.queue_max_bytes,
         help="Outbound queue limit per connection, in bytes.")
@_option("--queue-max-frames", type=click.IntRange(1), default=_DEFAULTS.queue_max_frames,
         help="Outbound queue limit per connection, in frames.")
@_option("--slow-consumer-policy", type=click.Choice([p.value for p in SlowConsumerPolicy]),
         default=_DEFAULTS.slow_consumer_policy.value,
         help="What to do when a client's queue is over its limit: close it with 4008, "
              "or drop its oldest queued frames.")
@_option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info",
         help="Logging verbosity.")
def serve(log_level: str, **options: Any) -> None:
    """Run the push server.

    With no options it listens on http://127.0.0.1:8000 with an in-memory hub:
    clients connect to ws://127.0.0.1:8000/ws and subscribe, publishers POST to
    /api/publish. SIGTERM or Ctrl-C drains gracefully; a second one exits at once.
    """
    logging.basicConfig(level=log_level.upper(),
                        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    try:
        config = Config(**options)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    server = Server(config, handle_signals=True)
    try:
        trio.run(server.serve)
    except OSError as exc:
        raise click.ClickException(str(exc)) from None
    if server.forced_exit is not None:
        sys.exit(128 + server.forced_exit)


if __name__ == "__main__":
    main()
