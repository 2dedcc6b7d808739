"""A token's claims: what the topic globs allow, the defaults of a token that
names no topics, anonymous access, and the seconds left before expiry."""

from __future__ import annotations

import time

import pytest

from trioserve.protocol.claims import ANONYMOUS, AuthError, Claims, seconds_left


@pytest.mark.parametrize(("pattern", "topic", "allowed"), [
    ("chat.*", "chat.lobby", True),
    ("chat.*", "chat.vip.lounge", True),  # '*' crosses dots: globs, not path segments
    ("chat.*", "chat", False),
    ("chat.*", "Chat.lobby", False),  # topics are case-sensitive, and so are their patterns
    ("room.?", "room.1", True),
    ("room.?", "room.12", False),
    ("room.[0-4]", "room.3", True),
    ("room.[!0-4]", "room.3", False),
    ("news", "news", True),
    ("news", "news.eu", False),
])
def test_topic_globs(pattern: str, topic: str, allowed: bool) -> None:
    claims = Claims(sub="u", subscribe=(pattern,), publish=(pattern,))
    assert claims.may_subscribe(topic) is allowed
    assert claims.may_publish(topic) is allowed


def test_any_one_pattern_is_enough() -> None:
    claims = Claims(sub="u", subscribe=("a.*", "b"))
    assert claims.may_subscribe("a.x") and claims.may_subscribe("b")
    assert not claims.may_subscribe("c")


def test_claims_without_topics_may_subscribe_to_anything_and_publish_nothing() -> None:
    claims = Claims(sub="u")
    assert claims.may_subscribe("any.topic")
    assert not claims.may_publish("any.topic")
    assert not claims.presence and not claims.anonymous


def test_empty_lists_allow_nothing() -> None:
    claims = Claims(sub="u", subscribe=(), publish=())
    assert not claims.may_subscribe("t") and not claims.may_publish("t")


def test_anonymous_claims_allow_everything_and_never_expire() -> None:
    # Publishing is then up to client_publish alone.
    assert ANONYMOUS.anonymous and ANONYMOUS.presence
    assert ANONYMOUS.may_subscribe("any.topic") and ANONYMOUS.may_publish("any.topic")
    assert ANONYMOUS.exp is None and seconds_left(ANONYMOUS) is None


def test_seconds_left_counts_down_and_goes_negative() -> None:
    now = time.time()
    ahead = seconds_left(Claims(sub="u", exp=now + 100))
    assert ahead is not None and 90 < ahead <= 100
    behind = seconds_left(Claims(sub="u", exp=now - 100))
    assert behind is not None and -110 < behind <= -100


def test_an_auth_error_carries_its_code_and_message() -> None:
    exc = AuthError("token_expired", "the token expired; get a new one")
    assert (exc.code, exc.message, str(exc)) == ("token_expired", "the token expired; get a new one",
                                                 "the token expired; get a new one")
