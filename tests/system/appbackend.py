"""A real HTTP application backend whose answers a test scripts: for the proxy and webhooks.

It is the standard library's ThreadingHTTPServer on a free port, in threads of
the test process, so a slow answer blocks only its own thread (as a slow
backend elsewhere would) and never the trio loop the server runs on. Each
path answers with a :data:`Reply` the test sets: a JSON object, raw bytes
with a status, or :data:`HOLD` to hang until :meth:`AppBackend.release`.
Tests await requests with :meth:`AppBackend.wait_for`, an event set from the
handler thread, rather than polling.
"""

from __future__ import annotations

import json
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import attrs
import trio

#: Hang until the test calls release() (or the backend stops).
HOLD = object()
#: A JSON answer (status 200), ``(status, raw body)``, HOLD, or a function of the request body.
Reply = Any


@attrs.frozen
class Received:
    path: str
    body: bytes
    headers: dict[str, str]

    def json(self) -> Any:
        return json.loads(self.body)


class AppBackend:
    def __init__(self, token: trio.lowlevel.TrioToken):
        self._token = token
        self.replies: dict[str, Reply] = {}
        self.received: list[Received] = []
        self._changed = trio.Event()
        self._released = threading.Event()
        self._lock = threading.Lock()
        backend = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                backend._record(Received(self.path, body, dict(self.headers.items())))
                reply = backend.replies.get(self.path, {"result": {}})
                if callable(reply):
                    reply = reply(body)
                if reply is HOLD:
                    backend._released.wait(30)
                    reply = {"result": {}}
                status, data = reply if isinstance(reply, tuple) else (200, json.dumps(reply).encode())
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:
                    pass  # the server gave up on this call (proxy_timeout)
                backend._notify()  # what the reply function recorded is visible now

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.http.daemon_threads = True
        self.port: int = self.http.server_address[1]

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def _record(self, received: Received) -> None:
        with self._lock:
            self.received.append(received)
        self._notify()

    def _notify(self) -> None:
        try:
            trio.from_thread.run_sync(self._wake, trio_token=self._token)
        except trio.RunFinishedError:
            pass

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def requests(self, path: str) -> list[Received]:
        with self._lock:
            return [r for r in self.received if r.path == path]

    async def wait_for(self, path: str, count: int = 1, timeout: float = 10) -> list[Received]:
        """The first *count* requests to *path*, waiting for them."""
        with trio.fail_after(timeout):
            while len(found := self.requests(path)) < count:
                await self._changed.wait()
        return found[:count]

    async def wait_until(self, predicate: Callable[[], bool], timeout: float = 10) -> None:
        """Wait for *predicate* to hold; checked as each request arrives and is answered."""
        with trio.fail_after(timeout):
            while not predicate():
                await self._changed.wait()

    def release(self) -> None:
        self._released.set()


@asynccontextmanager
async def app_backend() -> AsyncIterator[AppBackend]:
    backend = AppBackend(trio.lowlevel.current_trio_token())
    thread = threading.Thread(target=backend.http.serve_forever, daemon=True)
    thread.start()
    try:
        yield backend
    finally:
        backend.release()
        await trio.to_thread.run_sync(backend.http.shutdown)
        backend.http.server_close()
