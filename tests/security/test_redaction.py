"""What the logs, reprs and error messages never contain: tokens, the token secret,
API keys and broker passwords."""

from __future__ import annotations

import logging
import time
from typing import Any

import jwt
import pytest
import trio

from trioserve import Config
from trioserve.config import ConfigError, load_config, redact_url
from trioserve.protocol.codes import CloseCode
from trioserve.push.brokers.redis import RedisBroker

from ..peers import Closed, NdjsonClient, RawWebSocket, dumps, http_request

SECRET = "s3cret-token-key-0123456789abcdefghijkl"
API_KEY = "api-key-9f8e7d6c5b4a39281706f5e4d3c2b1a0"
# A wrong key that shares most of its characters with the right one.
NEAR_KEY = API_KEY[:-4] + "zzzz"
PASSWORD = "broker-pw-7c1d0e"


def token(secret: str = SECRET, **claims: Any) -> str:
    payload = {"sub": "alice", "exp": int(time.time()) + 3600, "subscribe": ["*"], **claims}
    return jwt.encode(payload, secret, algorithm="HS256")


async def test_no_secret_or_token_in_the_logs(start_server: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    good = token()
    forged = token(secret="not-the-secret-but-as-long-as-it-0123")
    expired = token(exp=int(time.time()) - 10)
    rs = await start_server(token_secret=SECRET, api_key=API_KEY, log_level="debug")
    with trio.fail_after(20):
        # WebSocket: a token in the query string, and in the Authorization header.
        ok = await RawWebSocket.connect(rs.port, path=f"/ws?token={good}")
        assert (await ok.request({"op": "subscribe", "topic": "t", "id": 1}))["ok"] is True
        ok_header = await RawWebSocket.connect(rs.port, headers=[("authorization", f"Bearer {good}")])
        assert (await ok_header.request({"op": "ping", "id": 1}))["ok"] is True
        for bad in (forged, expired, "not.a.token"):
            refused = await RawWebSocket.connect(rs.port, path=f"/ws?token={bad}")
            closed = await refused.wait_closed()
            assert closed.code == CloseCode.UNAUTHORIZED
            await refused.aclose()
        nothing = await RawWebSocket.connect(rs.port)
        assert (await nothing.wait_closed()).code == CloseCode.UNAUTHORIZED
        await nothing.aclose()

        # TCP: connect with a forged token, then a good one, then refresh.
        tcp = await NdjsonClient.connect(rs.tcp_port)
        reply = await tcp.request({"op": "connect", "token": forged, "id": 1})
        assert reply["error"]["code"] == "unauthorized"
        assert (await tcp.request({"op": "connect", "token": good, "id": 2}))["ok"] is True
        assert (await tcp.request({"op": "refresh", "token": good, "id": 3}))["ok"] is True
        assert (await tcp.request({"op": "refresh", "token": expired, "id": 4}))["ok"] is False
        await tcp.aclose()

        # HTTP API: no key, a near miss, the right key.
        body = dumps({"topic": "t", "data": 1}).encode()
        assert (await http_request(rs.port, "POST", "/api/publish", body)).status == 401
        assert (await http_request(rs.port, "POST", "/api/publish", body,
                                   headers=[("Authorization", f"Bearer {NEAR_KEY}")])).status == 401
        assert (await http_request(rs.port, "POST", "/api/publish", body,
                                   headers=[("Authorization", f"Bearer {API_KEY}")])).status == 200
        assert (await http_request(rs.port, "GET", f"/api/history?topic=t&token={good}",
                                   headers=[("Authorization", f"Bearer {API_KEY}")])).status == 200
        assert (await ok.recv_json())["data"] == 1

        for client in (ok, ok_header):
            await client.aclose()
        while rs.server.connections:
            await trio.sleep(0.01)
    assert rs.server.statistics().auth_failures >= 7
    text = "\n".join(f"{r.name} {r.getMessage()} {r.exc_text or ''}" for r in caplog.records)
    assert "unauthorized" in text and "connect 127.0.0.1" in text  # the log did record the attempts
    for secret in (SECRET, API_KEY, NEAR_KEY, good, forged, expired):
        assert secret not in text
        # Nor the distinctive part of a JWT: its signature.
        assert secret.rsplit(".", 1)[-1] not in text


def test_config_repr_hides_secrets() -> None:
    config = Config(token_secret=SECRET, api_key=API_KEY, broker=f"redis://:{PASSWORD}@h:6379/0")
    shown = repr(config)
    assert SECRET not in shown and API_KEY not in shown and PASSWORD not in shown
    assert "token_secret='***'" in shown and "api_key='***'" in shown
    assert "redis://:***@h:6379/0" in shown
    password_only = repr(Config(broker="redis://h:6379/0", broker_password=PASSWORD))
    assert PASSWORD not in password_only and "broker_password='***'" in password_only
    assert "token_secret=None" in repr(Config())


def test_config_errors_do_not_echo_secrets(tmp_path: Any) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("api_key = 12345678901234567890\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert "12345678901234567890" not in str(info.value)
    assert "api_key must be a string" in str(info.value)
    with pytest.raises(ConfigError) as info:
        Config(token_secret=b"raw-bytes-secret")  # type: ignore[arg-type]
    assert "raw-bytes-secret" not in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_config(None, env={"TRIOSERVE_BROKER": f"redis://:{PASSWORD}@/0"})
    assert PASSWORD not in str(info.value) and "***" in str(info.value)


def test_redis_urls_are_redacted() -> None:
    assert redact_url(f"redis://:{PASSWORD}@h:6379/0") == "redis://:***@h:6379/0"
    assert redact_url(f"redis://user:{PASSWORD}@h/0") == "redis://user:***@h/0"
    assert redact_url(f"rediss://h/0?password={PASSWORD}&ssl_cert_reqs=none") == \
        "rediss://h/0?password=***&ssl_cert_reqs=none"
    assert redact_url("redis://h:6379/0") == "redis://h:6379/0"
    for url in (f"redis://:{PASSWORD}@h:6379/0", f"redis://h:6379/0?password={PASSWORD}"):
        broker = RedisBroker(url, Config(broker="redis://h:6379/0"))
        assert PASSWORD not in repr(broker) and "h:6379" in repr(broker)
    broker = RedisBroker("redis://h:6379/0", Config(broker="redis://h:6379/0", broker_password=PASSWORD))
    assert PASSWORD not in repr(broker)


async def test_token_in_a_closed_reason_is_never_echoed(start_server: Any) -> None:
    # The close reason names why a token was refused, never the token itself.
    rs = await start_server(token_secret=SECRET)
    forged = token(secret="not-the-secret-but-as-long-as-it-0123")
    with trio.fail_after(10):
        client = await RawWebSocket.connect(rs.port, path=f"/ws?token={forged}")
        with pytest.raises(Closed) as closed:
            await client.recv_json()
        assert closed.value.reason == "unauthorized: bad_signature"
        await client.aclose()
