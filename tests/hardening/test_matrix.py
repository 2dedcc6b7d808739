"""The bad-input matrix: one test per hostile input, on a real socket to a real server.

Each case sends its input, asserts the named close code, HTTP status or error
reply (always with a reason), and then :meth:`Ctx.finish` asserts that the
server dropped the case's connections, still answers, and still delivers to a
bystander that subscribed before the case began. Cases whose point is a
timeout run on the autojump clock (``test_bad_input_timed``).

Every case adds a row (sent, expected, observed) to the matrix table; see
conftest.py and docs/reliability.md.
"""

from __future__ import annotations

import json
import os
import struct
import time
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import pytest
import trio

from trioserve import Config, ConnectionState

from ..conftest import ServerFactory
from ..peers import (
    HOST,
    OP_BINARY,
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_TEXT,
    NdjsonClient,
    RawWebSocket,
    apply_mask,
    dumps,
    encode_frame,
    http_publish,
    open_socket,
    upgrade_head,
)
from ..system.helpers import wait_until
from .harness import (
    LIMIT,
    SECRET,
    Ctx,
    case_context,
    describe_error,
    exchange,
    forged_token,
    hs256_token,
    reset_socket,
    rsa_keys,
    unsigned_token,
)

pytestmark = pytest.mark.system

CaseFn = Callable[[Ctx], Awaitable[None]]
#: Small limits keep the oversize cases quick; every case may override them.
BASE_CONFIG: dict[str, Any] = {"max_message_size": 4096, "close_timeout": 2}
MAX = BASE_CONFIG["max_message_size"]
#: Virtual seconds for a case on the autojump clock.
TIMED_LIMIT = 600


@attrs.frozen
class Case:
    id: str
    area: str
    sent: str
    expected: str
    run: CaseFn
    config: dict[str, Any]
    timed: bool


CASES: list[Case] = []


def case(id: str, area: str, sent: str, expected: str, *, timed: bool = False,
         **config: Any) -> Callable[[CaseFn], CaseFn]:
    def register(fn: CaseFn) -> CaseFn:
        CASES.append(Case(id, area, sent, expected, fn, {**BASE_CONFIG, **config}, timed))
        return fn
    return register


# --- shared steps ---------------------------------------------------------------------------


async def expect_ws_close(ctx: Ctx, data: bytes, code: int, reason_has: str = "",
                          ws: RawWebSocket | None = None) -> None:
    """Send *data* on a fresh WebSocket (or *ws*); the server must close with *code* and a reason."""
    ws = ws or await ctx.connect()
    try:
        await ws.stream.send_all(data)
    except trio.BrokenResourceError:
        pass  # the server may have closed already; its close frame is still to be read
    closed = await ws.wait_closed()
    await ws.aclose()
    got, reason = closed.code, closed.reason
    ctx.observe(f"close {got} {reason!r}")
    assert got == code, f"expected close {code}, got {got} {reason!r}"
    assert reason, "the close frame carries no reason"
    assert reason_has.lower() in reason.lower(), f"{reason_has!r} not in {reason!r}"


async def close_cleanly(ws: RawWebSocket) -> None:
    await ws.send_close(1000)
    while (frame := await ws.recv_frame()).opcode != OP_CLOSE:
        pass
    assert frame.close_code == 1000, frame
    await ws.aclose()


async def expect_error_reply(ctx: Ctx, payload: bytes | str, code: str, message_has: str = "",
                             ws: RawWebSocket | None = None) -> None:
    """The server answers *payload* with ``{"ok":false}`` and keeps the connection usable."""
    ws = ws or await ctx.connect()
    data = payload.encode() if isinstance(payload, str) else payload
    await ws.send_frame(OP_TEXT, data)
    reply = await ws.recv_json()
    ctx.observe(describe_error(reply) + "; connection open")
    assert reply.get("ok") is False, reply
    assert reply["error"]["code"] == code, reply
    assert reply["error"]["message"], reply
    assert message_has.lower() in reply["error"]["message"].lower(), reply
    assert await ws.request({"op": "ping", "id": "after"}) == {"id": "after", "ok": True, "op": "pong"}
    await close_cleanly(ws)


async def expect_http(ctx: Ctx, data: bytes, status: int, message_has: str = "",
                      header: tuple[str, str] | None = None) -> None:
    """One refused request: *status*, an error body with a message, then the connection closes."""
    ex = await exchange(ctx.port, data)
    ctx.observe(ex.describe())
    assert len(ex.responses) == 1, ex
    resp = ex.responses[0]
    assert resp.status == status, ex
    body = resp.json()
    assert body["ok"] is False and body["error"]["code"] and body["error"]["message"], body
    assert message_has.lower() in body["error"]["message"].lower(), body
    if header is not None:
        assert resp.headers.get(header[0]) == header[1], resp.headers
    assert ex.closed, "the server kept the connection open after refusing the request"


async def expect_tcp_close(client: NdjsonClient, code: int, reason_has: str) -> str:
    """Lines until the server's close line; it must carry *code* and a reason, then EOF."""
    while True:
        line = await client.recv_line()
        assert line is not None, "EOF without a close line"
        obj = json.loads(line)
        if obj.get("op") == "close":
            break
    observed = f"close line {obj['code']} {obj['reason']!r}"
    assert obj["code"] == code and obj["reason"] and reason_has in obj["reason"], obj
    assert await client.recv_line() is None, "data after the close line"
    return observed


def _if_supported(**options: Any) -> dict[str, Any]:
    """The options this version of Config has (limits are still being added)."""
    return {k: v for k, v in options.items() if k in attrs.fields_dict(Config)}


