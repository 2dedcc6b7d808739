"""HTTP on the WebSocket port: h11 parses requests, routes answer them.

A request with ``Upgrade: websocket`` on the WebSocket path gets its 101 here
and the socket is handed over; the h11 object is dropped after that, so a
WebSocket connection carries no HTTP state. ``GET`` on the event-stream path
(``/sse``) is handed over the same way, as an :class:`EventStream`, before its
answer: the stream's handler decides between the 200 and an error.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Container, Sequence
from typing import Any
from urllib.parse import parse_qs, urlsplit

import attrs
import h11
import orjson
import trio

from ..config import Config
from ..protocol import deflate, websocket
from ..protocol.claims import Claims
from ..protocol.codes import ErrorCode
from .admission import Admission, IdleScopes
from .transport import Transport

__all__ = ["Admitted", "EventStream", "HttpSite", "Request", "Response", "RouteHandler", "Router",
           "Upgrade", "cors_headers", "json_error", "json_response", "serve_http"]

log = logging.getLogger("trioserve.http")
# A failing route is logged under the server's name, which operators' log filters know.
_route_log = logging.getLogger("trioserve.server")

#: Largest request head (request line + headers) we buffer.
MAX_HEAD = 16 * 1024
_SERVER_HEADER = (b"server", b"trioserve")


@attrs.frozen
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: list[tuple[bytes, bytes]]
    body: bytes
    remote: str | None

    def header(self, name: bytes) -> bytes | None:
        """The first value of header *name* (lower-case), or None."""
        return _header(self.headers, name)


@attrs.frozen
class Response:
    status: int
    body: bytes = b""
    content_type: bytes = b"application/json"
    headers: list[tuple[bytes, bytes]] = attrs.Factory(list)


RouteHandler = Callable[[Request], Awaitable[Response]]


@attrs.frozen
class Upgrade:
    """A WebSocket upgrade that got its 101."""

    #: Bytes that came after the request: the start of the WebSocket stream.
    trailing: bytes
    #: The connection token, from ``?token=`` or ``Authorization: Bearer``.
    token: str | None
    #: The request path, which chose the handler (see ``Server.add_websocket``).
    path: str
    #: permessage-deflate was negotiated (see :mod:`trioserve.protocol.deflate`).
    deflate: bool = False
    #: What the server's upgrade gate (the connect proxy) decided, if it did.
    admitted: Admitted | None = None


@attrs.frozen
class Admitted:
    """An upgrade the gate let in: the connection's id and claims are decided."""

    conn_id: int
    claims: Claims


#: Asked before a 101 (or an event stream's 200) with the request, its token
#: and the transport ("websocket", "sse"): None lets the connection go on as
#: usual, a Response refuses it, Admitted decides who it is.
UpgradeGate = Callable[[Request, "str | None", str], Awaitable["Response | Admitted | None"]]


@attrs.frozen
class EventStream:
    """A ``GET`` on the event-stream path that passed the origin and admission
    checks; it holds a reserved connection slot, like an :class:`Upgrade`."""

    request: Request
    #: The token, from ``?token=`` or ``Authorization: Bearer``.
    token: str | None
    #: The CORS headers its answer carries.
    cors: list[tuple[bytes, bytes]]
    #: What the server's gate (the connect proxy) decided, if it did.
    admitted: Admitted | None = None


def json_response(status: int, obj: Any, headers: list[tuple[bytes, bytes]] | None = None) -> Response:
    return Response(status, orjson.dumps(obj), headers=headers or [])


def json_error(
    status: int, code: ErrorCode | str, message: str, headers: list[tuple[bytes, bytes]] | None = None
) -> Response:
    """An error answer in the same shape as the protocol's error replies."""
    return json_response(status, {"ok": False, "error": {"code": str(code), "message": message}},
                         headers)


class Router:
    """``(method, path)`` to a handler; answers 404, 405 (with ``Allow``) and 500 itself."""

    def __init__(self, routes: dict[tuple[str, str], RouteHandler] | None = None):
        self.routes: dict[tuple[str, str], RouteHandler] = dict(routes or {})

    def add(self, method: str, path: str, handler: RouteHandler) -> None:
        self.routes[(method.upper(), path)] = handler

    async def dispatch(self, req: Request) -> Response:
        handler = self.routes.get((req.method, req.path))
        if handler is None:
            allowed = sorted(m for (m, p) in self.routes if p == req.path)
            if allowed:
                return json_error(405, ErrorCode.METHOD_NOT_ALLOWED,
                                  f"{req.method} not allowed on {req.path}",
                                  [(b"allow", ", ".join(allowed).encode())])
            return json_error(404, ErrorCode.NOT_FOUND, f"no route for {req.path}")
        try:
            return await handler(req)
        except Exception:
            _route_log.exception("route %s %s failed", req.method, req.path)
            return json_error(500, ErrorCode.INTERNAL, "internal error")


