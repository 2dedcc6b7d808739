from __future__ import annotations

import itertools

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trioserve.protocol.messages import encode_reply
from trioserve.protocol.ndjson import (
    PING_LINE,
    PONG_LINE,
    LineSplitter,
    LineTooLong,
    close_line,
    control_op,
    frame_batch,
    line,
    pong_reply,
)


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *sorted(cuts), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def feed_all(splitter: LineSplitter, chunks: list[bytes]) -> list[bytes]:
    out: list[bytes] = []
    for chunk in chunks:
        out.extend(splitter.feed(chunk))
    return out


# --- LineSplitter ------------------------------------------------------------


def test_feed_complete_lines() -> None:
    s = LineSplitter(100)
    assert s.feed(b'{"a":1}\n{"b":2}\n') == [b'{"a":1}', b'{"b":2}']
    assert s.pending == 0


def test_feed_holds_the_tail() -> None:
    s = LineSplitter(100)
    assert s.feed(b"ab") == []
    assert s.pending == 2
    assert s.feed(b"c\nde") == [b"abc"]
    assert s.pending == 2
    assert s.feed(b"f") == []
    assert s.pending == 3
    assert s.feed(b"\n") == [b"def"]
    assert s.pending == 0


def test_feed_empty_chunk() -> None:
    s = LineSplitter(10)
    assert s.feed(b"") == []
    assert s.pending == 0
    s.feed(b"abc")
    assert s.feed(b"") == []
    assert s.pending == 3


def test_feed_strips_one_cr() -> None:
    s = LineSplitter(100)
    assert s.feed(b"a\r\nb\n") == [b"a", b"b"]
    assert s.feed(b"c\r\r\n") == [b"c\r"]
    assert s.feed(b"d\re\n") == [b"d\re"]


def test_feed_crlf_split_between_cr_and_lf() -> None:
    s = LineSplitter(100)
    assert s.feed(b"abc\r") == []
    assert s.pending == 4
    assert s.feed(b"\nx") == [b"abc"]
    assert s.pending == 1


def test_feed_drops_empty_lines() -> None:
    s = LineSplitter(100)
    assert s.feed(b"\n\r\n\na\n\n") == [b"a"]
    assert s.feed(b"\r") == []
    assert s.feed(b"\n") == []
    assert s.pending == 0


def test_max_length_complete_line_over_limit() -> None:
    with pytest.raises(LineTooLong):
        LineSplitter(4).feed(b"abcde\n")


def test_max_length_over_limit_line_between_good_ones() -> None:
    with pytest.raises(LineTooLong):
        LineSplitter(4).feed(b"ok\nabcde\nok\n")


def test_max_length_over_limit_line_assembled_from_chunks() -> None:
    s = LineSplitter(4)
    assert s.feed(b"abc") == []
    with pytest.raises(LineTooLong):
        s.feed(b"de\n")


def test_max_length_unterminated_tail() -> None:
    with pytest.raises(LineTooLong):
        LineSplitter(4).feed(b"abcde")


def test_max_length_unterminated_tail_after_a_newline() -> None:
    with pytest.raises(LineTooLong):
        LineSplitter(4).feed(b"ok\nabcde")


def test_max_length_tail_growing_over_feeds() -> None:
    s = LineSplitter(4)
    assert s.feed(b"ab") == []
    assert s.feed(b"cd") == []
    assert s.pending == 4
    with pytest.raises(LineTooLong):
        s.feed(b"e")


def test_max_length_exactly_at_limit_accepted() -> None:
    assert LineSplitter(4).feed(b"abcd\n") == [b"abcd"]
    assert LineSplitter(4).feed(b"abcd\r\n") == [b"abcd"]
    s = LineSplitter(4)
    assert s.feed(b"abcd") == []
    assert s.pending == 4
    assert s.feed(b"\nwxyz\nw") == [b"abcd", b"wxyz"]
    assert s.pending == 1


@pytest.mark.parametrize("prefix", [b"", b"ok\n"])
@pytest.mark.parametrize("cut", range(1, 6))
def test_max_length_crlf_line_at_limit_accepted_at_every_split(prefix: bytes, cut: int) -> None:
    data = prefix + b"abcd\r\n"
    cut += len(prefix)
    s = LineSplitter(4)
    assert feed_all(s, [data[:cut], data[cut:]]) == [*prefix.split(b"\n")[:-1], b"abcd"]
    assert s.pending == 0


def test_max_length_at_limit_byte_by_byte() -> None:
    data = b"abcd\nefgh\n"
    s = LineSplitter(4)
    assert feed_all(s, [data[i : i + 1] for i in range(len(data))]) == [b"abcd", b"efgh"]


def test_max_length_attribute() -> None:
    assert LineSplitter(123).max_length == 123


line_bodies = st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"").replace(b"\r", b""))
terminators = st.sampled_from([b"\n", b"\r\n"])


@settings(max_examples=200)
@given(
    st.lists(st.tuples(line_bodies, terminators), max_size=20),
    line_bodies,
    st.data(),
)
def test_feed_any_chunking_gives_the_lines(
    lines: list[tuple[bytes, bytes]], tail: bytes, data: st.DataObject
) -> None:
    stream = b"".join(body + end for body, end in lines) + tail
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=15), label="cuts")
    s = LineSplitter(1000)
    assert feed_all(s, split_at(stream, cuts)) == [body for body, _ in lines if body]
    assert s.pending == len(tail)


