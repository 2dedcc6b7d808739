from __future__ import annotations

import base64
import itertools
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from wsproto import ConnectionType
from wsproto.connection import Connection
from wsproto.events import CloseConnection, TextMessage

from trioserve.protocol.websocket import (
    HandshakeError,
    accept_key,
    announced_remainder,
    check_upgrade,
    close_frame,
    frame_batch,
    is_upgrade,
    text_frame,
)

RFC_KEY = b"dGhlIHNhbXBsZSBub25jZQ=="
RFC_ACCEPT = b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="

Headers = list[tuple[bytes, bytes]]

VALID: Headers = [
    (b"host", b"example.com"),
    (b"upgrade", b"websocket"),
    (b"connection", b"Upgrade"),
    (b"sec-websocket-key", RFC_KEY),
    (b"sec-websocket-version", b"13"),
]
RESPONSE: Headers = [
    (b"upgrade", b"websocket"),
    (b"connection", b"Upgrade"),
    (b"sec-websocket-accept", RFC_ACCEPT),
]
VERSION_13: Headers = [(b"sec-websocket-version", b"13")]


def with_header(name: bytes, *values: bytes) -> Headers:
    """VALID with every *name* header replaced by one header per value (none if no values)."""
    return [(k, v) for k, v in VALID if k != name] + [(name, v) for v in values]


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *sorted(cuts), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def client_receive(chunks: list[bytes]) -> list[TextMessage | CloseConnection]:
    """Feed server bytes to a wsproto client; whole text messages and close events, in order."""
    conn = Connection(ConnectionType.CLIENT)
    events: list[TextMessage | CloseConnection] = []
    partial: list[str] = []
    for chunk in chunks:
        conn.receive_data(chunk)
        for event in conn.events():
            if isinstance(event, TextMessage):
                partial.append(event.data)
                if event.message_finished:
                    events.append(TextMessage(data="".join(partial)))
                    partial = []
            elif isinstance(event, CloseConnection):
                events.append(event)
            else:
                raise AssertionError(f"unexpected event {event!r}")
    assert partial == []
    return events


# --- accept_key --------------------------------------------------------------


def test_accept_key_rfc6455_example() -> None:
    assert accept_key(RFC_KEY) == RFC_ACCEPT


def test_accept_key_other_key() -> None:
    assert accept_key(b"x3JJHMbDL1EzLkh9GBhXDw==") == b"HSmrc0sMlYUkAGmm5OPpG2HaGWk="


# --- check_upgrade -----------------------------------------------------------


def test_check_upgrade_valid_returns_exactly_the_101_headers() -> None:
    assert check_upgrade(b"GET", b"1.1", VALID) == RESPONSE


@pytest.mark.parametrize(
    "connection",
    [
        [b"Upgrade"],
        [b"upgrade"],
        [b"UPGRADE"],
        [b"keep-alive, Upgrade"],
        [b"Upgrade,keep-alive"],
        [b"keep-alive", b"Upgrade"],
    ],
)
def test_check_upgrade_connection_token_forms(connection: list[bytes]) -> None:
    assert check_upgrade(b"GET", b"1.1", with_header(b"connection", *connection)) == RESPONSE


def test_check_upgrade_accept_matches_the_key() -> None:
    key = base64.b64encode(bytes(range(16)))
    headers = check_upgrade(b"GET", b"1.1", with_header(b"sec-websocket-key", key))
    assert headers[2] == (b"sec-websocket-accept", accept_key(key))


def refused(method: bytes, version: bytes, headers: Headers) -> HandshakeError:
    with pytest.raises(HandshakeError) as info:
        check_upgrade(method, version, headers)
    exc = info.value
    assert str(exc) == exc.reason
    return exc


@pytest.mark.parametrize("method", [b"POST", b"HEAD", b"PUT", b"get"])
def test_check_upgrade_rejects_non_get(method: bytes) -> None:
    exc = refused(method, b"1.1", VALID)
    assert exc.status == 400
    assert "GET" in exc.reason
    assert exc.headers == []


@pytest.mark.parametrize("version", [b"1.0", b"2", b"0.9"])
def test_check_upgrade_rejects_other_http_versions(version: bytes) -> None:
    exc = refused(b"GET", version, VALID)
    assert exc.status == 400
    assert "HTTP/1.1" in exc.reason
    assert exc.headers == []