@attrs.frozen
class HttpSite:
    """What the HTTP driver needs of the server that runs it."""

    config: Config
    admission: Admission
    #: Waits for a request; a drain cancels them.
    idle: IdleScopes
    router: Router
    #: The paths that take WebSocket upgrades (the server's handlers by path).
    websocket_paths: Container[str]
    gate: UpgradeGate | None = None
    #: The path of Server-Sent Events streams, if the server has them.
    sse_path: str | None = None


class _BodyTooLarge(Exception):
    pass


async def _next_event(h: h11.Connection, transport: Transport) -> Any:
    while True:
        event = h.next_event()
        if event is not h11.NEED_DATA:
            return event
        h.receive_data(await transport.receive_some())


async def _read_body(h: h11.Connection, transport: Transport, limit: int) -> bytes:
    parts: list[bytes] = []
    size = 0
    while True:
        event = await _next_event(h, transport)
        if isinstance(event, h11.Data):
            size += len(event.data)
            if size > limit:
                raise _BodyTooLarge
            parts.append(bytes(event.data))
        elif isinstance(event, h11.EndOfMessage):
            return b"".join(parts)
        else:  # ConnectionClosed or PAUSED mid-body
            raise h11.RemoteProtocolError("request body ended early", 400)


async def _respond(h: h11.Connection, transport: Transport, resp: Response, close: bool,
                   head: bool = False) -> None:
    headers = [_SERVER_HEADER, (b"content-type", resp.content_type)]
    if resp.status != 304:  # a 304 has no body, and its length would be the 200's
        headers.append((b"content-length", str(len(resp.body)).encode()))
    headers += resp.headers
    if close:
        headers.append((b"connection", b"close"))
    data = h.send(h11.Response(status_code=resp.status, headers=headers))
    if resp.body and not head:  # a HEAD answer has GET's headers and no body
        data += h.send(h11.Data(data=resp.body))
    data += h.send(h11.EndOfMessage())
    await transport.send_all(data)


