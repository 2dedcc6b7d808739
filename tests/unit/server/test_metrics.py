"""The metrics module on its own: families from a server reduced to what they
read (``statistics()`` and ``connections``), the registry's hold on its server,
and the helpers that carry the workers' families to the scraped one.

tests/system/test_metrics.py scrapes a real server; test_workers.py merges two
workers' families. These are the rest of the module's contract.
"""

from __future__ import annotations

import gc
import json
import math
import os
import weakref
from typing import Any

import attrs
import pytest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from trioserve.push.hub import LATENCY_BUCKETS, HubStatistics
from trioserve.server import metrics
from trioserve.server.stats import ServerStatistics


@attrs.frozen
class Queue:
    queued_bytes: int
    queued_frames: int


class Observed:
    """A server as the metrics see it."""

    def __init__(self, stats: ServerStatistics, queues: tuple[Queue, ...] = ()):
        self.stats = stats
        self.connections = queues

    def statistics(self) -> ServerStatistics:
        return self.stats


def hub_stats(**changes: Any) -> HubStatistics:
    buckets = (0,) * (len(LATENCY_BUCKETS) + 1)
    fields: dict[str, Any] = {"topics": 0, "subscriptions": 0, "pending": 0, "publications": 0,
                              "deliveries": 0, "batches": 0, "closed": False,
                              "fanout_latency_buckets": buckets, "fanout_latency_sum": 0.0}
    return HubStatistics(**{**fields, **changes})


def server_stats(**changes: Any) -> ServerStatistics:
    fields: dict[str, Any] = {"connections": 0, "websocket_connections": 0, "tcp_connections": 0,
                              "max_connections": 100, "rejected_connections": 0, "connects_total": {},
                              "disconnects_total": {}, "auth_failures": 0, "draining": False,
                              "hub": hub_stats()}
    return ServerStatistics(**{**fields, **changes})


def samples(families: list[Metric]) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {(s.name, frozenset(s.labels.items())): s.value for f in families for s in f.samples}


