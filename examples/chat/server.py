"""The example chat server: trioserve used as a library, not configured as a push server.

Every chat feature is one of trioserve's extension points:

=====================  ==========================================================
rooms                  topics ``room.<name>``; joining is the push protocol's
                       ``subscribe``, so reconnecting clients recover what they
                       missed with ``since``
identity and nicks     a JWT from ``POST /api/login`` whose ``sub`` is the nick
                       (trioserve verifies it); ``{"op":"nick"}`` swaps the
                       connection's claims for the new nick
unique nicks per room  the ``on_subscribe`` hook (``nick_taken``)
members, join/leave    built-in presence: the ``presence`` op and the ``join`` /
                       ``leave`` events of topics in ``presence_events``
messages               the custom op ``{"op":"say"}``: validated, rate limited
                       (``slow_down``) and published into the room's history
last 50 messages       ``GET /api/recent``, a route that reads the hub's history
connection limits      the ``on_connect`` hook (``Reject``) and ``on_disconnect``
the web page           ``add_route`` serves ``static/`` on the same port; its
                       script imports ``/trioserve.js``, which every Server serves
=====================  ==========================================================

Run it with ``python -m examples.chat`` from the repository root.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import secrets
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import jwt
import trio

from trioserve import (
    Command,
    Config,
    Connection,
    ErrorCode,
    HistoryRule,
    HubClosed,
    ProtocolError,
    Reject,
    Request,
    Response,
    Server,
)

__all__ = ["BACKLOG", "MAX_TEXT", "Chat", "chat_config", "main"]

log = logging.getLogger("examples.chat")

ROOM_PREFIX = "room."
ROOM_RE = re.compile(r"[a-z0-9_-]{1,32}")
# Letters and digits of any script, plus _ . -; no spaces, so "/nick a b" is caught early.
NICK_RE = re.compile(r"\w[\w.-]{0,23}")
#: Longest message, in characters.
MAX_TEXT = 2000
#: Messages a client gets when it joins a room.
BACKLOG = 50
#: Publications kept per room; more than BACKLOG because join/nick notices share it.
HISTORY_SIZE = 500
#: Messages per second per connection, and the burst allowed before ``slow_down``.
RATE = 5.0
BURST = 5
TOKEN_TTL = 3600
#: Connections from one address; more are refused by ``on_connect``.
MAX_PER_HOST = 64
STATIC = Path(__file__).with_name("static")

_STATIC_FILES = {
    "/": ("index.html", b"text/html; charset=utf-8"),
    "/app.js": ("app.js", b"text/javascript; charset=utf-8"),
    "/style.css": ("style.css", b"text/css; charset=utf-8"),
}
# The page needs nothing from elsewhere; a strict policy also means that a
# message that did slip into the DOM as HTML could not run a script.
_PAGE_HEADERS = [
    (b"content-security-policy",
     b"default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data:; "
     b"base-uri 'none'; form-action 'none'; frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-cache"),
]


def chat_error(code: str, message: str, id: Any = None) -> ProtocolError:
    """An error reply with the chat's own ``error.code`` (``nick_taken``, ``slow_down``...).

    ``ProtocolError`` is annotated with trioserve's :class:`ErrorCode`, but the
    wire format takes any string, and applications need codes of their own.
    """
    return ProtocolError(code, message, id)


def room_topic(room: str) -> str:
    return ROOM_PREFIX + room


def json_response(status: int, body: Any) -> Response:
    return Response(status, json.dumps(body).encode())


def _error_response(status: int, code: str, message: str) -> Response:
    return json_response(status, {"ok": False, "error": {"code": code, "message": message}})


def _same_nick(a: str, b: str) -> bool:
    return a.casefold() == b.casefold()


def _host(conn: Connection) -> str:
    return (conn.remote or "?").rsplit(":", 1)[0]


@attrs.define
class RateLimit:
    """A token bucket: *burst* messages at once, refilled at *rate* per second."""

    rate: float
    burst: float
    tokens: float
    last: float

    def allow(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


def chat_config(host: str = "127.0.0.1", port: int = 8000, *, secret: str | None = None,
                **overrides: Any) -> Config:
    """The chat's :class:`Config`: tokens required, presence events and history for rooms."""
    return Config(
        host=host,
        port=port,
        # A fresh secret per process is enough: clients log in again after a
        # restart, as they must anyway because the in-memory history is gone.
        token_secret=secret or secrets.token_urlsafe(32),
        presence_events=(ROOM_PREFIX + "*",),
        history_rules=(HistoryRule(ROOM_PREFIX + "*", HISTORY_SIZE, 24 * 3600.0),),
        # 2,000 characters fit whatever UTF-8 and JSON escaping make of them.
        max_message_size=32 * 1024,
        **overrides,
    )


