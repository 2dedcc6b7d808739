"""One connection of the client: its reader, and the requests made on it. Internal.

The reader (:meth:`Session.read_loop`, run by the client's background task)
dispatches every message: a reply goes to the request waiting for its id (a
one-slot memory channel), a publication to its subscription's bounded memory
channel. When a consumer falls behind and its channel is full, the reader
waits: backpressure reaches the server, which closes a client that stays
behind (4008) and the client then reconnects and recovers.

A subscribe reply is applied by the reader before it reads anything else, so a
subscription's recovered publications, and the live ones after them, enter the
channel in offset order with nothing in between.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import attrs
import orjson
import trio

from ._errors import ServerError, server_error
from ._subscription import Subscriptions, SubState
from ._websocket import Closed, WebSocket

log = logging.getLogger("trioserve.client")


class Lost(Exception):
    """The connection ended before the reply arrived."""


@attrs.define
class _Pending:
    reply: trio.MemorySendChannel[dict[str, Any]]
    sub: SubState | None


class Session:
    """One connection's state: the socket, its requests, its tasks.

    *nursery* holds the connection's subscribe and refresh requests; it is
    cancelled when the connection ends.
    """

    def __init__(self, ws: WebSocket, nursery: trio.Nursery, subs: Subscriptions, ids: Iterator[int],
                 refresh: Callable[[Session], Awaitable[None]]):
        self.ws = ws
        self.nursery = nursery
        self.pending: dict[int, _Pending] = {}
        self.closed = False
        self.done = trio.Event()
        self.started_at = trio.current_time()
        self._subs = subs
        self._ids = ids
        self._refresh = refresh

    def end(self) -> None:
        """The connection is over: fail its requests, forget its subscribes, stop its tasks."""
        self.closed = True
        self.ws.abort()
        for pending in self.pending.values():
            pending.reply.close()
        for state in self._subs:
            if state.pending is self:
                state.pending = None
                state.held = []
        self.nursery.cancel_scope.cancel()
        self.done.set()

    # --- requests --------------------------------------------------------------------------

    async def send(self, msg: dict[str, Any]) -> None:
        """Send *msg* without waiting for a reply. Raises :class:`Closed`."""
        await self.ws.send_text(orjson.dumps(msg).decode())

    async def roundtrip(self, msg: dict[str, Any], sub: SubState | None = None) -> dict[str, Any]:
        """Send *msg* with a fresh id and return the reply. Raises :class:`Lost`."""
        request_id = msg["id"] = next(self._ids)
        text = orjson.dumps(msg).decode()
        send, receive = trio.open_memory_channel[dict[str, Any]](1)
        self.pending[request_id] = _Pending(send, sub)
        try:
            try:
                await self.ws.send_text(text)
            except Closed:
                raise Lost from None
            try:
                return await receive.receive()
            except trio.EndOfChannel:
                raise Lost from None
        finally:
            self.pending.pop(request_id, None)

    def start_subscribe(self, state: SubState) -> None:
        """Send a subscribe for *state* (with ``since`` when its position is
        known); publications for it wait until the reply."""
        if state.closed or self.closed or state.pending is self:
            return
        msg: dict[str, Any] = {"op": "subscribe", "topic": state.topic}
        if state.offset is not None and state.epoch is not None:
            msg["since"] = {"epoch": state.epoch, "offset": state.offset}
        state.pending = self
        state.held = []
        self.nursery.start_soon(self._subscribe, state, msg)

    async def _subscribe(self, state: SubState, msg: dict[str, Any]) -> None:
        # No timeout: the reply may wait behind a slow consumer's backpressure;
        # a dead connection is noticed by the reader and ends this task.
        try:
            reply = await self.roundtrip(msg, sub=state)
        except Lost:
            return  # the next connection subscribes again
        if reply.get("ok") is not True:
            self._subs.end(state, server_error(reply))

    # --- the reader ------------------------------------------------------------------------

    async def read_loop(self) -> Closed:
        """Dispatch messages until the connection ends; how it ended."""
        while True:
            try:
                text = await self.ws.receive()
            except Closed as closed:
                return closed
            try:
                msg = orjson.loads(text)
            except orjson.JSONDecodeError:
                log.warning("ignoring a message that is not JSON: %.200r", text)
                continue
            if not isinstance(msg, dict):
                continue
            if "ok" in msg:
                await self._on_reply(msg)
                continue
            op = msg.get("op")
            if op == "pub":
                state = self._subs.get(msg.get("topic"))
                if state is not None:
                    await state.receive_publication(self, msg)
            elif op == "refresh_required":
                self.nursery.start_soon(self._refresh, self)
            elif op in ("join", "leave"):
                state = self._subs.get(msg.get("topic"))
                if state is not None:
                    await state.receive_presence(msg)
            elif op == "unsubscribed":
                # The server API removed us: end it, rather than subscribe again on reconnect.
                state = self._subs.get(msg.get("topic"))
                if state is not None:
                    self._subs.end(state, ServerError(
                        "unsubscribed", f"the server unsubscribed this client from {state.topic}"))
            else:
                log.debug("ignoring %.200r", text)

    async def _on_reply(self, msg: dict[str, Any]) -> None:
        request_id = msg.get("id")
        if not isinstance(request_id, int):
            if msg.get("ok") is False:
                log.warning("error from the server: %s", server_error(msg))
            return
        pending = self.pending.pop(request_id, None)
        if pending is None:
            return
        state = pending.sub
        if state is not None and state.pending is self:
            if msg.get("ok") is True:
                await state.apply_subscribe(self, msg)
            else:
                state.pending = None
                state.held = []
        pending.reply.send_nowait(msg)
