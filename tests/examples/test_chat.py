"""The example chat server in process, driven over real sockets; and its terminal client."""

from __future__ import annotations

import itertools
import json
import signal
import urllib.error
import urllib.request
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import attrs
import pytest
import trio
import trio_websocket

from examples.chat.server import BACKLOG, MAX_TEXT, Chat, chat_config

from .conftest import Example

pytestmark = pytest.mark.system


@attrs.define
class Running:
    chat: Chat
    port: int

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"


StartChat = Callable[..., Awaitable[Running]]


@pytest.fixture
async def start_chat(nursery: trio.Nursery) -> StartChat:
    async def start(**kwargs: Any) -> Running:
        chat = Chat(chat_config(port=0), **kwargs)
        await nursery.start(chat.server.serve)
        return Running(chat, chat.server.addresses["ws+http"][0][1])

    return start


@attrs.frozen
class HttpReply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def _http(url: str, body: Any = None) -> HttpReply:
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=10) as resp:
            return HttpReply(resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read())
    except urllib.error.HTTPError as exc:
        return HttpReply(exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read())


async def http(url: str, body: Any = None) -> HttpReply:
    return await trio.to_thread.run_sync(_http, url, body)


class Peer:
    """A raw protocol client: requests with ids, other messages kept in order for :meth:`event`."""

    def __init__(self, ws: trio_websocket.WebSocketConnection) -> None:
        self.ws = ws
        self.events: deque[dict[str, Any]] = deque()
        self._ids = itertools.count(1)

    async def request(self, **msg: Any) -> dict[str, Any]:
        id = next(self._ids)
        await self.ws.send_message(json.dumps({**msg, "id": id}))
        while True:
            reply = json.loads(await self.ws.get_message())
            if reply.get("id") == id:
                return reply  # type: ignore[no-any-return]
            self.events.append(reply)

    async def ok(self, **msg: Any) -> dict[str, Any]:
        reply = await self.request(**msg)
        assert reply["ok"] is True, reply
        return reply

    async def error(self, **msg: Any) -> str:
        reply = await self.request(**msg)
        assert reply["ok"] is False, reply
        return str(reply["error"]["code"])

    async def event(self, op: str, by: str | None = None) -> dict[str, Any]:
        """The next message with this op (publications are ``"pub"``), from nick *by* if
        given; the messages before it are skipped."""
        while True:
            msg = self.events.popleft() if self.events else json.loads(await self.ws.get_message())
            if msg.get("op") != op:
                continue
            who = msg["data"].get("nick") if op == "pub" else msg.get("client", {}).get("client")
            if by is None or who == by:
                return msg


async def login(rc: Running, nick: str) -> str:
    reply = await http(f"{rc.base}/api/login", {"nick": nick})
    assert reply.status == 200, reply
    return str(reply.json()["token"])


@asynccontextmanager
async def peer(rc: Running, nick: str, room: str | None = "lobby") -> AsyncIterator[Peer]:
    token = await login(rc, nick)
    async with trio_websocket.open_websocket_url(f"ws://127.0.0.1:{rc.port}/ws?token={token}") as ws:
        p = Peer(ws)
        if room is not None:
            await p.ok(op="subscribe", topic=f"room.{room}")
        yield p


async def test_page_and_login_routes(start_chat: StartChat) -> None:
    rc = await start_chat()
    with trio.fail_after(10):
        page = await http(f"{rc.base}/")
        assert page.status == 200 and page.headers["content-type"].startswith("text/html")
        assert "script-src" not in page.headers["content-security-policy"]  # default-src 'self' covers it
        assert "default-src 'self'" in page.headers["content-security-policy"]
        for path, kind in (("/app.js", "text/javascript"), ("/style.css", "text/css")):
            asset = await http(rc.base + path)
            assert asset.status == 200 and asset.headers["content-type"].startswith(kind)
        assert (await http(f"{rc.base}/api/login", {"nick": "zoë_2"})).status == 200
        for bad in ({"nick": "two words"}, {"nick": ""}, {"nick": "x" * 25}, {"name": "bob"}, b"[1"):
            reply = await http(f"{rc.base}/api/login", bad)
            assert (reply.status, reply.json()["error"]["code"]) == (400, "bad_nick"), bad


