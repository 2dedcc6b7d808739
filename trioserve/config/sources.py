"""Config from a TOML file, ``TRIOSERVE_*`` variables and overrides; and genconfig's file.

Precedence is file < environment < overrides (the command line). TOML keys are
the :class:`~trioserve.config.Config` field names, flat, plus
``token_public_key_file`` and ``[[history_rules]]`` tables. Every problem is a
:class:`~trioserve.config.ConfigError` whose one-line message names the source,
the key, what was expected and what was given.
"""

from __future__ import annotations

import difflib
import enum
import json
import math
import os
import tomllib
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from .checks import ConfigError, HistoryRule, type_name
from .model import Config

__all__ = ["CONFIG_ENV", "ENV_PREFIX", "KEY_FILE", "OPTIONS", "Kind", "Option", "load_config",
           "render_config"]

ENV_PREFIX = "TRIOSERVE_"
#: Names the config file when no path is given.
CONFIG_ENV = "TRIOSERVE_CONFIG"
#: A loader-only key: the file's text becomes ``token_public_key``.
KEY_FILE = "token_public_key_file"
_RULE_KEYS = ("pattern", "size", "ttl")
#: File paths that a config file gives relative to itself.
_PATH_KEYS = (KEY_FILE, "certfile", "keyfile")
#: Options whose values must never appear in an error message (or a log).
_SECRETS = frozenset({"token_secret", "api_key", "broker_password", "webhooks_secret"})
_TRUE = ("1", "true", "yes")
_FALSE = ("0", "false", "no")


class Kind(enum.Enum):
    STR = "a string"
    INT = "an integer"
    FLOAT = "a number"
    BOOL = "true or false"
    STRINGS = "an array of strings"
    RULES = "[[history_rules]] tables with pattern, size and ttl"


@attrs.frozen
class Option:
    name: str
    kind: Kind
    optional: bool
    default: Any
    help: str
    section: str
    #: Shown commented out by genconfig for options that are off by default.
    example: Any = None

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()