@pytest.mark.parametrize(
    "connection",
    [[], [b"keep-alive"], [b"close"], [b"upgrade-insecure"], [b"websocket"]],
)
def test_check_upgrade_rejects_missing_connection_upgrade(connection: list[bytes]) -> None:
    exc = refused(b"GET", b"1.1", with_header(b"connection", *connection))
    assert exc.status == 400
    assert "Connection: Upgrade" in exc.reason
    assert exc.headers == []


@pytest.mark.parametrize("versions", [[], [b"8"], [b"12"], [b"14"], [b""], [b"13", b"8"]])
def test_check_upgrade_wrong_or_missing_version_is_426(versions: list[bytes]) -> None:
    exc = refused(b"GET", b"1.1", with_header(b"sec-websocket-version", *versions))
    assert exc.status == 426
    assert "Sec-WebSocket-Version" in exc.reason
    assert "13" in exc.reason
    assert exc.headers == VERSION_13


def test_check_upgrade_missing_key() -> None:
    exc = refused(b"GET", b"1.1", with_header(b"sec-websocket-key"))
    assert exc.status == 400
    assert "Sec-WebSocket-Key" in exc.reason
    assert exc.headers == []


def test_check_upgrade_two_keys() -> None:
    exc = refused(b"GET", b"1.1", with_header(b"sec-websocket-key", RFC_KEY, RFC_KEY))
    assert exc.status == 400
    assert "Sec-WebSocket-Key" in exc.reason
    assert "repeated" in exc.reason


@pytest.mark.parametrize(
    "key",
    [
        b"not base64 at all!!!!!!",
        b"dGhlIHNhbXBsZSBub25jZQ",
        b"dGhlIHNhbXBsZSBub25jZQ=",
        b"dGhlIHNhbXBs ZSBub25jZQ==",
        b"",
        base64.b64encode(b"\x00" * 15),
        base64.b64encode(b"\x00" * 17),
        base64.b64encode(b"\x00" * 32),
    ],
)
def test_check_upgrade_key_must_be_16_bytes_base64(key: bytes) -> None:
    exc = refused(b"GET", b"1.1", with_header(b"sec-websocket-key", key))
    assert exc.status == 400
    assert "Sec-WebSocket-Key" in exc.reason
    assert "16 bytes" in exc.reason
    assert exc.headers == []


def test_check_upgrade_15_byte_key_length() -> None:
    key = base64.b64encode(b"0123456789abcde")
    assert len(base64.b64decode(key)) == 15
    assert refused(b"GET", b"1.1", with_header(b"sec-websocket-key", key)).status == 400


def test_check_upgrade_reports_the_first_problem() -> None:
    assert "GET" in refused(b"POST", b"1.0", []).reason
    assert "HTTP/1.1" in refused(b"GET", b"1.0", []).reason
    assert "Connection" in refused(b"GET", b"1.1", []).reason
    assert refused(b"GET", b"1.1", [(b"connection", b"upgrade")]).status == 426
    assert "Sec-WebSocket-Key" in refused(b"GET", b"1.1", [(b"connection", b"upgrade"), *VERSION_13]).reason


# --- is_upgrade --------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        [(b"upgrade", b"websocket")],
        [(b"upgrade", b"WebSocket")],
        [(b"upgrade", b"WEBSOCKET")],
        [(b"upgrade", b"h2c, websocket")],
        [(b"upgrade", b" websocket ,h2c")],
        [(b"upgrade", b"h2c"), (b"upgrade", b"websocket")],
        VALID,
    ],
)
def test_is_upgrade_true(headers: Headers) -> None:
    assert is_upgrade(headers) is True


@pytest.mark.parametrize(
    "headers",
    [
        [],
        [(b"upgrade", b"h2c")],
        [(b"upgrade", b"websockets")],
        [(b"upgrade", b"web socket")],
        [(b"connection", b"websocket")],
        [(b"x-upgrade", b"websocket")],
    ],
)
def test_is_upgrade_false(headers: Headers) -> None:
    assert is_upgrade(headers) is False


