"""TLS on both listeners: wss:// with trio-websocket and trioserve.client, TCP+TLS,
HTTPS publishing, and clients that do not speak TLS."""

from __future__ import annotations

import json
import logging
import ssl
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trustme
from trio_websocket import open_websocket_url

import trioserve.client
from trioserve import Config, Server
from trioserve.config import ConfigError
from trioserve.net.tls import server_context
from trioserve.protocol.codes import CloseCode

from ..peers import HOST, NdjsonClient, RawWebSocket, dumps, http_request


@attrs.frozen
class Certs:
    certfile: str
    keyfile: str
    client: ssl.SSLContext


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    """A throwaway CA and a server certificate for 127.0.0.1, made for this test run."""
    ca = trustme.CA()
    cert = ca.issue_cert(HOST, "localhost")
    where = tmp_path_factory.mktemp("tls")
    certfile, keyfile = where / "cert.pem", where / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(certfile))
    for pem in cert.cert_chain_pems[1:]:
        pem.write_to_path(str(certfile), append=True)
    cert.private_key_pem.write_to_path(str(keyfile))
    client = ssl.create_default_context()
    ca.configure_trust(client)
    return Certs(str(certfile), str(keyfile), client)


async def start_tls(start_server: Any, certs: Certs, **config: Any) -> Any:
    return await start_server(certfile=certs.certfile, keyfile=certs.keyfile, **config)


async def test_wss_subscribe_and_publish(start_server: Any, certs: Certs,
                                         caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "trioserve")
    rs = await start_tls(start_server, certs, client_publish=True)
    assert f"listening on https://127.0.0.1:{rs.port} (WebSocket at wss://" in caplog.text
    assert "listening on tcp+tls://" in caplog.text
    url = f"wss://{HOST}:{rs.port}/ws"
    with trio.fail_after(15):
        async with open_websocket_url(url, ssl_context=certs.client) as sub, \
                open_websocket_url(url, ssl_context=certs.client) as pub:
            await sub.send_message(dumps({"op": "subscribe", "topic": "news", "id": 1}))
            assert json.loads(await sub.get_message())["ok"] is True
            await pub.send_message(dumps({"op": "publish", "topic": "news", "data": {"n": 1}, "id": 2}))
            assert json.loads(await pub.get_message()) == {"id": 2, "ok": True, "offset": 1,
                                                           "subscribers": 1}
            assert json.loads(await sub.get_message()) == {"op": "pub", "topic": "news", "offset": 1,
                                                           "data": {"n": 1}}
            # Publications from the HTTP API, over HTTPS.
            resp = await http_request(rs.port, "POST", "/api/publish",
                                      dumps({"topic": "news", "data": "big"}).encode() * 1,
                                      tls=certs.client)
            assert resp.status == 200 and json.loads(resp.body)["offset"] == 2
            assert json.loads(await sub.get_message())["data"] == "big"
            # A large publication crosses many TLS records.
            rs.server.hub.publish_nowait("news", "x" * 200_000)
            assert len(json.loads(await sub.get_message())["data"]) == 200_000
    with trio.fail_after(10):
        while rs.server.connections:
            await trio.sleep(0.01)
    assert rs.server.statistics().disconnects_total.get(CloseCode.NORMAL) == 2


async def test_wss_with_the_python_client(start_server: Any, certs: Certs) -> None:
    rs = await start_tls(start_server, certs, client_publish=True)
    with trio.fail_after(15):
        async with trioserve.client.connect(f"wss://{HOST}:{rs.port}/ws", ssl_context=certs.client) as c, \
                c.subscribe("ticks") as sub:
            await c.publish("ticks", 42)
            async for pub in sub:
                assert (pub.offset, pub.data) == (1, 42)
                break


async def test_tcp_over_tls(start_server: Any, certs: Certs) -> None:
    rs = await start_tls(start_server, certs)
    with trio.fail_after(15):
        client = await NdjsonClient.connect(rs.tcp_port, tls=certs.client)
        assert (await client.request({"op": "subscribe", "topic": "t", "id": 1}))["ok"] is True
        # The transport answers pings itself, over TLS too.
        assert await client.request({"op": "ping", "id": 2}) == {"id": 2, "ok": True, "op": "pong"}
        for i in range(3):
            rs.server.hub.publish_nowait("t", i)
        assert [(await client.recv())["data"] for _ in range(3)] == [0, 1, 2]
        # The server's close: a close line, then EOF.
        conn = next(iter(rs.server.connections))
        conn.start_close(CloseCode.GOING_AWAY)
        assert await client.recv() == {"op": "close", "code": 1001, "reason": "going away"}
        assert await client.recv_line() is None
        await client.aclose()
        while rs.server.connections:
            await trio.sleep(0.01)
        assert conn.close_code == CloseCode.GOING_AWAY


