"""The push protocol handler: client commands mapped onto the hub.

It is the default handler for both transports; applications can replace it
with their own (see ``Server(ws_handler=..., tcp_handler=...)``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .hub import HubClosed, HubOverloaded
from .protocol.codes import ErrorCode
from .protocol.messages import (
    Command,
    ProtocolError,
    encode_error,
    encode_reply,
    parse_command,
)

if TYPE_CHECKING:
    from .connection import Connection
    from .server import Server

__all__ = ["push_handler"]


async def push_handler(conn: Connection, server: Server) -> None:
    """Serve the push protocol on *conn* until it closes (ConnectionClosed)."""
    while True:
        # No locals survive into the wait for the next message: an idle
        # connection would otherwise keep its last command and reply alive
        # (an orjson result occupies ~4 KB whatever its length). And receive()
        # rather than ``async for``: one coroutine frame less per connection.
        await _handle(conn, server, await conn.receive())


async def _handle(conn: Connection, server: Server, message: str | bytes) -> None:
    try:
        reply = await _dispatch(conn, server, parse_command(message))
    except ProtocolError as exc:
        reply = encode_error(exc.code, exc.message, exc.id)
    conn.send_encoded(reply)


async def _dispatch(conn: Connection, server: Server, cmd: Command) -> bytes:
    hub = server.hub
    op = cmd.op
    if op == "subscribe":
        hub.subscribe(conn, cmd.topic)
        return encode_reply(cmd.id, topic=cmd.topic, offset=hub.offset(cmd.topic))
    if op == "unsubscribe":
        hub.unsubscribe(conn, cmd.topic)
        return encode_reply(cmd.id, topic=cmd.topic)
    if op == "publish":
        if not server.config.client_publish:
            raise ProtocolError(
                ErrorCode.FORBIDDEN,
                "client publish is disabled on this server (--client-publish)",
                cmd.id,
            )
        try:
            try:
                # No checkpoint on the common path: a burst read in one chunk
                # lands in the hub together and goes out as one batch.
                result = hub.publish_nowait(cmd.topic, cmd.fields["data"])
            except HubOverloaded:
                result = await hub.publish(cmd.topic, cmd.fields["data"])
        except HubClosed as exc:
            raise ProtocolError(ErrorCode.UNAVAILABLE, str(exc), cmd.id) from None
        return encode_reply(cmd.id, offset=result.offset, subscribers=result.subscribers)
    # "ping": the only other op parse_command accepts.
    return encode_reply(cmd.id, op="pong")
