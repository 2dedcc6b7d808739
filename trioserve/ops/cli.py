"""Command line: load the config (file < environment < flags) and run the server; write a
config file; sign client tokens. Nothing more."""

from __future__ import annotations

import datetime
import gc
import ipaddress
import json
import logging
import math
import os
import secrets
import sys
import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import click
import trio
from click.core import ParameterSource

from .._version import __version__
from ..bench.cli import bench
from ..config import (
    HMAC_ALGORITHMS,
    LOG_FORMATS,
    LOG_LEVELS,
    Config,
    ConfigError,
    SlowConsumerPolicy,
    check_topic_pattern,
    load_config,
)
from ..config.sources import CONFIG_ENV, ENV_PREFIX, render_config
from ..server import Server
from .doctor import doctor

log = logging.getLogger("trioserve.cli")

_DEFAULTS = Config()
_TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
# With --workers, every line says which process wrote it: "w2", or "sup" for the supervisor.
_TAGGED_FORMAT = "%(asctime)s %(levelname)-7s %(process_tag)s %(name)s: %(message)s"
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
# RFC 7518 3.2: an HMAC key at least as long as the hash output.
_HMAC_MIN_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


class ConfigProblem(click.ClickException):
    """A configuration error: one line on stderr, exit status 2 like click's usage errors."""

    exit_code = 2


class _ConfigOption(click.Option):
    """Shows its ``TRIOSERVE_*`` variable in --help but leaves reading it to load_config,
    so the environment has one parser and its place between the file and the flags."""

    def value_from_envvar(self, ctx: click.Context) -> Any:
        return None