# (section, name, one-line help, example for options unset by default). The
# order is genconfig's and docs/configuration.md's.
_PUBLIC_KEY_EXAMPLE = "-----BEGIN PUBLIC KEY-----\n...\n-----END PUBLIC KEY-----\n"
_HELP: tuple[tuple[str, str, str, Any], ...] = (
    ("listeners", "host", "Address to listen on; 0.0.0.0 or :: exposes the server to the network.", None),
    ("listeners", "port", "HTTP + WebSocket port; 0 picks a free port.", None),
    ("listeners", "tcp_port", "Also serve newline-delimited JSON over raw TCP on this port (off when unset).",
     9000),
    ("listeners", "ws_path", "Path of the WebSocket endpoint on the HTTP port.", None),
    ("listeners", "compression",
     "Accept permessage-deflate from WebSocket clients that offer it (browsers do); each "
     "publication is compressed once for all of them. Messages under 256 bytes go uncompressed.",
     None),
    ("listeners", "backlog", "listen() backlog; the kernel caps it at net.core.somaxconn.", None),
    ("listeners", "reuse_port", "Set SO_REUSEPORT, so several server processes can share the port.", None),
    ("listeners", "certfile",
     "PEM certificate chain; with it both ports speak TLS (wss://, TCP+TLS). Relative to this file.",
     "/etc/trioserve/cert.pem"),
    ("listeners", "keyfile", "PEM private key of certfile (unset: the key is in certfile).",
     "/etc/trioserve/key.pem"),
    ("workers", "workers",
     'Worker processes sharing the ports, each with its own fd limit ("auto": one per core); '
     "over 1 without a redis broker, the supervisor is their broker.",
     None),
    ("workers", "broker",
     'Where publications travel: "memory://" (one process, or with workers the supervisor), '
     'or "redis://host:6379/0" ("rediss://" for TLS) to span hosts.', None),
    ("workers", "broker_password",
     "Redis password, kept out of the broker URL (prefer TRIOSERVE_BROKER_PASSWORD).", "CHANGE-ME"),
    ("publishing", "client_publish",
     'Let connected clients publish with {"op":"publish"}; the HTTP API always can.', None),
    ("publishing", "api_key",
     "Require 'Authorization: Bearer KEY' on /api/... and the key on /admin (open when unset).",
     "CHANGE-ME"),
    ("publishing", "hub_max_pending",
     "Publications waiting for fan-out before publishers are pushed back.", None),
    ("limits", "max_connections",
     "Client connections at once, WebSocket + TCP (unset: what the fd limit allows).", 10000),
    ("limits", "max_connections_per_ip",
     "Open sockets from one IP address (IPv6: one /64); 0 is no limit "
     "(unset: 1000, loopback peers exempt).", 1000),
    ("limits", "rate_limit",
     "Messages per second one connection may send; more get rate_limited, a flood closes 4029. "
     "0 is no limit.", None),
    ("limits", "rate_burst", "Messages one connection may send at once before rate_limit applies.", None),
    ("limits", "max_subscriptions", "Topics one connection may subscribe to; 0 is no limit.", None),
    ("limits", "max_queued_bytes",
     "Outbound bytes queued over all connections before the largest queues are closed with 4008; "
     "0 is no limit.", None),
    ("limits", "max_message_size",
     "Largest client message, TCP line or HTTP body, in bytes (over it: close 1009 / HTTP 413).", None),
    ("limits", "queue_max_bytes", "Outbound queue limit per connection, in bytes.", None),
    ("limits", "queue_max_frames", "Outbound queue limit per connection, in frames.", None),
    ("limits", "slow_consumer_policy",
     'A client whose queue overflows: "disconnect" (close 4008) or "drop-oldest".', None),
    ("timeouts", "ping_interval", "Seconds of silence from a client before the server pings it.", None),
    ("timeouts", "ping_timeout", "Further seconds without data or pong before closing with 4002.", None),
    ("timeouts", "handshake_timeout",
     "Seconds a client has to send a complete HTTP request or upgrade.", None),
    ("timeouts", "close_timeout", "Seconds allowed for a close handshake before a forced close.", None),
    ("timeouts", "drain_timeout",
     "On SIGTERM/SIGINT, seconds to wait for clients to close before forcing them.", None),
    ("auth", "token_secret", "Shared secret for HS256/384/512 client tokens (JWT).", "CHANGE-ME"),
    ("auth", "token_public_key",
     "PEM public key for RS/ES/PS client tokens; or use token_public_key_file.", _PUBLIC_KEY_EXAMPLE),
    ("auth", KEY_FILE, "File holding token_public_key (relative to this file).",
     "/etc/trioserve/jwt-public.pem"),
    ("auth", "token_algorithms",
     'Accepted JWT algorithms (unset: ["HS256"] with a secret, ["RS256", "ES256"] with a public key).',
     ["HS256"]),
    ("auth", "token_audience", "Require this aud claim in client tokens.", "trioserve"),
    ("auth", "token_issuer", "Require this iss claim in client tokens.", "https://auth.example.com"),
    ("auth", "anonymous",
     "Let clients connect without a token (unset: only when no token key is set).", True),
    ("auth", "refresh_grace",
     "Seconds a connection may outlive its token's exp while it sends a fresh token.", None),
    ("auth", "allowed_origins",
     'Origins browsers may connect from, e.g. ["https://example.com"]; empty accepts any.', None),
    ("history", "history_size", "Publications kept per topic for late subscribers; 0 keeps none.", None),
    ("history", "history_ttl", "Seconds a kept publication stays available.", None),
    ("history", "history_rules",
     "Per-topic size and ttl; the first rule whose glob pattern matches wins.", None),
    ("presence", "presence_events",
     'Topic globs whose subscribers get join/leave events, e.g. ["chat.*"].', None),
    ("backend", "proxy_connect_url",
     "POST each connection without a valid token (WebSocket upgrade, SSE, TCP connect) here; "
     "the backend allows it as a user or refuses it (docs/backend.md).", "http://127.0.0.1:3000/connect"),
    ("backend", "proxy_subscribe_url",
     "POST each client subscribe here; a refusal is the forbidden error.", "http://127.0.0.1:3000/subscribe"),
    ("backend", "proxy_publish_url",
     "POST each client publish here; the backend decides (not client_publish) and may replace the data.",
     "http://127.0.0.1:3000/publish"),
    ("backend", "proxy_rpc_url", 'Forward {"op":"rpc"} here; the answer is the reply.',
     "http://127.0.0.1:3000/rpc"),
    ("backend", "proxy_timeout",
     "Seconds one backend call may take; then HTTP 503 / the unavailable error.", None),
    ("backend", "proxy_headers", "Headers of an upgrade or SSE request forwarded to the connect proxy.",
     None),
    ("backend", "proxy_max_in_flight",
     "Backend calls in flight at once; more get HTTP 503 / the unavailable error.", None),
    ("backend", "webhooks_url",
     "POST connect, disconnect and unsubscribe events here, in batches.", "http://127.0.0.1:3000/webhook"),
    ("backend", "webhooks_secret",
     "Sign each webhook batch with HMAC-SHA256 under this key (header X-Trioserve-Signature).",
     "CHANGE-ME"),
    ("backend", "webhooks_batch_size", "Events one webhook POST carries at most.", None),
    ("backend", "webhooks_queue_size",
     "Webhook events waiting for delivery; over it the oldest are dropped (and counted).", None),
    ("logging", "log_level", 'One of "debug", "info", "warning", "error".', None),
    ("logging", "log_format", '"text", or "json" for one JSON object per line.', None),
)


