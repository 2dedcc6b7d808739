"""The validators behind :class:`~trioserve.config.Config`'s fields, and the
constants they check against. Each raises :class:`ConfigError` with a one-line
message that names the setting, what it expects and what it got."""

from __future__ import annotations

import enum
import math
import os
import re
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

import attrs

#: Signed with ``token_secret``.
HMAC_ALGORITHMS = ("HS256", "HS384", "HS512")
#: Verified with ``token_public_key``.
PUBLIC_KEY_ALGORITHMS = ("RS256", "RS384", "RS512", "ES256", "ES384", "PS256")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
#: ``memory://`` is one process's hub; ``redis://`` and ``rediss://`` (TLS) span processes and hosts.
BROKER_SCHEMES = ("memory", "redis", "rediss")
_BROKER_FORMS = "memory:// or redis://[:password@]host:port/db (rediss:// for TLS)"

# Topic names (docs/protocol.md) plus the glob characters fnmatch understands.
_TOPIC_PATTERN = re.compile(r"[A-Za-z0-9_.:/\-*?\[\]!]{1,200}")
_SCHEME = re.compile(r"[a-z][a-z0-9+.\-]*")
_DEFAULT_PORTS = {"http": 80, "https": 443}
# More processes than this on one host is a mistake, not a deployment.
_MAX_WORKERS = 1024
# URL query parameters whose values redact_url hides.
_SECRET_PARAMS = ("pass", "secret", "token", "auth", "key")
#: ``max_connections_per_ip`` when unset, for peers that are not loopback.
DEFAULT_MAX_CONNECTIONS_PER_IP = 1000


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the option and the fix."""


class SlowConsumerPolicy(enum.StrEnum):
    DISCONNECT = "disconnect"
    DROP_OLDEST = "drop-oldest"


def check_topic_pattern(pattern: object, what: str) -> None:
    """Raise :class:`ConfigError` unless *pattern* is a topic name or glob (``chat.*``)."""
    if not isinstance(pattern, str) or not _TOPIC_PATTERN.fullmatch(pattern):
        raise ConfigError(
            f"{what} {pattern!r} is not a topic pattern: use 1-200 characters of "
            "A-Z a-z 0-9 _ . : / - and the globs * ? [...]"
        )


def _is_number(value: object) -> bool:
    # bool is an int subclass, and True seconds is a typo, not a duration.
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_positive(inst: object, attr: attrs.Attribute[Any], value: Any) -> None:
    if value is None:
        return
    # Config's annotations are strings ("int", "float", "int | None"): the field says
    # whether a fraction makes sense (1.5 bytes does not).
    if "float" in str(attr.type):
        if not (_is_number(value) and value > 0):
            raise ConfigError(f"{attr.name} must be a positive number, got {value!r}")
    elif not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
        raise ConfigError(f"{attr.name} must be a positive integer, got {value!r}")


def check_not_negative(inst: object, attr: attrs.Attribute[Any], value: Any) -> None:
    if not (_is_number(value) and value >= 0):
        raise ConfigError(f"{attr.name} must be a number >= 0, got {value!r}")


def check_count(inst: object, attr: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ConfigError(f"{attr.name} must be an integer >= 0, got {value!r}")


def check_port(inst: object, attr: attrs.Attribute[Any], value: Any) -> None:
    if value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 65535:
        raise ConfigError(f"{attr.name} must be a port number 0-65535, got {value!r}")


def check_optional_text(inst: object, attr: attrs.Attribute[Any], value: Any) -> None:
    if value is None:
        return
    if not isinstance(value, str):
        raise ConfigError(f"{attr.name} must be a string, got {value!r}")
    if not value:
        raise ConfigError(f"{attr.name} is empty; leave it unset instead")


def check_optional_secret(inst: object, attr: attrs.Attribute[Any], value: Any) -> None:
    # Like optional_text, but the message never repeats the value: it is a secret.
    if value is None:
        return
    if not isinstance(value, str):
        raise ConfigError(f"{attr.name} must be a string, got {type_name(value)}")
    if not value:
        raise ConfigError(f"{attr.name} is empty; leave it unset instead")


def check_optional_url(inst: object, attr: attrs.Attribute[Any], value: Any) -> None:
    """An http:// or https:// URL of the application's backend, or None."""
    if value is None:
        return
    check_optional_text(inst, attr, value)
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"{attr.name} must be an http:// or https:// URL, got {value!r}")


