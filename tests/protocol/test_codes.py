from __future__ import annotations

import pytest

from trioserve.protocol.codes import CloseCode, ErrorCode, default_reason


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        (CloseCode.NORMAL, ""),
        (CloseCode.GOING_AWAY, "going away"),
        (CloseCode.PROTOCOL_ERROR, "protocol error"),
        (CloseCode.ABNORMAL, "connection lost"),
        (CloseCode.INVALID_DATA, "invalid data"),
        (CloseCode.POLICY_VIOLATION, "policy violation"),
        (CloseCode.MESSAGE_TOO_BIG, "message too big"),
        (CloseCode.INTERNAL_ERROR, "internal error"),
        (CloseCode.TRY_AGAIN_LATER, "server at capacity"),
        (CloseCode.UNAUTHORIZED, "unauthorized"),
        (CloseCode.FORBIDDEN, "forbidden"),
        (CloseCode.HEARTBEAT_TIMEOUT, "heartbeat timeout"),
        (CloseCode.SLOW_CONSUMER, "slow consumer"),
        (CloseCode.RATE_LIMITED, "rate limited"),
    ],
)
def test_default_reason_named(code: CloseCode, reason: str) -> None:
    assert default_reason(code) == reason
    assert default_reason(int(code)) == reason


def test_every_close_code_has_a_reason_entry() -> None:
    named = {code for code in CloseCode if code is not CloseCode.NORMAL}
    assert all(default_reason(code) for code in named)


@pytest.mark.parametrize("code", [0, 999, 1004, 1005, 1015, 3000, 4000, 4999, 65535])
def test_default_reason_unknown_code(code: int) -> None:
    assert default_reason(code) == ""


def test_close_code_values() -> None:
    assert {c.name: int(c) for c in CloseCode} == {
        "NORMAL": 1000,
        "GOING_AWAY": 1001,
        "PROTOCOL_ERROR": 1002,
        "ABNORMAL": 1006,
        "INVALID_DATA": 1007,
        "POLICY_VIOLATION": 1008,
        "MESSAGE_TOO_BIG": 1009,
        "INTERNAL_ERROR": 1011,
        "TRY_AGAIN_LATER": 1013,
        "UNAUTHORIZED": 4001,
        "FORBIDDEN": 4003,
        "HEARTBEAT_TIMEOUT": 4002,
        "SLOW_CONSUMER": 4008,
        "RATE_LIMITED": 4029,
    }


def test_error_code_values_are_wire_strings() -> None:
    assert {c.value for c in ErrorCode} == {
        "bad_request",
        "forbidden",
        "unknown_op",
        "unauthorized",
        "not_found",
        "method_not_allowed",
        "too_large",
        "unavailable",
        "internal",
        "rate_limited",
        "too_many_subscriptions",
        "rpc_error",
        "batch_too_large",
    }
    assert ErrorCode("unknown_op") is ErrorCode.UNKNOWN_OP
    assert isinstance(ErrorCode.BAD_REQUEST, str)
