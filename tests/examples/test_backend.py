"""examples/backend: a stdlib application backend, as a process, in front of a real trioserve process."""

from __future__ import annotations

import json
import re

import pytest
import trio

from ..peers import RawWebSocket, Refused
from .conftest import Example
from .test_examples import LISTENING_HTTP, wait_for

pytestmark = pytest.mark.system

SECRET = "example-webhook-secret"


async def test_backend_example_decides_and_hears_the_events(run_example: type[Example]) -> None:
    backend = run_example(["-m", "examples.backend", "--port", "0", "--webhooks-secret", SECRET])
    base = (await wait_for(backend, r"backend listening on (http://127\.0\.0\.1:\d+)")).group(1)
    server = run_example([
        "-m", "trioserve", "serve", "--port", "0",
        "--proxy-connect-url", f"{base}/connect", "--proxy-subscribe-url", f"{base}/subscribe",
        "--proxy-publish-url", f"{base}/publish", "--proxy-rpc-url", f"{base}/rpc",
        "--webhooks-url", f"{base}/webhook", "--webhooks-secret", SECRET,
    ])
    port = int((await wait_for(server, LISTENING_HTTP)).group(1))
    with trio.fail_after(20):
        with pytest.raises(Refused) as refused:
            await RawWebSocket.connect(port)
        assert refused.value.status == 403
        assert "log in first" in json.loads(refused.value.body)["error"]["message"]

        ws = await RawWebSocket.connect(port, headers=[("Cookie", "theme=dark; session=s-alice")])
        async with ws.stream:
            assert (await ws.request({"op": "subscribe", "topic": "chat.room", "id": 1}))["ok"] is True
            for topic in ("admin.log", "user.bob"):
                reply = await ws.request({"op": "subscribe", "topic": topic, "id": 2})
                assert reply["error"]["code"] == "forbidden", reply
            reply = await ws.request({"op": "subscribe", "topic": "user.alice", "id": 3})
            assert reply["ok"] is True
            await ws.send_json({"op": "publish", "topic": "chat.room", "data": {"text": "  hi  "}, "id": 4})
            msgs = [await ws.recv_json(), await ws.recv_json()]
            pub = next(m for m in msgs if m.get("op") == "pub")
            assert pub["data"] == {"text": "hi", "from": "alice"}
            reply = await ws.request({"op": "publish", "topic": "news", "data": 1, "id": 5})
            assert reply["error"]["code"] == "forbidden"
            reply = await ws.request({"op": "rpc", "method": "add", "data": [1, 2, 3], "id": 6})
            assert reply == {"id": 6, "ok": True, "result": 6}
            whoami = await ws.request({"op": "rpc", "method": "whoami", "id": 7})
            assert whoami["result"]["user"] == "alice"
            reply = await ws.request({"op": "rpc", "method": "nope", "id": 8})
            assert reply["error"] == {"code": "rpc_error", "message": "no method 'nope'", "status": 404}
            assert (await ws.request({"op": "unsubscribe", "topic": "chat.room", "id": 9}))["ok"] is True
            await ws.send_close(1000)
            await ws.wait_closed()

    disconnect = await wait_for(backend, r'webhook: (\{.*"event": "disconnect".*\})')
    events = [json.loads(m.group(1)) for line in backend.output.splitlines()
              if (m := re.match(r"webhook: (\{.*\})", line))]
    client = events[0]["client"]
    assert [(e["event"], e["user"], e["client"]) for e in events] == [
        ("connect", "alice", client), ("unsubscribe", "alice", client), ("disconnect", "alice", client)]
    assert events[1]["topic"] == "chat.room"
    assert json.loads(disconnect.group(1))["code"] == 1000
    # One name for the connection in the connect proxy, rpc, and the webhooks.
    assert whoami["result"]["client"] == client and re.fullmatch(r"c\d+", client)
    assert "bad signature" not in backend.output
