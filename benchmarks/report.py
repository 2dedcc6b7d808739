"""Summaries, ratios and output (table, JSON, markdown) for ``fanout.py``, both modes.

Pure functions over the result dicts the orchestrator builds, so the
formatting can be read (and changed) without touching the measuring code.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Shared with `trioserve bench` (moved to trioserve/bench/output.py).
from trioserve.bench.output import (
    command_line,
    fmt,
    json_safe,
    latency_stats,
    machine_info,
    percentile,
    render_text,
    write_json,
)

__all__ = ["command_line", "fmt", "json_safe", "kept_up_text", "latency_stats", "machine_info", "notes",
           "percentile", "rate_notes", "rate_ratios", "rate_table_rows", "ratios", "render_markdown",
           "render_text", "summarize", "summarize_rate", "table_rows", "write_json", "write_markdown"]

BASELINE = "websockets"
#: The second anchor of the rooms scenario: a Go gorilla/websocket hub.
GO_HUB = "go-hub"
#: trioserve with the Redis broker is also compared with trioserve (memory broker).
MEMORY, REDIS = "trioserve", "trioserve-redis"


def median_of(bursts: list[dict[str, Any]], key: Callable[[dict[str, Any]], float | None]) -> float | None:
    values = [v for v in (key(b) for b in bursts) if v is not None and not math.isnan(v)]
    return statistics.median(values) if values else None


def connect_summary(result: dict[str, Any]) -> dict[str, Any]:
    """The connect phase and memory figures, which both modes measure the same way."""
    connect = result.get("connect") or {}
    rss_before, rss_after = result.get("rss_before"), result.get("rss_after")
    connected = connect.get("ok", 0)
    rss_per_conn = None
    if rss_before is not None and rss_after is not None and connected:
        rss_per_conn = (rss_after - rss_before) / connected / 1024
    return {
        "server": result["server"],
        "status": result["status"],
        "connected": connected,
        "connect_failed": connect.get("failed"),
        "handshakes_per_s": connect.get("rate"),
        "server_cpu_us_per_handshake": connect.get("server_cpu_us_per_handshake"),
        "rss_per_conn_kb": rss_per_conn,
    }


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """Headline numbers of one server: medians over bursts, totals for losses."""
    bursts = result.get("bursts", [])
    return {
        **connect_summary(result),
        "bursts": len(bursts),
        "bursts_incomplete": sum(1 for b in bursts if b["lost"] or b["worker_status"] != ["ok"]),
        "deliveries_per_s": median_of(bursts, lambda b: b["deliveries_per_s"]),
        "server_cpu_us_per_delivery": median_of(bursts, lambda b: b["server_cpu_us_per_delivery"]),
        "broker_cpu_us_per_delivery": median_of(bursts, lambda b: b.get("broker_cpu_us_per_delivery")),
        "server_broker_cpu_us_per_delivery": median_of(
            bursts, lambda b: b.get("server_broker_cpu_us_per_delivery")),
        "fanout_batches": median_of(bursts, lambda b: b.get("fanout_batches")),
        "client_cpu_us_per_delivery": median_of(bursts, lambda b: b["client_cpu_us_per_delivery"]),
        "p50_ms": median_of(bursts, lambda b: b["latency"]["p50_ms"]),
        "p99_ms": median_of(bursts, lambda b: b["latency"]["p99_ms"]),
        "max_ms": median_of(bursts, lambda b: b["latency"]["max_ms"]),
        "expected": sum(b["expected"] for b in bursts),
        "lost": sum(b["lost"] for b in bursts),
        "gaps": sum(b["gaps"] for b in bursts),
        "dups": sum(b["dups"] for b in bursts),
        "wire_bytes_per_delivery": median_of(bursts, lambda b: b.get("wire_bytes_per_delivery")),
        "wire_ratio": median_of(bursts, lambda b: b.get("wire_ratio")),
        "lossy_topics": sum(b.get("lossy_topics", 0) for b in bursts),
    }


LATENCY_KEYS = ("p50_ms", "p90_ms", "p99_ms", "p99_9_ms", "max_ms")


def summarize_rate(result: dict[str, Any]) -> dict[str, Any]:
    """Headline numbers of one server's rate phase (all None if it never ran)."""
    r = result.get("rate_phase") or {}
    lat = r.get("latency") or {}
    return {
        **connect_summary(result),
        "publications_planned": r.get("publications_planned"),
        "publications_sent": r.get("publications_sent"),
        "send_rate": r.get("send_rate"),
        "send_lag_max_ms": r.get("send_lag_max_ms"),
        "expected": r.get("expected", 0),
        "received": r.get("received", 0),
        "lost": r.get("lost", 0),
        "gaps": r.get("gaps", 0),
        "dups": r.get("dups", 0),
        "lossy_topics": r.get("lossy_topics", 0),
        "worker_status": r.get("worker_status", []),
        **{k: lat.get(k) for k in LATENCY_KEYS},
        "server_cpu_us_per_delivery": r.get("server_cpu_us_per_delivery"),
        "broker_cpu_us_per_delivery": r.get("broker_cpu_us_per_delivery"),
        "server_broker_cpu_us_per_delivery": r.get("server_broker_cpu_us_per_delivery"),
        "client_cpu_us_per_delivery": r.get("client_cpu_us_per_delivery"),
        "kept_up": r.get("kept_up"),
        "backlog_s": r.get("backlog_s"),
    }


