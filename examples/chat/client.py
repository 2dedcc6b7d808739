"""The chat's terminal client, built on :mod:`trioserve.client`.

::

    python -m examples.chat.client --room lobby --nick bob

Type a line to say it; ``/me waves``, ``/nick robert``, ``/join games``,
``/who`` and ``/quit`` (or Ctrl-D) do what they say. The client reconnects by
itself: :mod:`trioserve.client` resubscribes with the room's position and the
server replays what was missed. After a server restart the history is gone, so
the client prints the messages the room has had since.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote, urlsplit

import attrs
import trio

import trioserve.client
from trioserve.client import Client, PresenceEvent, Publication, RecoveryGap, ServerError

HELP = "commands: /me TEXT, /nick NAME, /join ROOM, /who, /quit"


@attrs.define
class State:
    base_url: str
    nick: str
    room: str


def out(line: str) -> None:
    # Flushed per line: the output is often a pipe (a test, or `| tee`).
    print(line, flush=True)


def show(room: str, data: dict[str, Any]) -> None:
    stamp = time.strftime("%H:%M", time.localtime(data.get("ts", time.time())))
    kind = data.get("kind")
    if kind == "msg":
        out(f"{stamp} [{room}] <{data['nick']}> {data['text']}")
    elif kind == "me":
        out(f"{stamp} [{room}] * {data['nick']} {data['text']}")
    elif kind == "nick":
        out(f"{stamp} [{room}] -- {data['old']} is now known as {data['nick']}")


# --- HTTP: a token per connection and the room's backlog ------------------------------
# urllib in a worker thread keeps the example free of an HTTP client dependency.


def _http(url: str, body: dict[str, Any] | None = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.load(resp)
    except urllib.error.HTTPError as exc:
        error = json.load(exc).get("error", {})
        raise ServerError(error.get("code", "http"), error.get("message", str(exc))) from None


async def http_json(url: str, body: dict[str, Any] | None = None) -> Any:
    return await trio.to_thread.run_sync(_http, url, body, abandon_on_cancel=True)


async def recent(state: State, room: str, upto: int) -> list[dict[str, Any]]:
    reply = await http_json(f"{state.base_url}/api/recent?room={quote(room)}&upto={upto}")
    messages: list[dict[str, Any]] = reply["messages"]
    return messages


async def call(client: Client, op: str, **fields: Any) -> dict[str, Any]:
    """Send one of the chat's own ops and return the reply.

    trioserve.client has no public call for an application's ops yet, so this
    goes through the one private method it needs (see docs/library.md).
    Like ``publish``, it is not repeated after a reconnect.
    """
    return await client.request(op, **fields)


# --- a room -------------------------------------------------------------------------


async def follow(client: Client, state: State, room: str) -> None:
    """Join *room* and print it until cancelled."""
    topic = "room." + room

    def on_presence(event: PresenceEvent) -> None:
        verb = "joined" if event.kind == "join" else "left"
        out(f"{time.strftime('%H:%M')} [{room}] -- {event.client.client} {verb}")

    try:
        async with client.subscribe(topic, on_presence=on_presence) as sub:
            # Subscribed first, then the backlog up to that position: what comes
            # later arrives live, so nothing is printed twice or skipped.
            position = sub.position
            for message in await recent(state, room, position.offset if position else 0):
                show(room, message["data"])
            await who(client, room)
            while True:
                try:
                    async for pub in sub:
                        show_pub(room, pub)
                    return
                except RecoveryGap as gap:
                    # The server restarted (new epoch): its history is gone, so
                    # print what the room has had since. The subscription goes on.
                    out(f"-- reconnected to #{room}; the server restarted, here is what was said since")
                    after = gap.last_offset if gap.new_epoch == gap.last_epoch else 0
                    for message in await recent(state, room, gap.new_offset):
                        if message["offset"] > after:
                            show(room, message["data"])
    except ServerError as exc:  # nick_taken, say: /nick another and /join again
        out(f"-- cannot stay in #{room}: {exc.message}")
    except trioserve.client.ClientError as exc:  # Unauthorized, ClientClosed: no way back
        out(f"-- disconnected: {exc}")


def show_pub(room: str, pub: Publication) -> None:
    if isinstance(pub.data, dict):
        show(room, pub.data)


async def who(client: Client, room: str) -> None:
    members = sorted((c.client or "?" for c in await client.presence("room." + room)), key=str.casefold)
    out(f"-- members of #{room}: {', '.join(members)}")


# --- input --------------------------------------------------------------------------


async def read_line() -> str:
    # A thread rather than non-blocking stdin, which would also change the
    # terminal the shell shares with us.
    return await trio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True)


async def handle(client: Client, state: State, text: str, rejoin: trio.MemorySendChannel[str]) -> bool:
    """Run one input line; False ends the client."""
    if text.startswith("/"):
        command, _, arg = text[1:].partition(" ")
        arg = arg.strip()
        command = command.lower()
        if command in ("quit", "exit"):
            return False
        if command == "nick" and arg:
            reply = await call(client, "nick", nick=arg)
            state.nick = reply["nick"]  # the next reconnect logs in with it
            out(f"-- you are now {state.nick}")
        elif command == "join" and arg:
            await rejoin.send(arg.lstrip("#").lower())
        elif command == "who":
            await who(client, state.room)
        elif command == "me" and arg:
            await call(client, "say", room=state.room, text=arg, me=True)
        else:
            out(f"-- {HELP}")
        return True
    await call(client, "say", room=state.room, text=text)
    return True


async def chat(state: State) -> None:
    async def token() -> str:
        # Called for every connection attempt, so a restarted server (with a
        # new key) gets a token it can verify, for the nick we have now.
        reply = await http_json(f"{state.base_url}/api/login", {"nick": state.nick})
        return str(reply["token"])

    parts = urlsplit(state.base_url)
    ws_url = f"{'wss' if parts.scheme == 'https' else 'ws'}://{parts.netloc}/ws"
    rejoin_send, rejoin_receive = trio.open_memory_channel[str](0)
    async with trioserve.client.connect(ws_url, token=token) as client:
        out(f"-- connected to {state.base_url} as {state.nick}; {HELP}")
        async with trio.open_nursery() as nursery:

            async def rooms() -> None:
                # One room at a time: cancelling the old room's task leaves it
                # (unsubscribe, and the others see "left"), then the new one is joined.
                room = state.room
                while True:
                    state.room = room
                    scope = trio.CancelScope()
                    nursery.start_soon(follow_in, scope, room)
                    room = await rejoin_receive.receive()
                    scope.cancel()

            async def follow_in(scope: trio.CancelScope, room: str) -> None:
                with scope:
                    await follow(client, state, room)

            nursery.start_soon(rooms)
            while True:
                line = await read_line()
                if not line:  # EOF (Ctrl-D, or the pipe closed)
                    break
                text = line.strip()
                if not text:
                    continue
                try:
                    if not await handle(client, state, text, rejoin_send):
                        break
                except ServerError as exc:
                    out(f"-- {exc.code}: {exc.message}")
                except trioserve.client.ConnectionLost:
                    out("-- not sent: the connection dropped; the client is reconnecting")
                except trio.TooSlowError:
                    out("-- not sent: no answer from the server")
            nursery.cancel_scope.cancel()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m examples.chat.client",
                                     description="The chat's terminal client.")
    parser.add_argument("--url", default="http://127.0.0.1:8000",
                        help="the chat server's address (default: %(default)s)")
    parser.add_argument("--room", default="lobby", help="room to join (default: %(default)s)")
    parser.add_argument("--nick", required=True, help="your nickname, unique in the room")
    args = parser.parse_args(argv)
    state = State(args.url.rstrip("/"), args.nick, args.room.lstrip("#").lower())
    try:
        trio.run(chat, state)
    except KeyboardInterrupt:
        pass
    except trioserve.client.ClientError as exc:
        sys.exit(f"chat: {exc}")


if __name__ == "__main__":
    main()
