"""The server's own routes: health, readiness, metrics and the JavaScript client.

Apart from :mod:`trioserve.server.server` so that a worker (ops/worker.py) can
take them as defaults and wrap them, and to keep that module small.
"""

from __future__ import annotations

from typing import Protocol

from ..net.httpd import Request, Response, RouteHandler, json_response
from .assets import asset_routes
from .stats import Observed

__all__ = ["Served", "server_routes"]


class Served(Observed, Protocol):
    """What the routes read of a server (a :class:`trioserve.Server`)."""

    @property
    def draining(self) -> bool: ...


def server_routes(server: Served) -> dict[tuple[str, str], RouteHandler]:
    """The server's own routes: ``/healthz``, ``/readyz``, ``/metrics``, and the
    JavaScript client (``/trioserve.js``, ``/trioserve.d.ts``)."""

    async def healthz(req: Request) -> Response:
        return json_response(200, {"status": "ok"})

    async def readyz(req: Request) -> Response:
        if server.draining:
            return json_response(503, {"status": "draining"})
        return json_response(200, {"status": "ready"})

    async def metrics(req: Request) -> Response:
        # Imported here so prometheus_client is loaded only by servers that get scraped.
        from .metrics import metrics_response

        return metrics_response(server, req)

    return {("GET", "/healthz"): healthz, ("GET", "/readyz"): readyz, ("GET", "/metrics"): metrics,
            **asset_routes()}