def ratio(value: float | None, base: float | None) -> float | None:
    if value is None or base is None or base == 0:
        return None
    return value / base


BROKER_RATIO_KEYS = ("server_broker_cpu_us_per_delivery", "p99_ms", "deliveries_per_s")


def broker_ratios(summaries: list[dict[str, Any]],
                  keys: tuple[str, ...] = BROKER_RATIO_KEYS) -> dict[str, float | None]:
    """trioserve-redis against trioserve (memory broker) in the same run; {} unless both ran."""
    by_name = {s["server"]: s for s in summaries}
    if MEMORY not in by_name or REDIS not in by_name:
        return {}
    redis, memory = by_name[REDIS], by_name[MEMORY]
    return {k: ratio(redis.get(k), memory.get(k)) for k in keys}


def ratios(summaries: list[dict[str, Any]], baseline: str = BASELINE) -> dict[str, dict[str, float | None]]:
    """Each server against *baseline* (websockets) measured in the same run."""
    base = next((s for s in summaries if s["server"] == baseline), None)
    if base is None:
        return {}
    out = {}
    for s in summaries:
        out[s["server"]] = {
            "deliveries_per_s": ratio(s["deliveries_per_s"], base["deliveries_per_s"]),
            "server_cpu_us_per_delivery": ratio(s["server_cpu_us_per_delivery"],
                                                base["server_cpu_us_per_delivery"]),
            "rss_per_conn_kb": ratio(s["rss_per_conn_kb"], base["rss_per_conn_kb"]),
            "handshakes_per_s": ratio(s["handshakes_per_s"], base["handshakes_per_s"]),
            "server_cpu_us_per_handshake": ratio(s["server_cpu_us_per_handshake"],
                                                 base["server_cpu_us_per_handshake"]),
            "p99_ms": ratio(s["p99_ms"], base["p99_ms"]),
        }
    return out


RATE_RATIO_KEYS = ("p50_ms", "p99_ms", "server_cpu_us_per_delivery")


def rate_ratios(summaries: list[dict[str, Any]],
                baseline: str = BASELINE) -> dict[str, dict[str, float | None]]:
    """Rate mode: latency and CPU per delivery against *baseline* (websockets) in the same run."""
    base = next((s for s in summaries if s["server"] == baseline), None)
    if base is None:
        return {}
    return {s["server"]: {k: ratio(s[k], base[k]) for k in RATE_RATIO_KEYS} for s in summaries}


# -- rendering -------------------------------------------------------------------

Row = tuple[str, Callable[[dict[str, Any]], str]]

CONNECT_ROWS: list[Row] = [
    ("subscribers connected", lambda s: f"{s['connected']:,}" + (
        f" ({s['connect_failed']:,} failed)" if s["connect_failed"] else "")),
    ("handshakes/s (upgrade+subscribe)", lambda s: fmt(s["handshakes_per_s"])),
    ("server CPU us/handshake", lambda s: fmt(s["server_cpu_us_per_handshake"], ".0f")),
    ("server RSS per idle conn (KB)", lambda s: fmt(s["rss_per_conn_kb"], ".1f")),
]

