"""Server configuration: every default in one place, validated on construction.

The validators are in :mod:`trioserve.config.checks`; reading a TOML file, the
environment and command-line overrides is in :mod:`trioserve.config.sources`.
"""

from __future__ import annotations

from fnmatch import fnmatchcase
from urllib.parse import urlsplit

import attrs

from .checks import (
    DEFAULT_MAX_CONNECTIONS_PER_IP,
    HMAC_ALGORITHMS,
    LOG_FORMATS,
    LOG_LEVELS,
    PUBLIC_KEY_ALGORITHMS,
    ConfigError,
    HistoryRule,
    SlowConsumerPolicy,
    check_broker,
    check_count,
    check_history_rules,
    check_not_negative,
    check_optional_bool,
    check_optional_count,
    check_optional_secret,
    check_optional_strings,
    check_optional_text,
    check_optional_url,
    check_origin,
    check_patterns,
    check_port,
    check_positive,
    check_public_key,
    check_strings,
    check_worker_id,
    check_workers,
    one_of,
    secret_repr,
    to_history_rules,
    to_lower,
    to_origins,
    to_policy,
    to_tuple,
    to_workers,
    url_repr,
)

__all__ = ["Config"]


@attrs.frozen(kw_only=True)
class Config:
    """Everything a :class:`~trioserve.Server` needs; all fields have working defaults.

    The zero-config server listens on 127.0.0.1:8000 only, so nothing is exposed
    to the network until an operator chooses a host.
    """

    host: str = "127.0.0.1"
    #: HTTP + WebSocket port; 0 picks a free port (see ``Server.addresses``).
    port: int = attrs.field(default=8000, validator=check_port)
    #: Raw TCP (NDJSON) port; None leaves the TCP listener off.
    tcp_port: int | None = attrs.field(default=None, validator=check_port)
    #: Path of the WebSocket endpoint.
    ws_path: str = "/ws"
    #: Accept permessage-deflate (RFC 7692) from WebSocket clients that offer it;
    #: publications are then compressed once and shared by every such subscriber.
    compression: bool = True
    #: Let clients publish with ``{"op": "publish"}`` (the HTTP API always can).
    client_publish: bool = False
    #: When set, ``POST /api/publish`` requires ``Authorization: Bearer <key>``.
    api_key: str | None = attrs.field(default=None, validator=check_optional_secret, repr=secret_repr)
    #: Client connections (WebSocket + TCP) at once; None means what the fd limit allows.
    max_connections: int | None = attrs.field(default=None, validator=check_positive)
    #: Open sockets from one IP address (an IPv6 address counts by its /64); 0 turns the
    #: limit off. None: :data:`DEFAULT_MAX_CONNECTIONS_PER_IP`, with loopback peers exempt
    #: (see :meth:`per_ip_limit`).
    max_connections_per_ip: int | None = attrs.field(default=None, validator=check_optional_count)
    #: Messages per second one connection may send (token bucket refill); 0 turns it off.
    rate_limit: float = attrs.field(default=1000.0, validator=check_not_negative)
    #: Messages one connection may send in a burst before ``rate_limit`` applies.
    rate_burst: int = attrs.field(default=1000, validator=check_positive)
    #: Topics one connection may be subscribed to at once; 0 for no limit.
    max_subscriptions: int = attrs.field(default=100, validator=check_count)
    #: Outbound bytes queued over all connections of this process before the largest
    #: queues are closed with 4008; 0 turns the limit off.
    max_queued_bytes: int = attrs.field(default=256 * 1024 * 1024, validator=check_count)
    #: Largest client message (WebSocket message, NDJSON line, HTTP body) in bytes.
    max_message_size: int = attrs.field(default=64 * 1024, validator=check_positive)
    #: Read silence (seconds) after which the server pings.
    ping_interval: float = attrs.field(default=25.0, validator=check_positive)
    #: Further silence after a ping before closing with 4002.
    ping_timeout: float = attrs.field(default=10.0, validator=check_positive)
    #: Time allowed for a full HTTP request / upgrade (slowloris guard).
    handshake_timeout: float = attrs.field(default=10.0, validator=check_positive)
    #: Time allowed for the close handshake before a forced close.
    close_timeout: float = attrs.field(default=5.0, validator=check_positive)
    #: Time a drain waits for connections to close before forcing the rest.
    drain_timeout: float = attrs.field(default=30.0, validator=check_positive)
    #: Outbound queue limit per connection, bytes.
    queue_max_bytes: int = attrs.field(default=1024 * 1024, validator=check_positive)
    #: Outbound queue limit per connection, frames.
    queue_max_frames: int = attrs.field(default=1000, validator=check_positive)
    slow_consumer_policy: SlowConsumerPolicy = attrs.field(
        default=SlowConsumerPolicy.DISCONNECT, converter=to_policy
    )
    #: Publications waiting for fan-out before publishers are pushed back.
    hub_max_pending: int = attrs.field(default=100_000, validator=check_positive)
    #: listen() backlog; the kernel caps it at net.core.somaxconn.
    backlog: int = attrs.field(default=4096, validator=check_positive)
    #: Set SO_REUSEPORT on listening sockets (for several processes on one port).
    reuse_port: bool = False
    #: PEM certificate chain: with it both listeners speak TLS (wss://, TCP+TLS).
    certfile: str | None = attrs.field(default=None, validator=check_optional_text)
    #: PEM private key for ``certfile`` (unset: the key is in ``certfile``).
    keyfile: str | None = attrs.field(default=None, validator=check_optional_text)

    # --- workers and broker ----------------------------------------------------------------
    #: Worker processes sharing the ports (``trioserve serve --workers``; ``"auto"``: one per
    #: core). With more than 1
    #: and ``memory://``, the supervisor is their broker (one host); ``redis://`` spans hosts.
    workers: int = attrs.field(default=1, converter=to_workers, validator=check_workers)
    #: ``memory://`` (this process, or with ``workers > 1`` the supervisor's embedded
    #: broker), or ``redis://[:password@]host:port/db`` / ``rediss://`` (TLS) to share
    #: topics, offsets and history between processes and hosts.
    broker: str = attrs.field(default="memory://", validator=check_broker, repr=url_repr)
    #: Redis password, kept out of the URL (and so out of ``ps`` and logs).
    broker_password: str | None = attrs.field(default=None, validator=check_optional_secret,
                                              repr=secret_repr)
    #: Which worker this process is (1..workers); set by the supervisor, never by users,
    #: so it has no config key, variable or flag. None in a single-process server.
    worker_id: int | None = attrs.field(default=None, validator=check_worker_id,
                                        metadata={"loadable": False})

    # --- auth ---------------------------------------------------------------------------
    #: Shared secret for HS256/384/512 client tokens.
    token_secret: str | None = attrs.field(default=None, validator=check_optional_secret, repr=secret_repr)
    #: PEM public key for RS/ES/PS client tokens (the issuer keeps the private key).
    token_public_key: str | None = attrs.field(default=None, validator=check_optional_text)
    #: Accepted JWT algorithms; None: see :attr:`effective_token_algorithms`.
    token_algorithms: tuple[str, ...] | None = attrs.field(
        default=None, converter=to_tuple, validator=check_optional_strings
    )
    #: Required ``aud`` claim.
    token_audience: str | None = attrs.field(default=None, validator=check_optional_text)
    #: Required ``iss`` claim.
    token_issuer: str | None = attrs.field(default=None, validator=check_optional_text)
    #: Clients without a token; None: see :attr:`anonymous_allowed`.
    anonymous: bool | None = attrs.field(default=None, validator=check_optional_bool)
    #: Seconds a connection may outlive its token's ``exp`` while it sends a fresh one.
    refresh_grace: float = attrs.field(default=30.0, validator=check_not_negative)
    #: Origins a browser may connect from; empty accepts any Origin.
    allowed_origins: tuple[str, ...] = attrs.field(default=(), converter=to_origins, validator=check_strings)

    # --- history ------------------------------------------------------------------------
    #: Publications kept per topic for late subscribers; 0 keeps none.
    history_size: int = attrs.field(default=100, validator=check_count)
    #: Seconds a kept publication stays available.
    history_ttl: float = attrs.field(default=300.0, validator=check_positive)
    #: Per-topic overrides of size and ttl; the first matching pattern wins.
    history_rules: tuple[HistoryRule, ...] = attrs.field(
        default=(), converter=to_history_rules, validator=check_history_rules
    )

    # --- presence -----------------------------------------------------------------------
    #: Topic patterns whose subscribers get join/leave events.
    presence_events: tuple[str, ...] = attrs.field(
        default=(), converter=to_tuple, validator=check_patterns
    )

    # --- application backend: proxy and webhooks (docs/backend.md) -----------------------
    #: POSTed on every WebSocket upgrade, SSE stream and TCP ``connect`` without a valid
    #: token; the backend allows (``user`` becomes the client id) or refuses.
    proxy_connect_url: str | None = attrs.field(default=None, validator=check_optional_url, repr=url_repr)
    #: POSTed before every client subscribe; a refusal is ``forbidden``.
    proxy_subscribe_url: str | None = attrs.field(default=None, validator=check_optional_url, repr=url_repr)
    #: POSTed before every client publish; it decides (instead of ``client_publish``) and
    #: may replace the data.
    proxy_publish_url: str | None = attrs.field(default=None, validator=check_optional_url, repr=url_repr)
    #: Where ``{"op": "rpc"}`` is forwarded.
    proxy_rpc_url: str | None = attrs.field(default=None, validator=check_optional_url, repr=url_repr)
    #: Seconds one backend call may take; then 503 / ``unavailable``.
    proxy_timeout: float = attrs.field(default=3.0, validator=check_positive)
    #: Request headers of an upgrade or SSE request forwarded to the connect proxy.
    proxy_headers: tuple[str, ...] = attrs.field(default=("Cookie", "Authorization"),
                                                 converter=to_tuple, validator=check_strings)
    #: Backend calls in flight at once over all connections; more get 503 / ``unavailable``.
    proxy_max_in_flight: int = attrs.field(default=1000, validator=check_positive)
    #: Receives connect, disconnect and unsubscribe events in signed batches.
    webhooks_url: str | None = attrs.field(default=None, validator=check_optional_url, repr=url_repr)
    #: Key of each batch's HMAC-SHA256 signature (``X-Trioserve-Signature``).
    webhooks_secret: str | None = attrs.field(default=None, validator=check_optional_secret,
                                              repr=secret_repr)
    #: Events one webhook POST carries at most.
    webhooks_batch_size: int = attrs.field(default=100, validator=check_positive)
    #: Events waiting for delivery (retries included); over it the oldest are dropped.
    webhooks_queue_size: int = attrs.field(default=10_000, validator=check_positive)

    # --- logging ------------------------------------------------------------------------
    log_level: str = attrs.field(default="info", converter=to_lower, validator=one_of(LOG_LEVELS))
    log_format: str = attrs.field(default="text", converter=to_lower, validator=one_of(LOG_FORMATS))

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
            check_origin(origin)
        self._check_workers()
        if self.webhooks_secret is not None and self.webhooks_url is None:
            raise ConfigError("webhooks_secret is set but webhooks_url is not; set the receiver's URL "
                              "or drop the secret")

    def _check_workers(self) -> None:
        memory = self.broker.lower() == "memory://"
        # workers > 1 with memory:// is the embedded broker: the supervisor is the
        # sequencer, and the workers share topics through it (one host).
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
            check_public_key(self.token_public_key, self.token_algorithms)
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
    def embedded_broker(self) -> bool:
        """Workers share topics through their supervisor (``workers > 1``, ``memory://``)."""
        return self.workers > 1 and self.broker.lower() == "memory://"

    @property
    def connect_proxied(self) -> bool:
        """Connections without a valid token ask the backend (``proxy_connect_url``)."""
        return self.proxy_connect_url is not None

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
