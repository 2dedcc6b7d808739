"""Prometheus metrics for a Server, served as ``GET /metrics`` on the HTTP port.

Nothing here runs on the fan-out path. The server and the hub keep plain
integer counters. A :class:`ServerCollector` reads them through
``server.statistics()`` only when Prometheus scrapes, and turns them into
metric families. The hub's fan-out loop never takes a lock or calls
prometheus_client.

Each Server gets its own ``CollectorRegistry`` (see :func:`server_registry`),
not prometheus_client's global ``REGISTRY``. Two servers in one process, as in
tests or an embedding application, then report separately and cannot clash.
That registry also holds the process, platform and GC collectors.

``/metrics`` does not ask for the API key even when one is configured: it is
meant for a Prometheus scraper inside the network. Filter ``/metrics`` at the
proxy if the HTTP port is reachable from outside.

With ``--workers N`` the worker that gets the scrape answers for all of them
(:mod:`trioserve.ops.worker`): each worker's families carry a ``worker="<id>"``
label on every sample (:func:`worker_families`), travel to the scraped worker
as JSON (:func:`families_to_json`), and are merged family by family
(:func:`merge_families`). Totals are left to PromQL, ``sum without (worker)
(...)``: a pre-summed counter would go backwards whenever a worker restarts
or misses a scrape, and ``rate()`` would read that as a huge spike.
"""

from __future__ import annotations

import math
import os
import weakref
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from ..net.httpd import Request, Response
from ..protocol.codes import CloseCode
from ..push.hub import LATENCY_BUCKETS
from .stats import Observed, ServerStatistics

__all__ = [
    "WORKER_LABEL",
    "Observed",
    "ServerCollector",
    "families_from_json",
    "families_response",
    "families_to_json",
    "merge_families",
    "metrics_response",
    "server_registry",
    "worker_families",
    "with_label",
    "worker_up_family",
]

#: The label that tells the workers of ``serve --workers N`` apart.
WORKER_LABEL = "worker"

# The transport labels (``Connection.transport_name``), always reported, even at
# zero, so rate() and alerts have a series from the start.
_WEBSOCKET = "websocket"
_TCP = "tcp"
_TRANSPORTS = (_WEBSOCKET, _TCP)
# The "le" labels: for these bounds repr() matches the Go float formatting
# Prometheus uses (prometheus_client.utils.floatToGoString, which is untyped).
_LATENCY_BOUNDS = [*(repr(float(b)) for b in LATENCY_BUCKETS), "+Inf"]

_registries: weakref.WeakKeyDictionary[Observed, CollectorRegistry] = weakref.WeakKeyDictionary()


class ServerCollector(Collector):
    """Reads one server's statistics at scrape time and yields metric families.

    It holds the server through a weak reference. The registry is the value
    in a ``WeakKeyDictionary`` keyed by that server, and a strong reference
    would keep the server alive for good. Once the server is gone, the
    collector yields nothing.
    """

    def __init__(self, server: Observed):
        self._server = weakref.ref(server)

    def describe(self) -> Iterable[Metric]:
        # Lets the registry check for clashing names when this is registered.
        return self.collect()

    def collect(self) -> Iterable[Metric]:
        server = self._server()
        if server is None:
            return []
        return _families(server)


def server_registry(server: Observed) -> CollectorRegistry:
    """The registry for *server*, made on first use.

    It holds a :class:`ServerCollector` plus the process, platform and GC
    collectors. Register your own collectors here to have them served on
    ``/metrics``.
    """
    registry = _registries.get(server)
    if registry is None:
        registry = CollectorRegistry()
        registry.register(ServerCollector(server))
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
        _registries[server] = registry
    return registry


def metrics_response(server: Observed, request: Request) -> Response:
    """The answer to ``GET /metrics``.

    The body is in the Prometheus text format, or in OpenMetrics when the
    ``Accept`` header asks for it (``prometheus_client``'s ``choose_encoder``).
    """
    return _encode(server_registry(server), request)


