from __future__ import annotations

import json
import sys
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trioserve.protocol.codes import ErrorCode
from trioserve.protocol.messages import (
    Command,
    ProtocolError,
    encode_error,
    encode_presence_event,
    encode_publication,
    encode_reply,
    kept_json,
    parse_command,
    validate_topic,
)

TOPIC_MESSAGE = "topic must be 1-200 characters of A-Z a-z 0-9 _ . : / -"


def rejected(raw: str | bytes, extra_ops: frozenset[str] = frozenset()) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        parse_command(raw, extra_ops)
    exc = info.value
    assert isinstance(exc.code, ErrorCode)
    assert str(exc) == exc.message
    return exc


def msg(**fields: Any) -> bytes:
    return orjson.dumps(fields)


# --- valid commands ----------------------------------------------------------


def test_parse_subscribe() -> None:
    cmd = parse_command('{"op":"subscribe","topic":"news"}')
    assert cmd == Command(op="subscribe", id=None, fields={"op": "subscribe", "topic": "news"})
    assert cmd.topic == "news"


def test_parse_unsubscribe() -> None:
    cmd = parse_command(b'{"op":"unsubscribe","topic":"a/b:c.d_e-f","id":1}')
    assert cmd == Command(
        op="unsubscribe", id=1, fields={"op": "unsubscribe", "topic": "a/b:c.d_e-f", "id": 1}
    )
    assert cmd.topic == "a/b:c.d_e-f"


@pytest.mark.parametrize("data", [None, 0, "x", [1, {"a": None}], {"k": [True, 1.5]}])
def test_parse_publish(data: Any) -> None:
    cmd = parse_command(msg(op="publish", topic="t", data=data, id="p1"))
    assert (cmd.op, cmd.id, cmd.topic) == ("publish", "p1", "t")
    assert cmd.fields == {"op": "publish", "topic": "t", "data": data, "id": "p1"}


def test_parse_ping() -> None:
    assert parse_command('{"op":"ping"}') == Command(op="ping", id=None, fields={"op": "ping"})
    assert parse_command(' {"op" : "ping", "id": 3}\n') == Command(
        op="ping", id=3, fields={"op": "ping", "id": 3}
    )


def test_parse_keeps_unknown_fields() -> None:
    cmd = parse_command('{"op":"subscribe","topic":"t","extra":5,"x":{"y":1}}')
    assert cmd.fields["extra"] == 5
    assert cmd.fields["x"] == {"y": 1}


def test_subscribe_since_is_validated() -> None:
    cmd = parse_command('{"op":"subscribe","topic":"t","since":{"epoch":"e1","offset":41}}')
    assert cmd.fields["since"] == {"epoch": "e1", "offset": 41}
    for bad in ('5', '{"epoch":"e"}', '{"offset":1}', '{"epoch":1,"offset":1}',
                '{"epoch":"e","offset":-1}', '{"epoch":"e","offset":true}', '{"epoch":"e","offset":1.5}'):
        with pytest.raises(ProtocolError) as info:
            parse_command('{"op":"subscribe","topic":"t","id":3,"since":' + bad + "}")
        assert info.value.code is ErrorCode.BAD_REQUEST and info.value.id == 3
        assert "since" in info.value.message


@pytest.mark.parametrize("op", ["connect", "refresh"])
def test_token_ops_need_a_token(op: str) -> None:
    assert parse_command('{"op":"' + op + '","token":"abc"}').fields["token"] == "abc"
    # connect without a token parses: the connect proxy, or the handler's bad_request.
    for bad in ((',"token":""', ',"token":5') if op == "connect" else ("", ',"token":""', ',"token":5')):
        with pytest.raises(ProtocolError) as info:
            parse_command('{"op":"' + op + '"' + bad + "}")
        assert info.value.code is ErrorCode.BAD_REQUEST and "token" in info.value.message
    if op == "connect":
        assert "token" not in parse_command('{"op":"connect"}').fields


def test_rpc_needs_a_method() -> None:
    cmd = parse_command('{"op":"rpc","method":"whoami","data":[1],"id":4}')
    assert cmd.fields["method"] == "whoami" and cmd.fields["data"] == [1] and cmd.id == 4
    for bad in ("", ',"method":""', ',"method":5', ',"method":"' + "m" * 201 + '"'):
        with pytest.raises(ProtocolError) as info:
            parse_command('{"op":"rpc"' + bad + "}")
        assert info.value.code is ErrorCode.BAD_REQUEST and "method" in info.value.message


def test_presence_needs_a_topic() -> None:
    assert parse_command('{"op":"presence","topic":"room.1"}').topic == "room.1"
    with pytest.raises(ProtocolError):
        parse_command('{"op":"presence"}')