@settings(max_examples=100)
@given(st.integers(1, 30), st.lists(st.integers(0, 30), min_size=1, max_size=10), st.data())
def test_feed_lines_at_or_under_limit_never_raise(
    limit: int, lengths: list[int], data: st.DataObject
) -> None:
    bodies = [b"y" * min(n, limit) for n in lengths] + [b"z" * limit]
    stream = b"".join(b + b"\n" for b in bodies)
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=15), label="cuts")
    assert feed_all(LineSplitter(limit), split_at(stream, cuts)) == [b for b in bodies if b]


@settings(max_examples=100)
@given(st.integers(1, 30), st.integers(1, 20), st.binary(max_size=20), st.data())
def test_feed_line_over_limit_always_raises(
    limit: int, extra: int, prefix: bytes, data: st.DataObject
) -> None:
    prefix = prefix.replace(b"\n", b"")[:limit] + b"\n"
    stream = prefix + b"q" * (limit + extra) + b"\n"
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=15), label="cuts")
    with pytest.raises(LineTooLong):
        feed_all(LineSplitter(limit), split_at(stream, cuts))


# --- encoders ----------------------------------------------------------------


def test_line() -> None:
    assert line(b'{"a":1}') == b'{"a":1}\n'
    assert line(b"") == b"\n"


def test_frame_batch_exact_bytes() -> None:
    assert frame_batch([b'{"a":1}']) == b'{"a":1}\n'
    assert frame_batch([b"1", b"2", b"3"]) == b"1\n2\n3\n"
    assert frame_batch((b"x", b"y")) == b"x\ny\n"


def test_frame_batch_empty_is_no_bytes() -> None:
    assert frame_batch([]) == b""


@settings(max_examples=100)
@given(st.lists(st.binary(max_size=30).map(lambda b: b.replace(b"\n", b"")), min_size=1, max_size=10))
def test_frame_batch_equals_lines(payloads: list[bytes]) -> None:
    batch = frame_batch(payloads)
    assert batch == b"".join(line(p) for p in payloads)
    s = LineSplitter(100)
    assert s.feed(batch) == [p.removesuffix(b"\r") for p in payloads if p.removesuffix(b"\r")]
    assert s.pending == 0


def test_ping_pong_constants() -> None:
    assert PING_LINE == b'{"op":"ping"}\n'
    assert PONG_LINE == b'{"op":"pong"}\n'


def test_pong_reply_exact_bytes() -> None:
    assert pong_reply(7) == b'{"id":7,"ok":true,"op":"pong"}\n'
    assert pong_reply("a") == b'{"id":"a","ok":true,"op":"pong"}\n'
    assert pong_reply() == b'{"ok":true,"op":"pong"}\n'


def test_pong_reply_matches_the_websocket_ping_reply() -> None:
    assert pong_reply(3) == encode_reply(3, op="pong") + b"\n"
    assert pong_reply() == encode_reply(op="pong") + b"\n"


def test_close_line_exact_bytes() -> None:
    assert close_line(1000, "") == b'{"op":"close","code":1000,"reason":""}\n'
    assert close_line(4008, "slow consumer") == b'{"op":"close","code":4008,"reason":"slow consumer"}\n'
    assert close_line(1001, 'a "b"\nc') == b'{"op":"close","code":1001,"reason":"a \\"b\\"\\nc"}\n'
    assert close_line(1007, "é") == b'{"op":"close","code":1007,"reason":"\xc3\xa9"}\n'


@settings(max_examples=100)
@given(st.integers(0, 65535), st.text())
def test_close_line_is_one_json_line(code: int, reason: str) -> None:
    data = close_line(code, reason)
    assert data.endswith(b"\n")
    assert data.count(b"\n") == 1
    assert orjson.loads(data) == {"op": "close", "code": code, "reason": reason}


# --- control_op --------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"op":"ping"}', ("ping", None)),
        ('{"op":"pong"}', ("pong", None)),
        ('{"op":"ping","id":5}', ("ping", 5)),
        ('{"op":"pong","id":"abc"}', ("pong", "abc")),
        ('{"id":1,"op":"ping"}', ("ping", 1)),
        ('{"op":"ping","id":null}', ("ping", None)),
        (' { "op" : "ping" } ', ("ping", None)),
        (PING_LINE.decode().strip(), ("ping", None)),
        (PONG_LINE.decode().strip(), ("pong", None)),
        ('{"op":"pong","id":42}', ("pong", 42)),
    ],
)
def test_control_op_heartbeats(text: str, expected: tuple[str, object]) -> None:
    assert control_op(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        '{"op":"ping","x":1}',
        '{"op":"ping","id":1,"x":2}',
        '{"op":"pong","data":null}',
        '{"op":"publish","topic":"p"}',
        '{"op":"PING"}',
        '{"op":"pingx"}',
        '{"op":["ping"]}',
        '{"id":"ping"}',
        '{"op":"ping"',
        "ping",
        '"ping"',
        '["ping"]',
        "",
        "{}",
        '{"op":"ping"}{"op":"ping"}',
        '{"op":"ping","id":"' + "a" * 60 + '"}',
        '{"op":"ping"}' + " " * 60,
        "\ud800p",
    ],
)
def test_control_op_other_lines(text: str) -> None:
    assert control_op(text) is None


@settings(max_examples=200)
@given(st.text(st.characters(exclude_categories=()), max_size=80))
def test_control_op_never_raises(text: str) -> None:
    result = control_op(text)
    assert result is None or result[0] in ("ping", "pong")
