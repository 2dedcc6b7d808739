"""Connections by user, for the server API (``POST /api/disconnect``, ``/api/unsubscribe``).

Kept on the server side rather than on each connection, and only for
connections with a user (a token's ``sub``): anonymous connections, the
common case of a large public fan-out, cost nothing here. Nothing here runs
per delivery; a connection pays one entry in each of two dicts when it
authenticates, and gives them back when it closes.
"""

from __future__ import annotations

from collections.abc import Hashable

__all__ = ["UserIndex"]


class UserIndex:
    """``user -> connections``; most users have one, stored as itself (a set costs 216 bytes)."""

    def __init__(self) -> None:
        self._by_user: dict[str, Hashable | set[Hashable]] = {}
        self._user_of: dict[Hashable, str] = {}

    def set(self, conn: Hashable, user: str | None) -> None:
        """*conn* now belongs to *user* (None: to nobody the API can address)."""
        if self._user_of.get(conn) == user:
            return
        self.discard(conn)
        if user is None:
            return
        self._user_of[conn] = user
        held = self._by_user.get(user)
        if held is None:
            self._by_user[user] = conn
        elif isinstance(held, set):
            held.add(conn)
        else:
            self._by_user[user] = {held, conn}

    def discard(self, conn: Hashable) -> None:
        user = self._user_of.pop(conn, None)
        if user is None:
            return
        held = self._by_user[user]
        if isinstance(held, set):
            held.discard(conn)
            if len(held) == 1:
                (self._by_user[user],) = held
        else:
            del self._by_user[user]

    def connections(self, user: str) -> list[Hashable]:
        held = self._by_user.get(user)
        if held is None:
            return []
        return list(held) if isinstance(held, set) else [held]

    def users(self) -> int:
        return len(self._by_user)

    def __len__(self) -> int:
        return len(self._user_of)
