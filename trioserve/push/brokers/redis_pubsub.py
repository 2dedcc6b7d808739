"""The Redis broker's pub/sub connection: one socket, read a chunk at a time, parsed by hiredis.

Why not coredis' ``PubSub``: its connection's reader parses a whole chunk at
once, but the messages then pass through two anyio memory streams and a
consumer task (``_consume_push_messages``) that moves one message per
checkpoint, and ``get_message()`` checkpoints before it looks at its buffer
(so ``get_message(timeout=0)`` returns None under trio even when messages
wait). A burst therefore reached the hub one publication per scheduler round,
and the hub fanned out one publication per batch. Nothing public in coredis
6.9 hands over what is already buffered.

So this connection does what ``net.Connection.receive()`` does for clients:
one read of up to 64 KB, every complete reply in it parsed by hiredis' reader
(the RESP parsing stays in the library), and everything that arrived handed
to the consumer in one list by :meth:`PubSubConnection.receive`. Commands are
packed by ``hiredis.pack_command``.

It speaks RESP2 (AUTH, SELECT, then only SUBSCRIBE, UNSUBSCRIBE and PING),
reusing the address, credentials, database and TLS context that coredis parsed
from the broker URL, so both connections reach the same Redis the same way. It
sends a PING after ``keepalive`` seconds of silence and gives up after
``timeout`` more, as coredis' PubSub did.
"""

from __future__ import annotations

import ssl
from typing import Any, cast

import coredis.exceptions
import hiredis
import trio

__all__ = ["PubSubConnection", "PubSubLost"]

READ_SIZE = 65536


class PubSubLost(ConnectionError):
    """The pub/sub connection closed, broke or stopped answering."""


class PubSubConnection:
    """A subscribed connection to Redis: ``run()`` reads, ``receive()`` hands over."""

    def __init__(self, stream: trio.abc.Stream, *, timeout: float, keepalive: float) -> None:
        self._stream = stream
        self._timeout = timeout
        self._keepalive = keepalive
        self._reader = hiredis.Reader(protocolError=PubSubLost,
                                      replyError=coredis.exceptions.ResponseError)
        self._send_lock = trio.Lock()
        # (channel, data) of each message, in arrival order, until receive() takes them.
        self._messages: list[tuple[bytes, bytes]] = []
        self._arrived = trio.lowlevel.ParkingLot()
        self._acks: dict[bytes, list[trio.Event]] = {}
        self._lost = False

    @classmethod
    async def open(cls, host: str, port: int, *, ssl_context: ssl.SSLContext | None = None,
                   username: str | None = None, password: str | None = None, db: int | None = None,
                   connect_timeout: float, timeout: float, keepalive: float = 15.0) -> PubSubConnection:
        """Connect, authenticate and select the database; then start :meth:`run`."""
        stream: trio.abc.Stream | None = None
        try:
            with trio.fail_after(connect_timeout):
                stream = await trio.open_tcp_stream(host, port)
                if ssl_context is not None:
                    stream = trio.SSLStream(stream, ssl_context, server_hostname=host)
                    await stream.do_handshake()
                conn = cls(stream, timeout=timeout, keepalive=keepalive)
                if password:
                    await conn._call("AUTH", *((username,) if username else ()), password)
                if db:
                    await conn._call("SELECT", db)
        except trio.TooSlowError:
            if stream is not None:
                await trio.aclose_forcefully(stream)
            raise TimeoutError(f"redis {host}:{port}: no connection within {connect_timeout}s") from None
        except BaseException:
            if stream is not None:
                await trio.aclose_forcefully(stream)
            raise
        return conn

    async def aclose(self) -> None:
        self._give_up()
        await trio.aclose_forcefully(self._stream)

    def _give_up(self) -> None:
        """The connection is lost: wake whoever waits for a confirmation (they raise)."""
        self._lost = True
        for waiting in self._acks.values():
            for event in waiting:
                event.set()
        self._acks.clear()

    async def _call(self, *command: Any) -> Any:
        """Send one command and read its reply (only before :meth:`run` starts)."""
        await self._stream.send_all(hiredis.pack_command(command))
        while (reply := self._reader.gets()) is False:
            data = await self._stream.receive_some(READ_SIZE)
            if not data:
                raise PubSubLost("redis closed the connection")
            self._reader.feed(cast(bytes, data))  # any buffer will do
        if isinstance(reply, Exception):
            raise reply
        return reply

    async def _send(self, *command: Any) -> None:
        if self._lost:
            raise PubSubLost("the pub/sub connection is closed")
        try:
            async with self._send_lock:
                await self._stream.send_all(hiredis.pack_command(command))
        except (trio.ClosedResourceError, trio.BrokenResourceError) as exc:
            raise PubSubLost(f"the pub/sub connection is closed: {exc!r}") from None

    # --- subscriptions ---------------------------------------------------------------

    async def subscribe(self, *channels: str) -> None:
        """Subscribe, and return once Redis confirmed every channel: each
        message published afterwards reaches :meth:`receive`."""
        waiting = []
        for channel in channels:
            event = trio.Event()
            self._acks.setdefault(channel.encode(), []).append(event)
            waiting.append(event)
        await self._send("SUBSCRIBE", *channels)
        with trio.move_on_after(self._timeout):
            for event in waiting:
                await event.wait()
            if self._lost:
                raise PubSubLost("the pub/sub connection was lost before SUBSCRIBE was confirmed")
            return
        raise TimeoutError(f"redis did not confirm SUBSCRIBE within {self._timeout}s")

    async def unsubscribe(self, *channels: str) -> None:
        """Unsubscribe without waiting for the answer: the broker ignores the
        messages of topics it has left."""
        await self._send("UNSUBSCRIBE", *channels)

    # --- reading -----------------------------------------------------------------------

    async def receive(self) -> list[tuple[bytes, bytes]]:
        """Every message that arrived since the last call, in order (waits for one)."""
        if self._messages:
            await trio.lowlevel.checkpoint()
        while not self._messages:
            await self._arrived.park()
        messages, self._messages = self._messages, []
        return messages

    async def run(self) -> None:
        """Read until the connection fails (raises :class:`PubSubLost` or
        ``TimeoutError``); one checkpoint per chunk, never per message."""
        try:
            await self._read()
        finally:
            self._give_up()

    async def _read(self) -> None:
        stream, reader = self._stream, self._reader
        pinged = False
        while True:
            with trio.move_on_after(self._timeout if pinged else self._keepalive) as idle:
                data = await stream.receive_some(READ_SIZE)
            if idle.cancelled_caught:
                if pinged:
                    raise TimeoutError(f"redis did not answer a pub/sub PING within {self._timeout}s")
                await self._send("PING")
                pinged = True
                continue
            if not data:
                raise PubSubLost("redis closed the pub/sub connection")
            pinged = False
            reader.feed(cast(bytes, data))  # any buffer will do
            while (reply := reader.gets()) is not False:
                if isinstance(reply, list) and reply[0] == b"message":
                    self._messages.append((reply[1], reply[2]))
                else:
                    self._other(reply)
            if self._messages and self._arrived:
                self._arrived.unpark_all()

    def _other(self, reply: Any) -> None:
        if isinstance(reply, Exception):
            raise PubSubLost(f"redis refused a pub/sub command: {reply}")
        if isinstance(reply, list) and reply and reply[0] == b"subscribe":
            waiting = self._acks.get(reply[1])
            if waiting:
                waiting.pop(0).set()
                if not waiting:
                    del self._acks[reply[1]]
        # "unsubscribe" and "pong" need nothing.