# --- text_frame --------------------------------------------------------------


@pytest.mark.parametrize(
    ("length", "header"),
    [
        (0, b"\x81\x00"),
        (1, b"\x81\x01"),
        (125, b"\x81\x7d"),
        (126, b"\x81\x7e\x00\x7e"),
        (127, b"\x81\x7e\x00\x7f"),
        (65535, b"\x81\x7e\xff\xff"),
        (65536, b"\x81\x7f\x00\x00\x00\x00\x00\x01\x00\x00"),
        (70000, b"\x81\x7f" + struct.pack("!Q", 70000)),
    ],
)
def test_text_frame_exact_bytes(length: int, header: bytes) -> None:
    payload = bytes(i % 26 + 97 for i in range(length))
    assert text_frame(payload) == header + payload


def test_text_frame_small_literal() -> None:
    assert text_frame(b'{"op":"pub"}') == b'\x81\x0c{"op":"pub"}'
    assert text_frame("é".encode()) == b"\x81\x02\xc3\xa9"


# --- close_frame -------------------------------------------------------------


def test_close_frame_exact_bytes() -> None:
    assert close_frame(1000) == b"\x88\x02\x03\xe8"
    assert close_frame(1000, "") == b"\x88\x02\x03\xe8"
    assert close_frame(1001, "bye") == b"\x88\x05\x03\xe9bye"
    assert close_frame(4008, "slow consumer") == b"\x88\x0f\x0f\xa8slow consumer"
    assert close_frame(1011, "é") == b"\x88\x04\x03\xf3\xc3\xa9"


def test_close_frame_reason_truncated_to_123_bytes() -> None:
    assert close_frame(1000, "x" * 123) == b"\x88\x7d\x03\xe8" + b"x" * 123
    assert close_frame(1000, "x" * 124) == b"\x88\x7d\x03\xe8" + b"x" * 123
    assert close_frame(1000, "x" * 1000) == b"\x88\x7d\x03\xe8" + b"x" * 123


@pytest.mark.parametrize(
    ("reason", "kept"),
    [
        ("x" * 122 + "é", "x" * 122),
        ("x" * 121 + "é", "x" * 121 + "é"),
        ("x" * 121 + "€", "x" * 121),
        ("x" * 122 + "€", "x" * 122),
        ("x" * 120 + "€", "x" * 120 + "€"),
        ("😀" * 31, "😀" * 30),
        ("x" * 120 + "😀", "x" * 120),
        ("x" * 119 + "😀", "x" * 119 + "😀"),
    ],
)
def test_close_frame_truncation_never_splits_a_character(reason: str, kept: str) -> None:
    data = kept.encode()
    assert close_frame(1000, reason) == bytes((0x88, 2 + len(data))) + b"\x03\xe8" + data


@settings(max_examples=100)
@given(st.sampled_from([1000, 1001, 1002, 1007, 1009, 1011, 1013, 4001, 4002, 4008]), st.text())
def test_close_frame_roundtrip_through_wsproto(code: int, reason: str) -> None:
    frame = close_frame(code, reason)
    assert frame[0] == 0x88
    assert frame[1] == len(frame) - 2 <= 125
    kept = frame[4:].decode("utf-8")
    assert reason.startswith(kept)
    assert len(kept.encode()) <= 123
    assert kept == reason or len((reason[: len(kept) + 1]).encode()) > 123
    [event] = client_receive([frame])
    assert isinstance(event, CloseConnection)
    assert event.code == code
    assert event.reason == kept


# --- frame_batch -------------------------------------------------------------


def test_frame_batch_exact_bytes() -> None:
    assert frame_batch([]) == b""
    assert frame_batch([b"a"]) == b"\x81\x01a"
    assert frame_batch([b"a", b"", b"bc"]) == b"\x81\x01a\x81\x00\x81\x02bc"


@pytest.mark.parametrize("sizes", [[0], [125, 126], [65535, 65536, 0, 1], [126] * 3])
def test_frame_batch_is_concatenated_text_frames(sizes: list[int]) -> None:
    payloads = [b"z" * n for n in sizes]
    assert frame_batch(payloads) == b"".join(text_frame(p) for p in payloads)
    assert frame_batch(tuple(payloads)) == b"".join(text_frame(p) for p in payloads)