ROWS: list[Row] = [
    *CONNECT_ROWS,
    ("deliveries/s (median)", lambda s: fmt(s["deliveries_per_s"])),
    ("server CPU us/delivery (median)", lambda s: fmt(s["server_cpu_us_per_delivery"], ".2f")),
    ("its redis-server CPU us/delivery (median)", lambda s: fmt(s["broker_cpu_us_per_delivery"], ".3f")),
    ("server + redis-server CPU us/delivery (median)",
     lambda s: fmt(s["server_broker_cpu_us_per_delivery"], ".2f")),
    ("fan-out batches per burst (median)", lambda s: fmt(s["fanout_batches"], ".1f")),
    ("client CPU us/delivery (median)", lambda s: fmt(s["client_cpu_us_per_delivery"], ".2f")),
    ("bytes read per delivery (median)", lambda s: fmt(s.get("wire_bytes_per_delivery"), ".0f")),
    ("wire / uncompressed bytes (median)", lambda s: fmt(s.get("wire_ratio"), ".3f")),
    ("latency p50 ms (median)", lambda s: fmt(s["p50_ms"], ".1f")),
    ("latency p99 ms (median)", lambda s: fmt(s["p99_ms"], ".1f")),
    ("latency max ms (median)", lambda s: fmt(s["max_ms"], ".1f")),
    ("lost / expected (all bursts)", lambda s: f"{s['lost']:,} / {s['expected']:,}"),
    ("offset gaps / dups", lambda s: f"{s['gaps']:,} / {s['dups']:,}"),
    ("topics with loss (all bursts)", lambda s: f"{s['lossy_topics']:,}"),
    ("bursts (incomplete)", lambda s: f"{s['bursts']} ({s['bursts_incomplete']})"),
]

RATIO_ROWS = [
    ("deliveries/s ratio (higher=better)", "deliveries_per_s"),
    ("server CPU/delivery ratio (lower=better)", "server_cpu_us_per_delivery"),
    ("latency p99 ratio (lower=better)", "p99_ms"),
    ("RSS/conn ratio (lower=better)", "rss_per_conn_kb"),
    ("handshakes/s ratio (higher=better)", "handshakes_per_s"),
    ("server CPU/handshake ratio (lower=better)", "server_cpu_us_per_handshake"),
]


BROKER_RATIO_ROWS = [
    ("server+redis CPU/delivery (lower=better)", "server_broker_cpu_us_per_delivery"),
    ("latency p99 ratio (lower=better)", "p99_ms"),
    ("deliveries/s ratio (higher=better)", "deliveries_per_s"),
]


def kept_up_text(r: dict[str, Any]) -> str:
    """Whether the server kept up with the rate, and the time from last publication to last delivery."""
    backlog = fmt(r["backlog_s"], ".3f", " s")
    if r["kept_up"] is None:
        return "n/a"
    if r["kept_up"]:
        return f"yes ({backlog})"
    if r["worker_status"] != ["ok"] or r["lost"]:
        return f"no: {','.join(r['worker_status']) or 'not run'} ({r['lost']:,} undelivered)"
    return f"fell behind ({backlog})"


RATE_ROWS: list[Row] = [
    *CONNECT_ROWS,
    ("publications sent / planned", lambda s: f"{fmt(s['publications_sent'])} / "
                                              f"{fmt(s['publications_planned'])}"),
    ("publish rate achieved (msg/s)", lambda s: fmt(s["send_rate"], ".2f")),
    ("deliveries expected", lambda s: f"{s['expected']:,}"),
    ("deliveries received", lambda s: f"{s['received']:,}"),
    ("deliveries lost", lambda s: f"{s['lost']:,}"),
    ("topics with loss", lambda s: f"{s['lossy_topics']:,}"),
    ("offset gaps / dups", lambda s: f"{s['gaps']:,} / {s['dups']:,}"),
    ("latency p50 ms", lambda s: fmt(s["p50_ms"], ".1f")),
    ("latency p90 ms", lambda s: fmt(s["p90_ms"], ".1f")),
    ("latency p99 ms", lambda s: fmt(s["p99_ms"], ".1f")),
    ("latency p99.9 ms", lambda s: fmt(s["p99_9_ms"], ".1f")),
    ("latency max ms", lambda s: fmt(s["max_ms"], ".1f")),
    ("server CPU us/delivery", lambda s: fmt(s["server_cpu_us_per_delivery"], ".2f")),
    ("its redis-server CPU us/delivery", lambda s: fmt(s["broker_cpu_us_per_delivery"], ".3f")),
    ("server + redis-server CPU us/delivery", lambda s: fmt(s["server_broker_cpu_us_per_delivery"], ".2f")),
    ("client CPU us/delivery", lambda s: fmt(s["client_cpu_us_per_delivery"], ".2f")),
    ("kept up (last delivery - last pub)", kept_up_text),
]

RATE_RATIO_ROWS = [
    ("latency p50 ratio (lower=better)", "p50_ms"),
    ("latency p99 ratio (lower=better)", "p99_ms"),
    ("server CPU/delivery ratio (lower=better)", "server_cpu_us_per_delivery"),
]


