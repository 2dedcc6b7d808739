"""Server configuration: every default in one place, validated on construction.

Reading a TOML file, the environment and command-line overrides is in
:mod:`trioserve.configfile`; :func:`load_config` here is its entry point.
"""

from __future__ import annotations

import enum
import math
import os
import re
from collections.abc import Callable, Mapping
from fnmatch import fnmatchcase
from typing import Any
from urllib.parse import urlsplit

import attrs

__all__ = [
    "BROKER_SCHEMES",
    "DEFAULT_MAX_CONNECTIONS_PER_IP",
    "HMAC_ALGORITHMS",
    "LOG_FORMATS",
    "LOG_LEVELS",
    "PUBLIC_KEY_ALGORITHMS",
    "Config",
    "ConfigError",
    "HistoryRule",
    "SlowConsumerPolicy",
    "check_topic_pattern",
    "load_config",
    "redact_url",
]

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


def _positive(inst: object, attr: attrs.Attribute[Any], value: Any) -> None:
    if value is not None and not (isinstance(value, (int, float)) and value > 0):
        raise ConfigError(f"{attr.name} must be a positive number, got {value!r}")


def _not_negative(inst: object, attr: attrs.Attribute[Any], value: Any) -> None:
    if not (_is_number(value) and value >= 0):
        raise ConfigError(f"{attr.name} must be a number >= 0, got {value!r}")


