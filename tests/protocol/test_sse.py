"""Server-Sent Events framing and the resume cursor, as exact bytes."""

from __future__ import annotations

import base64
import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trioserve.protocol import sse


def test_frame_batch_exact_bytes() -> None:
    assert sse.frame_batch([b'{"a":1}']) == b'data: {"a":1}\n\n'
    assert sse.frame_batch([b"1", b"2"]) == b"data: 1\n\ndata: 2\n\n"


def test_frame_open_leaves_the_last_event_for_the_id() -> None:
    assert sse.frame_open([b"1"]) == b"data: 1\n"
    assert sse.frame_open([b"1", b"2", b"3"]) == b"data: 1\n\ndata: 2\n\ndata: 3\n"
    # Ended by one stream's id, it is the same events with an id on the last.
    assert sse.frame_open([b"1", b"2"]) + sse.id_line(b"1.x") == b"data: 1\n\ndata: 2\nid: 1.x\n\n"


def test_fields_exact_bytes() -> None:
    assert sse.COMMENT == b":\n\n"
    assert sse.retry_field(2500) == b"retry: 2500\n\n"
    assert sse.event("gap", b'{"t":1}') == b'event: gap\ndata: {"t":1}\n\n'
    assert sse.event("gap", b"{}", b"1.c") == b"event: gap\ndata: {}\nid: 1.c\n\n"
    assert sse.close_event(1001, "going away", 1234) == (
        b'event: close\ndata: {"code":1001,"reason":"going away"}\nretry: 1234\n\n')


def test_tag_is_six_url_safe_characters_of_blake2b() -> None:
    digest = hashlib.blake2b(b"news", digest_size=6).digest()
    assert sse.tag("news") == base64.urlsafe_b64encode(digest)[:6]
    assert sse.entry_tag("news", "e1") == sse.tag("news") + sse.tag("e1")
    assert len(sse.tag("x" * 200)) == 6


def test_cursor_exact_bytes() -> None:
    a, b = sse.entry_tag("a", "ep"), sse.entry_tag("b", "ep")
    assert sse.encode_cursor([a], [7]) == b"1." + a + b"7"
    assert sse.encode_cursor([a, b], [0, 123]) == b"1." + a + b"0." + b + b"123"


def test_decode_cursor_by_topic_tag() -> None:
    a, b = sse.entry_tag("a", "ep"), sse.entry_tag("b", "ep2")
    cursor = sse.encode_cursor([a, b], [5, 0]).decode()
    assert sse.decode_cursor(cursor) == {sse.tag("a"): (a, 5), sse.tag("b"): (b, 0)}
    assert sse.decode_cursor("1") == {}


@pytest.mark.parametrize("bad", ["", "2.abcdefabcdef1", "1.", "1.short1", "1.abcdefabcdef",
                                 "1.abcdefabcdef01", "1.abcdefabcdef-1", "1.abc!efabcdef1",
                                 "1.abcdefabcdef1.", "x" * 20000,
                                 "1.abcdefabcdef" + "9" * 20])
def test_decode_cursor_refuses_what_is_not_one(bad: str) -> None:
    with pytest.raises(sse.CursorError):
        sse.decode_cursor(bad)


@given(st.lists(st.tuples(st.text(min_size=1, max_size=30), st.text(max_size=20),
                          st.integers(0, 2**63 - 1)), min_size=1, max_size=8, unique_by=lambda e: e[0]))
def test_cursor_roundtrip(entries: list[tuple[str, str, int]]) -> None:
    tags = [sse.entry_tag(t, e) for t, e, _ in entries]
    cursor = sse.encode_cursor(tags, [o for _, _, o in entries])
    text = cursor.decode("ascii")
    assert all(c.isalnum() or c in "._-" for c in text)  # URL-safe, header-safe
    decoded = sse.decode_cursor(text)
    for (topic, _, offset), tag in zip(entries, tags, strict=True):
        if list(decoded).count(sse.tag(topic)) == 1:
            assert decoded[sse.tag(topic)] == (tag, offset)
