"""Who gets in: the one admission check for WebSocket and TCP, and the socket budget.

Every new connection passes :meth:`Admission.refusal` once, whatever its
transport: a draining server, ``max_connections`` and
``max_connections_per_ip`` refuse it the same way and count it the same way.
Only the answer differs: an HTTP 503 for an upgrade, a close line for TCP.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
from collections.abc import Sized

import attrs
import trio

from ..config import Config
from ..protocol.codes import CloseCode
from . import listeners

__all__ = ["AT_CAPACITY", "DRAINING", "OVER_PER_IP", "Admission", "IdleScopes", "Refusal", "peer_key"]

log = logging.getLogger("trioserve.server")

# Seconds between warnings about refused connections (an attacker must not be
# able to flood the log).
_WARN_INTERVAL = 60.0


@attrs.frozen
class Refusal:
    """Why a new connection is turned away."""

    #: The close code a TCP client gets (an upgrade gets HTTP 503).
    code: int
    #: The close line's reason (docs/protocol.md names them).
    reason: str
    #: The HTTP answer's message: the reason, with the setting that caused it.
    message: str
    #: Seconds for the 503's ``Retry-After``, if a retry soon can succeed.
    retry_after: int | None = None


DRAINING = Refusal(CloseCode.GOING_AWAY, "server is draining", "server is draining")
AT_CAPACITY = Refusal(CloseCode.TRY_AGAIN_LATER, "server at capacity",
                      "server at capacity (max_connections)", 1)
_PER_IP = "too many connections from your address (max_connections_per_ip)"
OVER_PER_IP = Refusal(CloseCode.TRY_AGAIN_LATER, _PER_IP, _PER_IP, 5)


def peer_key(remote: str) -> tuple[str, bool]:
    """(what connections from *remote* ("host:port") are counted under, whether it is loopback).

    An IPv4 address counts alone; an IPv6 address counts by its /64, since one
    host is usually given a whole /64 and could otherwise take a fresh address
    for every connection.
    """
    return _host_key(remote.rpartition(":")[0] or remote)


@functools.lru_cache(maxsize=4096)
def _host_key(host: str) -> tuple[str, bool]:
    # Cached: a handshake asks twice, and busy clients come back.
    if host.startswith("["):
        host = host[1:-1]
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return host, False
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        else:
            return f"{int(addr) >> 64:x}::/64", addr.is_loopback
    return str(addr), addr.is_loopback


class Admission:
    """Counts sockets, connections and refusals for one server.

    *connections* is the server's live set of connections (only its size is
    read). An upgrade that passed the check holds a slot (:meth:`reserve`)
    until it is counted as a connection, so upgrades in flight cannot all
    pass the same check.
    """

    def __init__(self, config: Config, connections: Sized):
        self._config = config
        self._connections = connections
        self.max_connections = config.max_connections or 0
        #: Client sockets the fd limit leaves room for (see :meth:`check_fd_limit`).
        self.fd_budget = 0
        #: Set when the server starts draining: every new connection is refused.
        self.draining = False
        #: Connections refused, for every reason and on every transport.
        self.rejected = 0
        self._sockets = 0
        self._upgrading = 0
        # Open sockets per peer address (see peer_key), for max_connections_per_ip.
        self._per_ip: dict[str, int] = {}
        self._per_ip_refused = 0
        self._per_ip_warned_at = -_WARN_INTERVAL

    def check_fd_limit(self) -> None:
        """Raise the fd limit and size ``max_connections`` (when unset) to it."""
        soft, _hard = listeners.raise_fd_limit()
        self.fd_budget = listeners.fd_budget(soft)
        if not self.max_connections:
            self.max_connections = self.fd_budget
        elif self.max_connections > self.fd_budget:
            log.warning(
                "max_connections=%d exceeds what the fd limit (%d) allows (~%d); connections "
                "past that are refused. Raise the hard limit (ulimit -Hn / LimitNOFILE) or run "
                "several workers.", self.max_connections, soft, self.fd_budget,
            )
        log.info("fd limit %d: capacity ~%d connections, max_connections=%d",
                 soft, self.fd_budget, self.max_connections)

    # --- sockets ---------------------------------------------------------------------

    def take_socket(self) -> bool:
        """Count an accepted socket; False (and counted as refused) past the fd budget,
        where even a refusal could fail: the caller closes it at once."""
        if self._sockets >= self.fd_budget:
            self.rejected += 1
            return False
        self._sockets += 1
        return True

    def release_socket(self) -> None:
        self._sockets -= 1

    @property
    def sockets(self) -> int:
        """Client sockets open now, upgraded or not."""
        return self._sockets

    # --- the check -------------------------------------------------------------------

    def refusal(self, remote: str | None) -> Refusal | None:
        """None if a new connection from *remote* may go on; else why not (counted)."""
        refusal = None
        if self.draining:
            refusal = DRAINING
        elif len(self._connections) + self._upgrading >= self.max_connections:
            refusal = AT_CAPACITY
        elif self._over_per_ip(remote):
            refusal = OVER_PER_IP
        if refusal is not None:
            self.rejected += 1
        return refusal

    def reserve(self) -> None:
        """Hold a connection slot for an upgrade between the check and the connection."""
        self._upgrading += 1

    def release(self) -> None:
        """Give back a slot from :meth:`reserve`: the upgrade failed, or it is now counted
        as a connection."""
        self._upgrading -= 1

    # --- per-address limit ------------------------------------------------------------

    def count_peer(self, remote: str) -> str | None:
        """Count a new socket from *remote*; the key to release, or None if not counted."""
        if self._config.max_connections_per_ip == 0:
            return None
        key, loopback = peer_key(remote)
        if not self._config.per_ip_limit(loopback):
            return None
        self._per_ip[key] = self._per_ip.get(key, 0) + 1
        return key

    def release_peer(self, key: str | None) -> None:
        if key is not None:
            left = self._per_ip[key] - 1
            if left:
                self._per_ip[key] = left
            else:
                del self._per_ip[key]

    def _over_per_ip(self, remote: str | None) -> bool:
        """Whether *remote*'s address has more open sockets than max_connections_per_ip
        (this one included). A refusal is logged at most once a minute."""
        if remote is None or self._config.max_connections_per_ip == 0:
            return False
        key, loopback = peer_key(remote)
        limit = self._config.per_ip_limit(loopback)
        if not limit or self._per_ip.get(key, 0) <= limit:
            return False
        self._per_ip_refused += 1
        now = trio.current_time()
        if now - self._per_ip_warned_at >= _WARN_INTERVAL:
            log.warning("refused %d connection(s) over max_connections_per_ip (%d) since the last "
                        "warning, the latest from %s", self._per_ip_refused, limit, key)
            self._per_ip_warned_at = now
            self._per_ip_refused = 0
        return True


class IdleScopes:
    """The cancel scopes of sockets waiting for a request or a TLS handshake.

    A drain closes them (:meth:`close`), so idle keep-alive sockets and
    half-sent handshakes do not hold a drain to its deadline.
    """

    __slots__ = ("_closed", "_scopes")

    def __init__(self) -> None:
        self._scopes: set[trio.CancelScope] = set()
        self._closed = False

    def open(self, deadline: float) -> trio.CancelScope:
        """A scope for one wait; give it back with :meth:`discard`.

        A plain scope rather than a generator context manager: this runs for
        every handshake.
        """
        scope = trio.CancelScope(deadline=deadline)
        if self._closed:
            scope.cancel()
        self._scopes.add(scope)
        return scope

    def discard(self, scope: trio.CancelScope) -> None:
        self._scopes.discard(scope)

    def close(self) -> None:
        """Cancel every wait, now and from now on."""
        self._closed = True
        for scope in self._scopes:
            scope.cancel()