def test_parse_accepts_str_bytes_and_buffers() -> None:
    raw = '{"op":"ping","id":"é"}'
    expected = Command(op="ping", id="é", fields={"op": "ping", "id": "é"})
    assert parse_command(raw) == expected
    assert parse_command(raw.encode()) == expected
    assert parse_command(bytearray(raw.encode())) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize("id", [0, 1, -1, 2**63 - 1, -(2**63), "", "abc", "é😀", "1"])
def test_parse_echoes_id(id: int | str) -> None:
    assert parse_command(msg(op="ping", id=id)).id == id
    assert parse_command(msg(op="subscribe", topic="t", id=id)).id == id


def test_parse_null_id_is_none() -> None:
    assert parse_command('{"op":"ping","id":null}').id is None


# --- envelope errors ---------------------------------------------------------


@pytest.mark.parametrize("id", ["true", "false", "1.5", "1.0", "1e3", "[1]", "{}", '{"a":1}'])
def test_parse_rejects_bad_id_type(id: str) -> None:
    exc = rejected('{"op":"ping","id":' + id + "}")
    assert exc.code is ErrorCode.BAD_REQUEST
    assert exc.message == "'id' must be a string or an integer"
    assert exc.id is None


def test_parse_bad_id_checked_before_op() -> None:
    exc = rejected('{"op":"nope","id":true}')
    assert exc.code is ErrorCode.BAD_REQUEST
    assert exc.id is None


@pytest.mark.parametrize(
    "raw",
    [
        "",
        b"",
        " ",
        "{",
        '{"op":"ping"',
        '{"op":"ping",}',
        "{'op':'ping'}",
        '{op:"ping"}',
        '{"op":"ping"}{"op":"ping"}',
        '{"op":"ping"}\n{"op":"ping"}',
        "\x00",
    ],
)
def test_parse_invalid_json(raw: str | bytes) -> None:
    exc = rejected(raw)
    assert exc.code is ErrorCode.BAD_REQUEST
    assert exc.message.startswith("invalid JSON")
    assert exc.id is None


@pytest.mark.parametrize(
    "raw",
    [
        b"\xff",
        b'{"op":"ping","id":"\xff"}',
        b'{"op":"ping","id":"\xc3"}',
        b'{"op":"\xed\xa0\x80"}',
        b'{"op":"ping","id":"\xf8\x88\x80\x80\x80"}',
    ],
)
def test_parse_invalid_utf8(raw: bytes) -> None:
    exc = rejected(raw)
    assert exc.code is ErrorCode.BAD_REQUEST
    assert exc.message.startswith("invalid JSON")


@pytest.mark.parametrize("raw", ['{"op":"ping","id":"\ud800"}', '{"op":"ping","id":"\\ud800"}'])
def test_parse_lone_surrogates(raw: str) -> None:
    exc = rejected(raw)
    assert exc.code is ErrorCode.BAD_REQUEST
    assert exc.id is None


@pytest.mark.parametrize("raw", ["[]", '[{"op":"ping"}]', '"ping"', "1", "1.5", "null", "true"])
def test_parse_rejects_non_objects(raw: str) -> None:
    exc = rejected(raw)
    assert exc.code is ErrorCode.BAD_REQUEST
    assert exc.message == "message must be a JSON object"
    assert exc.id is None


@pytest.mark.parametrize(("raw", "id"), [("{}", None), ('{"id":3}', 3), ('{"id":"x","topic":"t"}', "x")])
def test_parse_missing_op(raw: str, id: Any) -> None:
    exc = rejected(raw)
    assert exc.code is ErrorCode.BAD_REQUEST
    assert exc.message == "missing 'op'"
    assert exc.id == id


@pytest.mark.parametrize("op", ["null", "1", "true", '["ping"]', '{"ping":1}'])
def test_parse_non_string_op(op: str) -> None:
    exc = rejected('{"id":"q","op":' + op + "}")
    assert exc.code is ErrorCode.BAD_REQUEST
    assert exc.message == "'op' must be a string"
    assert exc.id == "q"


@pytest.mark.parametrize("op", ["frobnicate", "", "PING", "Subscribe", " ping", "pub"])
def test_parse_unknown_op(op: str) -> None:
    exc = rejected(msg(op=op, id=9))
    assert exc.code is ErrorCode.UNKNOWN_OP
    assert exc.message == f"unknown op {op!r}"
    assert exc.id == 9


def test_parse_unknown_op_message_truncated() -> None:
    exc = rejected(msg(op="z" * 10_000, id="big"))
    assert exc.code is ErrorCode.UNKNOWN_OP
    assert exc.message == "unknown op " + repr("z" * 64)
    assert exc.id == "big"


