"""HTTP on the WebSocket port: h11 parses requests, routes answer them.

A request with ``Upgrade: websocket`` on the WebSocket path gets its 101 here
and the socket is handed over; the h11 object is dropped after that, so a
WebSocket connection carries no HTTP state.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

import attrs
import h11
import orjson
import trio

from .brokers import BrokerUnavailable
from .hub import HubClosed, HubOverloaded
from .protocol import websocket
from .protocol.codes import ErrorCode
from .protocol.messages import ProtocolError, validate_topic
from .transport import Transport

if TYPE_CHECKING:
    from .server import Server

__all__ = ["Request", "Response", "RouteHandler", "json_error", "serve_http"]

log = logging.getLogger("trioserve.http")

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


def json_response(status: int, obj: Any, headers: list[tuple[bytes, bytes]] | None = None) -> Response:
    return Response(status, orjson.dumps(obj), headers=headers or [])


def json_error(
    status: int, code: ErrorCode | str, message: str, headers: list[tuple[bytes, bytes]] | None = None
) -> Response:
    """An error answer in the same shape as the protocol's error replies."""
    return json_response(status, {"ok": False, "error": {"code": str(code), "message": message}},
                         headers)


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
    headers = [
        _SERVER_HEADER,
        (b"content-type", resp.content_type),
        (b"content-length", str(len(resp.body)).encode()),
        *resp.headers,
    ]
    if close:
        headers.append((b"connection", b"close"))
    data = h.send(h11.Response(status_code=resp.status, headers=headers))
    if resp.body and not head:  # a HEAD answer has GET's headers and no body
        data += h.send(h11.Data(data=resp.body))
    data += h.send(h11.EndOfMessage())
    await transport.send_all(data)


async def serve_http(transport: Transport, server: Server, remote: str | None) -> Upgrade | None:
    """Serve one socket of the HTTP+WebSocket listener until it closes or upgrades.

    Returns None when the socket is done, or the :class:`Upgrade` after a 101.
    Returning rather than running the WebSocket from here lets the h11 state
    and this frame be freed: they would otherwise cost every idle connection
    about 3 KB.
    """
    cfg = server.config
    h = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
    while True:
        # Waiting for a request is cancelled by a drain, so idle keep-alive
        # sockets and half-sent handshakes do not hold a drain to its deadline.
        idle = server._idle_scope(trio.current_time() + cfg.handshake_timeout)
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
            server._idle_scopes.discard(idle)
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
            return await _upgrade(h, transport, server, request, req_headers, url.path, url.query, remote)
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
        resp = await server._route(req)
        close = server.draining or h.our_state is h11.MUST_CLOSE
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


async def _upgrade(h: h11.Connection, transport: Transport, server: Server,
                   request: h11.Request, req_headers: list[tuple[bytes, bytes]], path: str, query: str,
                   remote: str | None = None) -> Upgrade | None:
    if path not in server.ws_handlers:
        await _refuse(h, transport, json_error(
            404, ErrorCode.NOT_FOUND, f"no WebSocket endpoint at {path}; use {server.config.ws_path}"))
        return None
    try:
        headers = websocket.check_upgrade(request.method, request.http_version, req_headers)
    except websocket.HandshakeError as exc:
        await _refuse(h, transport, json_error(exc.status, ErrorCode.BAD_REQUEST, exc.reason, exc.headers))
        return None
    origin = _header(req_headers, b"origin")
    allowed = server.config.allowed_origins
    # Origins guard browsers against cross-site use of their cookies/session;
    # clients that send no Origin are not browsers and are let through.
    if origin is not None and allowed and "*" not in allowed and origin.decode("latin-1") not in allowed:
        await _refuse(h, transport, json_error(403, ErrorCode.FORBIDDEN,
                                               f"origin {origin.decode('latin-1')!r} is not allowed"))
        return None
    if server.draining:
        await _refuse(h, transport, json_error(503, ErrorCode.UNAVAILABLE, "server is draining"))
        return None
    if not server._has_capacity():
        server._rejected += 1
        await _refuse(h, transport, json_error(503, ErrorCode.UNAVAILABLE,
                                               "server at capacity (max_connections)",
                                               [(b"retry-after", b"1")]))
        return None
    if server._peer_over_limit(remote):
        await _refuse(h, transport, json_error(503, ErrorCode.UNAVAILABLE,
                                               "too many connections from your address "
                                               "(max_connections_per_ip)",
                                               [(b"retry-after", b"5")]))
        return None
    # Hold a slot from the capacity check until the connection is counted:
    # otherwise every upgrade in flight passes the check (found by a flood test).
    server._upgrading += 1
    try:
        upgrade = await _finish_upgrade(h, transport, req_headers, headers, path, query)
    except BaseException:
        server._upgrading -= 1
        raise
    if upgrade is None:
        server._upgrading -= 1
    return upgrade