def value(found: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return found[(name, frozenset(labels.items()))]


def collect(server: Observed) -> list[Metric]:
    return list(metrics.ServerCollector(server).collect())


def test_idle_server_reports_every_series_at_zero() -> None:
    # Series exist from the start, so rate() and alerts have something to read.
    found = samples(collect(Observed(server_stats())))
    for transport in ("websocket", "tcp"):
        assert value(found, "trioserve_connections", transport=transport) == 0
        assert value(found, "trioserve_connects_total", transport=transport) == 0
    for name in ("trioserve_slow_consumer_disconnects_total", "trioserve_heartbeat_timeouts_total",
                 "trioserve_auth_failures_total", "trioserve_rejected_connections_total",
                 "trioserve_queued_bytes", "trioserve_queued_frames", "trioserve_draining"):
        assert value(found, name) == 0, name
    assert not [key for key in found if key[0] == "trioserve_disconnects_total"]


def test_connections_and_disconnects_by_label() -> None:
    stats = server_stats(connections=5, websocket_connections=3, tcp_connections=1,
                         connects_total={"websocket": 10, "tcp": 4, "sse": 2},
                         disconnects_total={4008: 2, 1000: 7, 4002: 1}, auth_failures=3,
                         rejected_connections=6, draining=True)
    families = collect(Observed(stats))
    found = samples(families)
    # A transport the server does not know by name still gets its series.
    assert value(found, "trioserve_connects_total", transport="sse") == 2
    assert value(found, "trioserve_connections", transport="sse") == 0
    assert value(found, "trioserve_connections", transport="websocket") == 3
    disconnects = next(f for f in families if f.name == "trioserve_disconnects")
    by_code = [(s.labels["code"], s.value) for s in disconnects.samples]
    assert by_code == [("1000", 7), ("4002", 1), ("4008", 2)]
    assert value(found, "trioserve_slow_consumer_disconnects_total") == 2
    assert value(found, "trioserve_heartbeat_timeouts_total") == 1
    assert value(found, "trioserve_auth_failures_total") == 3
    assert value(found, "trioserve_rejected_connections_total") == 6
    assert value(found, "trioserve_max_connections") == 100
    assert value(found, "trioserve_draining") == 1


def test_hub_counters_queues_and_the_latency_histogram() -> None:
    buckets = tuple(range(1, len(LATENCY_BUCKETS) + 2))  # cumulative, as the hub keeps them
    hub = hub_stats(topics=2, subscriptions=9, pending=4, publications=50, deliveries=400, batches=7,
                    fanout_latency_buckets=buckets, fanout_latency_sum=0.25)
    server = Observed(server_stats(hub=hub), (Queue(100, 2), Queue(0, 0), Queue(28, 1)))
    found = samples(collect(server))
    gauges = ("topics", "subscriptions", "hub_pending")
    assert [value(found, f"trioserve_{name}") for name in gauges] == [2, 9, 4]
    assert value(found, "trioserve_publications_total") == 50
    assert value(found, "trioserve_deliveries_total") == 400
    assert value(found, "trioserve_fanout_batches_total") == 7
    # Summed over the connections at scrape time.
    assert (value(found, "trioserve_queued_bytes"), value(found, "trioserve_queued_frames")) == (128, 3)
    name = "trioserve_fanout_latency_seconds"
    le = [s for s in found if s[0] == f"{name}_bucket"]
    assert len(le) == len(LATENCY_BUCKETS) + 1
    assert value(found, f"{name}_bucket", le="0.0001") == 1  # Prometheus's float formatting
    assert value(found, f"{name}_bucket", le="2.5") == len(LATENCY_BUCKETS)
    assert value(found, f"{name}_bucket", le="+Inf") == value(found, f"{name}_count") == buckets[-1]
    assert value(found, f"{name}_sum") == 0.25


def test_the_registry_does_not_keep_its_server_alive() -> None:
    server = Observed(server_stats())
    registry = metrics.server_registry(server)
    assert metrics.server_registry(server) is registry
    assert metrics.server_registry(Observed(server_stats())) is not registry
    collector = metrics.ServerCollector(server)
    gone = weakref.ref(server)
    del server
    gc.collect()
    assert gone() is None
    assert list(collector.collect()) == []  # a collector outliving its server reports nothing


def test_worker_families_label_every_sample_and_add_the_pid() -> None:
    families = metrics.worker_families(Observed(server_stats()), "3")
    assert all(s.labels.get("worker") == "3" for f in families for s in f.samples)
    info = next(f for f in families if f.name == "trioserve_worker_info")
    assert [(s.labels, s.value) for s in info.samples] == [({"pid": str(os.getpid()), "worker": "3"}, 1)]
    assert {"trioserve_connections", "process_cpu_seconds"} <= {f.name for f in families}


def test_worker_up_is_one_per_worker_that_answered() -> None:
    family = metrics.worker_up_family({"1": True, "2": False})
    assert [(s.labels, s.value) for s in family.samples] == [({"worker": "1"}, 1), ({"worker": "2"}, 0)]


def test_with_label_copies_and_leaves_the_family_alone() -> None:
    family = CounterMetricFamily("c", "help", labels=["transport"])
    family.add_metric(["tcp"], 1)
    copy = metrics.with_label(family, "worker", "1")
    assert copy.samples[0].labels == {"transport": "tcp", "worker": "1"}
    assert family.samples[0].labels == {"transport": "tcp"}
    assert (copy.name, copy.type, copy.documentation) == ("c", "counter", "help")


def test_values_json_cannot_hold_survive_the_trip_between_workers() -> None:
    gauge = GaugeMetricFamily("g", "help", labels=["k"])
    for label, number in (("nan", math.nan), ("inf", math.inf), ("-inf", -math.inf), ("one", 1.5)):
        gauge.add_metric([label], number)
    data = json.loads(json.dumps(metrics.families_to_json([gauge]), allow_nan=False))
    (back,) = metrics.families_from_json(data)
    got = {s.labels["k"]: s.value for s in back.samples}
    assert math.isnan(got["nan"]) and got["inf"] == math.inf and got["-inf"] == -math.inf
    assert got["one"] == 1.5


@pytest.mark.parametrize(("bad", "error"), [
    ([{"name": "g", "help": "h", "type": "gauge", "unit": ""}], KeyError),
    ([{"name": "g", "help": "h", "type": "gauge", "unit": "", "samples": [["g", {}, "many"]]}], ValueError),
])
def test_families_from_json_refuses_bad_input(bad: list[dict[str, Any]], error: type[Exception]) -> None:
    with pytest.raises(error):
        metrics.families_from_json(bad)


def test_merge_keeps_the_first_type_seen_for_a_name() -> None:
    # A worker running other code could report a name with another type; the
    # exposition formats allow one type per family, so its samples are left out.
    counter = CounterMetricFamily("x", "help", value=1)
    gauge = GaugeMetricFamily("x", "help", value=2)
    (merged,) = metrics.merge_families([[counter], [gauge]])
    assert merged.type == "counter" and [s.value for s in merged.samples] == [1]
