"""permessage-deflate without I/O: negotiation, shared compressed framing, bounded inflate.

wsproto's own PerMessageDeflate plays the client: what the server frames must
inflate there, and what it compresses must inflate here.
"""

from __future__ import annotations

import json
import os
import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st
from wsproto import ConnectionType
from wsproto.connection import Connection
from wsproto.events import CloseConnection, Message, TextMessage
from wsproto.extensions import PerMessageDeflate

from trioserve.protocol import deflate

RESPONSE = b"permessage-deflate; server_no_context_takeover; client_no_context_takeover"


def offer(*values: bytes) -> list[tuple[bytes, bytes]]:
    return [(b"host", b"x"), *((b"sec-websocket-extensions", v) for v in values)]


# --- negotiation ---------------------------------------------------------------------------


@pytest.mark.parametrize("value", [
    b"permessage-deflate",
    b"permessage-deflate; client_max_window_bits",  # what Chromium, Node's ws and websockets send
    b"permessage-deflate; client_max_window_bits=10",
    b'permessage-deflate; client_max_window_bits="12"',
    b"permessage-deflate; server_no_context_takeover; client_no_context_takeover",
    b"Permessage-Deflate; Client_Max_Window_Bits",
    b"permessage-deflate ; client_max_window_bits ",
])
def test_browser_style_offers_are_accepted_with_no_context_takeover(value: bytes) -> None:
    assert deflate.negotiate(offer(value)) == RESPONSE


def test_server_max_window_bits_15_is_echoed() -> None:
    assert deflate.negotiate(offer(b"permessage-deflate; server_max_window_bits=15")) == \
        RESPONSE + b"; server_max_window_bits=15"


@pytest.mark.parametrize("value", [
    b"permessage-deflate; server_max_window_bits=10",  # would need a second compressed copy
    b"permessage-deflate; server_max_window_bits",  # needs a value
    b"permessage-deflate; client_max_window_bits=16",
    b"permessage-deflate; client_max_window_bits=7",
    b"permessage-deflate; client_max_window_bits=010",
    b"permessage-deflate; client_max_window_bits=abc",
    b"permessage-deflate; server_no_context_takeover=1",
    b"permessage-deflate; client_max_window_bits; client_max_window_bits",  # repeated
    b"permessage-deflate; unknown_param",
    b"permessage-deflate; =",
    b"permessage-deflate; a b",
    b"permessage-deflate; x=\"unterminated",
    b"x-webkit-deflate-frame",
    b"",
    b",,,",
])
def test_unacceptable_or_malformed_offers_are_declined(value: bytes) -> None:
    assert deflate.negotiate(offer(value)) is None


def test_no_header_no_extension() -> None:
    assert deflate.negotiate([(b"host", b"x")]) is None


def test_the_first_acceptable_of_several_offers_wins() -> None:
    assert deflate.negotiate(offer(
        b"permessage-deflate; server_max_window_bits=10, permessage-deflate; bogus,"
        b" permessage-deflate; client_max_window_bits")) == RESPONSE
    # Offers may come in several header lines, and with other extensions between.
    assert deflate.negotiate(offer(b"x-foo; a=\"1, 2\"", b"permessage-deflate; server_max_window_bits=15")) \
        == RESPONSE + b"; server_max_window_bits=15"


@given(st.binary(max_size=200))
def test_any_header_value_is_parsed_or_declined_without_an_exception(value: bytes) -> None:
    result = deflate.negotiate(offer(value))
    assert result is None or result.startswith(RESPONSE)


# --- outbound: compressed once, read by a real permessage-deflate client -------------------


def client_for(response: bytes) -> Connection:
    ext = PerMessageDeflate()
    ext.finalize(response.decode())
    return Connection(ConnectionType.CLIENT, [ext])


def publication(i: int) -> bytes:
    entries = [{"rank": k, "player": f"player_{(i * 7 + k) % 9999:04d}", "team": ["red", "blue"][k % 2],
                "score": (i * 31 + k * 977) % 99999, "status": "alive"} for k in range(9)]
    return json.dumps({"op": "pub", "topic": "game", "offset": i, "data": {"entries": entries}}).encode()


def messages(client: Connection, data: bytes) -> list[str]:
    client.receive_data(data)
    out = []
    for event in client.events():
        assert isinstance(event, TextMessage), event
        out.append(event.data)
    return out


def test_a_batch_inflates_in_a_client_message_by_message() -> None:
    payloads = [publication(i) for i in range(20)] + [b'{"op":"pub","small":1}', b"{}"]
    data = deflate.frame_batch(payloads)
    client = client_for(RESPONSE)
    assert messages(client, data) == [p.decode() for p in payloads]
    # Each message stands alone: the batch read by a second client, in another
    # order of arrival (the last message first), reads the same.
    single = deflate.frame_batch([payloads[5]])
    assert messages(client_for(RESPONSE), single) == [payloads[5].decode()]


def test_small_messages_go_uncompressed_and_large_ones_with_rsv1() -> None:
    small = b'{"op":"pub","topic":"t","offset":1,"data":1}'
    assert len(small) < deflate.COMPRESS_THRESHOLD
    assert deflate.compressed_text_frame(small)[0] == 0x81
    big = publication(1)
    frame = deflate.compressed_text_frame(big)
    assert frame[0] == 0xC1
    assert len(frame) < 0.5 * len(big)