def _count(inst: object, attr: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ConfigError(f"{attr.name} must be an integer >= 0, got {value!r}")


def _port(inst: object, attr: attrs.Attribute[Any], value: Any) -> None:
    if value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 65535:
        raise ConfigError(f"{attr.name} must be a port number 0-65535, got {value!r}")


def _optional_text(inst: object, attr: attrs.Attribute[Any], value: Any) -> None:
    if value is None:
        return
    if not isinstance(value, str):
        raise ConfigError(f"{attr.name} must be a string, got {value!r}")
    if not value:
        raise ConfigError(f"{attr.name} is empty; leave it unset instead")


def _optional_secret(inst: object, attr: attrs.Attribute[Any], value: Any) -> None:
    # Like _optional_text, but the message never repeats the value: it is a secret.
    if value is None:
        return
    if not isinstance(value, str):
        raise ConfigError(f"{attr.name} must be a string, got {type_name(value)}")
    if not value:
        raise ConfigError(f"{attr.name} is empty; leave it unset instead")


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


def _secret_repr(value: object) -> str:
    """How a secret field appears in ``repr(config)``: whether it is set, never its value."""
    return "None" if value is None else "'***'"


def _url_repr(value: object) -> str:
    return repr(redact_url(value) if isinstance(value, str) else value)


def _optional_count(inst: object, attr: attrs.Attribute[Any], value: Any) -> None:
    if value is not None:
        _count(inst, attr, value)


def _optional_bool(inst: object, attr: attrs.Attribute[Any], value: Any) -> None:
    if value is not None and not isinstance(value, bool):
        raise ConfigError(f"{attr.name} must be true, false or unset, got {value!r}")


def _as_tuple(value: Any) -> Any:
    # Lists come from TOML and from callers; anything else is left for the
    # validator to reject by name (a bare string would become its characters).
    return tuple(value) if isinstance(value, list) else value


def _strings(inst: object, attr: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, tuple) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{attr.name} must be a list of strings, got {value!r}")


def _optional_strings(inst: object, attr: attrs.Attribute[Any], value: Any) -> None:
    if value is not None:
        _strings(inst, attr, value)


def _lower(value: Any) -> Any:
    return value.lower() if isinstance(value, str) else value


def _one_of(choices: tuple[str, ...]) -> Callable[[object, attrs.Attribute[Any], Any], None]:
    def check(inst: object, attr: attrs.Attribute[Any], value: Any) -> None:
        if value not in choices:
            raise ConfigError(f"{attr.name} must be one of {', '.join(choices)}; got {value!r}")

    return check


def _check_broker(inst: object, attr: attrs.Attribute[Any], value: Any) -> None:
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


def _workers(inst: object, attr: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= _MAX_WORKERS:
        raise ConfigError(f"workers must be an integer 1-{_MAX_WORKERS}, got {value!r}")


def _worker_id(inst: object, attr: attrs.Attribute[Any], value: Any) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ConfigError(f"worker_id must be an integer >= 1 or unset, got {value!r}")


def _policy(value: Any) -> Any:
    try:
        return SlowConsumerPolicy(value)
    except ValueError:
        choices = ", ".join(p.value for p in SlowConsumerPolicy)
        raise ConfigError(f"slow_consumer_policy must be one of {choices}; got {value!r}") from None


def _origins(value: Any) -> Any:
    # Browsers send Origin in lower case, so a capitalised entry could never match.
    value = _as_tuple(value)
    if isinstance(value, tuple):
        return tuple(v.lower() if isinstance(v, str) else v for v in value)
    return value


def _check_origin(origin: str) -> None:
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


def _history_rules(value: Any) -> Any:
    value = _as_tuple(value)
    return tuple(_history_rule(v) for v in value) if isinstance(value, tuple) else value


def _check_history_rules(inst: object, attr: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, tuple) or not all(isinstance(r, HistoryRule) for r in value):
        raise ConfigError(f"history_rules must be a list of HistoryRule, got {value!r}")


def _check_patterns(inst: object, attr: attrs.Attribute[Any], value: Any) -> None:
    _strings(inst, attr, value)
    for pattern in value:
        check_topic_pattern(pattern, f"{attr.name} entry")


@attrs.frozen(kw_only=True)
class Config:
    """Everything a :class:`~trioserve.Server` needs; all fields have working defaults.

    The zero-config server listens on 127.0.0.1:8000 only, so nothing is exposed
    to the network until an operator chooses a host.
    """

    host: str = "127.0.0.1"
    #: HTTP + WebSocket port; 0 picks a free port (see ``Server.addresses``).
    port: int = attrs.field(default=8000, validator=_port)
    #: Raw TCP (NDJSON) port; None leaves the TCP listener off.
    tcp_port: int | None = attrs.field(default=None, validator=_port)
    #: Path of the WebSocket endpoint.
    ws_path: str = "/ws"
    #: Let clients publish with ``{"op": "publish"}`` (the HTTP API always can).
    client_publish: bool = False
    #: When set, ``POST /api/publish`` requires ``Authorization: Bearer <key>``.
    api_key: str | None = attrs.field(default=None, validator=_optional_secret, repr=_secret_repr)
    #: Client connections (WebSocket + TCP) at once; None means what the fd limit allows.
    max_connections: int | None = attrs.field(default=None, validator=_positive)
    #: Open sockets from one IP address (an IPv6 address counts by its /64); 0 turns the
    #: limit off. None: :data:`DEFAULT_MAX_CONNECTIONS_PER_IP`, with loopback peers exempt
    #: (see :meth:`per_ip_limit`).
    max_connections_per_ip: int | None = attrs.field(default=None, validator=_optional_count)
    #: Messages per second one connection may send (token bucket refill); 0 turns it off.
    rate_limit: float = attrs.field(default=1000.0, validator=_not_negative)
    #: Messages one connection may send in a burst before ``rate_limit`` applies.
    rate_burst: int = attrs.field(default=1000, validator=_positive)
    #: Topics one connection may be subscribed to at once; 0 for no limit.
    max_subscriptions: int = attrs.field(default=100, validator=_count)
    #: Outbound bytes queued over all connections of this process before the largest
    #: queues are closed with 4008; 0 turns the limit off.
    max_queued_bytes: int = attrs.field(default=256 * 1024 * 1024, validator=_count)
    #: Largest client message (WebSocket message, NDJSON line, HTTP body) in bytes.
    max_message_size: int = attrs.field(default=64 * 1024, validator=_positive)
    #: Read silence (seconds) after which the server pings.
    ping_interval: float = attrs.field(default=25.0, validator=_positive)
    #: Further silence after a ping before closing with 4002.
    ping_timeout: float = attrs.field(default=10.0, validator=_positive)
    #: Time allowed for a full HTTP request / upgrade (slowloris guard).
    handshake_timeout: float = attrs.field(default=10.0, validator=_positive)
    #: Time allowed for the close handshake before a forced close.
    close_timeout: float = attrs.field(default=5.0, validator=_positive)
    #: Time a drain waits for connections to close before forcing the rest.
    drain_timeout: float = attrs.field(default=30.0, validator=_positive)
    #: Outbound queue limit per connection, bytes.
    queue_max_bytes: int = attrs.field(default=1024 * 1024, validator=_positive)
    #: Outbound queue limit per connection, frames.
    queue_max_frames: int = attrs.field(default=1000, validator=_positive)
    slow_consumer_policy: SlowConsumerPolicy = attrs.field(
        default=SlowConsumerPolicy.DISCONNECT, converter=_policy
    )
    #: Publications waiting for fan-out before publishers are pushed back.
    hub_max_pending: int = attrs.field(default=100_000, validator=_positive)
    #: listen() backlog; the kernel caps it at net.core.somaxconn.
    backlog: int = attrs.field(default=4096, validator=_positive)
    #: Set SO_REUSEPORT on listening sockets (for several processes on one port).
    reuse_port: bool = False
    #: PEM certificate chain: with it both listeners speak TLS (wss://, TCP+TLS).
    certfile: str | None = attrs.field(default=None, validator=_optional_text)
    #: PEM private key for ``certfile`` (unset: the key is in ``certfile``).
    keyfile: str | None = attrs.field(default=None, validator=_optional_text)

    # --- workers and broker ----------------------------------------------------------------
    #: Worker processes sharing the ports (``trioserve serve --workers``); more than 1 needs
    #: a broker that spans processes.
    workers: int = attrs.field(default=1, validator=_workers)
    #: ``memory://`` (this process only), or ``redis://[:password@]host:port/db`` /
    #: ``rediss://`` (TLS) to share topics, offsets and history between processes and hosts.
    broker: str = attrs.field(default="memory://", validator=_check_broker, repr=_url_repr)
    #: Redis password, kept out of the URL (and so out of ``ps`` and logs).
    broker_password: str | None = attrs.field(default=None, validator=_optional_secret,
                                              repr=_secret_repr)
    #: Which worker this process is (1..workers); set by the supervisor, never by users,
    #: so it has no config key, variable or flag. None in a single-process server.
    worker_id: int | None = attrs.field(default=None, validator=_worker_id,
                                        metadata={"loadable": False})

    # --- auth ---------------------------------------------------------------------------
    #: Shared secret for HS256/384/512 client tokens.
    token_secret: str | None = attrs.field(default=None, validator=_optional_secret, repr=_secret_repr)
    #: PEM public key for RS/ES/PS client tokens (the issuer keeps the private key).
    token_public_key: str | None = attrs.field(default=None, validator=_optional_text)
    #: Accepted JWT algorithms; None: see :attr:`effective_token_algorithms`.
    token_algorithms: tuple[str, ...] | None = attrs.field(
        default=None, converter=_as_tuple, validator=_optional_strings
    )
    #: Required ``aud`` claim.
    token_audience: str | None = attrs.field(default=None, validator=_optional_text)
    #: Required ``iss`` claim.
    token_issuer: str | None = attrs.field(default=None, validator=_optional_text)
    #: Clients without a token; None: see :attr:`anonymous_allowed`.
    anonymous: bool | None = attrs.field(default=None, validator=_optional_bool)
    #: Seconds a connection may outlive its token's ``exp`` while it sends a fresh one.
    refresh_grace: float = attrs.field(default=30.0, validator=_not_negative)
    #: Origins a browser may connect from; empty accepts any Origin.
    allowed_origins: tuple[str, ...] = attrs.field(default=(), converter=_origins, validator=_strings)

    # --- history ------------------------------------------------------------------------
    #: Publications kept per topic for late subscribers; 0 keeps none.
    history_size: int = attrs.field(default=100, validator=_count)
    #: Seconds a kept publication stays available.
    history_ttl: float = attrs.field(default=300.0, validator=_positive)
    #: Per-topic overrides of size and ttl; the first matching pattern wins.
    history_rules: tuple[HistoryRule, ...] = attrs.field(
        default=(), converter=_history_rules, validator=_check_history_rules
    )

    # --- presence -----------------------------------------------------------------------
    #: Topic patterns whose subscribers get join/leave events.
    presence_events: tuple[str, ...] = attrs.field(
        default=(), converter=_as_tuple, validator=_check_patterns
    )

    # --- logging ------------------------------------------------------------------------
    log_level: str = attrs.field(default="info", converter=_lower, validator=_one_of(LOG_LEVELS))
    log_format: str = attrs.field(default="text", converter=_lower, validator=_one_of(LOG_FORMATS))

    def __attrs_post_init__(self) -> None:
        if not self.host:
            raise ConfigError("host is empty; use 127.0.0.1 for loopback, or 0.0.0.0 / :: "
                              "for every interface")
        if self.tcp_port is not None and self.tcp_port == self.port and self.port != 0:
            raise ConfigError(f"tcp_port and port are both {self.port}; pick two ports")
        if not self.ws_path.startswith("/"):
            raise ConfigError(f"ws_path must start with '/', got {self.ws_path!r}")
        if self.keyfile is not None and self.certfile is None:
            raise ConfigError("keyfile is set but certfile is not; TLS needs the certificate too "
                              "(set certfile, or drop keyfile)")
        self._check_auth()
        for origin in self.allowed_origins:
            _check_origin(origin)
        self._check_workers()

    def _check_workers(self) -> None:
        memory = self.broker.lower() == "memory://"
        if self.workers > 1 and memory:
            raise ConfigError(
                f"workers = {self.workers} needs a broker that spans processes, or each worker "
                "would have its own hub and miss the others' publications: add "
                "--broker redis://host:6379/0, or use --workers 1")
        if self.broker_password is not None:
            if memory:
                raise ConfigError("broker_password is set but broker is memory://, which has no "
                                  "password; set broker = redis://host:6379/0 or drop broker_password")
            if urlsplit(self.broker).password is not None:
                raise ConfigError("the broker URL has a password and broker_password is set too; "
                                  "keep one (broker_password keeps it out of the URL)")
        if self.worker_id is not None and self.worker_id > self.workers:
            raise ConfigError(f"worker_id {self.worker_id} is over workers = {self.workers}")

    def _check_auth(self) -> None:
        if self.token_secret is not None and self.token_public_key is not None:
            raise ConfigError("token_secret and token_public_key are both set; use one: the secret "
                              "for HS tokens, or the public key for RS/ES/PS tokens")
        if self.token_algorithms is not None:
            self._check_algorithms(self.token_algorithms)
        if self.token_public_key is not None:
            _check_public_key(self.token_public_key, self.token_algorithms)
        if not self.auth_enabled:
            for name in ("token_audience", "token_issuer"):
                if getattr(self, name) is not None:
                    raise ConfigError(f"{name} is set but no token_secret or token_public_key is, "
                                      "so no token is ever checked; set a token key or drop it")
            if self.anonymous is False:
                raise ConfigError("anonymous is false but no token_secret or token_public_key is set, "
                                  "so no client could connect; set a token key or drop anonymous")

    def _check_algorithms(self, algorithms: tuple[str, ...]) -> None:
        if not algorithms:
            raise ConfigError("token_algorithms is empty; leave it unset for the default")
        known = HMAC_ALGORITHMS + PUBLIC_KEY_ALGORITHMS
        for alg in algorithms:
            if alg.lower() == "none":
                raise ConfigError("token_algorithms must not contain 'none': unsigned tokens "
                                  "would let anyone in")
            if alg not in known:
                hint = f"; did you mean {alg.upper()!r}?" if alg.upper() in known else ""
                raise ConfigError(f"token_algorithms: unknown algorithm {alg!r}{hint} "
                                  f"(supported: {', '.join(known)})")
            # One key per algorithm family: a public key must never be usable
            # as an HMAC secret, or anyone holding it could forge tokens.
            if alg in HMAC_ALGORITHMS and self.token_secret is None:
                raise ConfigError(f"token_algorithms has {alg}, which needs token_secret; "
                                  "set token_secret or drop the HS algorithms")
            if alg in PUBLIC_KEY_ALGORITHMS and self.token_public_key is None:
                raise ConfigError(f"token_algorithms has {alg}, which needs token_public_key; "
                                  f"set token_public_key (or token_public_key_file) or drop {alg}")

    # --- derived ------------------------------------------------------------------------

    @property
    def auth_enabled(self) -> bool:
        """Client tokens are checked: a token secret or public key is configured."""
        return self.token_secret is not None or self.token_public_key is not None

    @property
    def anonymous_allowed(self) -> bool:
        """Clients may connect without a token; by default only when no token key is set."""
        return not self.auth_enabled if self.anonymous is None else self.anonymous

    @property
    def effective_token_algorithms(self) -> tuple[str, ...]:
        """``token_algorithms``, or the default for the keys configured (empty without keys)."""
        if self.token_algorithms is not None:
            return self.token_algorithms
        if self.token_secret is not None:
            return ("HS256",)
        return ("RS256", "ES256") if self.token_public_key is not None else ()

    @property
    def tls_enabled(self) -> bool:
        """Both listeners speak TLS: a ``certfile`` is configured."""
        return self.certfile is not None

    def per_ip_limit(self, loopback: bool) -> int:
        """The open-socket limit for one peer address; 0 means none.

        Unset, it is :data:`DEFAULT_MAX_CONNECTIONS_PER_IP` for remote peers and off
        for loopback ones: a reverse proxy on the same host, and the benchmarks' load
        clients (spread over 127.0.0.x, thousands of connections each), all arrive from
        loopback, and counting them as one host would cap the whole server. A value
        that is set applies to every address, loopback included.
        """
        limit = self.max_connections_per_ip
        if limit is None:
            return 0 if loopback else DEFAULT_MAX_CONNECTIONS_PER_IP
        return limit

    def history_for(self, topic: str) -> tuple[int, float]:
        """(size, ttl) of the history kept for *topic*: the first matching rule, else the defaults."""
        for rule in self.history_rules:
            if fnmatchcase(topic, rule.pattern):
                return rule.size, rule.ttl
        return self.history_size, self.history_ttl

    def presence_events_for(self, topic: str) -> bool:
        """Whether subscribers of *topic* get join/leave events."""
        return any(fnmatchcase(topic, pattern) for pattern in self.presence_events)


def _check_public_key(pem: str, algorithms: tuple[str, ...] | None) -> None:
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


def load_config(
    path: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """A Config from a TOML file, then ``TRIOSERVE_*`` variables, then *overrides*.

    Each later source wins. *path* defaults to ``TRIOSERVE_CONFIG``; *env* to
    ``os.environ``. Every problem raises :class:`ConfigError` with a one-line message.
    """
    # configfile builds on Config, so importing it at the top would be circular.
    from .configfile import load_config as load

    return load(path, env, overrides)
