"""What a connection is allowed: the claims of its token (docs/protocol.md).

A token's claims: ``sub`` (the client id), ``exp``, and optionally
``subscribe`` / ``publish`` (lists of topic glob patterns such as ``chat.*``)
and ``presence`` (bool). Verifying a token is the server's
(:class:`trioserve.Authenticator`); the claims are plain values that every
layer may hold.
"""

from __future__ import annotations

import time
from fnmatch import fnmatchcase

import attrs

__all__ = ["ANONYMOUS", "AuthError", "Claims", "seconds_left"]


class AuthError(Exception):
    """A token was refused. ``code`` names why; the message says what to fix."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


@attrs.frozen
class Claims:
    """Who a connection is and what it may do."""

    #: The client id (the token's ``sub``), shown in presence.
    sub: str
    #: Unix time the token expires, or None for no expiry (anonymous).
    exp: float | None = None
    subscribe: tuple[str, ...] = ("*",)
    publish: tuple[str, ...] = ()
    presence: bool = False
    #: True for a connection without a token.
    anonymous: bool = False

    def may_subscribe(self, topic: str) -> bool:
        return any(fnmatchcase(topic, p) for p in self.subscribe)

    def may_publish(self, topic: str) -> bool:
        return any(fnmatchcase(topic, p) for p in self.publish)


#: Claims of a connection without a token, where anonymous access is allowed.
#: Publishing is then governed by ``client_publish`` alone.
ANONYMOUS = Claims(sub="anonymous", subscribe=("*",), publish=("*",), presence=True, anonymous=True)



def seconds_left(claims: Claims) -> float | None:
    """Seconds until *claims* expire (may be negative), or None if they never do."""
    return None if claims.exp is None else claims.exp - time.time()