class Chat:
    """The chat application around one :class:`trioserve.Server`.

    Args:
      config: usually :func:`chat_config`'s; it must set ``token_secret``.
      handle_signals: drain on SIGTERM/SIGINT (for the command line).
      max_per_host: connections allowed from one address.
    """

    def __init__(self, config: Config, *, handle_signals: bool = False,
                 max_per_host: int = MAX_PER_HOST) -> None:
        if config.token_secret is None:
            raise ValueError("the chat signs its own tokens: set token_secret")
        self.secret = config.token_secret
        self.max_per_host = max_per_host
        self._per_host: dict[str, int] = {}
        self.server = Server(
            config,
            handle_signals=handle_signals,
            on_connect=self.on_connect,
            on_disconnect=self.on_disconnect,
            on_subscribe=self.on_subscribe,
        )
        self.server.add_op("say", self.op_say)
        self.server.add_op("nick", self.op_nick)
        for path, (name, content_type) in _STATIC_FILES.items():
            self.server.add_route("GET", path, self._static(name, content_type))
        self.server.add_route("POST", "/api/login", self.login)
        self.server.add_route("GET", "/api/recent", self.recent)
        self.server.add_route("GET", "/api/stats", self.stats)

    # --- hooks ----------------------------------------------------------------------

    async def on_connect(self, conn: Connection) -> None:
        """Refuse a flood of connections from one address; set up the rate limit."""
        host = _host(conn)
        if self._per_host.get(host, 0) >= self.max_per_host:
            raise Reject(4029, "too many connections from your address")
        self._per_host[host] = self._per_host.get(host, 0) + 1
        conn.data["host"] = host
        conn.data["limit"] = RateLimit(RATE, BURST, BURST, trio.current_time())
        conn.data["said"] = 0

    def on_disconnect(self, conn: Connection) -> None:
        # Also called for connections that never reached on_connect (a bad token).
        host = conn.data.get("host")
        if host is None:
            return
        left = self._per_host[host] - 1
        if left:
            self._per_host[host] = left
        else:
            del self._per_host[host]
        log.debug("%s left after %d messages", self._nick(conn), conn.data["said"])

    def on_subscribe(self, conn: Connection, topic: str) -> None:
        """Joining a room: only ``room.*`` topics, and one member per nick."""
        room = self._room_of(topic)
        nick = self._nick(conn)
        for other in self.server.hub.subscribers(topic):
            if other is not conn and _same_nick(self._nick(other), nick):
                raise chat_error("nick_taken",
                                 f"{nick} is already in #{room}; choose another nick with /nick")

    # --- custom ops -------------------------------------------------------------------

    async def op_say(self, conn: Connection, cmd: Command) -> dict[str, Any]:
        """``{"op":"say","room":"lobby","text":"hi","me":false}`` → ``{"offset": 7}``."""
        room = cmd.fields.get("room")
        if not isinstance(room, str) or not ROOM_RE.fullmatch(room):
            raise ProtocolError(ErrorCode.BAD_REQUEST, "'room' must be a room name", cmd.id)
        topic = room_topic(room)
        if topic not in self.server.hub.topics_of(conn):
            raise chat_error("not_in_room", f"join #{room} before you speak there", cmd.id)
        text = cmd.fields.get("text")
        if not isinstance(text, str) or not text.strip():
            raise ProtocolError(ErrorCode.BAD_REQUEST, "'text' must be a non-empty string", cmd.id)
        text = text.strip()
        if len(text) > MAX_TEXT:
            raise chat_error("too_long", f"messages are at most {MAX_TEXT} characters; "
                             f"this one has {len(text)}", cmd.id)
        limit: RateLimit = conn.data["limit"]
        if not limit.allow(trio.current_time()):
            raise chat_error("slow_down", f"You are sending messages quickly: at most {RATE:g} "
                             "a second, please. Wait a moment and try again.", cmd.id)
        kind = "me" if cmd.fields.get("me") is True else "msg"
        result = await self._publish(topic, {"kind": kind, "nick": self._nick(conn), "text": text},
                                     cmd.id)
        conn.data["said"] += 1
        return {"offset": result}

    async def op_nick(self, conn: Connection, cmd: Command) -> dict[str, Any]:
        """``{"op":"nick","nick":"bob"}``: a new nick in every room of the connection.

        The nick is the connection's identity (its claims' ``sub``), so the
        built-in presence op and join/leave events show it; the client asks
        ``/api/login`` for a token with the new nick before its next reconnect.
        """
        nick = cmd.fields.get("nick")
        if not isinstance(nick, str) or not NICK_RE.fullmatch(nick):
            raise chat_error("bad_nick", "a nick is 1-24 letters, digits, '_', '.' or '-'", cmd.id)
        claims = conn.claims
        assert claims is not None  # the server requires a token, so claims are set
        old = claims.sub
        if nick == old:
            return {"nick": nick}
        rooms = sorted(self.server.hub.topics_of(conn))
        for topic in rooms:
            for other in self.server.hub.subscribers(topic):
                if other is not conn and _same_nick(self._nick(other), nick):
                    raise chat_error("nick_taken", f"{nick} is already in "
                                     f"#{topic.removeprefix(ROOM_PREFIX)}", cmd.id)
        # Set before the first checkpoint, so no other join can take the nick meanwhile.
        conn.set_claims(attrs.evolve(claims, sub=nick))
        for topic in rooms:
            await self._publish(topic, {"kind": "nick", "old": old, "nick": nick,
                                        "conn": f"c{conn.id}"}, cmd.id)
        return {"nick": nick}

    # --- routes -----------------------------------------------------------------------

    async def login(self, req: Request) -> Response:
        """``POST /api/login {"nick": "bob"}`` → ``{"ok": true, "nick": "bob", "token": "…"}``.

        There are no accounts: anyone may log in with any well-formed nick. The
        token only carries the nick to trioserve, which verifies it on connect.
        """
        try:
            nick = json.loads(req.body).get("nick")
        except (ValueError, AttributeError):
            nick = None
        if not isinstance(nick, str) or not NICK_RE.fullmatch(nick):
            return _error_response(400, "bad_nick", "a nick is 1-24 letters, digits, '_', '.' or '-'")
        now = int(time.time())
        token = jwt.encode({"sub": nick, "iat": now, "exp": now + TOKEN_TTL,
                            "subscribe": [ROOM_PREFIX + "*"], "presence": True},
                           self.secret, algorithm="HS256")
        return json_response(200, {"ok": True, "nick": nick, "token": token})

    async def recent(self, req: Request) -> Response:
        """``GET /api/recent?room=lobby&upto=41``: the last messages up to offset *upto*.

        A client subscribes first and asks for what came before the position
        in the subscribe reply; everything later reaches it live, so nothing
        is shown twice or skipped.
        """
        room = req.query.get("room", [""])[0]
        if not ROOM_RE.fullmatch(room):
            return _error_response(400, "bad_request", "room must be a room name")
        topic = room_topic(room)
        hub = self.server.hub
        position = hub.position(topic)
        try:
            upto = min(position, int(req.query.get("upto", [str(position)])[0]))
        except ValueError:
            return _error_response(400, "bad_request", "upto must be an integer")
        # history_page rather than history_after: it also reads a shared broker's history.
        held, _complete = await hub.history_page(topic, max(0, upto - HISTORY_SIZE), HISTORY_SIZE)
        messages = []
        for payload in held:
            pub = json.loads(payload)
            if pub["offset"] <= upto and pub["data"].get("kind") in ("msg", "me"):
                messages.append(pub)
        return json_response(200, {"ok": True, "room": room, "offset": upto,
                                   "messages": messages[-BACKLOG:]})

    async def stats(self, req: Request) -> Response:
        """``GET /api/stats``: the server's statistics and each connection's."""
        conns = []
        for conn in self.server.connections:
            entry = attrs.asdict(conn.statistics())
            entry.pop("remote")
            entry["nick"] = self._nick(conn)
            entry["rooms"] = sorted(t.removeprefix(ROOM_PREFIX)
                                    for t in self.server.hub.topics_of(conn))
            conns.append(entry)
        body = {"server": attrs.asdict(self.server.statistics()), "connections": conns}
        return Response(200, json.dumps(body, default=str).encode())

    def _static(self, name: str, content_type: bytes) -> Any:
        # Read once: the files are small, and the server should not touch the disk per request.
        body = (STATIC / name).read_bytes()
        response = Response(200, body, content_type, list(_PAGE_HEADERS))

        async def serve(req: Request) -> Response:
            return response

        return serve

    # --- helpers ----------------------------------------------------------------------

    async def _publish(self, topic: str, data: dict[str, Any], id: Any) -> int:
        data["ts"] = round(time.time(), 3)
        try:
            result = await self.server.hub.publish(topic, data)
        except HubClosed:
            raise ProtocolError(ErrorCode.UNAVAILABLE, "the server is restarting", id) from None
        return result.offset

    def _room_of(self, topic: str) -> str:
        room = topic.removeprefix(ROOM_PREFIX)
        if not topic.startswith(ROOM_PREFIX) or not ROOM_RE.fullmatch(room):
            raise ProtocolError(ErrorCode.FORBIDDEN, "rooms are room.<name>: a-z 0-9 _ - (1-32)")
        return room

    @staticmethod
    def _nick(conn: Connection) -> str:
        return conn.claims.sub if conn.claims is not None else "?"


async def run(chat: Chat) -> None:
    """Serve *chat* until it is drained (SIGTERM or Ctrl-C when it handles signals)."""
    async with trio.open_nursery() as nursery:
        await nursery.start(chat.server.serve)
        host, port = chat.server.addresses["ws+http"][0]
        shown = f"[{host}]" if ":" in host else host
        print(f"chat running: open http://{shown}:{port}/ (Ctrl-C stops it)", flush=True)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m examples.chat", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8000, help="HTTP + WebSocket port; 0 picks one "
                        "(default: %(default)s)")
    parser.add_argument("--drain-timeout", type=float, default=5.0,
                        help="seconds to wait for clients on shutdown (default: %(default)s)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    chat = Chat(chat_config(args.host, args.port, drain_timeout=args.drain_timeout), handle_signals=True)
    try:
        trio.run(run, chat)
    except OSError as exc:
        sys.exit(f"cannot start the chat: {exc}")
    if chat.server.forced_exit is not None:
        sys.exit(128 + chat.server.forced_exit)


if __name__ == "__main__":
    main()
