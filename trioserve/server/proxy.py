"""The proxy to the application's backend: :class:`~trioserve.push.backend.Backend` over HTTP.

Every call is one JSON POST through one pooled ``httpx.AsyncClient`` (httpx runs
on trio through anyio), within ``proxy_timeout``. The backend answers
``{"result": ...}`` to allow or ``{"error": {"code": <int>, "message": ...}}`` to
refuse (docs/backend.md). Anything else (unreachable, too slow, a non-2xx
status, no JSON, the wrong shape) is :class:`BackendUnavailable`, logged here,
and never taken as a yes. At most ``proxy_max_in_flight`` calls run at once:
one more is refused at once rather than queued, so a stuck backend costs
clients a quick 503 / ``unavailable`` instead of a growing pile of tasks.
"""

from __future__ import annotations

import logging
from typing import Any, NoReturn

import httpx
import orjson
import trio

from ..config import Config
from ..net.connection import next_connection_id
from ..net.httpd import Admitted, Request, Response, json_error
from ..protocol.claims import AuthError
from ..protocol.codes import ErrorCode
from ..push.backend import (
    BackendRefused,
    BackendUnavailable,
    CallerInfo,
    ConnectRequest,
    ConnectResult,
    proxied_claims,
)
from .auth import Authenticator

__all__ = ["HttpBackend", "admit"]

log = logging.getLogger("trioserve.proxy")


class HttpBackend:
    """The application's backend at the ``proxy_*_url`` of *config*."""

    def __init__(self, config: Config):
        self.config = config
        self._client: httpx.AsyncClient | None = None
        self.in_flight = 0
        #: Calls by outcome, for the metrics: allowed, refused, unavailable.
        self.calls: dict[str, int] = {"allowed": 0, "refused": 0, "unavailable": 0}

    @classmethod
    def for_config(cls, config: Config) -> HttpBackend | None:
        """The backend of *config*, or None when no ``proxy_*_url`` is set."""
        urls = (config.proxy_connect_url, config.proxy_subscribe_url, config.proxy_publish_url,
                config.proxy_rpc_url)
        return cls(config) if any(url is not None for url in urls) else None

    @property
    def connect_proxied(self) -> bool:
        return self.config.proxy_connect_url is not None

    @property
    def subscribe_proxied(self) -> bool:
        return self.config.proxy_subscribe_url is not None

    @property
    def publish_proxied(self) -> bool:
        return self.config.proxy_publish_url is not None

    @property
    def rpc_proxied(self) -> bool:
        return self.config.proxy_rpc_url is not None

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    # --- the calls ---------------------------------------------------------------------

    async def connect(self, request: ConnectRequest) -> ConnectResult:
        assert self.config.proxy_connect_url is not None
        body = {"client": request.client, "transport": request.transport,
                "remote": _ip(request.remote), "headers": request.headers}
        result = await self._call("connect", self.config.proxy_connect_url, body)
        user = result.get("user") if isinstance(result, dict) else None
        data = result.get("data") if isinstance(result, dict) else None
        if not isinstance(user, str) or not user or not (data is None or isinstance(data, dict)):
            self._bad("connect", 'the result must be {"user": <non-empty string>, "data": <object>}')
        return ConnectResult(user, data)

    async def subscribe(self, caller: CallerInfo, topic: str) -> None:
        assert self.config.proxy_subscribe_url is not None
        await self._call("subscribe", self.config.proxy_subscribe_url, {**_caller(caller), "topic": topic})

    async def publish(self, caller: CallerInfo, topic: str, data: Any) -> Any:
        assert self.config.proxy_publish_url is not None
        result = await self._call("publish", self.config.proxy_publish_url,
                                  {**_caller(caller), "topic": topic, "data": data})
        # {"result": {}} keeps the client's data; {"result": {"data": ...}} replaces it.
        if isinstance(result, dict) and "data" in result:
            return result["data"]
        return data

    async def rpc(self, caller: CallerInfo, method: str, data: Any) -> Any:
        assert self.config.proxy_rpc_url is not None
        return await self._call("rpc", self.config.proxy_rpc_url,
                                {**_caller(caller), "method": method, "data": data})

    # --- HTTP ----------------------------------------------------------------------------

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            limit = self.config.proxy_max_in_flight
            self._client = httpx.AsyncClient(
                timeout=self.config.proxy_timeout,
                limits=httpx.Limits(max_connections=limit, max_keepalive_connections=min(limit, 100)),
                headers={"content-type": "application/json", "user-agent": "trioserve"},
            )
        return self._client

    async def _call(self, what: str, url: str, body: dict[str, Any]) -> Any:
        """The answer's ``result``; raises BackendRefused or BackendUnavailable."""
        if self.in_flight >= self.config.proxy_max_in_flight:
            self.calls["unavailable"] += 1
            raise BackendUnavailable(f"{self.in_flight} backend calls in flight (proxy_max_in_flight); "
                                     "try again")
        self.in_flight += 1
        try:
            try:
                # httpx's timeout bounds each phase; this bounds the whole call,
                # so a backend trickling its answer cannot hold a client longer.
                with trio.fail_after(self.config.proxy_timeout):
                    resp = await self._http().post(url, content=orjson.dumps(body))
            except (httpx.TimeoutException, trio.TooSlowError):
                self._bad(what, f"no answer within {self.config.proxy_timeout:g}s (proxy_timeout)")
            except httpx.HTTPError as exc:
                self._bad(what, f"unreachable: {exc!r}")
        finally:
            self.in_flight -= 1
        if resp.status_code != 200:
            self._bad(what, f"HTTP status {resp.status_code}")
        try:
            answer = orjson.loads(resp.content)
        except orjson.JSONDecodeError:
            self._bad(what, "the answer is not JSON")
        if isinstance(answer, dict) and "error" in answer:
            error = answer["error"]
            code = error.get("code") if isinstance(error, dict) else None
            message = error.get("message", "") if isinstance(error, dict) else None
            if not isinstance(code, int) or isinstance(code, bool) or not isinstance(message, str):
                self._bad(what, 'the error must be {"code": <integer>, "message": <string>}')
            self.calls["refused"] += 1
            raise BackendRefused(code, message)
        if not isinstance(answer, dict) or "result" not in answer:
            self._bad(what, 'the answer must be {"result": ...} or {"error": ...}')
        self.calls["allowed"] += 1
        return answer["result"]

    def _bad(self, what: str, problem: str) -> NoReturn:
        self.calls["unavailable"] += 1
        log.warning("%s proxy: %s", what, problem)
        raise BackendUnavailable(f"the application's backend failed: {problem}")