def _kind(field_type: Any) -> tuple[Kind, bool]:
    args = typing.get_args(field_type)
    optional = type(None) in args
    if optional:
        (field_type,) = (a for a in args if a is not type(None))
    if field_type is bool:
        return Kind.BOOL, optional
    if field_type is int:
        return Kind.INT, optional
    if field_type is float:
        return Kind.FLOAT, optional
    if field_type is str or (isinstance(field_type, type) and issubclass(field_type, str)):
        return Kind.STR, optional
    if typing.get_origin(field_type) is tuple:
        item = typing.get_args(field_type)[0]
        if item is str:
            return Kind.STRINGS, optional
        if item is HistoryRule:
            return Kind.RULES, optional
    raise TypeError(f"Config field type {field_type!r} has no loader")


def _options() -> dict[str, Option]:
    loadable = {f.name: (*_kind(f.type), f.default) for f in attrs.fields(attrs.resolve_types(Config))
                if f.metadata.get("loadable", True)}
    loadable[KEY_FILE] = (Kind.STR, True, None)
    documented = {name: (section, text, example) for section, name, text, example in _HELP}
    # Documented order first; an undocumented field still loads (a test flags it).
    names = [name for name in documented if name in loadable]
    names += [name for name in loadable if name not in documented]
    options = {}
    for name in names:
        kind, optional, default = loadable[name]
        section, text, example = documented.get(name, ("other", "", None))
        options[name] = Option(name, kind, optional, default, text, section, example)
    return options


#: Every key a config file, ``TRIOSERVE_*`` variable or override may set.
OPTIONS = _options()


# --- values ---------------------------------------------------------------------------------


def _describe(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return f"the integer {value}"
    if isinstance(value, float):
        return f"the number {value}"
    if isinstance(value, str):
        return f"the string {value!r}"
    if isinstance(value, (list, tuple)):
        return "an array"
    if isinstance(value, Mapping):
        return "a table"
    return f"a {type(value).__name__}"


def _suggest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else "; see docs/configuration.md for the options"


def _typed(opt: Option, value: Any, where: str) -> Any:
    """*value* as the option's Python type, or an error naming what was expected."""
    kind = opt.kind
    if kind is Kind.RULES:
        return _rules(value, where)
    if value is None and opt.optional:
        return None
    if opt.name == "workers" and isinstance(value, str) and value.strip().lower() == "auto":
        return value  # one per core: Config resolves it
    ok = {
        Kind.BOOL: isinstance(value, bool),
        Kind.INT: isinstance(value, int) and not isinstance(value, bool),
        Kind.FLOAT: isinstance(value, (int, float)) and not isinstance(value, bool),
        Kind.STR: isinstance(value, str),
        Kind.STRINGS: isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value),
    }[kind]
    if not ok:
        got = type_name(value) if opt.name in _SECRETS else _describe(value)
        raise ConfigError(f"{where}{opt.name} must be {kind.value}, got {got}")
    if kind is Kind.FLOAT:
        return float(value)
    if kind is Kind.STRINGS:
        return tuple(value)
    return value