def table_rows(summaries: list[dict[str, Any]], rats: dict[str, dict[str, float | None]],
               rows_spec: list[Row] = ROWS,
               ratio_rows: list[tuple[str, str]] = RATIO_ROWS,
               go_rats: dict[str, dict[str, float | None]] | None = None) -> list[list[str]]:
    rows = [["metric", *(s["server"] for s in summaries)]]
    for label, render in rows_spec:
        rows.append([label, *(render(s) for s in summaries)])
    for anchor, anchor_rats in ((BASELINE, rats), (GO_HUB, go_rats or {})):
        if anchor_rats:
            for label, key in ratio_rows:
                rows.append([f"vs {anchor}: {label}",
                             *(fmt(anchor_rats.get(s["server"], {}).get(key), "#.3g", "x")
                               for s in summaries)])
    broker = broker_ratios(summaries)
    for label, key in BROKER_RATIO_ROWS:
        if key in broker:
            rows.append([f"vs {MEMORY}: {label}",
                         *(fmt(broker[key], "#.3g", "x") if s["server"] == REDIS else "" for s in summaries)])
    rows.append(["status", *(short_status(s["status"]) for s in summaries)])
    return rows


def short_status(status: str) -> str:
    """A table cell; the full text goes to the notes under the table."""
    return status if status == "ok" else status.split(":", 1)[0][:24] + " (see notes)"


def rate_table_rows(summaries: list[dict[str, Any]], rats: dict[str, dict[str, float | None]],
                    go_rats: dict[str, dict[str, float | None]] | None = None) -> list[list[str]]:
    return table_rows(summaries, rats, RATE_ROWS, RATE_RATIO_ROWS, go_rats)


def notes(summaries: list[dict[str, Any]]) -> list[str]:
    return [f"{s['server']}: {s['status']}" for s in summaries if s["status"] != "ok"] + \
        workers_notes(summaries) + deflate_notes(summaries)


#: permessage-deflate's targets (issue 13): wire bytes of ~1 KB JSON publications,
#: server CPU per delivery against uncompressed trioserve, RSS per idle connection.
DEFLATE_WIRE_TARGET = 0.4
DEFLATE_CPU_TARGET = 1.3
DEFLATE_RSS_TARGET_KB = 9.0
#: Messages smaller than this (frame included) are not what the wire target is about.
DEFLATE_TARGET_MIN_BYTES = 512


def deflate_notes(summaries: list[dict[str, Any]]) -> list[str]:
    """``trioserve-deflate`` against ``trioserve`` in the same run."""
    by_name = {s["server"]: s for s in summaries}
    plain, packed = by_name.get("trioserve"), by_name.get("trioserve-deflate")
    if packed is None:
        return []
    out = []
    wire = packed.get("wire_ratio")
    per = packed.get("wire_bytes_per_delivery")
    if wire is not None and per is not None and per / wire < DEFLATE_TARGET_MIN_BYTES:
        out.append(f"trioserve-deflate: publications of {per / wire:.0f} B on the wire uncompressed are "
                   "under the compression threshold and go uncompressed; the wire target is for "
                   "~1 KB JSON (--size 1000 --payload json)")
    elif wire is not None:
        out.append(f"trioserve-deflate: wire bytes {wire:.3f}x of uncompressed (target <= "
                   f"{DEFLATE_WIRE_TARGET}x): {'met' if wire <= DEFLATE_WIRE_TARGET else 'MISSED'}")
    rss = packed.get("rss_per_conn_kb")
    if rss is not None:
        out.append(f"trioserve-deflate: RSS per idle connection {rss:.1f} KB (target <= "
                   f"{DEFLATE_RSS_TARGET_KB} KB): {'met' if rss <= DEFLATE_RSS_TARGET_KB else 'MISSED'}")
    if plain is not None:
        cpu = ratio(packed["server_cpu_us_per_delivery"], plain["server_cpu_us_per_delivery"])
        if cpu is not None:
            out.append(f"trioserve-deflate vs trioserve: server CPU per delivery {cpu:.2f}x (target <= "
                       f"{DEFLATE_CPU_TARGET}x): {'met' if cpu <= DEFLATE_CPU_TARGET else 'MISSED'}")
    return out


#: The embedded broker's target: all its processes together per delivery, against one process.
WORKERS_CPU_TARGET = 1.3