def host(ctx: Ctx) -> str:
    return f"Host: {HOST}:{ctx.port}\r\n"


# ============================================================================================
# WebSocket frames
# ============================================================================================

@case("ws-unmasked-frame", "websocket", "text frame without the mask bit", "close 1002 + reason")
async def _(ctx: Ctx) -> None:
    await expect_ws_close(ctx, encode_frame(OP_TEXT, b'{"op":"ping"}', mask=False), 1002)


@case("ws-rsv1-set", "websocket", "text frame with RSV1 set (no extension negotiated)",
      "close 1002 + reason")
async def _(ctx: Ctx) -> None:
    frame = bytearray(encode_frame(OP_TEXT, b'{"op":"ping"}'))
    frame[0] |= 0x40
    await expect_ws_close(ctx, bytes(frame), 1002, "reserved")


@case("ws-rsv3-set", "websocket", "ping frame with RSV3 set", "close 1002 + reason")
async def _(ctx: Ctx) -> None:
    frame = bytearray(encode_frame(OP_PING, b"x"))
    frame[0] |= 0x10
    await expect_ws_close(ctx, bytes(frame), 1002, "reserved")


@case("ws-unknown-data-opcode", "websocket", "frame with opcode 0x3", "close 1002 + reason")
async def _(ctx: Ctx) -> None:
    await expect_ws_close(ctx, encode_frame(0x3, b"x"), 1002, "opcode")


@case("ws-unknown-control-opcode", "websocket", "frame with opcode 0xB", "close 1002 + reason")
async def _(ctx: Ctx) -> None:
    await expect_ws_close(ctx, encode_frame(0xB, b"x"), 1002, "opcode")


@case("ws-fragmented-control", "websocket", "ping frame with FIN=0", "close 1002 + reason")
async def _(ctx: Ctx) -> None:
    await expect_ws_close(ctx, encode_frame(OP_PING, b"x", fin=False), 1002, "fragment")


@case("ws-control-over-125", "websocket", "ping frame with a 126-byte payload", "close 1002 + reason")
async def _(ctx: Ctx) -> None:
    await expect_ws_close(ctx, encode_frame(OP_PING, b"p" * 126), 1002, "125")


@case("ws-length-2^63", "websocket", "text frame header declaring 2^63 bytes (64-bit length, MSB set)",
      "close 1002 + reason")
async def _(ctx: Ctx) -> None:
    data = struct.pack("!BBQ", 0x81, 0x80 | 127, 2**63) + os.urandom(4)
    await expect_ws_close(ctx, data, 1002, "MSB")


@case("ws-length-2^63-1", "websocket",
      f"text frame header declaring 2^63-1 bytes, then {MAX + 100} bytes of it",
      "close 1009 once past max_message_size")
async def _(ctx: Ctx) -> None:
    key = os.urandom(4)
    data = struct.pack("!BBQ", 0x81, 0x80 | 127, 2**63 - 1) + key + apply_mask(b"a" * (MAX + 100), key)
    await expect_ws_close(ctx, data, 1009, "too big")


@case("ws-continuation-without-start", "websocket", "continuation frame with no message started",
      "close 1002 + reason")
async def _(ctx: Ctx) -> None:
    await expect_ws_close(ctx, encode_frame(OP_CONT, b"x"), 1002, "continuation")


@case("ws-new-message-mid-fragment", "websocket",
      "text frame FIN=0, then another text frame instead of a continuation", "close 1002 + reason")
async def _(ctx: Ctx) -> None:
    data = encode_frame(OP_TEXT, b'{"op":', fin=False) + encode_frame(OP_TEXT, b'"ping"}')
    await expect_ws_close(ctx, data, 1002, "continuation")


@case("ws-invalid-utf8", "websocket", "text frame with byte 0xFF", "close 1007 + reason")
async def _(ctx: Ctx) -> None:
    await expect_ws_close(ctx, encode_frame(OP_TEXT, b'{"op":"ping","id":"\xff"}'), 1007)


@case("ws-invalid-utf8-across-fragments", "websocket",
      "text message whose 3-byte character starts in fragment 1 and is broken in fragment 2",
      "close 1007 + reason")
async def _(ctx: Ctx) -> None:
    data = (encode_frame(OP_TEXT, b'{"op":"ping","id":"\xe6\x97', fin=False)
            + encode_frame(OP_CONT, b'A"}'))
    await expect_ws_close(ctx, data, 1007)


@case("ws-truncated-utf8-at-end", "websocket",
      "text message ending in the first 2 bytes of a 3-byte character", "close 1007 + reason")
async def _(ctx: Ctx) -> None:
    data = encode_frame(OP_TEXT, b'{"op":"ping"}\xe6\x97', fin=False) + encode_frame(OP_CONT, b"")
    await expect_ws_close(ctx, data, 1007)


@case("ws-valid-utf8-across-fragments", "websocket",
      "control: a valid 3-byte character split across two fragments",
      "accepted: pong reply with the character; connection open")
async def _(ctx: Ctx) -> None:
    ws = await ctx.connect()
    await ws.stream.send_all(encode_frame(OP_TEXT, b'{"op":"ping","id":"\xe6\x97', fin=False)
                             + encode_frame(OP_CONT, b'\xa5"}'))
    reply = await ws.recv_json()
    ctx.observe(f"reply {dumps(reply)}; connection open")
    assert reply == {"id": "日", "ok": True, "op": "pong"}
    await close_cleanly(ws)