def families_response(families: Sequence[Metric], request: Request) -> Response:
    """The answer to ``GET /metrics`` from already collected *families*."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed(families))
    return _encode(registry, request)


def _encode(registry: CollectorRegistry, request: Request) -> Response:
    accept = request.header(b"accept") or b""
    encoder, content_type = choose_encoder(accept.decode("latin-1"))
    body = encoder(registry)
    return Response(200, body, content_type.encode("ascii"))


class _Fixed(Collector):
    def __init__(self, families: Sequence[Metric]):
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return self._families


# --- several workers --------------------------------------------------------------------------


def worker_families(server: Observed, worker: str) -> list[Metric]:
    """Everything *server*'s registry collects, plus ``trioserve_worker_info`` (the pid),
    with ``worker=<worker>`` added to every sample."""
    info = GaugeMetricFamily("trioserve_worker_info",
                             "1 per worker process of serve --workers; pid is its process id.",
                             labels=["pid"])
    info.add_metric([str(os.getpid())], 1)
    families = [*server_registry(server).collect(), info]
    return [with_label(family, WORKER_LABEL, worker) for family in families]


def worker_up_family(up: Mapping[str, bool]) -> Metric:
    """``trioserve_worker_up``: 1 for each worker that answered this scrape, else 0."""
    family = GaugeMetricFamily(
        "trioserve_worker_up",
        "1 if the worker answered for this scrape; 0 if it did not (restarting or stuck), "
        "and its other series are missing from this scrape.",
        labels=[WORKER_LABEL])
    for worker, answered in up.items():
        family.add_metric([worker], int(answered))
    return family


def with_label(family: Metric, name: str, value: str) -> Metric:
    """A copy of *family* with label *name* = *value* on every sample."""
    copy = Metric(family.name, family.documentation, family.type, family.unit)
    for sample in family.samples:
        copy.add_sample(sample.name, {**sample.labels, name: value}, sample.value)
    return copy


def families_to_json(families: Iterable[Metric]) -> list[dict[str, Any]]:
    """*families* as plain JSON-able data; timestamps and exemplars are left out."""
    return [
        {
            "name": f.name, "help": f.documentation, "type": f.type, "unit": f.unit,
            # JSON has no NaN or infinity; Python's float() reads their str() back.
            "samples": [[s.name, s.labels, s.value if math.isfinite(s.value) else str(s.value)]
                        for s in f.samples],
        }
        for f in families
    ]


def families_from_json(data: Iterable[Mapping[str, Any]]) -> list[Metric]:
    """The inverse of :func:`families_to_json`; raises ValueError or KeyError on bad input."""
    families = []
    for item in data:
        family = Metric(item["name"], item["help"], item["type"], item["unit"])
        for name, labels, value in item["samples"]:
            family.add_sample(str(name), {str(k): str(v) for k, v in labels.items()}, float(value))
        families.append(family)
    return families


def merge_families(groups: Iterable[Iterable[Metric]]) -> list[Metric]:
    """One family per name, holding every group's samples, in first-seen order.

    The exposition formats want each family's samples together, so the
    workers' copies of ``trioserve_connections`` become one family.
    """
    merged: dict[str, Metric] = {}
    for group in groups:
        for family in group:
            into = merged.get(family.name)
            if into is None:
                into = Metric(family.name, family.documentation, family.type, family.unit)
                merged[family.name] = into
            if into.type == family.type:
                into.samples.extend(family.samples)
    return list(merged.values())


def _families(server: Observed) -> list[Metric]:
    s = server.statistics()
    hub = s.hub
    # Summed here, at scrape time, so the send path keeps no server-wide total.
    queued_bytes = queued_frames = 0
    for conn in server.connections:
        queued_bytes += conn.queued_bytes
        queued_frames += conn.queued_frames

    current = {_WEBSOCKET: s.websocket_connections, _TCP: s.tcp_connections, "sse": s.sse_connections}
    extra = sorted(set(s.connects_total) - set(_TRANSPORTS))
    connections = GaugeMetricFamily("trioserve_connections", "Open client connections, by transport.",
                                    labels=["transport"])
    connects = CounterMetricFamily("trioserve_connects",
                                   "Client connections accepted since start, by transport.",
                                   labels=["transport"])
    for transport in (*_TRANSPORTS, *extra):
        connections.add_metric([transport], current.get(transport, 0))
        connects.add_metric([transport], s.connects_total.get(transport, 0))

    disconnects = CounterMetricFamily(
        "trioserve_disconnects",
        "Closed client connections since start, by close code "
        "(4008 slow consumer, 4002 heartbeat timeout, 1006 connection lost).",
        labels=["code"])
    for code in sorted(s.disconnects_total):
        disconnects.add_metric([str(code)], s.disconnects_total[code])

    latency = HistogramMetricFamily(
        "trioserve_fanout_latency_seconds",
        "Seconds from publish until the publication was handed to every subscriber's socket.",
        buckets=list(zip(_LATENCY_BOUNDS, hub.fanout_latency_buckets, strict=True)),
        sum_value=hub.fanout_latency_sum, unit="seconds")

    return [
        connections,
        connects,
        disconnects,
        CounterMetricFamily(
            "trioserve_slow_consumer_disconnects",
            "Connections closed with 4008 because their outbound queue overflowed.",
            value=s.disconnects_total.get(CloseCode.SLOW_CONSUMER, 0)),
        CounterMetricFamily(
            "trioserve_heartbeat_timeouts",
            "Connections closed with 4002 because nothing, not even a pong, came after a ping.",
            value=s.disconnects_total.get(CloseCode.HEARTBEAT_TIMEOUT, 0)),
        CounterMetricFamily(
            "trioserve_auth_failures",
            "Upgrades refused and connections closed for a missing, invalid or expired token.",
            value=s.auth_failures),
        CounterMetricFamily(
            "trioserve_rejected_connections",
            "Connections refused: over max_connections, over the fd budget, or draining.",
            value=s.rejected_connections),
        GaugeMetricFamily("trioserve_max_connections", "The connection limit in force.",
                          value=s.max_connections),
        GaugeMetricFamily("trioserve_draining", "1 while the server drains, else 0.",
                          value=int(s.draining)),
        GaugeMetricFamily("trioserve_topics", "Topics with at least one subscriber.", value=hub.topics),
        GaugeMetricFamily("trioserve_subscriptions", "Subscriptions (connection, topic pairs).",
                          value=hub.subscriptions),
        GaugeMetricFamily("trioserve_hub_pending", "Publications accepted and waiting for fan-out.",
                          value=hub.pending),
        CounterMetricFamily("trioserve_publications", "Publications accepted by the hub since start.",
                            value=hub.publications),
        CounterMetricFamily(
            "trioserve_deliveries",
            "Publications handed to subscribers since start (one per subscriber per publication).",
            value=hub.deliveries),
        CounterMetricFamily("trioserve_fanout_batches", "Fan-out batches run by the hub since start.",
                            value=hub.batches),
        GaugeMetricFamily("trioserve_queued_bytes",
                          "Bytes waiting in outbound queues, summed over connections.",
                          value=queued_bytes, unit="bytes"),
        GaugeMetricFamily("trioserve_queued_frames",
                          "Frames waiting in outbound queues, summed over connections.",
                          value=queued_frames),
        latency,
        *_backend_families(s),
    ]


def _backend_families(s: ServerStatistics) -> list[Metric]:
    """The proxy's and the webhooks' counters, when they are configured."""
    families: list[Metric] = []
    if s.proxy_calls:
        calls = CounterMetricFamily(
            "trioserve_proxy_calls",
            "Calls to the application's backend, by outcome: allowed, refused, or unavailable "
            "(unreachable, timed out, a bad answer, or over proxy_max_in_flight).", labels=["outcome"])
        for outcome, count in sorted(s.proxy_calls.items()):
            calls.add_metric([outcome], count)
        families.append(calls)
    if s.webhooks:
        w = s.webhooks
        families += [
            CounterMetricFamily("trioserve_webhook_events_delivered",
                                "Webhook events the receiver accepted (2xx).", value=w["delivered"]),
            CounterMetricFamily("trioserve_webhook_events_dropped",
                                "Webhook events dropped, oldest first, because the queue was full "
                                "(webhooks_queue_size).", value=w["dropped"]),
            CounterMetricFamily("trioserve_webhook_failed_posts",
                                "Webhook POSTs that failed and were retried.", value=w["failed_posts"]),
            GaugeMetricFamily("trioserve_webhook_events_queued",
                              "Webhook events waiting for delivery.", value=w["queued"]),
        ]
    return families