async def test_a_connection_needs_a_token(start_chat: StartChat) -> None:
    rc = await start_chat()
    with trio.fail_after(10):
        async with trio_websocket.open_websocket_url(f"ws://127.0.0.1:{rc.port}/ws") as ws:
            with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                await ws.get_message()
    assert closed.value.reason is not None and closed.value.reason.code == 4001


async def test_messages_members_and_join_leave(start_chat: StartChat) -> None:
    rc = await start_chat()
    with trio.fail_after(10):
        async with peer(rc, "alice") as alice:
            async with peer(rc, "bob") as bob:
                join = await alice.event("join")
                assert join["client"]["client"] == "bob"
                members = await bob.ok(op="presence", topic="room.lobby")
                assert sorted(c["client"] for c in members["clients"]) == ["alice", "bob"]
                reply = await alice.ok(op="say", room="lobby", text="  hi <b>bob</b>  ")
                pub = await bob.event("pub")
                assert pub["offset"] == reply["offset"]
                assert pub["data"] | {"ts": 0} == {"kind": "msg", "nick": "alice", "text": "hi <b>bob</b>",
                                                   "ts": 0}
                await bob.ok(op="say", room="lobby", text="waves", me=True)
                assert (await alice.event("pub", by="bob"))["data"]["kind"] == "me"
            leave = await alice.event("leave")
            assert leave["client"]["client"] == "bob"
            # A client cannot publish around the chat's checks.
            assert await alice.error(op="publish", topic="room.lobby", data={"nick": "bob"}) == "forbidden"


async def test_nicks_are_unique_per_room(start_chat: StartChat) -> None:
    rc = await start_chat()
    with trio.fail_after(10):
        async with peer(rc, "bob"), peer(rc, "BOB", room=None) as other:
            assert await other.error(op="subscribe", topic="room.lobby") == "nick_taken"
            await other.ok(op="subscribe", topic="room.games")  # another room is fine
            assert await other.error(op="say", room="lobby", text="hi") == "not_in_room"
            assert await other.error(op="subscribe", topic="news") == "forbidden"  # the token's claim
            async with peer(rc, "carol", room="games") as carol:
                assert await carol.error(op="nick", nick="bob") == "nick_taken"  # BOB is in games
                assert await carol.error(op="nick", nick="no spaces") == "bad_nick"
                await carol.ok(op="nick", nick="caroline")
                notice = await other.event("pub")
                assert notice["data"] | {"ts": 0, "conn": ""} == {
                    "kind": "nick", "old": "carol", "nick": "caroline", "ts": 0, "conn": ""}
                members = await other.ok(op="presence", topic="room.games")
                assert sorted(c["client"] for c in members["clients"]) == ["BOB", "caroline"]


async def test_rate_limit_and_length(start_chat: StartChat) -> None:
    rc = await start_chat()
    with trio.fail_after(10):
        async with peer(rc, "speedy") as p:
            assert await p.error(op="say", room="lobby", text="x" * (MAX_TEXT + 1)) == "too_long"
            assert await p.error(op="say", room="lobby", text="   ") == "bad_request"
            await p.ok(op="say", room="lobby", text="é" * MAX_TEXT)
            codes = [(await p.request(op="say", room="lobby", text=f"m{i}")).get("error", {}).get("code")
                     for i in range(10)]
            # A burst of 5 (one was used above), then a polite refusal.
            assert codes[:4] == [None] * 4 and set(codes[4:]) == {"slow_down"}
            reply = await p.request(op="say", room="lobby", text="again")
            assert "Wait a moment" in reply["error"]["message"]