def _rules(value: Any, where: str) -> tuple[HistoryRule, ...]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, Mapping) for v in value):
        raise ConfigError(f"{where}history_rules must be {Kind.RULES.value}, got {_describe(value)}")
    rules = []
    for i, table in enumerate(value):
        name = f"history_rules[{i}]"
        for key in table:
            if key not in _RULE_KEYS:
                raise ConfigError(f"{where}{name}: unknown key {key!r}{_suggest(key, list(_RULE_KEYS))}")
        for key in _RULE_KEYS:
            if key not in table:
                raise ConfigError(f"{where}{name} has no {key!r}; each rule needs pattern, size and ttl")
        pattern, size, ttl = (table[k] for k in _RULE_KEYS)
        for key, val, ok, expected in (
            ("pattern", pattern, isinstance(pattern, str), Kind.STR),
            ("size", size, isinstance(size, int) and not isinstance(size, bool), Kind.INT),
            ("ttl", ttl, isinstance(ttl, (int, float)) and not isinstance(ttl, bool), Kind.FLOAT),
        ):
            if not ok:
                raise ConfigError(f"{where}{name}.{key} must be {expected.value}, got {_describe(val)}")
        try:
            rules.append(HistoryRule(pattern, size, float(ttl)))
        except ConfigError as exc:
            raise ConfigError(f"{where}{name}: {exc}") from None
    return tuple(rules)


def _from_env(opt: Option, raw: str) -> Any:
    text = raw.strip()
    if opt.kind is Kind.STRINGS:
        items = tuple(item.strip() for item in text.split(",") if item.strip())
        return None if not items and opt.optional else items
    if not text and opt.optional:
        return None
    if opt.kind is Kind.BOOL:
        if text.lower() in _TRUE + _FALSE:
            return text.lower() in _TRUE
        raise ConfigError(f"{opt.env} must be one of 1/0/true/false/yes/no, got {raw!r}")
    if opt.name == "workers" and text.lower() == "auto":
        return text
    if opt.kind is Kind.INT:
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"{opt.env} must be an integer, got {raw!r}") from None
    if opt.kind is Kind.FLOAT:
        try:
            number = float(text)
        except ValueError:
            number = math.nan
        if not math.isfinite(number):
            raise ConfigError(f"{opt.env} must be a number, got {raw!r}")
        return number
    return raw


# --- sources --------------------------------------------------------------------------------


def _read_file(path: Path) -> dict[str, Any]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} not found") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {str(path)!r}: {exc.strerror}") from None
    where = f"{path}: "
    try:
        doc = tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{where}not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where}invalid TOML: {exc}") from None
    layer: dict[str, Any] = {}
    for key, value in doc.items():
        opt = OPTIONS.get(key)
        if opt is None:
            if isinstance(value, dict):
                raise ConfigError(f"{where}unknown table [{key}]; options are top-level keys "
                                  "(port = 8000), not grouped in tables")
            raise ConfigError(f"{where}unknown key {key!r}{_suggest(key, list(OPTIONS))}")
        layer[key] = _typed(opt, value, where)
    for key in _PATH_KEYS:
        if layer.get(key) is not None:
            # Relative to the config file, so the pair can move together.
            layer[key] = str(path.parent / layer[key])
    _one_key_source(layer, where)
    return layer


