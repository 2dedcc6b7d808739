"""Config itself: the checks that span fields, and what it derives from them
(auth, algorithms, history per topic, presence per topic)."""

from __future__ import annotations

from typing import Any

import pytest

from trioserve.config import Config, ConfigError, HistoryRule

from .helpers import SECRET, config_error

# --- checks across fields --------------------------------------------------------------------


def test_the_two_listeners_need_two_ports() -> None:
    config_error(r"tcp_port and port are both 9000; pick two ports", port=9000, tcp_port=9000)
    assert Config(port=0, tcp_port=0).tcp_port == 0  # two free ports, picked apart by the kernel


def test_ws_path_is_an_absolute_path() -> None:
    config_error(r"ws_path must start with '/', got 'ws'", ws_path="ws")
    assert Config(ws_path="/live").ws_path == "/live"


def test_tls_is_on_exactly_when_a_certfile_is_set() -> None:
    assert not Config().tls_enabled
    assert Config(certfile="cert.pem").tls_enabled
    assert Config(certfile="cert.pem", keyfile="key.pem").tls_enabled


# --- auth ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("config", "allowed"), [
    ({}, True),
    ({"token_secret": SECRET}, False),
    ({"token_secret": SECRET, "anonymous": True}, True),
    ({"anonymous": True}, True),
    ({"token_secret": SECRET, "anonymous": False}, False),
])
def test_anonymous_allowed_resolution(config: dict[str, Any], allowed: bool) -> None:
    cfg = Config(**config)
    assert cfg.anonymous_allowed is allowed
    assert cfg.auth_enabled is ("token_secret" in config)


def test_anonymous_false_without_a_key_would_lock_everyone_out() -> None:
    config_error(r"anonymous is false but no token_secret or token_public_key", anonymous=False)


def test_default_algorithms_follow_the_key(rsa_pem: str) -> None:
    assert Config().effective_token_algorithms == ()
    assert Config(token_secret=SECRET).effective_token_algorithms == ("HS256",)
    assert Config(token_public_key=rsa_pem).effective_token_algorithms == ("RS256", "ES256")
    assert Config(token_secret=SECRET, token_algorithms=["HS512"]).effective_token_algorithms == ("HS512",)
    assert Config(token_public_key=rsa_pem, token_algorithms=("PS256",)).token_algorithms == ("PS256",)


@pytest.mark.parametrize(("algorithms", "match"), [
    (("none",), r"must not contain 'none'"),
    (("HS256", "None"), r"must not contain 'none'"),
    (("hs256",), r"unknown algorithm 'hs256'; did you mean 'HS256'\?"),
    (("EdDSA",), r"unknown algorithm 'EdDSA' \(supported: HS256, "),
    (("RS256",), r"token_algorithms has RS256, which needs token_public_key"),
    ((), r"token_algorithms is empty"),
])
def test_bad_algorithms_with_a_secret(algorithms: tuple[str, ...], match: str) -> None:
    config_error(match, token_secret=SECRET, token_algorithms=algorithms)


def test_algorithm_confusion_is_refused(rsa_pem: str, ec_pem: str) -> None:
    # An HS algorithm beside a public key would let the public key act as an HMAC secret.
    config_error(r"token_algorithms has HS256, which needs token_secret",
                 token_public_key=rsa_pem, token_algorithms=("RS256", "HS256"))
    config_error(r"token_secret and token_public_key are both set", token_secret=SECRET,
                 token_public_key=rsa_pem)
    config_error(r"token_algorithms has ES256, which token_public_key \(RSA\) cannot verify",
                 token_public_key=rsa_pem, token_algorithms=("ES256",))
    config_error(r"token_algorithms has RS256, which token_public_key \(EC\) cannot verify",
                 token_public_key=ec_pem, token_algorithms=("RS256",))
    config_error(r"token_algorithms has HS256, which needs token_secret", token_algorithms=("HS256",))


def test_token_claims_need_a_key() -> None:
    config_error(r"token_audience is set but no token_secret or token_public_key", token_audience="a")
    config_error(r"token_issuer is set but no", token_issuer="i")
    config_error(r"token_secret is empty; leave it unset", token_secret="")


def test_origins_are_normalised_to_lower_case() -> None:
    cfg = Config(allowed_origins=["HTTPS://App.Example.com:8443", "*"])
    assert cfg.allowed_origins == ("https://app.example.com:8443", "*")


# --- history and presence --------------------------------------------------------------------


def test_history_for_a_topic_without_rules_is_the_defaults() -> None:
    assert Config().history_for("any") == (100, 300.0)
    assert Config(history_size=0, history_ttl=5).history_for("any") == (0, 5)


def test_history_rules_from_mappings() -> None:
    cfg = Config(history_rules=[{"pattern": "a.*", "size": 3, "ttl": 4.0}])
    assert cfg.history_rules == (HistoryRule("a.*", 3, 4.0),)
    assert cfg.history_for("a.b") == (3, 4.0) and cfg.history_for("b") == (100, 300.0)
    config_error(r"must have exactly pattern, size and ttl", history_rules=[{"pattern": "a"}])
    with pytest.raises(ConfigError, match=r"history_rules must be a list of HistoryRule"):
        Config(history_rules=["chat.*"])


def test_presence_events_for() -> None:
    cfg = Config(presence_events=["room.*", "lobby"])
    assert cfg.presence_events_for("room.1") and cfg.presence_events_for("lobby")
    assert not cfg.presence_events_for("lobby.2") and not cfg.presence_events_for("news")
    assert not Config().presence_events_for("room.1")
    config_error(r"presence_events entry 'room 1' is not a topic pattern", presence_events=["room 1"])
    config_error(r"presence_events must be a list of strings", presence_events="room.*")


# --- the application's backend ----------------------------------------------------------------


def test_backend_urls_are_http_urls() -> None:
    for name in ("proxy_connect_url", "proxy_subscribe_url", "proxy_publish_url", "proxy_rpc_url",
                 "webhooks_url"):
        config_error(rf"{name} must be an http:// or https:// URL, got 'ftp://x/y'", **{name: "ftp://x/y"})
        config_error(rf"{name} must be an http:// or https:// URL, got 'localhost:3000'",
                     **{name: "localhost:3000"})
    config = Config(proxy_connect_url="https://app.example/connect", webhooks_url="http://u:pw@h/w")
    assert config.connect_proxied and "pw" not in repr(config)
    assert not Config().connect_proxied
    assert Config().proxy_headers == ("Cookie", "Authorization") and Config().proxy_timeout == 3.0


def test_a_webhooks_secret_needs_a_webhooks_url() -> None:
    config_error(r"webhooks_secret is set but webhooks_url is not", webhooks_secret="s" * 32)
    assert "s3cret" not in repr(Config(webhooks_url="http://h/w", webhooks_secret="s3cret"))
