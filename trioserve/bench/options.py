"""What ``trioserve bench`` was asked to do: its options, their checks and the
plan of connections over load-client processes."""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

SCENARIOS = ("idle", "fanout", "echo", "storm", "rooms")
CONNS_PER_PROC = 15_000


class UsageError(Exception):
    """Options that cannot work; the CLI turns it into a usage error (exit 2)."""


@dataclass
class Options:
    scenario: str
    url: str = "ws://127.0.0.1:8000/ws"
    connections: int = 100
    procs: int | None = None
    source_ips: list[str] | None = None
    connect_rate: float = 1000.0
    connect_concurrency: int = 200
    connect_timeout: float = 10.0
    duration: float = 10.0
    topics: int = 1
    subscriptions: int = 1
    rate: float = 100.0
    size: int = 64
    #: Subscribers offer permessage-deflate (and inflate what comes compressed).
    deflate: bool = False
    #: Publication data: "pad" (a run of "x") or "json" (a realistic document).
    payload: str = "pad"
    publishers: int = 1
    storm_percent: float = 10.0
    storm_interval: float = 2.0
    settle: float = 1.0
    drain_timeout: float = 10.0
    metrics_url: str | None = None
    max_p99_ms: float | None = None
    max_loss: float | None = None
    max_connect_failures: int = 0
    progress: bool = True
    loop: str = "auto"
    topic_prefix: str | None = None
    target: dict[str, Any] = field(default_factory=dict)


def parse_target(url: str) -> dict[str, Any]:
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "tcp"):
        raise UsageError(f"{url!r}: use ws://HOST:PORT/PATH or tcp://HOST:PORT (wss is not supported)")
    if not parts.hostname or parts.port is None:
        raise UsageError(f"{url!r}: give a host and a port, e.g. ws://127.0.0.1:8000/ws")
    return {"scheme": parts.scheme, "host": parts.hostname, "port": parts.port,
            "path": (parts.path or "/") + (f"?{parts.query}" if parts.query else "")}


def is_loopback(host: str) -> bool:
    return host == "localhost" or host.startswith("127.")


def default_procs(connections: int) -> int:
    return max(1, math.ceil(connections / CONNS_PER_PROC))


def default_source_ips(connections: int, host: str) -> list[str] | None:
    """127.0.0.2, 127.0.0.3, …: one per 10,000 connections, against a loopback server."""
    if not is_loopback(host):
        return None
    return [f"127.0.0.{2 + i}" for i in range(max(1, math.ceil(connections / 10_000)))]


def validate(opts: Options) -> None:
    if opts.scenario not in SCENARIOS:
        raise UsageError(f"unknown scenario {opts.scenario!r}; choose from {', '.join(SCENARIOS)}")
    opts.target = parse_target(opts.url)
    if opts.deflate and opts.target["scheme"] != "ws":
        raise UsageError("--deflate needs a ws:// URL: TCP connections are never compressed")
    opts.target["deflate"] = opts.deflate
    opts.target["payload"] = opts.payload
    if opts.connections < 1:
        raise UsageError("--connections must be at least 1")
    if opts.procs is None:
        opts.procs = default_procs(opts.connections)
    opts.procs = max(1, min(opts.procs, opts.connections))
    if opts.source_ips is None:
        opts.source_ips = default_source_ips(opts.connections, opts.target["host"])
    if opts.scenario in ("fanout", "storm", "echo", "rooms") and opts.rate <= 0:
        raise UsageError(f"{opts.scenario} needs --rate > 0")
    if opts.topics < 1:
        raise UsageError("--topics must be at least 1")
    if not 1 <= opts.subscriptions <= opts.topics:
        raise UsageError(f"--subscriptions must be 1 to --topics ({opts.topics})")
    if opts.subscriptions > 1 and opts.scenario != "rooms":
        raise UsageError("--subscriptions above 1 is for the rooms scenario")
    if not 0 < opts.storm_percent <= 100:
        raise UsageError("--storm-percent must be in (0, 100]")
    if opts.topic_prefix is None:
        opts.topic_prefix = f"bench.{secrets.token_hex(3)}"


def plan(opts: Options) -> list[list[list[Any]]]:
    """[src_ip, topic] per connection, dealt round-robin to the worker processes."""
    assert opts.procs is not None
    ips: list[str | None] = [*opts.source_ips] if opts.source_ips else [None]
    topics: list[str | None] = list(topic_names(opts)) if opts.scenario != "echo" else [None]
    if opts.subscriptions > 1:
        # rooms: connection i takes topics i*k … i*k+k-1 (mod topics): each topic
        # gets connections * k / topics subscribers, none twice on one connection.
        k, count = opts.subscriptions, len(topics)
        rows = [[ips[i % len(ips)], [topics[(i * k + j) % count] for j in range(k)]]
                for i in range(opts.connections)]
    else:
        rows = [[ips[i % len(ips)], topics[i % len(topics)]] for i in range(opts.connections)]
    return [rows[p :: opts.procs] for p in range(opts.procs)]


def topic_names(opts: Options) -> list[str]:
    return [f"{opts.topic_prefix}.{i}" for i in range(opts.topics)]
