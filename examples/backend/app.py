"""An application backend for trioserve's proxy and webhooks, with the standard library only.

Run it, then point trioserve at it (docs/backend.md walks through it)::

    python -m examples.backend --port 3000 --webhooks-secret s3cret
    trioserve serve --client-publish \\
        --proxy-connect-url http://127.0.0.1:3000/connect \\
        --proxy-subscribe-url http://127.0.0.1:3000/subscribe \\
        --proxy-publish-url http://127.0.0.1:3000/publish \\
        --proxy-rpc-url http://127.0.0.1:3000/rpc \\
        --webhooks-url http://127.0.0.1:3000/webhook --webhooks-secret s3cret

What it decides, as a real application would with its own sessions:

- connect: the ``session`` cookie names the user (``SESSIONS``); no session, 403;
- subscribe: ``user.<name>`` only for that user, ``admin.*`` for nobody, the rest for all;
- publish: only to ``chat.*``; the text is trimmed, and ``from`` is set to the user;
- rpc: ``whoami`` and ``add``; any other method is a 404 error;
- webhook: checks the HMAC-SHA256 signature, then prints each event as a JSON line.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import sys
from http.cookies import SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

#: session cookie -> user, standing in for the application's session store.
SESSIONS = {"s-alice": "alice", "s-bob": "bob"}


def connect(req: dict[str, Any]) -> dict[str, Any]:
    cookie = SimpleCookie(req.get("headers", {}).get("Cookie", ""))
    session = cookie.get("session")
    user = SESSIONS.get(session.value) if session is not None else None
    if user is None:
        return {"error": {"code": 403, "message": "log in first: no valid session cookie"}}
    return {"result": {"user": user, "data": {"plan": "free"}}}


def subscribe(req: dict[str, Any]) -> dict[str, Any]:
    topic, user = req["topic"], req["user"]
    if topic.startswith("admin."):
        return {"error": {"code": 403, "message": f"{topic} is for administrators"}}
    if topic.startswith("user.") and topic != f"user.{user}":
        return {"error": {"code": 403, "message": f"{topic} is another user's"}}
    return {"result": {}}


def publish(req: dict[str, Any]) -> dict[str, Any]:
    if not req["topic"].startswith("chat."):
        return {"error": {"code": 403, "message": "clients may publish to chat.* only"}}
    data = req["data"]
    text = str(data.get("text", "")) if isinstance(data, dict) else str(data)
    return {"result": {"data": {"text": text.strip()[:500], "from": req["user"]}}}


def rpc(req: dict[str, Any]) -> dict[str, Any]:
    if req["method"] == "whoami":
        return {"result": {"user": req["user"], "client": req["client"]}}
    if req["method"] == "add":
        return {"result": sum(req["data"])}
    return {"error": {"code": 404, "message": f"no method {req['method']!r}"}}


ROUTES = {"/connect": connect, "/subscribe": subscribe, "/publish": publish, "/rpc": rpc}


def verify(secret: str, body: bytes, signature: str | None) -> bool:
    """The check a webhook receiver makes: HMAC-SHA256 of the raw body, compared in constant time."""
    expected = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return signature is not None and hmac.compare_digest(expected, signature)


class Handler(BaseHTTPRequestHandler):
    server: Backend

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.path == "/webhook":
            self.webhook(body)
            return
        route = ROUTES.get(self.path)
        if route is None:
            self.answer(404, {"error": "no such route"})
            return
        self.answer(200, route(json.loads(body)))

    def webhook(self, body: bytes) -> None:
        secret = self.server.webhooks_secret
        if secret is not None and not verify(secret, body, self.headers.get("X-Trioserve-Signature")):
            print("webhook: bad signature", flush=True)
            self.answer(401, {"error": "bad signature"})
            return
        for event in json.loads(body)["events"]:
            print("webhook:", json.dumps(event, sort_keys=True), flush=True)
        self.answer(200, {})

    def answer(self, status: int, obj: Any) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # stdout is for the webhook events


class Backend(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, port: int, webhooks_secret: str | None):
        super().__init__(("127.0.0.1", port), Handler)
        self.webhooks_secret = webhooks_secret


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=3000, help="0 picks a free port")
    parser.add_argument("--webhooks-secret", default=None, help="the server's webhooks_secret")
    args = parser.parse_args(argv)
    with Backend(args.port, args.webhooks_secret) as backend:
        print(f"backend listening on http://127.0.0.1:{backend.server_address[1]}", flush=True)
        try:
            backend.serve_forever()
        except KeyboardInterrupt:
            sys.exit(0)


if __name__ == "__main__":
    main()