async def serve_http(transport: Transport, site: HttpSite,
                     remote: str | None) -> Upgrade | EventStream | None:
    """Serve one socket of the HTTP+WebSocket listener until it closes or upgrades.

    Returns None when the socket is done, or the :class:`Upgrade` after a 101.
    Returning rather than running the WebSocket from here lets the h11 state
    and this frame be freed: they would otherwise cost every idle connection
    about 3 KB.
    """
    cfg = site.config
    h = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
    while True:
        # Waiting for a request is cancelled by a drain, so idle keep-alive
        # sockets and half-sent handshakes do not hold a drain to its deadline.
        idle = site.idle.open(trio.current_time() + cfg.handshake_timeout)
        try:
            with idle:
                request = await _next_event(h, transport)
        except h11.RemoteProtocolError as exc:
            bad = json_error(exc.error_status_hint, ErrorCode.BAD_REQUEST, str(exc))
            await _refuse(h, transport, bad, linger=cfg.close_timeout)
            return None
        except OSError:
            return None
        finally:
            site.idle.discard(idle)
        if idle.cancelled_caught:
            log.debug("no complete request from %s within %ss (or draining)", remote,
                      cfg.handshake_timeout)
            return None
        if not isinstance(request, h11.Request):
            return None  # ConnectionClosed: the client is done
        try:
            method = request.method.decode("ascii")
            url = urlsplit(request.target.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            await _refuse(h, transport, json_error(400, ErrorCode.BAD_REQUEST, "malformed request target"))
            return None
        # A plain list: h11's Headers is a Sequence whose item access runs in
        # Python, and a handshake scans the headers half a dozen times.
        req_headers = list(request.headers)
        if websocket.is_upgrade(req_headers):
            return await _upgrade(h, transport, site, request, req_headers, url.path, url.query, remote)
        if url.path == site.sse_path:
            try:
                return await _event_stream(h, transport, site, method, req_headers, url.path, url.query,
                                           remote)
            except OSError:
                return None
        if _header(req_headers, b"transfer-encoding") is not None and \
                _header(req_headers, b"content-length") is not None:
            # The request-smuggling shape: RFC 9112 6.1 lets us refuse it, and
            # requires closing the connection whatever we do.
            await _refuse(h, transport, json_error(
                400, ErrorCode.BAD_REQUEST, "both Content-Length and Transfer-Encoding"),
                linger=cfg.close_timeout)
            return None
        too_large = json_error(413, ErrorCode.TOO_LARGE,
                               f"request body over {cfg.max_message_size} bytes")
        if _declared_length(req_headers) > cfg.max_message_size:
            await _refuse(h, transport, too_large, linger=cfg.close_timeout)
            return None
        try:
            if h.they_are_waiting_for_100_continue:
                await transport.send_all(h.send(h11.InformationalResponse(status_code=100, headers=[])))
            with trio.fail_after(cfg.handshake_timeout):
                body = await _read_body(h, transport, cfg.max_message_size)
        except _BodyTooLarge:
            await _refuse(h, transport, too_large, linger=cfg.close_timeout)
            return None
        except h11.RemoteProtocolError as exc:
            await _refuse(h, transport, json_error(400, ErrorCode.BAD_REQUEST, f"bad request body: {exc}"),
                          linger=cfg.close_timeout)
            return None
        except (trio.TooSlowError, OSError):
            return None
        head = method == "HEAD"
        req = Request("GET" if head else method, url.path, parse_qs(url.query), req_headers,
                      body, remote)
        resp = await site.router.dispatch(req)
        close = site.admission.draining or h.our_state is h11.MUST_CLOSE
        try:
            await _respond(h, transport, resp, close, head)
        except OSError:
            return None
        if close or h.our_state is not h11.DONE or h.their_state is not h11.DONE:
            return None
        h.start_next_cycle()


async def _refuse(h: h11.Connection, transport: Transport, resp: Response,
                  linger: float = 0) -> None:
    """Answer with *resp* and end the connection.

    With *linger*, first send EOF and read and discard until the client closes
    or *linger* seconds pass: closing a socket with unread input sends a reset,
    which can destroy the answer before a client still sending has read it.
    """
    if h.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
        return
    try:
        await _respond(h, transport, resp, close=True)
        if linger:
            transport.shutdown_write()
            with trio.move_on_after(linger):
                while await transport.receive_some():
                    pass
    except (OSError, h11.LocalProtocolError):
        pass


def _declared_length(headers: Sequence[tuple[bytes, bytes]]) -> int:
    for name, value in headers:
        if name == b"content-length":
            return int(value)  # h11 has validated it
    return 0


async def _upgrade(h: h11.Connection, transport: Transport, site: HttpSite,
                   request: h11.Request, req_headers: list[tuple[bytes, bytes]], path: str, query: str,
                   remote: str | None = None) -> Upgrade | None:
    if path not in site.websocket_paths:
        await _refuse(h, transport, json_error(
            404, ErrorCode.NOT_FOUND, f"no WebSocket endpoint at {path}; use {site.config.ws_path}"))
        return None
    try:
        headers = websocket.check_upgrade(request.method, request.http_version, req_headers)
    except websocket.HandshakeError as exc:
        await _refuse(h, transport, json_error(exc.status, ErrorCode.BAD_REQUEST, exc.reason, exc.headers))
        return None
    if site.config.compression:
        extensions = deflate.negotiate(req_headers)
        if extensions is not None:
            headers.append((b"sec-websocket-extensions", extensions))
    origin = _header(req_headers, b"origin")
    allowed = site.config.allowed_origins
    # Origins guard browsers against cross-site use of their cookies/session;
    # clients that send no Origin are not browsers and are let through.
    if origin is not None and allowed and "*" not in allowed and origin.decode("latin-1") not in allowed:
        await _refuse(h, transport, json_error(403, ErrorCode.FORBIDDEN,
                                               f"origin {origin.decode('latin-1')!r} is not allowed"))
        return None
    admission = site.admission
    refusal = admission.refusal(remote)
    if refusal is not None:
        retry = [] if refusal.retry_after is None else [(b"retry-after", str(refusal.retry_after).encode())]
        await _refuse(h, transport, json_error(503, ErrorCode.UNAVAILABLE, refusal.message, retry))
        return None
    # Hold a slot from the check until the connection is counted: otherwise
    # every upgrade in flight passes the check.
    admission.reserve()
    try:
        admitted = None
        if site.gate is not None:
            token = _token(req_headers, query)
            verdict = await site.gate(Request(request.method.decode("ascii"), path, {}, req_headers,
                                              b"", remote), token, "websocket")
            if isinstance(verdict, Response):
                await _refuse(h, transport, verdict)
                admission.release()
                return None
            admitted = verdict
        upgrade = await _finish_upgrade(h, transport, req_headers, headers, path, query, admitted)
    except BaseException:
        admission.release()
        raise
    if upgrade is None:
        admission.release()
    return upgrade


async def _finish_upgrade(h: h11.Connection, transport: Transport, req_headers: list[tuple[bytes, bytes]],
                          headers: list[tuple[bytes, bytes]], path: str, query: str,
                          admitted: Admitted | None = None) -> Upgrade | None:
    try:
        event = await _next_event(h, transport)
        if isinstance(event, h11.EndOfMessage):
            event = await _next_event(h, transport)
    except h11.RemoteProtocolError:
        event = None  # a body h11 cannot even parse: refused below like any body
    if event is not h11.PAUSED:
        await _refuse(h, transport, json_error(400, ErrorCode.BAD_REQUEST, "upgrade request has a body"))
        return None
    # The 101 is built here rather than by h11.send(): h11 is dropped right
    # after it, and its header validation is a measurable share of a handshake.
    data = websocket.switching_protocols([_SERVER_HEADER, *headers])
    trailing, _ = h.trailing_data
    try:
        await transport.send_all(data)
    except OSError:
        return None
    deflated = any(name == b"sec-websocket-extensions" for name, _ in headers)
    return Upgrade(bytes(trailing), _token(req_headers, query), path, deflated, admitted)


def cors_headers(config: Config, origin: bytes | None) -> list[tuple[bytes, bytes]] | None:
    """The CORS headers of an answer to *origin*; None if ``allowed_origins`` refuses it.

    No list (the default) or ``*``: any origin may read, without credentials
    (trioserve authenticates with tokens, not cookies). A listed origin is
    echoed, with credentials, so a page may use ``withCredentials`` for a
    proxy's cookie in front of the server.
    """
    if origin is None:
        return []
    allowed = config.allowed_origins
    if not allowed or "*" in allowed:
        return [(b"access-control-allow-origin", b"*")]
    if origin.decode("latin-1") not in allowed:
        return None
    return [(b"access-control-allow-origin", origin), (b"access-control-allow-credentials", b"true"),
            (b"vary", b"Origin")]


async def _event_stream(h: h11.Connection, transport: Transport, site: HttpSite, method: str,
                        req_headers: list[tuple[bytes, bytes]], path: str, query: str,
                        remote: str | None) -> EventStream | None:
    if method not in ("GET", "OPTIONS"):
        wrong = json_error(405, ErrorCode.METHOD_NOT_ALLOWED, f"{method} not allowed on {path}",
                           [(b"allow", b"GET, OPTIONS")])
        await _refuse(h, transport, wrong, linger=site.config.close_timeout)
        return None
    origin = _header(req_headers, b"origin")
    cors = cors_headers(site.config, origin)
    if cors is None:
        assert origin is not None
        await _refuse(h, transport, json_error(403, ErrorCode.FORBIDDEN,
                                               f"origin {origin.decode('latin-1')!r} is not allowed"))
        return None
    if method == "OPTIONS":  # a preflight: what a fetch() with headers may send
        await _refuse(h, transport, Response(204, b"", b"text/plain", [
            *cors, (b"access-control-allow-methods", b"GET, OPTIONS"),
            (b"access-control-allow-headers", b"Authorization, Last-Event-ID, Cache-Control"),
            (b"access-control-max-age", b"600")]))
        return None
    event = await _next_event(h, transport)
    if not isinstance(event, h11.EndOfMessage):
        await _refuse(h, transport, json_error(400, ErrorCode.BAD_REQUEST, "a stream request has no body"),
                      linger=site.config.close_timeout)
        return None
    admission = site.admission
    refusal = admission.refusal(remote)
    if refusal is not None:
        retry = [] if refusal.retry_after is None else [(b"retry-after", str(refusal.retry_after).encode())]
        await _refuse(h, transport, json_error(503, ErrorCode.UNAVAILABLE, refusal.message, retry + cors))
        return None
    admission.reserve()
    request = Request(method, path, parse_qs(query), req_headers, b"", remote)
    token = _token(req_headers, query)
    admitted = None
    if site.gate is not None:
        try:
            verdict = await site.gate(request, token, "sse")
        except BaseException:
            admission.release()
            raise
        if isinstance(verdict, Response):
            admission.release()
            await _refuse(h, transport, attrs.evolve(verdict, headers=[*verdict.headers, *cors]))
            return None
        admitted = verdict
    return EventStream(request, token, cors, admitted)


def _header(headers: Sequence[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for k, v in headers:
        if k == name:
            return v
    return None


def _token(headers: Sequence[tuple[bytes, bytes]], query: str) -> str | None:
    tokens = parse_qs(query).get("token")
    if tokens:
        return tokens[0]
    auth = _header(headers, b"authorization")
    if auth is not None and auth[:7].lower() == b"bearer ":
        return auth[7:].strip().decode("latin-1")
    return None