BOUNDARY_SIZES = [0, 1, 124, 125, 126, 127, 65534, 65535, 65536, 65537]


def text_of_byte_size(prefix: str, size: int) -> str:
    """*prefix* (cut at a character boundary) padded with ASCII to exactly *size* UTF-8 bytes."""
    while len(prefix.encode()) > size:
        prefix = prefix[:-1]
    return prefix + "x" * (size - len(prefix.encode()))


payload_texts = st.one_of(
    st.text(),
    st.builds(text_of_byte_size, st.text(max_size=20), st.sampled_from(BOUNDARY_SIZES)),
)


@settings(max_examples=60, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(payload_texts, max_size=6))
def test_frame_batch_equals_text_frames_property(texts: list[str]) -> None:
    payloads = [t.encode() for t in texts]
    assert frame_batch(payloads) == b"".join(text_frame(p) for p in payloads)


@settings(max_examples=60, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(payload_texts, min_size=1, max_size=6), st.data())
def test_frame_batch_roundtrip_through_wsproto_client(texts: list[str], data: st.DataObject) -> None:
    stream = frame_batch([t.encode() for t in texts])
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=12), label="cuts")
    events = client_receive(split_at(stream, cuts))
    assert [e.data if isinstance(e, TextMessage) else e for e in events] == texts


def test_frame_batch_roundtrip_byte_by_byte() -> None:
    texts = ["", "a", "é" * 63, "x" * 126, "日本語", "😀" * 40]
    stream = frame_batch([t.encode() for t in texts]) + close_frame(1001, "going away")
    events = client_receive([stream[i : i + 1] for i in range(len(stream))])
    assert [e.data for e in events[:-1] if isinstance(e, TextMessage)] == texts
    assert isinstance(events[-1], CloseConnection)
    assert (events[-1].code, events[-1].reason) == (1001, "going away")


# --- announced_remainder: the frame header's length, before its payload ------------------------


def _client_header(opcode: int, length: int, fin: bool = True) -> bytes:
    """A masked client frame header (mask key 0, so the payload goes as is)."""
    first = (0x80 if fin else 0) | opcode
    if length < 126:
        head = bytes([first, 0x80 | length])
    elif length < 1 << 16:
        head = bytes([first, 0x80 | 126]) + struct.pack("!H", length)
    else:
        head = bytes([first, 0x80 | 127]) + struct.pack("!Q", length)
    return head + b"\0\0\0\0"


def _fed(*chunks: bytes) -> Connection:
    ws = Connection(ConnectionType.SERVER)
    for chunk in chunks:
        ws.receive_data(chunk)
        list(ws.events())
    return ws


def test_announced_remainder_reads_the_header_before_any_payload() -> None:
    assert announced_remainder(_fed(_client_header(0x1, 10_000_000)), False) == 10_000_000
    assert announced_remainder(_fed(_client_header(0x2, 70_000)), False) == 70_000


def test_announced_remainder_counts_down_as_payload_arrives_and_ends_with_the_frame() -> None:
    ws = _fed(_client_header(0x1, 1000), b"a" * 10)
    assert announced_remainder(ws, True) == 990  # its payload has begun: wsproto took it
    ws.receive_data(b"a" * 990)
    list(ws.events())
    assert announced_remainder(ws, False) == 0


def test_announced_remainder_is_zero_between_frames_and_for_control_frames() -> None:
    assert announced_remainder(_fed(), False) == 0
    assert announced_remainder(_fed(_client_header(0x9, 100)), False) == 0  # a ping
    assert announced_remainder(_fed(_client_header(0x1, 2, fin=False)), False) == 2


def test_announced_remainder_leaves_frames_out_of_sequence_to_wsproto() -> None:
    # wsproto refuses these with 1002 once payload arrives; a 1009 at the header
    # would make the close code depend on where the bytes were split.
    assert announced_remainder(_fed(_client_header(0x0, 10_000_000)), False) == 0
    assert announced_remainder(_fed(_client_header(0x1, 10_000_000)), True) == 0
    assert announced_remainder(_fed(_client_header(0x0, 10_000_000)), True) == 10_000_000