async def test_tls_refusals_still_speak_the_protocol(start_server: Any, certs: Certs) -> None:
    rs = await start_tls(start_server, certs, max_connections=1)
    with trio.fail_after(15):
        holder = await RawWebSocket.connect(rs.port, tls=certs.client)
        tcp = await NdjsonClient.connect(rs.tcp_port, tls=certs.client)
        assert await tcp.recv() == {"op": "close", "code": 1013, "reason": "server at capacity"}
        assert await tcp.recv_line() is None
        await tcp.aclose()
        resp = await http_request(rs.port, "GET", "/healthz", tls=certs.client)
        assert (resp.status, json.loads(resp.body)) == (200, {"status": "ok"})
        assert (await holder.request({"op": "ping", "id": 1}))["ok"] is True
        await holder.aclose()


async def test_plain_text_client_on_the_tls_port_is_closed(start_server: Any, certs: Certs) -> None:
    rs = await start_tls(start_server, certs)
    with trio.fail_after(10):
        for port, request in ((rs.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"),
                              (rs.tcp_port, b'{"op":"subscribe","topic":"t"}\n')):
            stream = await trio.open_tcp_stream(HOST, port)
            await stream.send_all(request)
            # No answer in plain text: the server gives up on the handshake and closes.
            try:
                data = await stream.receive_some(4096)
                assert b"HTTP" not in data and b'"ok"' not in data
                while data:
                    data = await stream.receive_some(4096)
            except trio.BrokenResourceError:
                pass  # a reset: also closed
            await stream.aclose()
        # The server is fine.
        client = await RawWebSocket.connect(rs.port, tls=certs.client)
        assert (await client.request({"op": "ping", "id": 1}))["ok"] is True
        await client.aclose()
    while rs.server._admission.sockets > 0:
        await trio.sleep(0.01)


async def test_silent_client_is_cut_at_the_handshake_timeout(start_server: Any, certs: Certs,
                                                             autojump_clock: Any) -> None:
    rs = await start_tls(start_server, certs, handshake_timeout=7)
    stream = await trio.open_tcp_stream(HOST, rs.tcp_port)
    start = trio.current_time()
    assert await stream.receive_some(100) == b""
    assert trio.current_time() - start == pytest.approx(7)
    await stream.aclose()
    assert rs.server._admission.sockets == 0


async def test_ssl_context_argument(start_server: Any, certs: Certs) -> None:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(certs.certfile, certs.keyfile)
    rs = await start_server(server_kwargs={"ssl_context": ctx})
    assert rs.server.ssl_context is ctx
    with trio.fail_after(10):
        client = await RawWebSocket.connect(rs.port, tls=certs.client)
        assert (await client.request({"op": "ping", "id": 1}))["ok"] is True
        await client.aclose()


def test_certificate_problems_are_config_errors(certs: Certs, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        Server(Config(certfile=str(tmp_path / "missing.pem")))
    with pytest.raises(ConfigError, match="keyfile is set but certfile is not"):
        Config(keyfile=certs.keyfile)
    # The certificate alone, without its key.
    with pytest.raises(ConfigError, match="private key"):
        server_context(Config(certfile=certs.certfile))
    # A key that does not belong to the certificate.
    other = trustme.CA().issue_cert(HOST)
    wrong_key = tmp_path / "wrong.pem"
    other.private_key_pem.write_to_path(str(wrong_key))
    with pytest.raises(ConfigError, match="private key"):
        server_context(Config(certfile=certs.certfile, keyfile=str(wrong_key)))
    # Certificate and key in one file.
    both = tmp_path / "both.pem"
    both.write_bytes(Path(certs.certfile).read_bytes() + Path(certs.keyfile).read_bytes())
    assert isinstance(server_context(Config(certfile=str(both))), ssl.SSLContext)