def workers_notes(summaries: list[dict[str, Any]]) -> list[str]:
    """``trioserve-workers2`` against ``trioserve`` in the same run: server CPU per
    delivery summed over the supervisor and both workers, and what was lost."""
    by_name = {s["server"]: s for s in summaries}
    single, workers = by_name.get("trioserve"), by_name.get("trioserve-workers2")
    if single is None or workers is None:
        return []
    cpu = ratio(workers["server_cpu_us_per_delivery"], single["server_cpu_us_per_delivery"])
    if cpu is None:
        return ["trioserve-workers2 vs trioserve: no CPU ratio (a server has no bursts)"]
    verdict = "met" if cpu <= WORKERS_CPU_TARGET and not workers["lost"] else "MISSED"
    return [f"trioserve-workers2 vs trioserve: server CPU per delivery {cpu:.2f}x "
            f"(all processes; target <= {WORKERS_CPU_TARGET}x), lost {workers['lost']:,}: {verdict}"]


# A publisher this late is no longer the steady rate asked for.
SEND_LAG_NOTE_MS = 50.0


def rate_notes(summaries: list[dict[str, Any]], kept_up_within: float) -> list[str]:
    out = notes(summaries)
    for s in summaries:
        backlog = s["backlog_s"]
        if backlog is not None and backlog > kept_up_within:
            out.append(f"{s['server']}: fell behind: its last delivery came {backlog:.2f} s after "
                       f"the last publication (limit {kept_up_within:g} s)")
        if s["kept_up"] is False and (s["lost"] or s["worker_status"] != ["ok"]):
            out.append(f"{s['server']}: {s['lost']:,} of {s['expected']:,} deliveries missing when "
                       f"the phase ended ({', '.join(s['worker_status']) or 'not run'})")
        lag = s["send_lag_max_ms"]
        if lag is not None and lag > SEND_LAG_NOTE_MS:
            out.append(f"{s['server']}: the publisher sent up to {lag:.0f} ms behind its schedule "
                       f"(the harness was busy); latency counts from the actual send")
    return out


def intro(config: dict[str, Any], date: str) -> list[str]:
    """The markdown's opening: what was measured, in the run's own numbers."""
    client = (f"Load client: {config['client_procs']} processes on {config.get('client_loop', 'asyncio')}, "
              f"{config['connect_concurrency']} connects in flight each. See `benchmarks/README.md` "
              f"for how each number is measured.")
    topics = config.get("topics", 1)
    where = "on one topic" if topics == 1 else (
        f"over {topics:,} topics ({config['subscribers'] // topics:,} per topic), publications "
        f"spread evenly over the topics")
    if config.get("mode", "burst") == "rate":
        return [
            f"## Fan-out latency at a fixed rate ({date})",
            "",
            f"{config['subscribers']:,} subscribers {where}; one publisher connection sends "
            f"{config['rate']:g} publications/s with {config['size']}-byte data for "
            f"{config['duration']:g} s ({config['rate_publications']:,} publications) on a fixed "
            f"schedule, each stamped with its send time. Latency percentiles are over every "
            f"delivery; CPU per delivery is from the first publication to the last delivery. Kept "
            f"up: the last delivery came within {config['kept_up_within']:g} s of the last "
            f"publication. {client}",
        ]
    return [
        f"## Fan-out benchmark ({date})",
        "",
        f"{config['subscribers']:,} subscribers {where}; bursts of {config['publications']:,} "
        f"publications with {config['size']}-byte data from one publisher connection; "
        f"{config['bursts']} bursts per server, medians reported. {client}",
    ]


def render_markdown(rows: list[list[str]], notes: list[str], command: str,
                    machine: dict[str, Any], config: dict[str, Any]) -> str:
    def md_row(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    libs = ", ".join(f"{k} {v}" for k, v in machine["libraries"].items())
    out = [
        *intro(config, machine["date_utc"]),
        "",
        md_row(rows[0]),
        md_row(["---"] + ["---:"] * (len(rows[0]) - 1)),
        *(md_row(r) for r in rows[1:]),
        "",
        *(f"- {note}" for note in notes),
        *([""] if notes else []),
        "Command:",
        "",
        "```",
        command,
        "```",
        "",
        f"Machine: `nproc` = {machine['nproc']}, {machine['cpu_model']}, "
        f"{machine['memory_gib']} GiB RAM, Linux {machine['kernel']}, {machine['python']}; "
        f"load average at start {', '.join(f'{x:.2f}' for x in machine['loadavg_at_start'])}. "
        f"Server and load client share these cores (loopback only).",
        "",
        f"Libraries: {libs}.",
        "",
    ]
    return "\n".join(out)


def write_markdown(path: str, text: str) -> None:
    Path(path).write_text(text)
