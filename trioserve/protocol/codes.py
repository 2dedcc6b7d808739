"""Close codes, reasons and reply error codes: the one place they are named.

WebSocket clients see these as close frames; TCP clients see the same numbers in
a close line, so a client library can handle both transports with one table.
"""

from __future__ import annotations

import enum

__all__ = ["CloseCode", "ErrorCode", "default_reason"]


class CloseCode(enum.IntEnum):
    NORMAL = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    ABNORMAL = 1006
    INVALID_DATA = 1007
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    TRY_AGAIN_LATER = 1013
    UNAUTHORIZED = 4001
    #: The application's backend refused the connection (connect proxy).
    FORBIDDEN = 4003
    HEARTBEAT_TIMEOUT = 4002
    SLOW_CONSUMER = 4008
    RATE_LIMITED = 4029


_REASONS = {
    CloseCode.NORMAL: "",
    CloseCode.GOING_AWAY: "going away",
    CloseCode.PROTOCOL_ERROR: "protocol error",
    CloseCode.ABNORMAL: "connection lost",
    CloseCode.INVALID_DATA: "invalid data",
    CloseCode.POLICY_VIOLATION: "policy violation",
    CloseCode.MESSAGE_TOO_BIG: "message too big",
    CloseCode.INTERNAL_ERROR: "internal error",
    CloseCode.TRY_AGAIN_LATER: "server at capacity",
    CloseCode.UNAUTHORIZED: "unauthorized",
    CloseCode.FORBIDDEN: "forbidden",
    CloseCode.HEARTBEAT_TIMEOUT: "heartbeat timeout",
    CloseCode.SLOW_CONSUMER: "slow consumer",
    CloseCode.RATE_LIMITED: "rate limited",
}


def default_reason(code: int) -> str:
    """The reason sent with *code* when the caller gives none."""
    try:
        return _REASONS[CloseCode(code)]
    except ValueError:
        return ""


class ErrorCode(enum.StrEnum):
    """``error.code`` values in ``{"ok": false, ...}`` replies and HTTP error bodies."""

    BAD_REQUEST = "bad_request"
    FORBIDDEN = "forbidden"
    UNKNOWN_OP = "unknown_op"
    UNAUTHORIZED = "unauthorized"
    NOT_FOUND = "not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    TOO_LARGE = "too_large"
    #: A publish_batch, a POST /api/publish array or a broadcast over MAX_BATCH_PUBLICATIONS.
    BATCH_TOO_LARGE = "batch_too_large"
    UNAVAILABLE = "unavailable"
    INTERNAL = "internal"
    RATE_LIMITED = "rate_limited"
    TOO_MANY_SUBSCRIPTIONS = "too_many_subscriptions"
    #: The application's backend answered an rpc with an error (its code is ``error.status``).
    RPC_ERROR = "rpc_error"
