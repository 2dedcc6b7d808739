"""Summaries, ratios and output (table, JSON, markdown) for ``fanout.py``.

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

__all__ = ["command_line", "fmt", "json_safe", "latency_stats", "machine_info", "notes", "percentile",
           "ratios", "render_markdown", "render_text", "summarize", "table_rows", "write_json",
           "write_markdown"]

BASELINE = "websockets"


def median_of(bursts: list[dict[str, Any]], key: Callable[[dict[str, Any]], float | None]) -> float | None:
    values = [v for v in (key(b) for b in bursts) if v is not None and not math.isnan(v)]
    return statistics.median(values) if values else None


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """Headline numbers of one server: medians over bursts, totals for losses."""
    bursts = result.get("bursts", [])
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
        "bursts": len(bursts),
        "bursts_incomplete": sum(1 for b in bursts if b["lost"] or b["worker_status"] != ["ok"]),
        "deliveries_per_s": median_of(bursts, lambda b: b["deliveries_per_s"]),
        "server_cpu_us_per_delivery": median_of(bursts, lambda b: b["server_cpu_us_per_delivery"]),
        "client_cpu_us_per_delivery": median_of(bursts, lambda b: b["client_cpu_us_per_delivery"]),
        "p50_ms": median_of(bursts, lambda b: b["latency"]["p50_ms"]),
        "p99_ms": median_of(bursts, lambda b: b["latency"]["p99_ms"]),
        "max_ms": median_of(bursts, lambda b: b["latency"]["max_ms"]),
        "expected": sum(b["expected"] for b in bursts),
        "lost": sum(b["lost"] for b in bursts),
        "gaps": sum(b["gaps"] for b in bursts),
        "dups": sum(b["dups"] for b in bursts),
    }


def ratio(value: float | None, base: float | None) -> float | None:
    if value is None or base is None or base == 0:
        return None
    return value / base


def ratios(summaries: list[dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """Each server against websockets measured in the same run."""
    base = next((s for s in summaries if s["server"] == BASELINE), None)
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
        }
    return out


# -- rendering -------------------------------------------------------------------

ROWS: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
    ("subscribers connected", lambda s: f"{s['connected']:,}" + (
        f" ({s['connect_failed']:,} failed)" if s["connect_failed"] else "")),
    ("handshakes/s (upgrade+subscribe)", lambda s: fmt(s["handshakes_per_s"])),
    ("server CPU us/handshake", lambda s: fmt(s["server_cpu_us_per_handshake"], ".0f")),
    ("server RSS per idle conn (KB)", lambda s: fmt(s["rss_per_conn_kb"], ".1f")),
    ("deliveries/s (median)", lambda s: fmt(s["deliveries_per_s"])),
    ("server CPU us/delivery (median)", lambda s: fmt(s["server_cpu_us_per_delivery"], ".2f")),
    ("client CPU us/delivery (median)", lambda s: fmt(s["client_cpu_us_per_delivery"], ".2f")),
    ("latency p50 ms (median)", lambda s: fmt(s["p50_ms"], ".1f")),
    ("latency p99 ms (median)", lambda s: fmt(s["p99_ms"], ".1f")),
    ("latency max ms (median)", lambda s: fmt(s["max_ms"], ".1f")),
    ("lost / expected (all bursts)", lambda s: f"{s['lost']:,} / {s['expected']:,}"),
    ("offset gaps / dups", lambda s: f"{s['gaps']:,} / {s['dups']:,}"),
    ("bursts (incomplete)", lambda s: f"{s['bursts']} ({s['bursts_incomplete']})"),
]

RATIO_ROWS = [
    ("deliveries/s ratio (higher=better)", "deliveries_per_s"),
    ("server CPU/delivery ratio (lower=better)", "server_cpu_us_per_delivery"),
    ("RSS/conn ratio (lower=better)", "rss_per_conn_kb"),
    ("handshakes/s ratio (higher=better)", "handshakes_per_s"),
    ("server CPU/handshake ratio (lower=better)", "server_cpu_us_per_handshake"),
]


def table_rows(summaries: list[dict[str, Any]], rats: dict[str, dict[str, float | None]]) -> list[list[str]]:
    rows = [["metric", *(s["server"] for s in summaries)]]
    for label, render in ROWS:
        rows.append([label, *(render(s) for s in summaries)])
    if rats:
        for label, key in RATIO_ROWS:
            rows.append([f"vs {BASELINE}: {label}",
                         *(fmt(rats.get(s["server"], {}).get(key), "#.3g", "x") for s in summaries)])
    rows.append(["status", *(short_status(s["status"]) for s in summaries)])
    return rows


def short_status(status: str) -> str:
    """A table cell; the full text goes to the notes under the table."""
    return status if status == "ok" else status.split(":", 1)[0][:24] + " (see notes)"


def notes(summaries: list[dict[str, Any]]) -> list[str]:
    return [f"{s['server']}: {s['status']}" for s in summaries if s["status"] != "ok"]


def render_markdown(rows: list[list[str]], notes: list[str], command: str,
                    machine: dict[str, Any], config: dict[str, Any]) -> str:
    def md_row(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    libs = ", ".join(f"{k} {v}" for k, v in machine["libraries"].items())
    out = [
        f"## Fan-out benchmark ({machine['date_utc']})",
        "",
        f"{config['subscribers']:,} subscribers on one topic, bursts of {config['publications']} "
        f"publications with {config['size']}-byte data from one publisher connection; "
        f"{config['bursts']} bursts per server, medians reported. Load client: "
        f"{config['client_procs']} asyncio processes, {config['connect_concurrency']} connects "
        f"in flight each. See `benchmarks/README.md` for how each number is measured.",
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