async def _finish_upgrade(h: h11.Connection, transport: Transport, req_headers: list[tuple[bytes, bytes]],
                          headers: list[tuple[bytes, bytes]], path: str, query: str) -> Upgrade | None:
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
    return Upgrade(bytes(trailing), _token(req_headers, query), path)


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


# --- the push server's routes -------------------------------------------------------


def push_routes(server: Server) -> dict[tuple[str, str], RouteHandler]:
    async def healthz(req: Request) -> Response:
        return json_response(200, {"status": "ok"})

    async def readyz(req: Request) -> Response:
        if server.draining:
            return json_response(503, {"status": "draining"})
        return json_response(200, {"status": "ready"})

    def refused(req: Request) -> Response | None:
        """A 401 unless the request carries the API key (when one is configured)."""
        key = server.config.api_key
        if key is None:
            return None
        given = req.header(b"authorization") or b""
        if hmac.compare_digest(given, b"Bearer " + key.encode()):
            return None
        server.count_auth_failure()
        return json_error(401, ErrorCode.UNAUTHORIZED,
                          "missing or wrong API key (Authorization: Bearer <key>)",
                          [(b"www-authenticate", b"Bearer")])

    async def publish(req: Request) -> Response:
        if (denied := refused(req)) is not None:
            return denied
        try:
            body = orjson.loads(req.body)
        except orjson.JSONDecodeError as exc:
            return json_error(400, ErrorCode.BAD_REQUEST, f"invalid JSON: {exc}")
        if not isinstance(body, dict) or "data" not in body:
            return json_error(400, ErrorCode.BAD_REQUEST,
                              'body must be {"topic": "...", "data": <any JSON>}')
        try:
            topic = validate_topic(body.get("topic"))
        except ProtocolError as exc:
            return json_error(400, exc.code, exc.message)
        hub = server.hub
        try:
            if hub.broker.synchronous:
                result = hub.publish_nowait(topic, body["data"])
            else:
                result = await hub.publish(topic, body["data"])
        except HubClosed:
            return json_error(503, ErrorCode.UNAVAILABLE, "server is draining")
        except BrokerUnavailable as exc:
            return json_error(503, ErrorCode.UNAVAILABLE, f"broker unavailable: {exc}",
                              [(b"retry-after", b"1")])
        except HubOverloaded as exc:
            return json_error(503, ErrorCode.UNAVAILABLE, f"overloaded: {exc}",
                              [(b"retry-after", b"1")])
        return json_response(200, {"ok": True, "offset": result.offset,
                                   "subscribers": result.subscribers})

    async def history(req: Request) -> Response:
        """``GET /api/history?topic=t&since=41&limit=100``: what followed offset 41.

        ``complete`` is false when history no longer reaches back to ``since``
        (the publications returned then start later than ``since + 1``).
        """
        if (denied := refused(req)) is not None:
            return denied
        try:
            topic = validate_topic(req.query.get("topic", [None])[0])
            since = int(req.query.get("since", ["0"])[0])
            limit = int(req.query.get("limit", ["100"])[0])
            if since < 0 or not 1 <= limit <= 1000:
                raise ValueError
        except ProtocolError as exc:
            return json_error(400, exc.code, exc.message)
        except ValueError:
            return json_error(400, ErrorCode.BAD_REQUEST,
                              "since must be an integer >= 0 and limit 1-1000")
        hub = server.hub
        try:
            publications, complete = await hub.history_page(topic, since, limit)
            epoch, offset = await hub.broker.head(topic)
        except BrokerUnavailable as exc:
            return json_error(503, ErrorCode.UNAVAILABLE, f"broker unavailable: {exc}")
        return json_response(200, {
            "ok": True, "topic": topic, "epoch": epoch, "offset": offset,
            "complete": complete, "publications": [orjson.Fragment(p) for p in publications],
        })

    async def metrics(req: Request) -> Response:
        # Imported here so prometheus_client is loaded only by servers that get scraped.
        from .metrics import metrics_response

        return metrics_response(server, req)

    return {
        ("GET", "/healthz"): healthz,
        ("GET", "/readyz"): readyz,
        ("POST", "/api/publish"): publish,
        ("GET", "/api/history"): history,
        ("GET", "/metrics"): metrics,
    }