def test_incompressible_payloads_go_uncompressed() -> None:
    noise = json.dumps(os.urandom(600).hex()).encode()[:600]
    random_text = bytes(b % 94 + 33 for b in os.urandom(600))
    for payload in (noise, random_text):
        frame = deflate.compressed_text_frame(payload)
        assert len(frame) <= len(payload) + 4


@given(st.lists(st.text(min_size=0, max_size=2000), min_size=1, max_size=8))
def test_any_batch_round_trips(texts: list[str]) -> None:
    payloads = [t.encode() for t in texts]
    assert messages(client_for(RESPONSE), deflate.frame_batch(payloads)) == texts


def test_deflate_strips_the_sync_tail() -> None:
    body = deflate.deflate(b"hello " * 100)
    assert not body.endswith(b"\x00\x00\xff\xff")
    assert zlib.decompressobj(-15).decompress(body + b"\x00\x00\xff\xff") == b"hello " * 100


# --- inbound: bounded inflate in wsproto ----------------------------------------------------


def server(limit: int = 65536) -> Connection:
    return Connection(ConnectionType.SERVER, [deflate.InboundDeflate(limit)])


def compressing_client() -> Connection:
    ext = PerMessageDeflate(client_no_context_takeover=True)
    ext.finalize(RESPONSE.decode())
    return Connection(ConnectionType.CLIENT, [ext])


def server_events(srv: Connection, data: bytes) -> list[object]:
    srv.receive_data(data)
    return list(srv.events())


def text_of(events: list[object]) -> list[str]:
    out: list[str] = []
    for e in events:
        assert isinstance(e, Message), e
        assert isinstance(e.data, str)
        out.append(e.data)
    return out


def test_compressed_client_messages_inflate_one_after_another() -> None:
    client, srv = compressing_client(), server()
    texts = [publication(i).decode() for i in range(5)] + ["tiny", ""]
    data = b"".join(client.send(TextMessage(data=t)) for t in texts)
    assert data[0] & 0x40  # RSV1: the client compressed
    got = "".join(text_of(server_events(srv, data)))
    assert got == "".join(texts)


def test_uncompressed_messages_still_work_with_the_extension() -> None:
    plain = Connection(ConnectionType.CLIENT)
    srv = server()
    assert text_of(server_events(srv, plain.send(TextMessage(data="hello")))) == ["hello"]


def test_fragmented_compressed_message_with_a_ping_between_fragments() -> None:
    from wsproto.events import Ping
    client, srv = compressing_client(), server()
    text = publication(3).decode()
    first = client.send(TextMessage(data=text[:500], message_finished=False))
    ping = client.send(Ping(b"p"))
    rest = client.send(TextMessage(data=text[500:], message_finished=True))
    events = server_events(srv, first + ping + rest)
    assert "".join(e.data for e in events if isinstance(e, TextMessage)) == text
    assert any(isinstance(e, Ping) for e in events)


def test_a_zip_bomb_closes_1009_without_inflating_past_the_limit() -> None:
    client, srv = compressing_client(), server(limit=64 * 1024)
    bomb = client.send(TextMessage(data="a" * 20_000_000))
    assert len(bomb) < 40_000
    events = server_events(srv, bomb)
    assert isinstance(events[-1], CloseConnection) and events[-1].code == 1009
    assert sum(len(getattr(e, "data", "")) for e in events) <= 64 * 1024


def test_at_the_limit_is_accepted() -> None:
    client, srv = compressing_client(), server(limit=1000)
    assert text_of(server_events(srv, client.send(TextMessage(data="b" * 1000)))) == ["b" * 1000]


def test_corrupt_compressed_data_closes_1007() -> None:
    srv = server()
    # A masked (mask 0) text frame with RSV1 whose payload is not deflate data.
    events = server_events(srv, b"\xc1\x84\x00\x00\x00\x00\xff\xff\xff\xff")
    assert isinstance(events[-1], CloseConnection) and events[-1].code == 1007


def test_rsv1_without_negotiation_is_a_protocol_error() -> None:
    client = compressing_client()
    data = client.send(TextMessage(data="x" * 300))
    events = server_events(Connection(ConnectionType.SERVER), data)
    assert isinstance(events[-1], CloseConnection) and events[-1].code == 1002


@pytest.mark.parametrize("frame", [
    b"\xc9\x80\x00\x00\x00\x00",  # RSV1 on a ping
    b"\x41\x81\x00\x00\x00\x00a" + b"\xc0\x81\x00\x00\x00\x00b",  # RSV1 on a continuation
])
def test_rsv1_where_rfc_7692_forbids_it_is_a_protocol_error(frame: bytes) -> None:
    events = server_events(server(), frame)
    assert isinstance(events[-1], CloseConnection) and events[-1].code == 1002


def test_an_idle_extension_holds_no_zlib_object() -> None:
    client, ext = compressing_client(), deflate.InboundDeflate(65536)
    srv = Connection(ConnectionType.SERVER, [ext])
    server_events(srv, client.send(TextMessage(data=publication(1).decode())))
    assert ext._inflater is None
