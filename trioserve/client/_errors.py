"""The client's exceptions."""

from __future__ import annotations

from typing import Any


class ClientError(Exception):
    """Base class of every exception the trioserve client raises itself."""


class ServerError(ClientError):
    """The server answered a request with an error reply.

    ``code`` is the reply's ``error.code`` (``"bad_request"``, ``"forbidden"``,
    ``"unavailable"``, ... see docs/protocol.md) and ``message`` its
    human-readable ``error.message``. ``status`` is the application
    backend's own code, for an ``"rpc_error"``; otherwise None.
    """

    def __init__(self, code: str, message: str, status: int | None = None):
        super().__init__(code, message)
        self.code = code
        self.message = message
        self.status = status

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class ConnectError(ClientError):
    """The client could not connect: the TCP connection failed, the WebSocket
    upgrade was refused (``status`` is the HTTP status then), or it timed out.

    Raised by :func:`connect` for the first connection only; later connection
    attempts are retried with backoff.
    """

    def __init__(self, message: str, *, status: int | None = None):
        super().__init__(message)
        self.status = status


class Unauthorized(ClientError):
    """The server refused the token: HTTP 401 on the upgrade, or close code 4001
    (an expired token that was not refreshed in time, or a refused refresh).

    The client does not reconnect after this; every pending and later request,
    and every subscription's iterator, raises it.
    """


class ClientClosed(ClientError):
    """The client is closed, so it can send or receive nothing more.

    ``code`` and ``reason`` are the close code and reason that ended it: 1000
    after :meth:`Client.aclose`, or the server's close code when it was one the
    client does not reconnect after (e.g. 1009), or the last code when
    reconnecting is off.
    """

    def __init__(self, code: int, reason: str):
        super().__init__(code, reason)
        self.code = code
        self.reason = reason

    def __str__(self) -> str:
        return f"client closed ({self.code}{': ' + self.reason if self.reason else ''})"


class ConnectionLost(ClientError):
    """The connection dropped while a request was in flight.

    The request may or may not have reached the server: a publication may have
    been published. Requests that are safe to repeat (presence, ping) are
    retried on the next connection instead of raising this.
    """


class RecoveryGap(ClientError):
    """Publications of a topic were missed and cannot be recovered.

    Raised by a subscription's iterator when, after a reconnect, the server
    could not replay what was missed: its history no longer reaches back to
    ``last_offset`` or the topic's ``epoch`` changed (the server lost its
    history, e.g. a restart with the memory broker). ``last_epoch`` /
    ``last_offset`` is the last position this subscription received;
    ``new_epoch`` / ``new_offset`` is where it continues. An epoch is ``None``
    when the server does not report one.

    The subscription stays subscribed: iterating it again continues from the
    new position. Pass ``on_gap=`` to :func:`connect` or
    :meth:`Client.subscribe` to decide without an exception.
    """

    def __init__(
        self,
        topic: str,
        last_epoch: str | None,
        last_offset: int,
        new_epoch: str | None,
        new_offset: int,
    ):
        super().__init__(topic, last_epoch, last_offset, new_epoch, new_offset)
        self.topic = topic
        self.last_epoch = last_epoch
        self.last_offset = last_offset
        self.new_epoch = new_epoch
        self.new_offset = new_offset

    def __str__(self) -> str:
        if self.last_epoch != self.new_epoch:
            why = f"epoch changed from {self.last_epoch!r} to {self.new_epoch!r}"
        else:
            why = "the server's history does not reach back far enough"
        return (f"topic {self.topic!r}: publications after offset {self.last_offset} were lost "
                f"({why}); continuing after offset {self.new_offset}")


def server_error(reply: dict[str, Any]) -> ServerError:
    """The :class:`ServerError` for an error reply (or for a reply that makes no sense)."""
    error = reply.get("error")
    if isinstance(error, dict):
        status = error.get("status")
        return ServerError(str(error.get("code", "unknown")), str(error.get("message", "")),
                           status if isinstance(status, int) and not isinstance(status, bool) else None)
    return ServerError("unknown", f"unexpected reply {reply!r:.200}")