def test_parse_extra_ops_accepted_without_validation() -> None:
    extra = frozenset({"custom", "auth"})
    cmd = parse_command('{"op":"custom","id":4,"anything":[1]}', extra)
    assert cmd == Command(op="custom", id=4, fields={"op": "custom", "id": 4, "anything": [1]})
    assert parse_command('{"op":"auth"}', extra).op == "auth"
    assert rejected('{"op":"other"}', extra).code is ErrorCode.UNKNOWN_OP


def test_parse_extra_ops_do_not_bypass_builtin_validation() -> None:
    exc = rejected('{"op":"subscribe","id":1}', frozenset({"subscribe"}))
    assert exc.code is ErrorCode.BAD_REQUEST
    assert exc.message == "missing 'topic'"


def test_parse_extra_ops_still_check_the_envelope() -> None:
    assert rejected('{"op":"custom","id":1.5}', frozenset({"custom"})).code is ErrorCode.BAD_REQUEST
    assert rejected('["custom"]', frozenset({"custom"})).code is ErrorCode.BAD_REQUEST


# --- topics and data ---------------------------------------------------------


@pytest.mark.parametrize("op", ["subscribe", "unsubscribe", "publish"])
def test_parse_missing_topic(op: str) -> None:
    exc = rejected(msg(op=op, id=7, data=1))
    assert exc.code is ErrorCode.BAD_REQUEST
    assert exc.message == "missing 'topic'"
    assert exc.id == 7


BAD_TOPICS: list[Any] = [
    "",
    "a" * 201,
    "a b",
    " a",
    "a\n",
    "a\t",
    "naïve",
    "日本",
    "a😀",
    "a#b",
    "a*",
    "a?b",
    "a\\b",
    "a\x00",
    None,
    5,
    True,
    ["a"],
    {"a": 1},
]


@pytest.mark.parametrize("op", ["subscribe", "unsubscribe", "publish"])
@pytest.mark.parametrize("topic", BAD_TOPICS)
def test_parse_invalid_topic(op: str, topic: Any) -> None:
    exc = rejected(msg(op=op, topic=topic, id="t1", data=None))
    assert exc.code is ErrorCode.BAD_REQUEST
    assert exc.message == TOPIC_MESSAGE
    assert exc.id == "t1"


@pytest.mark.parametrize(
    "topic",
    ["a", "a" * 200, "ABCxyz0123456789_.:/-", "-", "/", "..", "chat:room/42", "x" * 199 + "_"],
)
def test_parse_valid_topic(topic: str) -> None:
    assert parse_command(msg(op="subscribe", topic=topic)).topic == topic
    assert parse_command(msg(op="publish", topic=topic, data=0)).topic == topic


@pytest.mark.parametrize("topic", BAD_TOPICS)
def test_validate_topic_rejects(topic: Any) -> None:
    with pytest.raises(ProtocolError) as info:
        validate_topic(topic, id=12)
    assert info.value.code is ErrorCode.BAD_REQUEST
    assert info.value.id == 12


def test_validate_topic_returns_topic() -> None:
    assert validate_topic("a" * 200) == "a" * 200
    with pytest.raises(ProtocolError) as info:
        validate_topic("a" * 201)
    assert info.value.id is None


def test_parse_publish_without_data() -> None:
    exc = rejected('{"op":"publish","topic":"t","id":2}')
    assert exc.code is ErrorCode.BAD_REQUEST
    assert exc.message == "missing 'data'"
    assert exc.id == 2


def test_parse_publish_topic_checked_before_data() -> None:
    assert rejected('{"op":"publish","topic":""}').message == TOPIC_MESSAGE


@pytest.mark.parametrize("literal", ["NaN", "-NaN", "Infinity", "-Infinity", "nan", "inf", "1e999", "-1e999"])
def test_parse_rejects_non_finite_numbers(literal: str) -> None:
    exc = rejected('{"op":"publish","topic":"t","data":' + literal + "}")
    assert exc.code is ErrorCode.BAD_REQUEST
    assert exc.message.startswith("invalid JSON")


@pytest.mark.parametrize(
    "raw",
    [
        "[" * 10_000 + "]" * 10_000,
        '{"a":' * 10_000 + "1" + "}" * 10_000,
        '{"op":"publish","topic":"t","data":' + "[" * 10_000 + "]" * 10_000 + "}",
        '{"op":"publish","topic":"t","data":' + "[" * 10_000,
        "[" * 100_000,
    ],
)
def test_parse_rejects_deep_nesting(raw: str) -> None:
    exc = rejected(raw)
    assert exc.code is ErrorCode.BAD_REQUEST
    assert exc.message.startswith("invalid JSON")