async def test_recent_is_the_last_messages_from_history(start_chat: StartChat) -> None:
    rc = await start_chat()
    hub = rc.chat.server.hub
    with trio.fail_after(10):
        for i in range(70):
            await hub.publish("room.lobby", {"kind": "msg", "nick": "n", "text": f"m{i}", "ts": 0})
            if i % 10 == 0:  # notices are in the history too, but not in the backlog
                await hub.publish("room.lobby", {"kind": "nick", "old": "a", "nick": "b", "ts": 0})
        await hub.flush()
        recent = (await http(f"{rc.base}/api/recent?room=lobby")).json()
        texts = [m["data"]["text"] for m in recent["messages"]]
        assert texts == [f"m{i}" for i in range(70 - BACKLOG, 70)]
        assert recent["offset"] == 77
        upto = (await http(f"{rc.base}/api/recent?room=lobby&upto=12")).json()
        assert [m["offset"] for m in upto["messages"]][-1] <= 12 and upto["offset"] == 12
        assert (await http(f"{rc.base}/api/recent?room=No!")).status == 400
        stats = (await http(f"{rc.base}/api/stats")).json()
        assert stats["server"]["hub"]["publications"] == 77


async def test_on_connect_limits_connections_per_address(start_chat: StartChat) -> None:
    rc = await start_chat(max_per_host=2)
    with trio.fail_after(10):
        async with peer(rc, "a", room=None), peer(rc, "b", room=None):
            token = await login(rc, "c")
            async with trio_websocket.open_websocket_url(f"ws://127.0.0.1:{rc.port}/ws?token={token}") as ws:
                with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                    await ws.get_message()
            assert closed.value.reason is not None and closed.value.reason.code == 4029
        async with peer(rc, "d"):  # the count went down again
            pass


async def test_terminal_client(start_chat: StartChat, run_example: type[Example]) -> None:
    rc = await start_chat()

    async def expect(pattern: str) -> None:
        await trio.to_thread.run_sync(lambda: client.wait_for(pattern))

    with trio.fail_after(60):
        async with peer(rc, "alice") as alice:
            await alice.ok(op="say", room="lobby", text="before carol came")
            client = run_example(["-m", "examples.chat.client", "--url", rc.base, "--nick", "carol"],
                                 stdin=True)
            await expect(r"\[lobby\] <alice> before carol came")  # the backlog
            await expect(r"-- members of #lobby: alice, carol")
            await alice.event("join")
            await alice.ok(op="say", room="lobby", text="hi carol")
            await expect(r"\[lobby\] <alice> hi carol")
            client.send_line("hello <alice>")
            assert (await alice.event("pub", by="carol"))["data"]["text"] == "hello <alice>"
            client.send_line("/me waves")
            assert (await alice.event("pub", by="carol"))["data"] | {"ts": 0} == {
                "kind": "me", "nick": "carol", "text": "waves", "ts": 0}
            client.send_line("/nick alice")
            await expect(r"-- nick_taken: alice is already in #lobby")
            client.send_line("/nick carl")
            await expect(r"-- you are now carl")
            assert (await alice.event("pub", by="carl"))["data"]["old"] == "carol"
            client.send_line("/join games")
            assert (await alice.event("leave"))["client"]["client"] == "carl"
            await expect(r"-- members of #games: carl")
            client.send_line("/quit")
            assert await trio.to_thread.run_sync(client.wait) == 0
    assert "Traceback" not in client.output, client.output


def test_python_m_examples_chat_serves_and_stops_on_sigterm(run_example: type[Example]) -> None:
    server = run_example(["-m", "examples.chat", "--port", "0"])
    port = server.wait_for(r"chat running: open http://127\.0\.0\.1:(\d+)/").group(1)
    page = _http(f"http://127.0.0.1:{port}/")
    assert page.status == 200 and b"<title>trioserve chat</title>" in page.body
    assert server.stop(signal.SIGTERM) == 0, server.output
    assert "drained 0, forced 0" in server.output
