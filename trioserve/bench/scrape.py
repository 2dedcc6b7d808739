"""The server's own figures: scrape ``GET /metrics`` and compare two scrapes.

Parsed with prometheus_client's text parser. A scrape is a flat dict from a
sample's name with its labels (``trioserve_disconnects_total{code="1001"}``)
to its value, so two scrapes subtract key by key.
"""

from __future__ import annotations

import asyncio
import math
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import urlsplit

from prometheus_client.parser import text_string_to_metric_families

Scrape = dict[str, float]

# (label, sample key, how): "delta" for counters, "gauge" shows before → after.
SERVER_ROWS: list[tuple[str, str, str]] = [
    ("connections (websocket)", 'trioserve_connections{transport="websocket"}', "gauge"),
    ("connections (tcp)", 'trioserve_connections{transport="tcp"}', "gauge"),
    ("connects (websocket)", 'trioserve_connects_total{transport="websocket"}', "delta"),
    ("connects (tcp)", 'trioserve_connects_total{transport="tcp"}', "delta"),
    ("rejected connections", "trioserve_rejected_connections_total", "delta"),
    ("slow-consumer disconnects", "trioserve_slow_consumer_disconnects_total", "delta"),
    ("heartbeat timeouts", "trioserve_heartbeat_timeouts_total", "delta"),
    ("publications (fanned out by the hubs)", "trioserve_publications_total", "delta"),
    ("deliveries", "trioserve_deliveries_total", "delta"),
    ("subscriptions", "trioserve_subscriptions", "gauge"),
    ("queued bytes", "trioserve_queued_bytes", "gauge"),
    ("resident memory (MiB)", "process_resident_memory_bytes", "gauge"),
    ("open fds", "process_open_fds", "gauge"),
    ("CPU seconds", "process_cpu_seconds_total", "delta"),
]


def metrics_url(url: str, override: str | None = None) -> str | None:
    """``ws://h:p/ws`` → ``http://h:p/metrics``; a TCP URL has no HTTP port to guess."""
    if override:
        return override
    parts = urlsplit(url)
    if parts.scheme in ("ws", "wss", "http", "https") and parts.hostname:
        scheme = "https" if parts.scheme in ("wss", "https") else "http"
        host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        return f"{scheme}://{host}:{parts.port or (443 if scheme == 'https' else 80)}/metrics"
    return None


# `serve --workers N` labels every series with its worker; the report wants the
# server as a whole, so samples differing only in this label are added up.
WORKER_LABEL = "worker"


def parse(text: str) -> Scrape:
    out: Scrape = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items())
                              if k != WORKER_LABEL)
            key = f"{sample.name}{{{labels}}}" if labels else sample.name
            out[key] = out.get(key, 0.0) + float(sample.value)
    return out


def workers(scrape: Scrape | None) -> int:
    """How many worker processes answered the scrape; 1 for a single-process server."""
    if scrape is None:
        return 0
    return int(scrape.get("trioserve_worker_up", 1))


def _get(url: str, timeout: float) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return str(response.read().decode("utf-8", "replace"))


async def scrape(url: str | None, timeout: float = 10.0) -> tuple[Scrape | None, str | None]:
    """(samples, None), or (None, why not)."""
    if url is None:
        return None, "no metrics URL (a tcp:// URL needs --metrics-url)"
    try:
        text = await asyncio.wait_for(asyncio.to_thread(_get, url, timeout), timeout + 1)
        return parse(text), None
    except urllib.error.HTTPError as exc:
        return None, f"{url}: HTTP {exc.code}"
    except (OSError, TimeoutError, ValueError) as exc:
        return None, f"{url}: {type(exc).__name__}: {exc}"[:200]


def compare(before: Scrape | None, after: Scrape | None, connected: int,
            deliveries: int, mid: Scrape | None = None) -> dict[str, Any]:
    """The rows of the report's server section, plus derived figures.

    *before* is scraped before connecting, *mid* once connected and settled
    (memory per connection: before → mid), *after* at the end (CPU per
    delivery: mid → after).
    """
    if before is None or after is None:
        return {}
    rows = []
    for label, key, how in SERVER_ROWS:
        b, a = before.get(key), after.get(key)
        if b is None and a is None:
            continue
        scale = 1 / 2**20 if key == "process_resident_memory_bytes" else 1.0
        row: dict[str, Any] = {"metric": label, "key": key, "kind": how,
                               "before": None if b is None else b * scale,
                               "after": None if a is None else a * scale}
        row["delta"] = None if a is None or b is None else (a - b) * scale
        rows.append(row)
    closes = {}
    for key, value in after.items():
        if key.startswith("trioserve_disconnects_total{"):
            code = key.split('"')[1]
            closes[code] = value - before.get(key, 0.0)
    out: dict[str, Any] = {"rows": rows, "disconnects_by_code": {k: v for k, v in closes.items() if v}}
    # Connecting is over by the middle scrape: CPU per delivery counts the scenario only.
    cpu = _delta(mid if mid is not None else before, after, "process_cpu_seconds_total")
    if cpu is not None and deliveries:
        out["server_cpu_us_per_delivery"] = cpu / deliveries * 1e6
    fan_n = _delta(before, after, "trioserve_fanout_latency_seconds_count")
    fan_s = _delta(before, after, "trioserve_fanout_latency_seconds_sum")
    if fan_n and fan_s is not None:
        out["fanout_latency_mean_ms"] = fan_s / fan_n * 1e3
        for q in (0.5, 0.99):
            bound = bucket_quantile(before, after, "trioserve_fanout_latency_seconds", q)
            out[f"fanout_latency_p{round(q * 100)}_le_ms"] = None if bound is None else bound * 1e3
    out["workers"] = workers(after)
    rss = _delta(before, mid if mid is not None else after, "process_resident_memory_bytes")
    if rss is not None and connected:
        out["server_rss_per_conn_kb"] = rss / connected / 1024
    return out


def bucket_quantile(before: Scrape, after: Scrape, name: str, q: float) -> float | None:
    """The upper bound of the histogram bucket holding quantile *q* of the new observations.

    Prometheus buckets are coarse (``LATENCY_BUCKETS`` in trioserve/hub.py), so this
    says "at most X", which is what a target like p99 ≤ 1 s needs. None when
    nothing was observed, inf when the quantile is past the last bound.
    """
    prefix = f'{name}_bucket{{le="'
    bounds: list[tuple[float, float]] = sorted(
        (float(key[len(prefix):-2]), value - before.get(key, 0.0))
        for key, value in after.items() if key.startswith(prefix))
    if not bounds or bounds[-1][1] <= 0:
        return None
    want = q * bounds[-1][1]
    for upper, cumulative in bounds:
        if cumulative >= want:
            return upper
    return math.inf


def _delta(before: Scrape, after: Scrape, key: str) -> float | None:
    if key in before and key in after:
        return after[key] - before[key]
    return None
