"""The JavaScript client, served by the server: ``GET /trioserve.js`` and ``/trioserve.d.ts``.

A page imports it from the server it talks to (``import { Client } from
"/trioserve.js"``), so client and server come from one release. The files are
``trioserve/static/``, symbolic links to ``clients/js/`` (the npm package):
one source, which the wheel carries as plain files.

Each answer has an ``ETag`` and ``Cache-Control: no-cache``: a browser keeps
its copy and asks again each time, and gets a 304 until the server is upgraded.
"""

from __future__ import annotations

import functools
import hashlib
from importlib import resources

import attrs

from ..net.httpd import Request, Response, RouteHandler

__all__ = ["asset_routes"]

#: Path -> (file in trioserve/static, content type).
ASSETS = {
    "/trioserve.js": ("trioserve.js", b"text/javascript; charset=utf-8"),
    "/trioserve.d.ts": ("trioserve.d.ts", b"application/typescript; charset=utf-8"),
    # The status page (server/admin.py): one file, no build step, no CDN.
    "/admin": ("admin.html", b"text/html; charset=utf-8"),
}
_HEADERS = [
    (b"cache-control", b"no-cache"),
    (b"x-content-type-options", b"nosniff"),
    # A public file: pages of other origins may import it too (module scripts need CORS).
    (b"access-control-allow-origin", b"*"),
    (b"cross-origin-resource-policy", b"cross-origin"),
]


@attrs.frozen
class _Asset:
    body: bytes
    etag: bytes


@functools.cache
def _load(name: str) -> _Asset:
    body = resources.files("trioserve").joinpath("static", name).read_bytes()
    return _Asset(body, b'"' + hashlib.sha256(body).hexdigest()[:32].encode() + b'"')


def _matches(if_none_match: bytes | None, etag: bytes) -> bool:
    if if_none_match is None:
        return False
    tags = [t.strip().removeprefix(b"W/") for t in if_none_match.split(b",")]
    return b"*" in tags or etag in tags


def _route(name: str, content_type: bytes) -> RouteHandler:
    async def serve(req: Request) -> Response:
        asset = _load(name)
        headers = [(b"etag", asset.etag), *_HEADERS]
        if _matches(req.header(b"if-none-match"), asset.etag):
            return Response(304, b"", content_type, headers)
        return Response(200, asset.body, content_type, headers)

    return serve


def asset_routes() -> dict[tuple[str, str], RouteHandler]:
    """``GET /trioserve.js`` and ``GET /trioserve.d.ts`` (HEAD too, as for every GET route)."""
    return {("GET", path): _route(name, content_type) for path, (name, content_type) in ASSETS.items()}