def _read_env(env: Mapping[str, str]) -> dict[str, Any]:
    by_env = {opt.env: opt for opt in OPTIONS.values() if opt.kind is not Kind.RULES}
    layer: dict[str, Any] = {}
    for var, raw in env.items():
        if not var.startswith(ENV_PREFIX) or var == CONFIG_ENV:
            continue
        opt = by_env.get(var)
        if opt is not None:
            layer[opt.name] = _from_env(opt, raw)
        elif var == OPTIONS["history_rules"].env:
            raise ConfigError(f"{var}: history_rules can only be set in a config file "
                              "([[history_rules]] tables)")
        else:
            # Other tools may use the prefix (a client's TRIOSERVE_URL), so only
            # a near-miss of a real option is treated as a typo.
            close = difflib.get_close_matches(var.upper(), [*by_env, CONFIG_ENV], n=1, cutoff=0.85)
            if close:
                raise ConfigError(f"{var} is not a trioserve setting; did you mean {close[0]}?")
    _one_key_source(layer, "environment: ")
    return layer


def _read_overrides(overrides: Mapping[str, Any]) -> dict[str, Any]:
    layer: dict[str, Any] = {}
    for key, value in overrides.items():
        opt = OPTIONS.get(key)
        if opt is None:
            raise ConfigError(f"unknown option {key!r}{_suggest(key, list(OPTIONS))}")
        layer[key] = _typed(opt, value, "")
    _one_key_source(layer, "")
    return layer


def _one_key_source(layer: Mapping[str, Any], where: str) -> None:
    if layer.get("token_public_key") is not None and layer.get(KEY_FILE) is not None:
        raise ConfigError(f"{where}set token_public_key or {KEY_FILE}, not both")


def _read_key_file(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError(f"{KEY_FILE}: cannot read {path!r}: {reason}") from None


def load_config(
    path: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """A Config from a TOML file, then ``TRIOSERVE_*`` variables, then *overrides*.

    Each later source wins. *path* defaults to ``TRIOSERVE_CONFIG``; *env* to
    ``os.environ``. Every problem raises :class:`ConfigError` with a one-line message.
    """
    environ = os.environ if env is None else env
    if path is None:
        path = environ.get(CONFIG_ENV) or None
    layers = [] if path is None else [_read_file(Path(path))]
    layers.append(_read_env(environ))
    layers.append(_read_overrides(overrides or {}))
    merged: dict[str, Any] = {}
    for layer in layers:
        # The key and the key file are one option: a later source giving either
        # replaces what an earlier one gave.
        if "token_public_key" in layer or KEY_FILE in layer:
            merged.pop("token_public_key", None)
            merged.pop(KEY_FILE, None)
        merged.update(layer)
    key_file = merged.pop(KEY_FILE, None)
    if key_file is not None:
        merged["token_public_key"] = _read_key_file(key_file)
    return Config(**merged)


# --- genconfig ------------------------------------------------------------------------------


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        # JSON's string escapes are a subset of TOML basic strings'.
        return json.dumps(str(value), ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {value!r}")


def render_config(*, token_secret: str, api_key: str) -> str:
    """A commented TOML file with every option at its default, and the two secrets given."""
    secrets = {"token_secret": token_secret, "api_key": api_key}
    lines = [
        "# trioserve configuration, written by `trioserve genconfig`.",
        "# Keys are the option names; see docs/configuration.md. Precedence: this file <",
        "# TRIOSERVE_<KEY> environment variables < command-line flags. Options that are",
        "# off by default are commented out. It holds secrets: keep it private (mode 600).",
        "# With token_secret set, clients need a token (`trioserve token`); uncomment",
        "# the anonymous line below to let clients without one in as well.",
    ]
    section = ""
    for opt in OPTIONS.values():
        if opt.kind is Kind.RULES:
            continue
        if opt.section != section:
            section = opt.section
            lines += ["", f"# --- {section} ---"]
        lines.append(f"# {opt.help}")
        if opt.name in secrets:
            lines.append(f"{opt.name} = {_toml(secrets[opt.name])}")
        elif opt.default is None:
            lines.append(f"# {opt.name} = {_toml(opt.example)}")
        else:
            lines.append(f"{opt.name} = {_toml(opt.default)}")
    rules = OPTIONS["history_rules"]
    # Tables last: every key after a [[table]] header belongs to that table.
    lines += [
        "",
        f"# {rules.help} For example:",
        "# [[history_rules]]",
        '# pattern = "chat.*"',
        "# size = 500",
        "# ttl = 3600.0",
        "",
    ]
    return "\n".join(lines)