# --- encoders ----------------------------------------------------------------


def test_encode_reply_exact_bytes() -> None:
    assert encode_reply() == b'{"ok":true}'
    assert encode_reply(None) == b'{"ok":true}'
    assert encode_reply(3) == b'{"id":3,"ok":true}'
    assert encode_reply(0) == b'{"id":0,"ok":true}'
    assert encode_reply("") == b'{"id":"","ok":true}'
    assert encode_reply("a", topic="t", offset=5) == b'{"id":"a","ok":true,"topic":"t","offset":5}'
    assert encode_reply(None, pong=True) == b'{"ok":true,"pong":true}'


def test_encode_error_exact_bytes() -> None:
    assert encode_error(ErrorCode.UNKNOWN_OP, "unknown op 'x'", 4) == (
        b'{"id":4,"ok":false,"error":{"code":"unknown_op","message":"unknown op \'x\'"}}'
    )
    assert encode_error(ErrorCode.BAD_REQUEST, "missing 'op'") == (
        b'{"ok":false,"error":{"code":"bad_request","message":"missing \'op\'"}}'
    )
    assert encode_error("custom_code", 'say "hi"', "r") == (
        b'{"id":"r","ok":false,"error":{"code":"custom_code","message":"say \\"hi\\""}}'
    )
    assert encode_error(ErrorCode.TOO_LARGE, "x", 0) == (
        b'{"id":0,"ok":false,"error":{"code":"too_large","message":"x"}}'
    )


def test_encode_publication_exact_bytes() -> None:
    assert encode_publication("news", 7, {"a": [1, 2]}) == (
        b'{"op":"pub","topic":"news","offset":7,"data":{"a":[1,2]}}'
    )
    assert encode_publication("t", 0, None) == b'{"op":"pub","topic":"t","offset":0,"data":null}'
    assert encode_publication("t", 1, "é") == b'{"op":"pub","topic":"t","offset":1,"data":"\xc3\xa9"}'


@pytest.mark.parametrize(
    "raw",
    ['{"op":"nope","id":"abc"}', '{"op":"subscribe","id":5}', "[]", "{", '{"op":"ping","id":[]}'],
)
def test_error_reply_from_parse_failure(raw: str) -> None:
    exc = rejected(raw)
    reply = orjson.loads(encode_error(exc.code, exc.message, exc.id))
    assert reply["ok"] is False
    assert reply["error"] == {"code": exc.code.value, "message": exc.message}
    assert reply.get("id") == exc.id


# --- properties --------------------------------------------------------------


def check_total(raw: str | bytes) -> None:
    """parse_command either returns a Command whose reply encodes, or raises a ProtocolError that does."""
    try:
        cmd = parse_command(raw, frozenset({"custom"}))
    except ProtocolError as exc:
        assert isinstance(exc.code, ErrorCode)
        assert exc.id is None or type(exc.id) in (int, str)
        orjson.loads(encode_error(exc.code, exc.message, exc.id))
    else:
        assert isinstance(cmd.op, str)
        assert cmd.id is None or type(cmd.id) in (int, str)
        assert cmd.fields["op"] == cmd.op
        orjson.loads(encode_reply(cmd.id))


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_parse_arbitrary_bytes_only_raises_protocol_error(raw: bytes) -> None:
    check_total(raw)


@settings(max_examples=300)
@given(st.text(st.characters(exclude_categories=()), max_size=200))
def test_parse_arbitrary_text_only_raises_protocol_error(raw: str) -> None:
    check_total(raw)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=10,
)
command_objects = st.dictionaries(
    st.sampled_from(["op", "id", "topic", "data", "since", "x"]),
    st.one_of(
        st.sampled_from(["subscribe", "unsubscribe", "publish", "ping", "custom", "pub", "a" * 201]),
        st.text(alphabet="ab_./: -é", max_size=8),
        json_values,
    ),
)


@settings(max_examples=150)
@given(command_objects)
def test_parse_command_shaped_json_only_raises_protocol_error(obj: dict[str, Any]) -> None:
    check_total(json.dumps(obj))
    check_total(json.dumps(obj).encode())


def test_kept_json_is_the_same_bytes_in_an_exact_size_object() -> None:
    obj = {"op": "join", "topic": "room", "client": {"client": "alice", "conn": "c1@aa"}}
    kept = kept_json(obj)
    assert kept == orjson.dumps(obj)
    # What is kept (in history, a presence round, an inbox) holds its own length,
    # not orjson's ~4 KB buffer: sys.getsizeof counts the object's allocation.
    for value in (kept, encode_publication("t", 1, obj), encode_presence_event("join", "t", obj)):
        assert sys.getsizeof(value) < len(value) + 64