class _Workers(click.ParamType):  # type: ignore[type-arg]  # generic only in click >= 8.2
    """1-1024, or ``auto`` (kept as written: Config makes it one per core)."""

    name = "N|auto"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, str) and value.strip().lower() == "auto":
            return "auto"
        try:
            number = int(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number of workers (1-1024) or 'auto'", param, ctx)
        if not 1 <= number <= 1024:
            self.fail(f"{number} is not in the range 1-1024 (or use 'auto')", param, ctx)
        return number


_WORKERS = _Workers()


def _option(*decls: str, field: str | None = None, **kwargs: Any) -> Decorator:
    """A ``serve`` flag for the Config field *field* (by default named after the flag)."""
    name = field or decls[0].split("/")[0].lstrip("-").replace("-", "_")
    kwargs.setdefault("show_default", True)
    return click.option(*decls, name, cls=_ConfigOption, envvar=ENV_PREFIX + name.upper(),
                        show_envvar=True, **kwargs)


_config_file_option = click.option(
    "--config", "config_path", cls=_ConfigOption, envvar=CONFIG_ENV, show_envvar=True,
    type=click.Path(dir_okay=False), default=None,
    help="TOML config file (docs/configuration.md); environment variables and flags override it.",
)


def _load(config_path: str | None, overrides: Mapping[str, Any]) -> Config:
    try:
        return load_config(config_path, os.environ, overrides)
    except ConfigError as exc:
        raise ConfigProblem(str(exc)) from None


def _duration(ctx: click.Context, param: click.Parameter, value: str) -> float:
    """``90s``, ``15m``, ``1h``, ``2d`` or plain seconds, as seconds."""
    text = value.strip().lower()
    unit = _SECONDS.get(text[-1:])
    try:
        seconds = float(text[:-1] if unit else text) * (unit or 1)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise click.BadParameter(f"{value!r} is not a duration; use e.g. 90s, 15m, 1h, 2d or seconds")
    return seconds


class JsonFormatter(logging.Formatter):
    """One JSON object per line (``ts``, ``level``, ``logger``, ``msg``, and ``exc`` with a
    traceback), so log shippers need no parsing rules."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": datetime.datetime.fromtimestamp(record.created, datetime.UTC)
            .isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        tag = getattr(record, "process_tag", None)
        if tag is not None:
            entry["process"] = tag
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exc"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


class _ProcessTag(logging.Filter):
    def __init__(self, tag: str):
        super().__init__()
        self.tag = tag

    def filter(self, record: logging.LogRecord) -> bool:
        record.process_tag = self.tag
        return True


def _setup_logging(config: Config, tag: str | None = None) -> None:
    """Log to stderr; *tag* ("sup", "w1"...) marks each line of a multi-process server."""
    handler = logging.StreamHandler()
    if config.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(_TEXT_FORMAT if tag is None else _TAGGED_FORMAT))
    if tag is not None:
        handler.addFilter(_ProcessTag(tag))
    logging.basicConfig(level=config.log_level.upper(), handlers=[handler])


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _warn_about(config: Config) -> None:
    if config.anonymous_allowed and not _is_loopback(config.host):
        fix = ("set anonymous = false to require a token" if config.auth_enabled
               else "set token_secret or token_public_key to require one (docs/configuration.md)")
        log.warning("clients can connect without a token and host %s is not loopback, so anyone "
                    "who reaches the port can subscribe; %s", config.host, fix)
    secret = config.token_secret
    if secret is not None and len(secret.encode()) < 32:
        log.warning("token_secret is only %d bytes; use at least 32 random bytes "
                    "(trioserve genconfig makes one)", len(secret.encode()))


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="trioserve")
def main() -> None:
    """trioserve: a WebSocket and TCP push server on Trio."""


@main.command()
@_config_file_option
@_option("--host", default=_DEFAULTS.host,
         help="Address to listen on. The default is loopback only; use 0.0.0.0 or :: to expose it.")
@_option("--port", type=click.IntRange(0, 65535), default=_DEFAULTS.port,
         help="HTTP + WebSocket port (WebSocket at /ws). 0 picks a free port.")
@_option("--tcp-port", type=click.IntRange(0, 65535), default=None,
         help="Also serve newline-delimited JSON over raw TCP on this port.  [default: off]")
@_option("--certfile", type=click.Path(dir_okay=False), default=None,
         help="PEM certificate chain: both ports then speak TLS (wss://, https://, TCP+TLS).  "
              "[default: none, plain text]")
@_option("--keyfile", type=click.Path(dir_okay=False), default=None,
         help="PEM private key of --certfile.  [default: the key is in the certfile]")
@_option("--workers", type=_WORKERS, default=_DEFAULTS.workers,
         help="Worker processes sharing the ports (SO_REUSEPORT), each with its own fd limit and "
              "trio loop; a supervisor restarts them. 'auto': one per core. Without --broker the "
              "supervisor is their broker: it sequences every topic for all workers (one host).")
@_option("--broker", default=_DEFAULTS.broker, metavar="URL",
         help="memory:// (in-host: this process, or the supervisor of --workers), or "
              "redis://host:6379/0 (rediss:// for TLS) to share topics between hosts. "
              "Put a password in TRIOSERVE_BROKER_PASSWORD.")
@_option("--compression/--no-compression", default=_DEFAULTS.compression,
         help="Accept permessage-deflate from WebSocket clients that offer it (browsers do). Each "
              "publication is compressed once and the same bytes go to every such subscriber; "
              "messages under 256 bytes go uncompressed.")
@_option("--client-publish/--no-client-publish", default=_DEFAULTS.client_publish,
         help='Let connected clients publish with {"op":"publish"}. The HTTP API can always publish.')
@_option("--api-key", default=None,
         help="Require 'Authorization: Bearer KEY' on the HTTP API (/api/...), and this key on "
              "the status page (/admin).  [default: none, open]")
@_option("--max-connections", type=click.IntRange(1), default=None,
         help="Client connections at once; more get HTTP 503 / a close line.  "
              "[default: what the fd limit allows]")
@_option("--max-connections-per-ip", type=click.IntRange(0), default=None,
         show_default="1000, loopback peers exempt",
         help="Open sockets from one IP address (IPv6: one /64); more get HTTP 503 / a 1013 close "
              "line. 0 = no limit. Behind a proxy every client has the proxy's address: raise it or use 0.")
@_option("--rate-limit", type=click.FloatRange(min=0), default=_DEFAULTS.rate_limit,
         help="Messages per second one connection may send; over it they get rate_limited errors, "
              "and a client that keeps going is closed with 4029. 0 = no limit.")
@_option("--rate-burst", type=click.IntRange(1), default=_DEFAULTS.rate_burst,
         help="Messages one connection may send at once before --rate-limit applies.")
@_option("--max-subscriptions", type=click.IntRange(0), default=_DEFAULTS.max_subscriptions,
         help="Topics one connection may subscribe to (more: too_many_subscriptions). 0 = no limit.")
@_option("--max-queued-bytes", type=click.IntRange(0), default=_DEFAULTS.max_queued_bytes,
         help="Outbound bytes queued over all connections; above it the largest queues are closed "
              "with 4008. 0 = no limit.")
@_option("--max-message-size", type=click.IntRange(1), default=_DEFAULTS.max_message_size,
         help="Largest client message, TCP line or HTTP body, in bytes (over it: close 1009 / 413).")
@_option("--ping-interval", type=click.FloatRange(min=0, min_open=True), default=_DEFAULTS.ping_interval,
         help="Seconds of silence from a client before the server pings it.")
@_option("--ping-timeout", type=click.FloatRange(min=0, min_open=True), default=_DEFAULTS.ping_timeout,
         help="Further seconds without data or pong before closing with 4002.")
@_option("--handshake-timeout", type=click.FloatRange(min=0, min_open=True),
         default=_DEFAULTS.handshake_timeout,
         help="Seconds a client has to send a complete HTTP request or upgrade.")
@_option("--drain-timeout", type=click.FloatRange(min=0, min_open=True), default=_DEFAULTS.drain_timeout,
         help="On SIGTERM/SIGINT, seconds to wait for clients to close before forcing them.")
@_option("--queue-max-bytes", type=click.IntRange(1), default=_DEFAULTS.queue_max_bytes,
         help="Outbound queue limit per connection, in bytes.")
@_option("--queue-max-frames", type=click.IntRange(1), default=_DEFAULTS.queue_max_frames,
         help="Outbound queue limit per connection, in frames.")
@_option("--slow-consumer-policy", type=click.Choice([p.value for p in SlowConsumerPolicy]),
         default=_DEFAULTS.slow_consumer_policy.value,
         help="What to do when a client's queue is over its limit: close it with 4008, "
              "or drop its oldest queued frames.")
@_option("--token-secret", default=None, metavar="SECRET",
         help="Shared secret for HS256 client tokens. Prefer the config file or the environment "
              "variable: other users can see command lines.  [default: none]")
@_option("--token-public-key-file", type=click.Path(dir_okay=False), default=None,
         help="PEM public key for RS256/ES256 client tokens.  [default: none]")
@_option("--anonymous/--no-anonymous", default=None, show_default="only when no token key is set",
         help="Let clients connect without a token.")
@_option("--allowed-origin", field="allowed_origins", multiple=True, metavar="ORIGIN",
         show_default="any origin",
         help="An Origin browsers may connect from, e.g. https://example.com; repeat for more, "
              "'*' for any. The variable takes a comma-separated list.")
@_option("--history-size", type=click.IntRange(0), default=_DEFAULTS.history_size,
         help="Publications kept per topic for late subscribers; 0 keeps none.")
@_option("--history-ttl", type=click.FloatRange(min=0, min_open=True), default=_DEFAULTS.history_ttl,
         help="Seconds a kept publication stays available.")
@_option("--proxy-connect-url", default=None, metavar="URL",
         help="POST each connection without a valid token (WebSocket upgrade, SSE, TCP connect) to "
              "the application's backend, which allows it as a user or refuses it.  [default: off]")
@_option("--proxy-subscribe-url", default=None, metavar="URL",
         help="POST each client subscribe to the backend; a refusal is the forbidden error.  "
              "[default: off]")
@_option("--proxy-publish-url", default=None, metavar="URL",
         help="POST each client publish to the backend, which decides (instead of --client-publish) "
              "and may replace the data.  [default: off]")
@_option("--proxy-rpc-url", default=None, metavar="URL",
         help='Forward {"op":"rpc"} to the backend; its result or error is the reply.  [default: off]')
@_option("--proxy-timeout", type=click.FloatRange(min=0, min_open=True), default=_DEFAULTS.proxy_timeout,
         help="Seconds one backend call may take; then HTTP 503 / the unavailable error.")
@_option("--proxy-header", field="proxy_headers", multiple=True, metavar="NAME",
         show_default="Cookie, Authorization",
         help="A request header forwarded to the connect proxy; repeat for more. "
              "The variable takes a comma-separated list.")
@_option("--proxy-max-in-flight", type=click.IntRange(1), default=_DEFAULTS.proxy_max_in_flight,
         help="Backend calls in flight at once; more get HTTP 503 / the unavailable error.")
@_option("--webhooks-url", default=None, metavar="URL",
         help="POST connect, disconnect and unsubscribe events to this URL in signed batches.  "
              "[default: off]")
@_option("--webhooks-secret", default=None, metavar="SECRET",
         help="HMAC-SHA256 key signing each webhook batch (header X-Trioserve-Signature). Prefer "
              "TRIOSERVE_WEBHOOKS_SECRET: other users can see command lines.  [default: unsigned]")
@_option("--webhooks-batch-size", type=click.IntRange(1), default=_DEFAULTS.webhooks_batch_size,
         help="Events one webhook POST carries at most (a batch also goes every 100 ms).")
@_option("--webhooks-queue-size", type=click.IntRange(1), default=_DEFAULTS.webhooks_queue_size,
         help="Webhook events waiting for delivery, retries included; over it the oldest are "
              "dropped, logged and counted (trioserve_webhook_events_dropped_total).")
@_option("--log-level", type=click.Choice(LOG_LEVELS), default=_DEFAULTS.log_level,
         help="Logging verbosity.")
@_option("--log-format", type=click.Choice(LOG_FORMATS), default=_DEFAULTS.log_format,
         help="text, or json: one JSON object per line (ts, level, logger, msg, exc).")
@click.pass_context
def serve(ctx: click.Context, /, config_path: str | None, **options: Any) -> None:
    """Run the push server.

    With no options it listens on http://127.0.0.1:8000 with an in-memory hub:
    clients connect to ws://127.0.0.1:8000/ws and subscribe, publishers POST to
    /api/publish. SIGTERM or Ctrl-C drains gracefully; a second one exits at once.

    Settings come from the --config file, then TRIOSERVE_* variables, then
    these flags; a later source wins. docs/configuration.md lists them all.
    """
    # Only what the user typed: a flag's default must not mask the file or the environment.
    overrides = {name: value for name, value in options.items()
                 if ctx.get_parameter_source(name) is ParameterSource.COMMANDLINE}
    config = _load(config_path, overrides)
    _setup_logging(config, "sup" if config.workers > 1 else None)
    _warn_about(config)
    ssl_context = None
    if config.certfile is not None:
        from ..net.tls import server_context

        try:
            # Loaded here too with --workers, so a bad certificate stops the
            # supervisor rather than every worker in turn.
            ssl_context = server_context(config)
        except ConfigError as exc:
            raise ConfigProblem(str(exc)) from None
    if config.workers > 1:
        from .supervisor import Supervisor

        try:
            sys.exit(trio.run(Supervisor(config).run))
        except OSError as exc:
            raise click.ClickException(str(exc)) from None
    server = Server(config, handle_signals=True, ssl_context=ssl_context)
    tune_gc()
    try:
        trio.run(server.serve)
    except OSError as exc:
        raise click.ClickException(str(exc)) from None
    if server.forced_exit is not None:
        sys.exit(128 + server.forced_exit)


#: The cyclic GC's thresholds for a serving process (CPython's default is (700, 10, 10)).
GC_THRESHOLDS = (700, 10, 100)


def tune_gc() -> None:
    """Make full collections about ten times rarer in a serving process.

    A full collection walks every connection's objects: 60-70 ms with 4,000
    connections, longer with more, and every publication waiting meanwhile.
    Each read makes a CancelScope (the heartbeat deadline) that trio's deadline
    heap keeps until it prunes, so a busy publisher promotes thousands of
    objects a second and CPython started a full collection every few seconds:
    the p99 of a steady 5,000 publications/s was 30-70 ms, 2-3 ms without them
    (BENCHMARKS.md, "rooms"). Young collections are unchanged, so short-lived
    garbage goes as before; cyclic garbage that reached the oldest generation
    is collected later, not never.
    """
    gc.set_threshold(*GC_THRESHOLDS)


@main.command("_worker", hidden=True)
@click.option("--runtime-dir", required=True, type=click.Path(file_okay=False, exists=True))
@click.option("--worker-id", required=True, type=click.IntRange(1))
@click.option("--ready-fd", type=int, default=None)
def worker(runtime_dir: str, worker_id: int, ready_fd: int | None) -> None:
    """One worker of `serve --workers N`, started by its supervisor (trioserve/ops/supervisor.py)."""
    from .worker import Worker, read_worker_config

    try:
        config = read_worker_config(runtime_dir, worker_id)
    except ConfigError as exc:
        raise ConfigProblem(str(exc)) from None
    _setup_logging(config, f"w{worker_id}")
    w = Worker(config, runtime_dir)
    tune_gc()
    try:
        trio.run(w.run, ready_fd)
    except OSError as exc:
        raise click.ClickException(str(exc)) from None
    sys.exit(w.exit_code)


@main.command()
@click.argument("path", required=False, type=click.Path(dir_okay=False, allow_dash=True))
@click.option("--force", is_flag=True, help="Overwrite PATH if it exists.")
def genconfig(path: str | None, force: bool) -> None:
    """Write a commented config file with every option at its default.

    It gets a fresh random token_secret and api_key, so clients need a token
    (see `trioserve token`) and publishing over HTTP needs the key. PATH
    defaults to stdout; an existing file is kept unless --force is given. The
    file is created readable by its owner only.
    """
    text = render_config(token_secret=secrets.token_urlsafe(32), api_key=secrets.token_urlsafe(32))
    if path is None or path == "-":
        click.echo(text, nl=False)
        return
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if force else os.O_EXCL)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise ConfigProblem(f"{path} exists; pass --force to overwrite it") from None
    except OSError as exc:
        raise click.ClickException(f"cannot write {path}: {exc.strerror}") from None
    # O_TRUNC keeps an existing file's mode, which may let others read the secrets.
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    click.echo(f"wrote {path}", err=True)


@main.command()
@_config_file_option
@click.option("--sub", required=True, help="Subject: the user or client the token is for.")
@click.option("--subscribe", multiple=True, metavar="PATTERN",
              help="Topic or glob the holder may subscribe to, e.g. 'chat.*'; repeat for more.")
@click.option("--publish", multiple=True, metavar="PATTERN",
              help="Topic or glob the holder may publish to; repeat for more.")
@click.option("--presence", is_flag=True, help="Add the claim presence: true.")
@click.option("--ttl", default="1h", show_default=True, callback=_duration, metavar="DURATION",
              help="Lifetime: 90s, 15m, 1h, 2d, or plain seconds.")
def token(config_path: str | None, sub: str, subscribe: tuple[str, ...], publish: tuple[str, ...],
          presence: bool, ttl: float) -> None:
    """Print a client token (JWT) signed with the config's token_secret.

    The secret comes from --config, TRIOSERVE_CONFIG or TRIOSERVE_TOKEN_SECRET.
    aud and iss are added when token_audience / token_issuer are configured.
    """
    config = _load(config_path, {})
    if not sub:
        raise ConfigProblem("--sub is empty; give the id of the user or client the token is for")
    try:
        for flag, patterns in (("--subscribe", subscribe), ("--publish", publish)):
            for pattern in patterns:
                check_topic_pattern(pattern, flag)
    except ConfigError as exc:
        raise ConfigProblem(str(exc)) from None
    algorithm = _signing_algorithm(config)
    now = int(time.time())
    claims: dict[str, Any] = {"sub": sub, "iat": now, "exp": now + math.ceil(ttl)}
    if subscribe:
        claims["subscribe"] = list(subscribe)
    if publish:
        claims["publish"] = list(publish)
    if presence:
        claims["presence"] = True
    if config.token_audience is not None:
        claims["aud"] = config.token_audience
    if config.token_issuer is not None:
        claims["iss"] = config.token_issuer
    # PyJWT loads the cryptography backend on import; only this command needs it.
    import jwt

    assert config.token_secret is not None
    secret = config.token_secret
    if len(secret.encode()) < _HMAC_MIN_BYTES[algorithm]:
        click.echo(f"warning: token_secret is {len(secret.encode())} bytes; {algorithm} wants at least "
                   f"{_HMAC_MIN_BYTES[algorithm]} (trioserve genconfig makes one)", err=True)
    with warnings.catch_warnings():
        # Said once above, in one line.
        warnings.simplefilter("ignore", jwt.InsecureKeyLengthWarning)
        click.echo(jwt.encode(claims, secret, algorithm=algorithm))


def _signing_algorithm(config: Config) -> str:
    if config.token_secret is None:
        if config.token_public_key is not None:
            raise ConfigProblem("the config has only token_public_key, which can verify tokens but not "
                                "sign them; sign RS/ES tokens with the private key where they are issued")
        raise ConfigProblem("no token_secret to sign with: set it in the config file (--config, "
                            f"trioserve genconfig) or in {ENV_PREFIX}TOKEN_SECRET")
    for algorithm in config.effective_token_algorithms:
        if algorithm in HMAC_ALGORITHMS:
            return algorithm
    raise ConfigProblem(f"token_algorithms ({', '.join(config.effective_token_algorithms)}) has no HS "
                        "algorithm, so the server would refuse a token signed with token_secret")


main.add_command(doctor)
main.add_command(bench)

if __name__ == "__main__":
    main()