for _code in (1005, 1006, 999):
    def _make(code: int) -> CaseFn:
        async def run(ctx: Ctx) -> None:
            await expect_ws_close(ctx, encode_frame(OP_CLOSE, struct.pack("!H", code)), 1002)
        return run

    case(f"ws-close-code-{_code}", "websocket", f"close frame with code {_code} on the wire",
         "close 1002 + reason")(_make(_code))


@case("ws-close-1-byte", "websocket", "close frame with a 1-byte payload", "close 1002 + reason")
async def _(ctx: Ctx) -> None:
    await expect_ws_close(ctx, encode_frame(OP_CLOSE, b"\x03"), 1002, "1 byte")


@case("ws-close-bad-utf8-reason", "websocket", "close 1000 whose reason is not UTF-8",
      "close 1007 + reason")
async def _(ctx: Ctx) -> None:
    await expect_ws_close(ctx, encode_frame(OP_CLOSE, struct.pack("!H", 1000) + b"\xff\xfe"), 1007)


@case("ws-oversized-message", "websocket", f"one text frame of {MAX + 1} bytes (limit {MAX})",
      "close 1009 'message too big'")
async def _(ctx: Ctx) -> None:
    await expect_ws_close(ctx, encode_frame(OP_TEXT, b"x" * (MAX + 1)), 1009, "message too big")


@case("ws-oversized-fragmented", "websocket",
      f"3 fragments of {MAX // 2} bytes each (each under the limit, the message over)",
      "close 1009 'message too big'")