def _ip(remote: str | None) -> str | None:
    """The address of a peer's ``host:port`` (``[v6]:port``)."""
    if remote is None:
        return None
    host = remote.rpartition(":")[0] or remote
    return host[1:-1] if host.startswith("[") else host


def _caller(caller: CallerInfo) -> dict[str, Any]:
    return {"client": caller.client, "user": caller.user, "transport": caller.transport}


def forwarded_headers(config: Config, headers: list[tuple[bytes, bytes]]) -> dict[str, str]:
    """The request headers named by ``proxy_headers``, by their configured names."""
    wanted = {name.lower().encode("latin-1"): name for name in config.proxy_headers}
    forwarded: dict[str, str] = {}
    for name, value in headers:
        shown = wanted.get(name)
        if shown is not None:
            value_text = value.decode("latin-1")
            forwarded[shown] = f"{forwarded[shown]}, {value_text}" if shown in forwarded else value_text
    return forwarded


async def admit(backend: HttpBackend, authenticator: Authenticator | None, request: Request,
                token: str | None, transport: str, node: str = "") -> Response | Admitted | None:
    """The connect proxy for an HTTP request (a WebSocket upgrade, an SSE stream).

    None when a valid token lets it in without asking (the server then takes
    the token as usual); else the backend's verdict: Admitted, or the Response
    refusing it (the backend's status, or 503).
    """
    if token is not None and authenticator is not None:
        try:
            authenticator.verify(token)
            return None
        except AuthError:
            pass  # maybe the application's own session token: the backend gets the header
    conn_id = next_connection_id()
    ask = ConnectRequest(f"c{conn_id}@{node}" if node else f"c{conn_id}", transport, request.remote,
                         forwarded_headers(backend.config, request.headers))
    try:
        result = await backend.connect(ask)
    except BackendRefused as exc:
        status = exc.code if 400 <= exc.code <= 599 else 403
        log.info("connect proxy refused %s: %d %s", request.remote, exc.code, exc.message)
        return json_error(status, ErrorCode.FORBIDDEN, exc.message or "refused by the application")
    except BackendUnavailable as exc:
        return json_error(503, ErrorCode.UNAVAILABLE, str(exc), [(b"retry-after", b"1")])
    return Admitted(conn_id, proxied_claims(backend.config, result.user))

