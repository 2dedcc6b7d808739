"""``trioserve bench``: the load tester's command line (docs/bench.md).

:mod:`trioserve.ops.cli` adds the command to ``trioserve``. The heavy parts
(hdrhistogram, rich, the worker code) are imported only when the command runs,
so ``trioserve serve`` does not pay for them and a missing ``bench`` extra is reported as such (exit 2).
"""

from __future__ import annotations

import asyncio
import importlib.util
import ipaddress
import resource
import sys
from typing import Any

import click

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_ERROR = 0, 1, 2, 3
_EXTRA_MODULES = {"hdrh": "hdrhistogram", "rich": "rich"}


class BenchProblem(click.ClickException):
    """Cannot run as asked (options, missing extra): one line on stderr, exit 2."""

    exit_code = EXIT_USAGE


def missing_extra() -> list[str]:
    """The ``bench`` extra's packages that are not installed."""
    return [pkg for mod, pkg in _EXTRA_MODULES.items() if importlib.util.find_spec(mod) is None]


def parse_source_ips(text: str | None) -> list[str] | None:
    """``127.0.0.2-127.0.0.20`` (a range), ``127.0.0.2,127.0.0.3`` (a list), or both mixed."""
    if text is None or text.strip().lower() in ("", "auto"):
        return None
    out: list[str] = []
    try:
        for part in text.split(","):
            part = part.strip()
            if not part:
                continue
            if "-" in part:
                lo_text, hi_text = (p.strip() for p in part.split("-", 1))
                lo = ipaddress.IPv4Address(lo_text)
                if "." not in hi_text:  # 127.0.0.2-20
                    hi_text = lo_text.rsplit(".", 1)[0] + "." + hi_text
                hi = ipaddress.IPv4Address(hi_text)
                if hi < lo:
                    raise ValueError(f"{part}: the range runs backwards")
                if int(hi) - int(lo) >= 65536:
                    raise ValueError(f"{part}: more than 65,536 addresses")
                out.extend(str(ipaddress.IPv4Address(n)) for n in range(int(lo), int(hi) + 1))
            else:
                out.append(str(ipaddress.IPv4Address(part)))
    except ValueError as exc:
        raise click.BadParameter(f"{text!r}: {exc}", param_hint="--source-ips") from None
    if not out:
        raise click.BadParameter(f"{text!r} names no address", param_hint="--source-ips")
    return out


_positive = click.FloatRange(min=0, min_open=True)


@click.command(context_settings={"show_default": True})
@click.argument("scenario", type=click.Choice(["idle", "fanout", "echo", "storm", "rooms"]))
@click.option("--url", default="ws://127.0.0.1:8000/ws",
              help="Server to load: ws://HOST:PORT/PATH, or tcp://HOST:PORT for the NDJSON port.")
@click.option("--connections", "-n", type=click.IntRange(1), default=100,
              help="Connections to open (subscribers, or echo clients).")
@click.option("--procs", type=click.IntRange(1), default=None, show_default="one per 15,000 connections",
              help="Load-client processes.")
@click.option("--source-ips", default=None, show_default="127.0.0.2, .3, …: one per 10,000 connections",
              help="Source addresses to spread connections over: a range 127.0.0.2-127.0.0.20 "
                   "and/or a comma-separated list.")
@click.option("--connect-rate", type=click.FloatRange(min=0), default=1000.0,
              help="New connections per second, all processes together; 0 = as fast as "
                   "--connect-concurrency allows.")
@click.option("--connect-concurrency", type=click.IntRange(1), default=200,
              help="Connections being opened at once, per process.")
@click.option("--connect-timeout", type=_positive, default=10.0, help="Seconds per connect + subscribe.")
@click.option("--duration", type=_positive, default=10.0, help="Seconds the scenario runs.")
@click.option("--topics", type=click.IntRange(1), default=1, help="Topics the subscribers are spread over.")
@click.option("--subscriptions", type=click.IntRange(1), default=1,
              help="rooms: topics each connection subscribes to (at most --topics and the "
                   "server's max_subscriptions).")
@click.option("--rate", type=click.FloatRange(min=0), default=100.0,
              help="Publications/s (fanout, storm) or ping round trips/s (echo), in total.")
@click.option("--size", type=click.IntRange(0), default=64, help="Bytes of JSON data per publication.")
@click.option("--payload", type=click.Choice(["pad", "json"]), default="pad",
              help='Publication data: "pad" (a run of "x") or "json" (a realistic JSON document, '
                   "about --size bytes; use it with --deflate).")
@click.option("--deflate", is_flag=True,
              help="Subscribers offer permessage-deflate and inflate what comes compressed.")