async def _(ctx: Ctx) -> None:
    part = b"y" * (MAX // 2)
    data = (encode_frame(OP_TEXT, part, fin=False) + encode_frame(OP_CONT, part, fin=False)
            + encode_frame(OP_CONT, part))
    await expect_ws_close(ctx, data, 1009, "message too big")


@case("ws-oversized-binary", "websocket", f"one binary frame of {MAX + 1} bytes",
      "close 1009 'message too big'")
async def _(ctx: Ctx) -> None:
    await expect_ws_close(ctx, encode_frame(OP_BINARY, b"\x00" * (MAX + 1)), 1009, "message too big")


# ============================================================================================
# HTTP and the handshake
# ============================================================================================


@case("upgrade-missing-key", "http", "upgrade without Sec-WebSocket-Key",
      "HTTP 400 bad_request + message, closed")
async def _(ctx: Ctx) -> None:
    head, _ = upgrade_head(ctx.port)
    await expect_http(ctx, head.replace(b"Sec-WebSocket-Key", b"X-Not-The-Key"), 400,
                      "Sec-WebSocket-Key")


@case("upgrade-wrong-key", "http", "Sec-WebSocket-Key that is not 16 base64-encoded bytes",
      "HTTP 400 bad_request + message, closed")
async def _(ctx: Ctx) -> None:
    head, _ = upgrade_head(ctx.port, key="dG9vIHNob3J0")
    await expect_http(ctx, head, 400, "16 bytes")


@case("upgrade-missing-version", "http", "upgrade without Sec-WebSocket-Version",
      "HTTP 426 + 'Sec-WebSocket-Version: 13', closed")
async def _(ctx: Ctx) -> None:
    head, _ = upgrade_head(ctx.port)
    await expect_http(ctx, head.replace(b"Sec-WebSocket-Version", b"X-Not-The-Version"), 426,
                      "version", ("sec-websocket-version", "13"))


@case("upgrade-wrong-version", "http", "Sec-WebSocket-Version: 8",
      "HTTP 426 + 'Sec-WebSocket-Version: 13', closed")
async def _(ctx: Ctx) -> None:
    head, _ = upgrade_head(ctx.port, version="8")
    await expect_http(ctx, head, 426, "version", ("sec-websocket-version", "13"))


@case("upgrade-http-1.0", "http", "a valid upgrade head, but HTTP/1.0",
      "HTTP 400 'needs HTTP/1.1', closed")
async def _(ctx: Ctx) -> None:
    head, _ = upgrade_head(ctx.port)
    await expect_http(ctx, head.replace(b"HTTP/1.1", b"HTTP/1.0", 1), 400, "HTTP/1.1")


@case("http-1.0-request", "http", "GET /healthz HTTP/1.0 (no Host)",
      "answered (200), then closed: HTTP/1.0 has no keep-alive here")
async def _(ctx: Ctx) -> None:
    ex = await exchange(ctx.port, b"GET /healthz HTTP/1.0\r\n\r\n")
    ctx.observe(ex.describe())
    assert [r.status for r in ex.responses] == [200] and ex.closed, ex


@case("head-request", "http", "HEAD /healthz, then GET /healthz on the same connection",
      "HTTP 200 with GET's headers and no body (or 405), then the GET answered; the server carries on")
async def _(ctx: Ctx) -> None:
    head = f"HEAD /healthz HTTP/1.1\r\n{host(ctx)}\r\n".encode()
    ex = await exchange(ctx.port, head, wait=2, head=True)
    ctx.observe(ex.describe())
    assert len(ex.responses) == 1 and ex.responses[0].status in (200, 405), ex
    assert ex.responses[0].body == b"" and not ex.leftover, ex
    # A body sent anyway would be read as the start of the next response.
    ex = await exchange(ctx.port, head + f"GET /healthz HTTP/1.1\r\n{host(ctx)}\r\n".encode(),
                        want=2, wait=2, head=True)
    assert len(ex.responses) == 2 and ex.responses[1].status in (200, 405), ex
    assert ex.leftover == b'{"status":"ok"}', ex  # the GET's body, unparsed with head=True


@case("header-100kb", "http", "GET /healthz with a 100 KB header",
      "HTTP 431 + message, closed (head limit 16 KiB)")
async def _(ctx: Ctx) -> None:
    data = f"GET /healthz HTTP/1.1\r\n{host(ctx)}X-Big: {'a' * 100_000}\r\n\r\n".encode()
    await expect_http(ctx, data, 431)


@case("request-smuggling-cl-te", "http",
      "POST with Content-Length and Transfer-Encoding: chunked; the CL-framed body hides a "
      "second request (GET /readyz)",
      "one answer, then the connection closed (RFC 9112 6.1); the hidden request never served")
async def _(ctx: Ctx) -> None:
    hidden = f"GET /readyz HTTP/1.1\r\n{host(ctx)}\r\n".encode()
    body = b"0\r\n\r\n" + hidden
    data = (f"POST /api/publish HTTP/1.1\r\n{host(ctx)}Content-Length: {len(body)}\r\n"
            "Transfer-Encoding: chunked\r\n\r\n").encode() + body
    ex = await exchange(ctx.port, data, want=2, wait=3)
    ctx.observe(ex.describe())
    assert len(ex.responses) == 1, (
        f"the server answered {len(ex.responses)} requests: the one hidden in the body was served "
        f"({ex.describe()})")
    assert ex.closed, "a request with both Content-Length and Transfer-Encoding must end the connection"


@case("malformed-chunked-body", "http", "POST /api/publish, Transfer-Encoding: chunked, chunk size 'zz'",
      "HTTP 400 bad_request + message, closed")
async def _(ctx: Ctx) -> None:
    data = (f"POST /api/publish HTTP/1.1\r\n{host(ctx)}Transfer-Encoding: chunked\r\n\r\n"
            "zz\r\nabc\r\n0\r\n\r\n").encode()
    await expect_http(ctx, data, 400)


@case("upgrade-with-bad-chunked-body", "http",
      "a valid upgrade request with Transfer-Encoding: chunked and the chunk header 'zz'",
      "HTTP 400 bad_request + message, closed; the server carries on")
async def _(ctx: Ctx) -> None:
    head, _ = upgrade_head(ctx.port)
    await expect_http(ctx, head.replace(b"\r\n\r\n", b"\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"),
                      400)


@case("pipelined-requests", "http", "GET /healthz and GET /readyz in one write",
      "both answered, in order (200 ok, 200 ready)")
async def _(ctx: Ctx) -> None:
    req = f"GET /healthz HTTP/1.1\r\n{host(ctx)}\r\nGET /readyz HTTP/1.1\r\n{host(ctx)}\r\n"
    ex = await exchange(ctx.port, req.encode(), want=2)
    ctx.observe(ex.describe())
    assert [(r.status, r.json()) for r in ex.responses] == [
        (200, {"status": "ok"}), (200, {"status": "ready"})], ex


@case("pipelined-publish-then-get", "http",
      "POST /api/publish (bad JSON) and GET /healthz in one write",
      "both answered in order (400 bad_request, 200)")
async def _(ctx: Ctx) -> None:
    req = (f"POST /api/publish HTTP/1.1\r\n{host(ctx)}Content-Length: 5\r\n\r\n{{nope"
           f"GET /healthz HTTP/1.1\r\n{host(ctx)}\r\n")
    ex = await exchange(ctx.port, req.encode(), want=2)
    ctx.observe(ex.describe())
    assert [r.status for r in ex.responses] == [400, 200], ex
    assert ex.responses[0].json()["error"]["code"] == "bad_request"


@case("upgrade-with-body", "http", "upgrade request with Content-Length: 3 and a body",
      "HTTP 400 bad_request + message, closed")
async def _(ctx: Ctx) -> None:
    head, _ = upgrade_head(ctx.port)
    await expect_http(ctx, head.replace(b"\r\n\r\n", b"\r\nContent-Length: 3\r\n\r\nabc"), 400, "body")


@case("tls-client-hello", "http", "a TLS ClientHello on the plain-HTTP port",
      "HTTP 400 bad_request + message, closed")
async def _(ctx: Ctx) -> None:
    await expect_http(ctx, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(64), 400)


@case("slowloris-partial-head", "http", "half a request head, then silence",
      "closed after handshake_timeout (10 s), no answer", timed=True, handshake_timeout=10)
async def _(ctx: Ctx) -> None:
    stream = await open_socket(ctx.port)
    async with stream:
        await stream.send_all(f"GET /ws HTTP/1.1\r\n{host(ctx)}Upgrade: websocket\r\n".encode())
        start = trio.current_time()
        data = await stream.receive_some(65536)
        elapsed = trio.current_time() - start
    ctx.observe(f"EOF after {elapsed:.1f} s, {len(data)} bytes of answer")
    assert data == b""
    assert elapsed == pytest.approx(10, abs=0.5)


@case("slowloris-dribble", "http", "a request head at one byte per second",
      "closed 10 s after the first byte (handshake_timeout bounds the whole head)",
      timed=True, handshake_timeout=10)
async def _(ctx: Ctx) -> None:
    head, _ = upgrade_head(ctx.port)
    stream = await open_socket(ctx.port)
    sent = 0

    async def dribble() -> None:
        nonlocal sent
        try:
            for i in range(len(head)):
                await stream.send_all(head[i : i + 1])
                sent += 1
                await trio.sleep(1)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async with stream, trio.open_nursery() as nursery:
        start = trio.current_time()
        nursery.start_soon(dribble)
        try:
            data = await stream.receive_some(65536)
            how = "EOF"
        except trio.BrokenResourceError:
            # Closing with our latest byte unread makes the kernel send RST: as good as EOF here.
            data, how = b"", "reset"
        elapsed = trio.current_time() - start
        nursery.cancel_scope.cancel()
    ctx.observe(f"{how} after {elapsed:.1f} s ({sent} of {len(head)} bytes sent), no answer")
    assert data == b""
    assert elapsed == pytest.approx(10, abs=1.5)


@case("half-open-websocket", "http",
      "an upgraded client that goes silent without FIN (never reads or writes again)",
      "ping at 25-26 s (the heartbeat task's 1 s tick), close 4002 'heartbeat timeout' at 36 s "
      "(interval + tick + timeout), socket dropped by 41 s (close_timeout)",
      timed=True, ping_interval=25, ping_timeout=10, close_timeout=5)
async def _(ctx: Ctx) -> None:
    ws = await ctx.connect()
    start = trio.current_time()
    await ctx.settle(timeout=100)
    elapsed = trio.current_time() - start
    frames = []
    async with ws.stream:
        while True:
            try:
                frames.append(await ws.recv_frame())
            except Exception:
                break
    close = frames[-1] if frames else None
    opcodes = [f.opcode for f in frames]
    ctx.observe(f"frames {opcodes}; close {close.close_code if close else None} "
                f"{close.close_reason if close else ''!r}; dropped after {elapsed:.0f} s")
    assert opcodes == [OP_PING, OP_CLOSE]
    assert close is not None and (close.close_code, close.close_reason) == (4002, "heartbeat timeout")
    assert elapsed == pytest.approx(41, abs=1)


@case("half-open-tcp", "http", "an NDJSON client that goes silent without FIN",
      "ping line at 25-26 s, close line 4002 at 36 s, socket dropped by 41 s",
      timed=True, ping_interval=25, ping_timeout=10, close_timeout=5)
async def _(ctx: Ctx) -> None:
    client = await NdjsonClient.connect(ctx.tcp_port)
    await wait_until(lambda: len(ctx.rs.server.connections) == 2, what="the TCP client to be accepted")
    start = trio.current_time()
    await ctx.settle(timeout=100)
    elapsed = trio.current_time() - start
    async with client.stream:
        data = await client.reader.read_to_eof()
    lines = data.splitlines()
    ctx.observe(f"lines {[line.decode() for line in lines]}; dropped after {elapsed:.0f} s")
    assert lines[0] == b'{"op":"ping"}'
    assert lines[1:] == [b'{"op":"close","code":4002,"reason":"heartbeat timeout"}']
    assert elapsed == pytest.approx(41, abs=1)


@case("reset-after-upgrade", "http", "a subscribed client closes with SO_LINGER 0 (RST, no close frame)",
      "connection dropped at once, recorded as 1006, subscription gone")
async def _(ctx: Ctx) -> None:
    server = ctx.rs.server
    ws = await ctx.connect()
    assert (await ws.request({"op": "subscribe", "topic": "rst", "id": 1}))["ok"] is True
    before = dict(server.statistics().disconnects_total)
    reset_socket(ws.stream)
    await ctx.settle()
    after = server.statistics().disconnects_total
    new = {int(code): n - before.get(code, 0) for code, n in after.items() if n != before.get(code, 0)}
    ctx.observe(f"dropped; disconnects by code {new}; subscribers of 'rst': "
                f"{server.hub.subscriber_count('rst')}")
    assert new == {1006: 1}
    assert server.hub.subscriber_count("rst") == 0


@case("reset-mid-handshake", "http", "half a request head, then RST",
      "socket dropped at once, nothing logged as a connection")
async def _(ctx: Ctx) -> None:
    stream = await open_socket(ctx.port)
    await stream.send_all(f"GET /ws HTTP/1.1\r\n{host(ctx)}".encode())
    await trio.testing.wait_all_tasks_blocked()
    reset_socket(stream)
    await wait_until(lambda: ctx.rs.server._admission.sockets == 1, what="the half-open socket to be dropped")
    ctx.observe("socket dropped")


@case("never-reading-client", "http",
      "a subscriber with a 4 KB receive buffer that never reads, while its topic gets 4 KB publications",
      "close 4008 'slow consumer' (queue_max_bytes 64 KiB), others unaffected",
      queue_max_bytes=64 * 1024, close_timeout=20)
async def _(ctx: Ctx) -> None:
    server = ctx.rs.server
    slow = await ctx.connect(rcvbuf=4096)
    assert (await slow.request({"op": "subscribe", "topic": "firehose", "id": 1}))["ok"] is True
    [conn] = [c for c in server.connections if c.remote == f"127.0.0.1:{slow.local_port}"]
    published = 0
    while conn.state is ConnectionState.OPEN:
        assert published < 20_000, "the slow client's queue never hit its limit"
        for _ in range(4):
            server.hub.publish_nowait("firehose", {"pad": "z" * 4000})
        published += 4
        await server.hub.flush()
    pubs = 0
    while (frame := await slow.recv_frame()).opcode == OP_TEXT:
        pubs += 1
    ctx.observe(f"close {frame.close_code} {frame.close_reason!r} after {pubs} of {published} "
                "publications reached the client")
    assert frame.opcode == OP_CLOSE and (frame.close_code, frame.close_reason) == (4008, "slow consumer")
    await slow.answer_close(frame)
    await slow.aclose()


# ============================================================================================
# The push protocol
# ============================================================================================


@case("invalid-json", "protocol", "text message '{not json'", "error bad_request; connection open")
async def _(ctx: Ctx) -> None:
    await expect_error_reply(ctx, "{not json", "bad_request", "invalid JSON")


@case("json-array", "protocol", "text message '[1, 2]'", "error bad_request; connection open")
async def _(ctx: Ctx) -> None:
    await expect_error_reply(ctx, "[1, 2]", "bad_request", "object")


@case("json-scalar", "protocol", "text message '\"subscribe\"'", "error bad_request; connection open")
async def _(ctx: Ctx) -> None:
    await expect_error_reply(ctx, '"subscribe"', "bad_request", "object")


@case("unknown-op", "protocol", '{"op":"frobnicate"}', "error unknown_op; connection open")
async def _(ctx: Ctx) -> None:
    await expect_error_reply(ctx, '{"op":"frobnicate","id":1}', "unknown_op", "frobnicate")


@case("missing-op", "protocol", '{"topic":"t"}', "error bad_request; connection open")
async def _(ctx: Ctx) -> None:
    await expect_error_reply(ctx, '{"topic":"t"}', "bad_request", "op")


@case("wrong-type-op", "protocol", '{"op":5}', "error bad_request; connection open")
async def _(ctx: Ctx) -> None:
    await expect_error_reply(ctx, '{"op":5}', "bad_request", "string")


@case("wrong-type-topic", "protocol", '{"op":"subscribe","topic":42}', "error bad_request; connection open")
async def _(ctx: Ctx) -> None:
    await expect_error_reply(ctx, '{"op":"subscribe","topic":42}', "bad_request", "topic")


@case("wrong-type-id", "protocol", '{"op":"ping","id":true}', "error bad_request; connection open")
async def _(ctx: Ctx) -> None:
    await expect_error_reply(ctx, '{"op":"ping","id":true}', "bad_request", "id")


@case("wrong-type-since", "protocol", '{"op":"subscribe","topic":"t","since":{"epoch":1,"offset":-1}}',
      "error bad_request; connection open")
async def _(ctx: Ctx) -> None:
    await expect_error_reply(ctx, '{"op":"subscribe","topic":"t","since":{"epoch":1,"offset":-1}}',
                             "bad_request", "since")


@case("huge-topic", "protocol", "subscribe to a 60,000-character topic", "error bad_request; connection open",
      max_message_size=64 * 1024)
async def _(ctx: Ctx) -> None:
    await expect_error_reply(ctx, dumps({"op": "subscribe", "topic": "t" * 60_000}), "bad_request", "topic")


@case("deeply-nested-json", "protocol", "publish with data nested 5,000 arrays deep",
      "error bad_request; connection open", max_message_size=64 * 1024, client_publish=True)
async def _(ctx: Ctx) -> None:
    raw = '{"op":"publish","topic":"t","data":' + "[" * 5000 + "]" * 5000 + "}"
    await expect_error_reply(ctx, raw, "bad_request", "invalid JSON")


@case("nan", "protocol", '{"op":"publish","topic":"t","data":NaN}', "error bad_request; connection open",
      client_publish=True)
async def _(ctx: Ctx) -> None:
    await expect_error_reply(ctx, '{"op":"publish","topic":"t","data":NaN}', "bad_request")


@case("infinity", "protocol", '{"op":"publish","topic":"t","data":-Infinity}',
      "error bad_request; connection open", client_publish=True)
async def _(ctx: Ctx) -> None:
    await expect_error_reply(ctx, '{"op":"publish","topic":"t","data":-Infinity}', "bad_request")


@case("ten-thousand-subscriptions", "protocol", "10,000 subscribes (distinct topics) on one connection",
      "error too_many_subscriptions past max_subscriptions; connection open",
      **_if_supported(max_subscriptions=1000, rate_limit=0))
async def _(ctx: Ctx) -> None:
    ws = await ctx.connect()
    replies: list[Any] = []
    for batch in range(20):
        await ws.stream.send_all(b"".join(
            encode_frame(OP_TEXT, dumps({"op": "subscribe", "topic": f"t{i}", "id": i}).encode())
            for i in range(batch * 500, batch * 500 + 500)))
        for _ in range(500):
            replies.append(await ws.recv_json())
    ok = sum(1 for r in replies if r.get("ok") is True)
    codes = sorted({r["error"]["code"] for r in replies if r.get("ok") is False})
    held = len(ctx.rs.server.hub.topics_of(next(c for c in ctx.rs.server.connections
                                               if c.remote == f"127.0.0.1:{ws.local_port}")))
    ctx.observe(f"{ok} of 10000 accepted, errors {codes or 'none'}; the connection holds {held} "
                "subscriptions" + ("" if codes else " (no max_subscriptions limit)"))
    assert codes == ["too_many_subscriptions"], "no subscription limit: all 10,000 were accepted"
    assert 0 < ok < 10_000
    await close_cleanly(ws)


@case("ndjson-line-over-limit", "protocol", f"TCP line of {MAX + 1000} bytes without a newline",
      "close line 1009 'line too long', EOF")
async def _(ctx: Ctx) -> None:
    client = await NdjsonClient.connect(ctx.tcp_port)
    async with client.stream:
        await client.send_raw(b"x" * (MAX + 1000))
        ctx.observe(await expect_tcp_close(client, 1009, "line too long"))


@case("ndjson-invalid-utf8", "protocol", "TCP line with byte 0xFF", "close line 1007 'invalid UTF-8', EOF")
async def _(ctx: Ctx) -> None:
    client = await NdjsonClient.connect(ctx.tcp_port)
    async with client.stream:
        await client.send_raw(b'{"op":"ping","id":"\xff"}\n')
        ctx.observe(await expect_tcp_close(client, 1007, "UTF-8"))


@case("ndjson-partial-line-at-eof", "protocol",
      "TCP: a complete ping line, then a subscribe line without its newline, then FIN",
      "ping answered; the partial line dropped (no subscription, no reply); connection closed")
async def _(ctx: Ctx) -> None:
    server = ctx.rs.server
    client = await NdjsonClient.connect(ctx.tcp_port)
    before = dict(server.statistics().disconnects_total)
    async with client.stream:
        await client.send_raw(b'{"op":"ping","id":1}\n{"op":"subscribe","topic":"partial","id":2}')
        await client.send_eof()
        data = await client.reader.read_to_eof()
    await ctx.settle()
    after = server.statistics().disconnects_total
    new = {int(code): n - before.get(code, 0) for code, n in after.items() if n != before.get(code, 0)}
    ctx.observe(f"got {data!r}, then EOF; subscribers of 'partial': "
                f"{server.hub.subscriber_count('partial')}; server recorded close code {new}")
    assert data == b'{"id":1,"ok":true,"op":"pong"}\n'
    assert server.hub.subscriber_count("partial") == 0


@case("tcp-command-before-connect", "auth", "TCP subscribe line on a token server without connect first",
      "close line 4001 naming 'connect'", token_secret=SECRET)
async def _(ctx: Ctx) -> None:
    client = await NdjsonClient.connect(ctx.tcp_port)
    async with client.stream:
        await client.send({"op": "subscribe", "topic": "t"})
        ctx.observe(await expect_tcp_close(client, 4001, "connect"))


# ============================================================================================
# Auth
# ============================================================================================

AUTH: dict[str, Any] = {"token_secret": SECRET}


def claims(ttl: float = 3600, **extra: Any) -> dict[str, Any]:
    return {"sub": "mallory", "exp": int(time.time() + ttl), "subscribe": ["*"], **extra}


@case("token-alg-none", "auth", "upgrade with an alg=none token (no signature)",
      "close 4001 'unauthorized: algorithm_not_allowed'", **AUTH)
async def _(ctx: Ctx) -> None:
    ws = await ctx.connect("/ws?token=" + unsigned_token(claims()))
    await expect_ws_close(ctx, b"", 4001, "algorithm_not_allowed", ws=ws)


@case("token-hs-rs-confusion", "auth",
      "RS256 server; HS256 token signed with the server's public key as HMAC secret",
      "close 4001 'unauthorized: algorithm_not_allowed'", token_public_key="RSA")
async def _(ctx: Ctx) -> None:
    forged = hs256_token(claims(), rsa_keys().public_pem.encode())
    ws = await ctx.connect("/ws?token=" + forged)
    await expect_ws_close(ctx, b"", 4001, "algorithm_not_allowed", ws=ws)


@case("token-es256-on-rsa-key", "auth",
      "server with an RSA public key (default algorithms RS256, ES256); upgrade with a token whose "
      "header says ES256 and whose signature is junk",
      "close 4001 'unauthorized: ...' naming the problem; the server carries on",
      token_public_key="RSA")
async def _(ctx: Ctx) -> None:
    ws = await ctx.connect("/ws?token=" + forged_token(claims(), "ES256"))
    await expect_ws_close(ctx, b"", 4001, "unauthorized", ws=ws)


@case("tcp-connect-es256-on-rsa-key", "auth",
      "the same ES256 token in a TCP {\"op\":\"connect\"} line",
      "error unauthorized naming the problem; connection open", token_public_key="RSA")
async def _(ctx: Ctx) -> None:
    client = await NdjsonClient.connect(ctx.tcp_port)
    async with client.stream:
        await client.send({"op": "connect", "token": forged_token(claims(), "ES256"), "id": 1})
        reply = await client.recv()
        ctx.observe(describe_error(reply) if reply.get("op") != "close"
                    else f"close line {reply['code']} {reply['reason']!r}")
        assert reply.get("ok") is False and reply["error"]["code"] == "unauthorized", reply
        await client.send({"op": "ping", "id": 2})
        assert await client.recv() == {"id": 2, "ok": True, "op": "pong"}


@case("token-expired", "auth", "token with exp 10 s ago", "close 4001 'unauthorized: token_expired'", **AUTH)
async def _(ctx: Ctx) -> None:
    ws = await ctx.connect("/ws?token=" + ctx.token(ttl=-10))
    await expect_ws_close(ctx, b"", 4001, "token_expired", ws=ws)


@case("token-future-nbf", "auth", "token with nbf one hour ahead",
      "close 4001 'unauthorized: token_not_yet_valid'", **AUTH)
async def _(ctx: Ctx) -> None:
    ws = await ctx.connect("/ws?token=" + ctx.token(nbf=int(time.time() + 3600)))
    await expect_ws_close(ctx, b"", 4001, "token_not_yet_valid", ws=ws)


@case("token-wrong-audience", "auth", "token for aud 'other' on a server requiring aud 'push'",
      "close 4001 'unauthorized: wrong_audience'", token_audience="push", **AUTH)
async def _(ctx: Ctx) -> None:
    ws = await ctx.connect("/ws?token=" + ctx.token(aud="other"))
    await expect_ws_close(ctx, b"", 4001, "wrong_audience", ws=ws)


@case("token-wrong-issuer", "auth", "token from iss 'evil' on a server requiring iss 'auth.example'",
      "close 4001 'unauthorized: wrong_issuer'", token_issuer="auth.example", **AUTH)
async def _(ctx: Ctx) -> None:
    ws = await ctx.connect("/ws?token=" + ctx.token(iss="evil"))
    await expect_ws_close(ctx, b"", 4001, "wrong_issuer", ws=ws)


@case("token-bad-signature", "auth", "token signed with another secret",
      "close 4001 'unauthorized: bad_signature'", **AUTH)
async def _(ctx: Ctx) -> None:
    forged = hs256_token(claims(), b"not-the-secret-but-long-enough-0123456789")
    ws = await ctx.connect("/ws?token=" + forged)
    await expect_ws_close(ctx, b"", 4001, "bad_signature", ws=ws)


@case("token-without-sub", "auth", "validly signed token without 'sub'",
      "close 4001 'unauthorized: token_invalid'", **AUTH)
async def _(ctx: Ctx) -> None:
    token = hs256_token({"exp": int(time.time() + 60)}, SECRET.encode())
    ws = await ctx.connect("/ws?token=" + token)
    await expect_ws_close(ctx, b"", 4001, "token_invalid", ws=ws)


@case("topic-outside-claim", "auth", "token for 'chat.*' subscribes to 'news'",
      "error forbidden; connection open", **AUTH)
async def _(ctx: Ctx) -> None:
    ws = await ctx.connect(ctx.ws_path(subscribe=["chat.*"]))
    await expect_error_reply(ctx, '{"op":"subscribe","topic":"news","id":1}', "forbidden", "news", ws=ws)


@case("token-replayed-after-expiry", "auth",
      "a token used for a connection, replayed for a new connection after its exp has passed",
      "first connection accepted; the replay closed 4001 'unauthorized: token_expired'", **AUTH)
async def _(ctx: Ctx) -> None:
    exp = int(time.time()) + 1
    token = ctx.token(ttl=0, exp=exp, subscribe=["*"])
    first = await ctx.connect("/ws?token=" + token)
    assert (await first.request({"op": "ping", "id": 1}))["ok"] is True
    await close_cleanly(first)
    await trio.sleep(max(0.0, exp - time.time()) + 0.05)
    ws = await ctx.connect("/ws?token=" + token)
    await expect_ws_close(ctx, b"", 4001, "token_expired", ws=ws)
    ctx.observe("first use accepted; replay after exp: " + ctx.row["observed"])


@case("token-replayed-for-refresh", "auth",
      "after refresh_required, a refresh with an already-expired token",
      "error unauthorized 'token_expired', then close 4001 'unauthorized: token expired' after "
      "refresh_grace", timed=True, refresh_grace=30, ping_interval=1000, **AUTH)
async def _(ctx: Ctx) -> None:
    ws = await ctx.connect("/ws?token=" + ctx.token(ttl=60))
    assert await ws.recv_json() == {"op": "refresh_required"}
    reply = await ws.request({"op": "refresh", "token": ctx.token(ttl=-30), "id": "r"})
    first = describe_error(reply)
    start = trio.current_time()
    closed = await ws.wait_closed()
    await ws.aclose()
    code, reason = closed.code, closed.reason
    grace = trio.current_time() - start
    ctx.observe(f"{first}; then close {code} {reason!r} after {grace:.0f} s")
    assert reply["ok"] is False and reply["error"]["code"] == "unauthorized", reply
    assert "token_expired" in reply["error"]["message"], reply
    assert (code, reason) == (4001, "unauthorized: token expired")
    assert grace == pytest.approx(30, abs=1)


@case("publish-without-api-key", "auth", "POST /api/publish without Authorization",
      "HTTP 401 unauthorized + message", api_key="k3y")
async def _(ctx: Ctx) -> None:
    resp = await http_publish(ctx.port, "t", 1)
    ctx.observe(f"HTTP {resp.status} {resp.json()['error']['code']}: {resp.json()['error']['message']!r}")
    assert resp.status == 401 and resp.json()["error"]["code"] == "unauthorized"
    assert ctx.rs.server.hub.position("t") == 0


@case("publish-wrong-api-key", "auth", "POST /api/publish with Authorization: Bearer wrong",
      "HTTP 401 unauthorized + message", api_key="k3y")
async def _(ctx: Ctx) -> None:
    resp = await http_publish(ctx.port, "t", 1, api_key="wrong")
    ctx.observe(f"HTTP {resp.status} {resp.json()['error']['code']}: {resp.json()['error']['message']!r}")
    assert resp.status == 401 and resp.json()["error"]["code"] == "unauthorized"
    assert ctx.rs.server.hub.position("t") == 0


# ============================================================================================
# Running them
# ============================================================================================


def _fill(row: dict[str, str], c: Case) -> None:
    row.update(category=c.area, sent=c.sent, expected=c.expected)


@pytest.mark.parametrize("c", [c for c in CASES if not c.timed], ids=lambda c: c.id)
async def test_bad_input(c: Case, start_server: ServerFactory, matrix_row: dict[str, str]) -> None:
    _fill(matrix_row, c)
    async with case_context(start_server, matrix_row, c.config) as ctx:
        with trio.fail_after(LIMIT):
            await c.run(ctx)
            await ctx.finish()


@pytest.mark.parametrize("c", [c for c in CASES if c.timed], ids=lambda c: c.id)
async def test_bad_input_timed(c: Case, start_server: ServerFactory, matrix_row: dict[str, str],
                               autojump_clock: trio.testing.MockClock) -> None:
    _fill(matrix_row, c)
    async with case_context(start_server, matrix_row, c.config) as ctx:
        with trio.fail_after(TIMED_LIMIT):
            await c.run(ctx)
            await ctx.finish()


def test_matrix_has_at_least_40_cases() -> None:
    assert len(CASES) >= 40
    assert len({c.id for c in CASES}) == len(CASES)

