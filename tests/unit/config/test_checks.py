"""The validators on their own: what each accepts, and the one-line message of
each refusal. The loader's own type errors (a TOML string where a number goes)
are in test_sources.py; these are the values that reach Config directly, from a
program or past the loader's type check."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from trioserve.config import Config, ConfigError, HistoryRule, check_topic_pattern, load_config
from trioserve.config.checks import check_origin, check_public_key, type_name

from .helpers import config_error, public_pem

# --- topic patterns and history rules --------------------------------------------------------


@pytest.mark.parametrize("pattern", ["chat", "chat.*", "a:b/c-d_e", "room.[0-9]?", "[!x]*", "x" * 200])
def test_topic_patterns_take_topic_characters_and_globs(pattern: str) -> None:
    check_topic_pattern(pattern, "pattern")


@pytest.mark.parametrize("pattern", ["", "a b", "x" * 201, "caf\u00e9", None, 3])
def test_anything_else_is_not_a_topic_pattern(pattern: object) -> None:
    with pytest.raises(ConfigError, match=r"^watch entry .* is not a topic pattern: use 1-200 characters"):
        check_topic_pattern(pattern, "watch entry")


@pytest.mark.parametrize(("size", "ttl", "match"), [
    (-1, 1.0, r"size must be an integer >= 0, got -1"),
    (True, 1.0, r"size must be an integer >= 0, got True"),
    (1.5, 1.0, r"size must be an integer >= 0, got 1.5"),
    (1, 0, r"ttl must be a number of seconds > 0, got 0"),
    (1, float("inf"), r"ttl must be a number of seconds > 0, got inf"),
    (1, float("nan"), r"ttl must be a number of seconds > 0, got nan"),
    (1, True, r"ttl must be a number of seconds > 0, got True"),
])
def test_a_history_rule_checks_itself(size: Any, ttl: Any, match: str) -> None:
    with pytest.raises(ConfigError, match=rf"^history rule 'chat\.\*': {match}$"):
        HistoryRule("chat.*", size, ttl)


def test_a_history_rule_may_keep_nothing() -> None:
    assert HistoryRule("ticks", 0, 0.5).size == 0


# --- field validators, through Config --------------------------------------------------------


@pytest.mark.parametrize(("field", "value", "match"), [
    ("ping_interval", 0, r"^ping_interval must be a positive number, got 0$"),
    ("close_timeout", -1.5, r"^close_timeout must be a positive number, got -1.5$"),
    ("rate_limit", float("nan"), r"^rate_limit must be a number >= 0, got nan$"),
    ("rate_limit", True, r"^rate_limit must be a number >= 0, got True$"),
    ("refresh_grace", float("inf"), r"^refresh_grace must be a number >= 0, got inf$"),
    ("max_subscriptions", 1.5, r"^max_subscriptions must be an integer >= 0, got 1.5$"),
    ("max_queued_bytes", False, r"^max_queued_bytes must be an integer >= 0, got False$"),
    ("port", True, r"^port must be a port number 0-65535, got True$"),
    ("tcp_port", -1, r"^tcp_port must be a port number 0-65535, got -1$"),
    ("max_connections_per_ip", -1, r"^max_connections_per_ip must be an integer >= 0, got -1$"),
    ("anonymous", "yes", r"^anonymous must be true, false or unset, got 'yes'$"),
    ("certfile", 5, r"^certfile must be a string, got 5$"),
    ("keyfile", "", r"^keyfile is empty; leave it unset instead$"),
    ("workers", True, r"^workers must be an integer 1-1024 or \"auto\", got True$"),
    ("workers", 1025, r"^workers must be an integer 1-1024 or \"auto\", got 1025$"),
    ("workers", "many", r"^workers must be an integer 1-1024 or \"auto\", got .many.$"),
    ("worker_id", 0, r"^worker_id must be an integer >= 1 or unset, got 0$"),
    # A bare string is left whole for the check to refuse, not split into its characters.
    ("allowed_origins", "https://a.example", r"^allowed_origins must be a list of strings"),
    ("token_algorithms", ["HS256", 1], r"^token_algorithms must be a list of strings"),
])
def test_field_validators_name_the_field_and_the_value(field: str, value: Any, match: str) -> None:
    config_error(match, **{field: value})


def test_log_settings_are_read_in_any_case() -> None:
    cfg = Config(log_level="DEBUG", log_format="Json")
    assert (cfg.log_level, cfg.log_format) == ("debug", "json")


def test_a_secret_of_the_wrong_type_is_described_without_its_value() -> None:
    message = config_error(r"^api_key must be a string, got an array$", api_key=["hunter2"])
    assert "hunter2" not in message
    for value, shown in ((True, "a boolean"), (7, "an integer"), (0.5, "a number"), ((1,), "an array"),
                         ({"k": "v"}, "a table"), (b"hunter2", "a bytes value")):
        assert type_name(value) == shown


@pytest.mark.parametrize(("broker", "match"), [
    ("redis://h:0/0", r"^broker 'redis://h:0/0' has port 0; Redis listens on 6379 by default$"),
    ("redis://h:6379/0#x", r"^broker 'redis://h:6379/0#x': drop the #fragment$"),
    (6379, r"^broker must be a URL string \(memory:// or redis://"),
    ("redis:h", r"^broker 'redis:h' is not a broker URL"),
])
def test_broker_urls(broker: Any, match: str) -> None:
    config_error(match, broker=broker)


def test_broker_schemes_are_case_insensitive() -> None:
    assert Config(broker="MEMORY://").broker == "MEMORY://"
    assert Config(broker="Rediss://cache.example:6380/1").broker == "Rediss://cache.example:6380/1"


# True seconds is a typo, inf is no timeout, and 1.5 bytes is no size; a TOML
# file's `inf` must be refused like TRIOSERVE_PING_INTERVAL=inf.
@pytest.mark.parametrize(("field", "value"), [
    ("ping_interval", True),
    ("ping_interval", float("inf")),
    ("max_connections", True),
    ("max_message_size", 1.5),
])
def test_positive_settings_refuse_booleans_infinity_and_fractions(field: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=rf"^{field} must be"):
        Config(**{field: value})


def test_an_infinite_timeout_is_refused_from_a_file_as_from_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "inf.toml"
    path.write_text("ping_interval = inf\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="ping_interval"):
        load_config(path, {})


# --- origins and public keys -----------------------------------------------------------------


@pytest.mark.parametrize(("origin", "match"), [
    ("https://example.com/", r"drop the path"),
    ("https://example.com/app", r"drop the path"),
    ("https://example.com?x=1", r"drop the path, query or user part"),
    ("https://user@example.com", r"drop the path, query or user part"),
    ("example.com", r"must be scheme://host\[:port\]"),
    ("https://*.example.com", r"wildcards inside an origin are not supported"),
    ("https://example.com:443", r"drop the default port :443"),
    ("http://example.com:80", r"drop the default port :80"),
    ("https://example.com:99999", r"invalid port"),
])
def test_bad_origins(origin: str, match: str) -> None:
    with pytest.raises(ConfigError, match=rf"^allowed_origins entry '{re.escape(origin)}'.*{match}"):
        check_origin(origin)


@pytest.mark.parametrize("origin", ["*", "https://example.com", "http://example.com:8080",
                                    "https://example.com:80", "app-scheme://host"])
def test_good_origins(origin: str) -> None:
    check_origin(origin)


def test_public_key_must_be_a_public_pem() -> None:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private_pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption()).decode()
    with pytest.raises(ConfigError, match=r"holds a private key; give the server only the public half"):
        check_public_key(private_pem, None)
    with pytest.raises(ConfigError, match=r"not a PEM public key"):
        check_public_key("ssh-rsa AAAA", None)
    with pytest.raises(ConfigError, match=r"use an RSA \(RS\*/PS\*\) or EC \(ES\*\) key"):
        check_public_key(public_pem(ed25519.Ed25519PrivateKey.generate()), None)


def test_a_public_key_checks_only_the_public_key_algorithms(rsa_pem: str) -> None:
    # HS algorithms beside a key are the model's concern (they need token_secret), not the key's.
    check_public_key(rsa_pem, ("RS256", "PS256", "HS256"))
    with pytest.raises(ConfigError, match=r"token_algorithms has ES384, which token_public_key \(RSA\)"):
        check_public_key(rsa_pem, ("RS256", "ES384"))
