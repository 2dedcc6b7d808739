"""The server API's index of connections by user."""

from __future__ import annotations

from trioserve.push.users import UserIndex


def test_connections_are_found_by_user_and_forgotten() -> None:
    index = UserIndex()
    index.set("c1", "alice")
    index.set("c2", "alice")
    index.set("c3", "bob")
    index.set("c4", None)  # anonymous: not addressable
    assert sorted(index.connections("alice")) == ["c1", "c2"]
    assert index.connections("bob") == ["c3"] and index.connections("nobody") == []
    assert len(index) == 3 and index.users() == 2
    index.discard("c1")
    assert index.connections("alice") == ["c2"]
    index.discard("c2")
    index.discard("c2")  # twice is harmless
    index.discard("c4")
    assert index.connections("alice") == [] and index.users() == 1


def test_a_new_identity_moves_the_connection() -> None:
    index = UserIndex()
    index.set("c1", "alice")
    index.set("c1", "alice")  # the same again: nothing changes
    index.set("c1", "bob")
    assert index.connections("alice") == [] and index.connections("bob") == ["c1"]
    index.set("c1", None)
    assert index.connections("bob") == [] and len(index) == 0
