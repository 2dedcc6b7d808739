"""``trioserve bench``'s result: build it from the raw run, judge it, print it.

:func:`build` turns what the orchestrator gathered into the report dict (the
``--json`` file is exactly that), :func:`verdict` applies the gates
(``--max-p99``, ``--max-loss``, ``--max-connect-failures``, connections
closed under the client), and :func:`render` prints it as tables.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import TYPE_CHECKING, Any

from rich import box
from rich.console import Console
from rich.table import Table

from . import hist, scrape
from .output import fmt, machine_info

if TYPE_CHECKING:
    from .options import Options

BENCH_LIBRARIES = ("trio", "wsproto", "orjson", "hdrhistogram", "rich", "prometheus-client")


def options_dict(opts: Options) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(opts).items() if k != "target"}


def _merge_counts(dicts: list[dict[str, int]]) -> dict[str, int]:
    total: Counter[str] = Counter()
    for d in dicts:
        total.update(d)
    return dict(total.most_common())


def build(opts: Options, raw: dict[str, Any]) -> dict[str, Any]:
    collected: list[dict[str, Any]] = raw["collected"]
    connect = raw["connect"]
    merged = hist.merge(c["hist"] for c in collected)
    out: dict[str, Any] = {
        "scenario": opts.scenario,
        "options": raw["options"],
        "machine": machine_info(BENCH_LIBRARIES),
        "connect": connect,
        "connections": {
            "open_at_end": sum(c["open"] for c in collected),
            "closed_by_reason": _merge_counts([c["closed_by_reason"] for c in collected]),
        },
        "latency": {"kind": "round trip" if opts.scenario == "echo" else "delivery",
                    **hist.summary(merged)},
        "latency_curve": hist.percentile_curve(merged),
        "errors": _merge_counts([c["errors"] for c in collected] + [raw.get("publishers", {})
                                                                    .get("errors", {})]),
        "scenario_seconds": raw.get("scenario_seconds"),
        "client_loop": raw.get("client_loop"),
        "timeline": raw["timeline"],
    }
    deliveries = 0
    if opts.scenario in ("fanout", "storm", "rooms"):
        out["messages"] = messages(raw, collected)
        deliveries = out["messages"]["received"]
    if opts.scenario == "storm":
        waves = raw.get("storm_waves", [])
        out["storm"] = {"waves": waves, **{k: sum(w[k] for w in waves) for k in
                                          ("dropped", "reconnected", "failed", "recovered", "unrecovered")}}
    if opts.scenario == "echo":
        sent = sum(c["echo_sent"] for c in collected)
        ok = sum(c["echo_ok"] for c in collected)
        out["echo"] = {"sent": sent, "replies": ok, "lost": sent - ok,
                       "loss_fraction": (sent - ok) / sent if sent else 0.0,
                       "round_trips_per_s": ok / opts.duration if opts.duration else None}
        deliveries = ok
    # The load client's CPU from connected to collected: compare it with the server's.
    out["client_cpu_s"] = raw.get("client_cpu_s")
    out["client_cpu_us_per_op"] = raw["client_cpu_s"] / deliveries * 1e6 \
        if deliveries and raw.get("client_cpu_s") is not None else None
    metrics = raw.get("metrics") or {}
    server = scrape.compare(metrics.get("before"), metrics.get("after"), connect["ok"], deliveries,
                            mid=metrics.get("mid"))
    out["server"] = {"url": metrics.get("url"), "error": raw.get("metrics_error"), **server}
    out["verdict"] = verdict(opts, out)
    return out


def messages(raw: dict[str, Any], collected: list[dict[str, Any]]) -> dict[str, Any]:
    pubs = raw["publishers"]
    per_topic = []
    totals: Counter[str] = Counter()
    for topic, p in pubs["per_topic"].items():
        t: Counter[str] = Counter()
        for c in collected:
            t.update(c["topics"].get(topic, {}))
        t["last_max"] = max((c["topics"].get(topic, {}).get("last_max", 0) for c in collected), default=0)
        final = max(p["last_offset"] or 0, t["last_max"])
        expected = t["subscribers"] * final - t["start_sum"]
        row = {"topic": topic, "published": p["acked"], "first_offset": p["first_offset"],
               "final_offset": final, "subscribers": t["subscribers"], "expected": expected,
               "received": t["received"], "lost": expected - t["received"], "gaps": t["gaps"],
               "dups": t["dups"], "recovered": t["recovered"], "unrecovered": t["unrecovered"]}
        per_topic.append(row)
        for key in ("published", "expected", "received", "lost", "gaps", "dups", "recovered",
                    "unrecovered", "subscribers"):
            totals[key] += row[key]
    last_recv = max((c.get("last_recv", 0.0) for c in collected), default=0.0)
    first = raw.get("first_send")
    span = last_recv - first if first and last_recv > first else None
    expected = totals["expected"]
    return {
        "publish_attempted": pubs["attempted"],
        **dict(totals),
        "loss_fraction": totals["lost"] / expected if expected else 0.0,
        "deliveries_per_s": totals["received"] / span if span else None,
        "delivery_seconds": span,
        "behind_after_drain": raw.get("behind_after_drain", 0),
        "per_topic": per_topic,
    }


def verdict(opts: Options, r: dict[str, Any]) -> dict[str, Any]:
    failures = []
    connect = r["connect"]
    if connect["failed"] > opts.max_connect_failures:
        failures.append(f"{connect['failed']:,} connections failed (allowed: {opts.max_connect_failures:,})")
    closed = sum(r["connections"]["closed_by_reason"].values())
    if closed:
        failures.append(f"{closed:,} connections were closed during the run")
    loss = r.get("messages") or r.get("echo")
    if loss is not None:
        what = "round trips" if "echo" in r else "deliveries"
        total = loss["expected"] if "expected" in loss else loss["sent"]
        if opts.max_loss is None and loss["lost"] > 0:
            failures.append(f"{loss['lost']:,} of {total:,} {what} lost")
        elif opts.max_loss is not None and loss["loss_fraction"] > opts.max_loss:
            failures.append(f"loss {loss['loss_fraction']:.4%} of {what} is over --max-loss "
                            f"{opts.max_loss:.4%}")
        if loss.get("dups"):
            failures.append(f"{loss['dups']:,} duplicate deliveries")
    p99 = r["latency"].get("p99_ms")
    if opts.max_p99_ms is not None:
        if p99 is None:
            failures.append("--max-p99 given but no latency was measured")
        elif p99 > opts.max_p99_ms:
            failures.append(f"p99 {p99:.1f} ms is over --max-p99 {opts.max_p99_ms:g} ms")
    return {"ok": not failures, "failures": failures}


# -- printing ------------------------------------------------------------------------

def _table(title: str, *columns: str) -> Table:
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, show_edge=False)
    for n, name in enumerate(columns):
        table.add_column(name, justify="left" if n == 0 else "right")
    return table


def _reasons(counts: dict[str, int]) -> str:
    return "; ".join(f"{k}: {v:,}" for k, v in counts.items())


def render(r: dict[str, Any], console: Console) -> None:
    opts = r["options"]
    console.print(f"[bold]trioserve bench {r['scenario']}[/bold] {opts['url']}: "
                  f"{opts['connections']:,} connections, {opts['procs']} client process(es) "
                  f"on {r.get('client_loop') or '?'}, "
                  f"{len(opts['source_ips'] or [])} source address(es)")
    c, conns = r["connect"], r["connections"]
    t = _table("Connections", "", "value")
    t.add_row("connected", f"{c['ok']:,} / {c['target']:,}")
    t.add_row("connect failures", f"{c['failed']:,}" + (f" ({_reasons(c['errors'])})" if c["errors"] else ""))
    t.add_row("connect rate", f"{fmt(c['rate'])}/s over {c['seconds']:.2f} s")
    t.add_row("load-client memory per connection", f"{fmt(c.get('client_rss_per_conn_kb'), '.1f')} KB")
    t.add_row("open at end", f"{conns['open_at_end']:,}")
    closed = conns["closed_by_reason"]
    t.add_row("closed during the run",
              f"{sum(closed.values()):,}" + (f" ({_reasons(closed)})" if closed else ""))
    console.print(t)
    if "messages" in r:
        _render_messages(r["messages"], r["client_cpu_us_per_op"], console)
    if "storm" in r:
        s = r["storm"]
        t = _table("Storm", "", "value")
        t.add_row("waves", str(len(s["waves"])))
        t.add_row("dropped / reconnected / failed",
                  f"{s['dropped']:,} / {s['reconnected']:,} / {s['failed']:,}")
        t.add_row("resubscribed recovered / not", f"{s['recovered']:,} / {s['unrecovered']:,}")
        console.print(t)
    if "echo" in r:
        e = r["echo"]
        t = _table("Echo (ping)", "", "value")
        t.add_row("sent / replies / lost", f"{e['sent']:,} / {e['replies']:,} / {e['lost']:,}")
        t.add_row("round trips/s", fmt(e["round_trips_per_s"]))
        t.add_row("load-client CPU per round trip", f"{fmt(r['client_cpu_us_per_op'], '.2f')} µs")
        console.print(t)
    lat = r["latency"]
    if lat["count"]:
        t = _table(f"Latency ({lat['kind']}, ms)", "count", "p50", "p90", "p99", "p99.9", "max")
        t.add_row(f"{lat['count']:,}", *(fmt(lat[k], ".2f") for k in
                                         ("p50_ms", "p90_ms", "p99_ms", "p99_9_ms", "max_ms")))
        console.print(t)
    if r["errors"]:
        t = _table("Errors", "kind", "count")
        for kind, n in r["errors"].items():
            t.add_row(kind, f"{n:,}")
        console.print(t)
    _render_server(r["server"], console, "round trip" if "echo" in r else "delivery")
    v = r["verdict"]
    if v["ok"]:
        console.print("[bold green]PASS[/bold green]")
    else:
        console.print("[bold red]FAIL[/bold red]: " + "; ".join(v["failures"]))


def _render_messages(m: dict[str, Any], client_cpu: float | None, console: Console) -> None:
    t = _table("Messages", "", "value")
    t.add_row("published (acknowledged / attempted)", f"{m['published']:,} / {m['publish_attempted']:,}")
    t.add_row("deliveries expected / received", f"{m['expected']:,} / {m['received']:,}")
    t.add_row("lost", f"{m['lost']:,} ({m['loss_fraction']:.4%})")
    t.add_row("offset gaps / duplicates", f"{m['gaps']:,} / {m['dups']:,}")
    if m["recovered"] or m["unrecovered"]:
        t.add_row("recovered on resubscribe / unrecoverable", f"{m['recovered']:,} / {m['unrecovered']:,}")
    t.add_row("deliveries/s", fmt(m["deliveries_per_s"]))
    t.add_row("load-client CPU per delivery", f"{fmt(client_cpu, '.2f')} µs")
    console.print(t)
    t = _table("Per topic", "topic", "published", "offsets", "subscribers", "expected", "received", "lost")
    for row in m["per_topic"]:
        first = row["first_offset"]
        offsets = f"{first}-{row['final_offset']}" if first is not None else "none"
        t.add_row(row["topic"], f"{row['published']:,}", offsets, f"{row['subscribers']:,}",
                  f"{row['expected']:,}", f"{row['received']:,}", f"{row['lost']:,}")
    console.print(t)


def _render_server(s: dict[str, Any], console: Console, per: str) -> None:
    if not s.get("rows"):
        console.print(f"Server /metrics: not available ({s.get('error') or 'no scrape'})")
        return
    summed = f", summed over {s['workers']} workers" if s.get("workers", 1) > 1 else ""
    title = f"Server ({s['url']}{summed})"
    t = _table(title, "metric", "before", "after", "change")
    for row in s["rows"]:
        spec = ",.1f" if row["key"] == "process_resident_memory_bytes" else ",.2f" \
            if row["key"] == "process_cpu_seconds_total" else ",.0f"
        t.add_row(row["metric"], fmt(row["before"], spec), fmt(row["after"], spec),
                  fmt(row["delta"], "+" + spec) if row["kind"] == "delta" or row["delta"] else "")
    if s.get("disconnects_by_code"):
        t.add_row("disconnects by close code", "", "",
                  ", ".join(f"{k}: {v:,.0f}" for k, v in s["disconnects_by_code"].items()))
    if s.get("server_rss_per_conn_kb") is not None:
        t.add_row("RSS per connection (KB, once connected)", "", "", fmt(s["server_rss_per_conn_kb"], ".1f"))
    if s.get("server_cpu_us_per_delivery") is not None:
        t.add_row(f"server CPU per {per} (µs)", "", "", fmt(s["server_cpu_us_per_delivery"], ".2f"))
    if s.get("fanout_latency_mean_ms") is not None:
        t.add_row("fan-out latency mean (ms)", "", "", fmt(s["fanout_latency_mean_ms"], ".3f"))
    for q in ("50", "99"):
        bound = s.get(f"fanout_latency_p{q}_le_ms")
        if bound is not None:
            t.add_row(f"fan-out latency p{q} (ms, bucket bound)", "", "", f"≤ {fmt(bound, ',.1f')}")
    console.print(t)