def type_name(value: object) -> str:
    """What *value* is, without what it says: for messages about secrets."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, (list, tuple)):
        return "an array"
    if isinstance(value, Mapping):
        return "a table"
    return f"a {type(value).__name__} value"


def secret_repr(value: object) -> str:
    """How a secret field appears in ``repr(config)``: whether it is set, never its value."""
    return "None" if value is None else "'***'"


def url_repr(value: object) -> str:
    return repr(redact_url(value) if isinstance(value, str) else value)


def check_optional_count(inst: object, attr: attrs.Attribute[Any], value: Any) -> None:
    if value is not None:
        check_count(inst, attr, value)


def check_optional_bool(inst: object, attr: attrs.Attribute[Any], value: Any) -> None:
    if value is not None and not isinstance(value, bool):
        raise ConfigError(f"{attr.name} must be true, false or unset, got {value!r}")


def to_tuple(value: Any) -> Any:
    # Lists come from TOML and from callers; anything else is left for the
    # validator to reject by name (a bare string would become its characters).
    return tuple(value) if isinstance(value, list) else value


def check_strings(inst: object, attr: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, tuple) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{attr.name} must be a list of strings, got {value!r}")


def check_optional_strings(inst: object, attr: attrs.Attribute[Any], value: Any) -> None:
    if value is not None:
        check_strings(inst, attr, value)


def to_lower(value: Any) -> Any:
    return value.lower() if isinstance(value, str) else value


def one_of(choices: tuple[str, ...]) -> Callable[[object, attrs.Attribute[Any], Any], None]:
    def check(inst: object, attr: attrs.Attribute[Any], value: Any) -> None:
        if value not in choices:
            raise ConfigError(f"{attr.name} must be one of {', '.join(choices)}; got {value!r}")

    return check


def check_broker(inst: object, attr: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, str):
        raise ConfigError(f"broker must be a URL string ({_BROKER_FORMS}), got {value!r}")
    shown = redact_url(value)
    parts = urlsplit(value)
    scheme = parts.scheme.lower()
    if scheme not in BROKER_SCHEMES or "://" not in value:
        raise ConfigError(f"broker {shown!r} is not a broker URL; use {_BROKER_FORMS}")
    if scheme == "memory":
        if value.lower() != "memory://":
            raise ConfigError(f"broker {shown!r}: memory:// takes no host, path or options")
        return
    try:
        port = parts.port
    except ValueError:
        raise ConfigError(f"broker {shown!r} has an invalid port; e.g. redis://127.0.0.1:6379/0") from None
    if not parts.hostname:
        raise ConfigError(f"broker {shown!r} has no host; e.g. redis://127.0.0.1:6379/0")
    if port == 0:
        raise ConfigError(f"broker {shown!r} has port 0; Redis listens on 6379 by default")
    db = parts.path[1:] if parts.path.startswith("/") else parts.path
    if db and not db.isdigit():
        raise ConfigError(f"broker {shown!r}: the path is the Redis database number, "
                          f"e.g. /0, not {parts.path!r}")
    if parts.fragment:
        raise ConfigError(f"broker {shown!r}: drop the #fragment")


def redact_url(url: str) -> str:
    """*url* with its password, if any, replaced by ``***``: fit for logs and errors.

    Both places a Redis URL can carry one are covered: ``redis://:pw@host`` and a
    query parameter such as ``?password=pw``.
    """
    parts = urlsplit(url)
    if parts.password is not None:
        user = parts.username or ""
        host = parts.netloc.rpartition("@")[2]
        parts = parts._replace(netloc=f"{user}:***@{host}")
    if parts.query:
        query = "&".join(_redact_param(p) for p in parts.query.split("&"))
        parts = parts._replace(query=query)
    return parts.geturl()


def _redact_param(param: str) -> str:
    name, eq, _value = param.partition("=")
    if eq and any(word in name.lower() for word in _SECRET_PARAMS):
        return f"{name}=***"
    return param


def cpu_count() -> int:
    """The cores this process may run on (its affinity mask, where there is one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def to_workers(value: Any) -> Any:
    """``"auto"``: one worker per core."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return min(cpu_count(), _MAX_WORKERS)
    return value


def check_workers(inst: object, attr: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= _MAX_WORKERS:
        raise ConfigError(f"workers must be an integer 1-{_MAX_WORKERS} or \"auto\", got {value!r}")


def check_worker_id(inst: object, attr: attrs.Attribute[Any], value: Any) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ConfigError(f"worker_id must be an integer >= 1 or unset, got {value!r}")


def to_policy(value: Any) -> Any:
    try:
        return SlowConsumerPolicy(value)
    except ValueError:
        choices = ", ".join(p.value for p in SlowConsumerPolicy)
        raise ConfigError(f"slow_consumer_policy must be one of {choices}; got {value!r}") from None


def to_origins(value: Any) -> Any:
    # Browsers send Origin in lower case, so a capitalised entry could never match.
    value = to_tuple(value)
    if isinstance(value, tuple):
        return tuple(v.lower() if isinstance(v, str) else v for v in value)
    return value


def check_origin(origin: str) -> None:
    if origin == "*":
        return
    what = f"allowed_origins entry {origin!r}"
    if "*" in origin:
        raise ConfigError(f"{what}: wildcards inside an origin are not supported; "
                          "list each origin, or use '*' alone for any")
    parts = urlsplit(origin)
    if not _SCHEME.fullmatch(parts.scheme) or not parts.hostname:
        raise ConfigError(f"{what} must be scheme://host[:port], e.g. https://example.com")
    if parts.path or parts.query or parts.fragment or "@" in parts.netloc:
        raise ConfigError(f"{what}: an origin is only scheme://host[:port]; drop the path, "
                          "query or user part (and any trailing '/')")
    try:
        port = parts.port
    except ValueError:
        raise ConfigError(f"{what} has an invalid port") from None
    if port is not None and port == _DEFAULT_PORTS.get(parts.scheme):
        raise ConfigError(f"{what}: drop the default port :{port}; browsers leave it out of Origin")


@attrs.frozen
class HistoryRule:
    """History for topics matching *pattern* (fnmatch glob, e.g. ``chat.*``): keep the
    last *size* publications (0: none), each for at most *ttl* seconds."""

    pattern: str
    size: int
    ttl: float

    def __attrs_post_init__(self) -> None:
        check_topic_pattern(self.pattern, "history rule pattern")
        if not isinstance(self.size, int) or isinstance(self.size, bool) or self.size < 0:
            raise ConfigError(f"history rule {self.pattern!r}: size must be an integer >= 0, "
                              f"got {self.size!r}")
        if not (_is_number(self.ttl) and self.ttl > 0):
            raise ConfigError(f"history rule {self.pattern!r}: ttl must be a number of seconds > 0, "
                              f"got {self.ttl!r}")


def _history_rule(value: Any) -> Any:
    if not isinstance(value, Mapping):
        return value
    try:
        return HistoryRule(**value)
    except TypeError:
        raise ConfigError(f"history rule {dict(value)!r} must have exactly pattern, size and ttl") from None


def to_history_rules(value: Any) -> Any:
    value = to_tuple(value)
    return tuple(_history_rule(v) for v in value) if isinstance(value, tuple) else value


def check_history_rules(inst: object, attr: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, tuple) or not all(isinstance(r, HistoryRule) for r in value):
        raise ConfigError(f"history_rules must be a list of HistoryRule, got {value!r}")


def check_patterns(inst: object, attr: attrs.Attribute[Any], value: Any) -> None:
    check_strings(inst, attr, value)
    for pattern in value:
        check_topic_pattern(pattern, f"{attr.name} entry")


def check_public_key(pem: str, algorithms: tuple[str, ...] | None) -> None:
    if "PRIVATE KEY" in pem:
        raise ConfigError("token_public_key holds a private key; give the server only the public "
                          "half (openssl pkey -in key.pem -pubout)")
    # Parsed now so a bad key stops the server at start-up, not at the first client.
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    try:
        key = load_pem_public_key(pem.encode())
    except ValueError:
        raise ConfigError("token_public_key is not a PEM public key ('-----BEGIN PUBLIC KEY-----'); "
                          "for a certificate, extract its key with openssl x509 -pubkey -noout") from None
    family: tuple[str, ...]
    if isinstance(key, rsa.RSAPublicKey):
        family = ("RS", "PS")
    elif isinstance(key, ec.EllipticCurvePublicKey):
        family = ("ES",)
    else:
        raise ConfigError(f"token_public_key is a {type(key).__name__.removeprefix('_')}; "
                          "use an RSA (RS*/PS*) or EC (ES*) key")
    for alg in algorithms or ():
        if alg in PUBLIC_KEY_ALGORITHMS and not alg.startswith(family):
            raise ConfigError(f"token_algorithms has {alg}, which token_public_key "
                              f"({'RSA' if family[0] == 'RS' else 'EC'}) cannot verify; "
                              "drop it or use a matching key")