@click.option("--publishers", type=click.IntRange(1), default=1, help="Publishing connections.")
@click.option("--storm-percent", type=click.FloatRange(0, 100, min_open=True), default=10.0,
              help="storm: share of the subscribers dropped and reconnected per wave.")
@click.option("--storm-interval", type=_positive, default=2.0, help="storm: seconds between waves.")
@click.option("--settle", type=click.FloatRange(min=0), default=1.0,
              help="Idle seconds after connecting, before the memory sample.")
@click.option("--drain-timeout", type=_positive, default=10.0,
              help="Seconds to wait for the last replies and deliveries after the scenario.")
@click.option("--metrics-url", default=None, show_default="from --url: http://HOST:PORT/metrics",
              help="The server's Prometheus endpoint.")
@click.option("--topic-prefix", default=None, show_default="bench.<random>",
              help="Topic names are PREFIX.0, PREFIX.1, ….")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="Write the whole report as JSON.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None,
              help="Write a PNG: latency by percentile, connections and deliveries over time "
                   "(the 'plot' extra).")
@click.option("--max-p99", "max_p99_ms", type=click.FloatRange(min=0), default=None,
              help="Fail (exit 1) when the p99 latency in ms is above this.")
@click.option("--max-loss", type=click.FloatRange(0, 1), default=None, show_default="any loss fails",
              help="Fail (exit 1) when the lost fraction of deliveries is above this.")
@click.option("--max-connect-failures", type=click.IntRange(0), default=0,
              help="Fail (exit 1) when more connections than this fail to open.")
@click.option("--loop", type=click.Choice(["auto", "uvloop", "asyncio"]), default="auto",
              show_default="auto: uvloop when installed",
              help="The load-client processes' event loop. uvloop (in the 'bench' extra) costs "
                   "the client less CPU per delivery, leaving more for the server under test.")
@click.option("--no-progress", is_flag=True, help="No live display (also off when stdout is not a terminal).")
def bench(scenario: str, json_path: str | None, plot_path: str | None, no_progress: bool,
          source_ips: str | None, **options: Any) -> None:
    """Load-test a trioserve server: idle, fanout, echo, storm or rooms.

    \b
    idle    connect and hold for --duration (memory per connection)
    fanout  subscribers on --topics topics, publishers at --rate msg/s
    echo    ping round trips at --rate per second
    storm   fanout, and every --storm-interval s drop --storm-percent % of the
            subscribers and reconnect them with `since` recovery
    rooms   fanout over many --topics with --subscriptions topics per
            connection: per-topic loss, latency, server CPU per delivery

    Prints connect rate and failures, messages sent/received/lost (by
    offsets), latency percentiles (HDR histogram, merged over processes) and
    the server's /metrics before and after. Exit status: 0 pass, 1 a gate
    failed (loss, --max-p99, --max-loss, --max-connect-failures, connections
    closed), 2 usage, 3 the run could not be done. fanout, storm and rooms need the
    server to run with --client-publish. See docs/bench.md.
    """
    missing = missing_extra()
    if missing:
        raise BenchProblem(f"trioserve bench needs the 'bench' extra (missing: {', '.join(missing)}): "
                           "pip install 'trioserve[bench]'")
    from .options import Options, UsageError, validate

    opts = Options(scenario=scenario, source_ips=parse_source_ips(source_ips),
                   progress=not no_progress and sys.stdout.isatty(), **options)
    try:
        validate(opts)
    except UsageError as exc:
        raise BenchProblem(str(exc)) from None
    assert opts.procs is not None
    per_proc = -(-opts.connections // opts.procs)
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and per_proc + 64 > hard:
        raise BenchProblem(f"{per_proc:,} connections per process exceed the open-files limit ({hard:,}); "
                           f"use --procs {-(-opts.connections // max(1, hard - 1000))} or more")
    sys.exit(execute(opts, json_path, plot_path))


def execute(opts: Any, json_path: str | None, plot_path: str | None) -> int:
    from rich.console import Console

    from .output import write_json
    from .pool import PhaseError
    from .report import render
    from .runner import run

    try:
        result = asyncio.run(run(opts))
    except PhaseError as exc:
        click.echo(f"trioserve bench: {exc}", err=True)
        return EXIT_ERROR
    # The files first: a closed stdout (`| head`) must not cost the report.
    if json_path:
        write_json(json_path, result)
    if plot_path:
        from .plot import PlotUnavailable, write_plot

        try:
            write_plot(result, plot_path)
        except PlotUnavailable as exc:
            click.echo(f"trioserve bench: {exc}", err=True)
    console = Console(width=None if sys.stdout.isatty() else 120, soft_wrap=False)
    render(result, console)
    return EXIT_OK if result["verdict"]["ok"] else EXIT_FAILED
