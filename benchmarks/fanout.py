"""Fan-out benchmark: trioserve vs websockets (asyncio) vs naive trio-websocket.

Runs the servers one after another under the same load client and prints a
comparison: of bursts (``--mode burst``, the default: throughput and CPU per
delivery) or of publications at a steady rate (``--mode rate``: latency, and
whether each server keeps up). Run from the repository root:

    .venv/bin/python benchmarks/fanout.py [--subscribers 5000] [--bursts 3] ...
    .venv/bin/python benchmarks/fanout.py --mode rate [--rate 5] [--duration 10] ...
    .venv/bin/python benchmarks/fanout.py --servers trioserve,trioserve-redis  # memory vs Redis broker
    .venv/bin/python benchmarks/fanout.py --scenario rooms --servers trioserve,websockets,go-hub
    .venv/bin/python benchmarks/fanout.py --scenario rooms --mode rate  # steady 5,000/s over the rooms

See benchmarks/README.md for what each number means and how it is measured.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import traceback
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(REPO))

from benchmarks import report  # noqa: E402
from benchmarks.loadclient import Workers, raise_fd_limit, start_workers  # noqa: E402
from benchmarks.phase import TOPIC, Sent, delivery_phase, gather_acks, sys_share  # noqa: E402
from benchmarks.ratephase import planned_publications, rate_line, run_rate  # noqa: E402
from benchmarks.serverproc import (  # noqa: E402
    HOST,
    SERVERS,
    PhaseError,
    ServerProcess,
    ServerSpec,
    free_port,
    http_get,
    probe_available,
    report_exc,
    wait_ready,
)
from trioserve.bench.burst import publish_burst, subscribe  # noqa: E402
from trioserve.bench.payloads import PAYLOADS  # noqa: E402
from trioserve.bench.pool import connect_totals, resolve_loop  # noqa: E402
from trioserve.bench.wsclient import Deliveries, WsClient, open_ws  # noqa: E402

WARMUP_TOPIC = "warmup"  # separate topic, so `bench` offsets start at 1


async def warm_up(port: int, size: int, subscribers: int = 50, publications: int = 10,
                  deflate: bool = False, payload: str = "pad") -> None:
    """Exercise connect, subscribe and fan-out once so the RSS baseline is warm."""
    d = Deliveries()
    clients: list[WsClient] = []
    try:
        for _ in range(subscribers):
            client = await open_ws(HOST, port, HOST, d, 10, deflate=deflate)
            clients.append(client)
            await subscribe(client, WARMUP_TOPIC, 10)
        d.arm(publications, subscribers)
        pub = await open_ws(HOST, port, HOST, None, 10)
        clients.append(pub)
        _, acks = publish_burst(pub, WARMUP_TOPIC, publications, size, payload)
        async with asyncio.timeout(60):
            await asyncio.gather(*acks)
            await d.done.wait()
    finally:
        for client in clients:
            client.close()
        if clients:
            await asyncio.wait([c.closed for c in clients], timeout=10)


def source_ips(count: int, per_ip: int) -> list[str]:
    """127.0.0.2, 127.0.0.3, ...: a few thousand connections per address."""
    return [f"127.0.0.{2 + i // per_ip}" for i in range(count)]


def split(items: list[str], parts: int) -> list[list[str]]:
    return [items[i::parts] for i in range(parts)]


def topic_names(scenario: str, topics: int) -> list[str]:
    """The single topic ``bench``, or the rooms ``room.0`` … ``room.<topics-1>``."""
    return [TOPIC] if scenario == "single" else [f"room.{i}" for i in range(topics)]


async def connect_phase(workers: Workers, port: int, args: argparse.Namespace,
                        deflate: bool = False) -> dict[str, Any]:
    ips = source_ips(args.subscribers, args.conns_per_ip)
    names = args.topic_names
    # Subscriber i joins room i % topics: every room gets subscribers / topics of them.
    topics = [names[i % len(names)] for i in range(args.subscribers)]
    parts = len(workers)
    cmds = [{"op": "connect", "host": HOST, "port": port, "src_ips": ip_share, "topics": topic_share,
             "deflate": deflate,
             "concurrency": args.connect_concurrency, "timeout": args.connect_timeout,
             "phase_timeout": args.phase_timeout}
            for ip_share, topic_share in zip(split(ips, parts), split(topics, parts), strict=True)]
    replies = await workers.ask(cmds, args.phase_timeout + 30)
    return {**connect_totals(replies), "per_process": [r["ok"] for r in replies]}


# -- one publish burst ----------------------------------------------------------

async def fanout_batches(server: ServerProcess) -> int | None:
    """trioserve's fan-out batches so far (``/metrics``); None for the other servers."""
    if not server.spec.name.startswith("trioserve"):
        return None
    try:
        status, body = await asyncio.wait_for(http_get(server.port, "/metrics"), 10)
    except (OSError, TimeoutError, ValueError, IndexError):
        return None
    if status != 200:
        return None
    for line in body.decode(errors="replace").splitlines():
        if line.startswith("trioserve_fanout_batches_total"):
            return int(float(line.split()[-1]))
    return None


async def run_burst(workers: Workers, server: ServerProcess, publisher: WsClient,
                    args: argparse.Namespace) -> dict[str, Any]:
    def start() -> Coroutine[Any, Any, Sent]:
        t_first, acks = publish_burst(publisher, args.topic_names, args.publications, args.size,
                                      args.payload)
        return collect_acks(t_first, acks)

    async def collect_acks(t_first: float, acks: list[asyncio.Future[dict[str, Any]]]) -> Sent:
        return Sent(t_first, t_first, await gather_acks(acks, args.burst_timeout))

    batches0 = await fanout_batches(server)
    # Each subscriber has one topic: it gets publications / topics of the burst.
    res = await delivery_phase(workers, server, args.publications // len(args.topic_names),
                               args.burst_timeout, args.stall_timeout, start)
    batches1 = await fanout_batches(server)
    received = res.counts["received"]
    span = res.last_recv - res.sent.t_first if received else None
    return {
        **res.counts,
        "seconds": span,
        "deliveries_per_s": received / span if span else None,
        # trioserve: the hub's fan-out batches during the burst (from /metrics).
        "fanout_batches": batches1 - batches0 if batches0 is not None and batches1 is not None else None,
        **res.accounting,
    }


def burst_line(n: int, b: dict[str, Any]) -> str:
    lat = b["latency"]
    broker = "" if b["broker_cpu_s"] is None else (
        f", redis-server {report.fmt(b['broker_cpu_us_per_delivery'], '.3f')} us/delivery (together "
        f"{report.fmt(b['server_broker_cpu_us_per_delivery'], '.2f')})")
    batches = "" if b["fanout_batches"] is None else f", {b['fanout_batches']} fan-out batches"
    if b.get("wire_ratio") is not None:
        batches += (f", {report.fmt(b['wire_bytes_per_delivery'], '.0f')} B read/delivery "
                    f"({b['wire_ratio']:.3f}x uncompressed)")
    return (f"    burst {n}: {b['received']:,}/{b['expected']:,} delivered "
            f"({report.fmt(b['deliveries_per_s'])}/s), server CPU "
            f"{report.fmt(b['server_cpu_us_per_delivery'], '.2f')} us/delivery "
            f"({sys_share(b, 'server')} sys){broker}{batches}, client CPU "
            f"{report.fmt(b['client_cpu_us_per_delivery'], '.2f')} us/delivery, "
            f"p50 {report.fmt(lat['p50_ms'], '.1f')} ms, p99 {report.fmt(lat['p99_ms'], '.1f')} ms, "
            f"gaps {b['gaps']}, dups {b['dups']}, closed {b['closed_conns']}, "
            f"topics with loss {b['lossy_topics']}, status {','.join(b['worker_status'])}")


# -- one server, start to finish -------------------------------------------------

async def bench_server(spec: ServerSpec, args: argparse.Namespace, log_dir: Path) -> dict[str, Any]:
    result: dict[str, Any] = {"server": spec.name, "status": "ok",
                              **({"rate_phase": None} if args.mode == "rate" else {"bursts": []})}
    unavailable = probe_available(spec)
    if unavailable:
        result["status"] = f"unavailable: {unavailable}"
        return result
    server: ServerProcess | None = None
    workers: Workers | None = None
    publisher: WsClient | None = None
    phase = "start"
    try:
        port = free_port()
        result["port"] = port
        server = ServerProcess(spec, port, log_dir / f"{spec.name}.log")
        result["pid"] = server.popen.pid
        workers = start_workers(args.client_procs)
        phase = "ready"
        await wait_ready(server)
        await workers.ask([{"op": "ping"}] * len(workers), 60)  # imports done, loops running
        phase = "warm-up"
        await warm_up(port, args.size, deflate=spec.deflate, payload=args.payload)
        publisher = await open_ws(HOST, port, HOST, None, args.connect_timeout)
        await asyncio.sleep(args.settle)
        result["rss_before"] = server.rss()
        phase = "connect"
        # Server CPU per handshake, like CPU per delivery: the load client shares
        # the cores, so the connect rate alone may be the client's ceiling.
        cpu0 = server.cpu()
        connect = result["connect"] = await connect_phase(workers, port, args, spec.deflate)
        cpu1 = server.cpu()
        connect["server_cpu_s"] = cpu1[0] - cpu0[0]
        connect["server_cpu_us_per_handshake"] = (
            connect["server_cpu_s"] / connect["ok"] * 1e6 if connect["ok"] else None)
        errors = f" errors: {connect['errors']}" if connect["errors"] else ""
        print(f"  connected {connect['ok']:,}/{args.subscribers:,} in {connect['seconds']:.2f}s"
              f" ({report.fmt(connect['rate'])}/s){errors}", flush=True)
        server.check_alive()
        if connect["ok"] == 0:
            raise PhaseError(f"no subscriber connected: {connect['errors']}")
        await asyncio.sleep(args.settle)
        result["rss_after"] = server.rss()
        if args.mode == "rate":
            phase = "rate phase"
            rate = result["rate_phase"] = await run_rate(workers, server, publisher, args)
            print(rate_line(rate), flush=True)
            server.check_alive()  # after recording: a crash's losses stay in the table
        else:
            for n in range(1, args.bursts + 1):
                phase = f"burst {n}"
                burst = await run_burst(workers, server, publisher, args)
                result["bursts"].append(burst)
                print(burst_line(n, burst), flush=True)
                server.check_alive()
                await asyncio.sleep(args.pause)
        if connect["failed"]:
            result["status"] = f"{connect['failed']} subscribers failed to connect"
    except Exception as exc:  # one server's failure must not cost the others' results
        result["status"] = f"failed in {phase}: {report_exc(exc)}"
        if not isinstance(exc, PhaseError | OSError | TimeoutError):
            traceback.print_exc()
        if server is not None:
            result["log_tail"] = server.log_tail()
        print(f"  {result['status']}", flush=True)
    finally:
        await cleanup(server, workers, publisher)
    if server is not None:
        result["server_log"] = str(server.log_path)
        result["server_exit_code"] = server.popen.returncode
    return result


async def cleanup(server: ServerProcess | None, workers: Workers | None,
                  publisher: WsClient | None) -> None:
    if publisher is not None:
        publisher.close()
    if workers is not None:
        try:
            await workers.ask([{"op": "close"}] * len(workers), 30)
        except PhaseError:
            pass
        await workers.stop()
    if server is not None:
        await server.stop()


# -- command line ---------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--mode", choices=("burst", "rate"), default="burst",
                   help="burst: bursts of --publications sent back to back; "
                        "rate: --rate publications/s for --duration seconds")
    p.add_argument("--scenario", choices=("single", "rooms"), default="single",
                   help="single: every subscriber on one topic; rooms: subscriber i on topic "
                        "room.<i %% topics>, publications spread evenly over the topics")
    p.add_argument("--subscribers", type=int, default=None,
                   help="subscriber connections (default: 5000 single, 4000 rooms)")
    p.add_argument("--topics", type=int, default=None,
                   help="rooms: topics (default: subscribers / 10, so 10 subscribers per room)")
    p.add_argument("--publications", type=int, default=None,
                   help="burst: publications per burst, rounded down to a multiple of --topics "
                        "(default: 100 single, 20000 rooms)")
    p.add_argument("--size", type=int, default=64, help="bytes of JSON data per publication")
    p.add_argument("--payload", choices=PAYLOADS, default="pad",
                   help='publication data: "pad" (a run of "x") or "json" (a realistic '
                        "leaderboard document; use it to measure compression)")
    p.add_argument("--bursts", type=int, default=None,
                   help="burst: bursts per server; medians reported (default: 3 single, 2 rooms)")
    p.add_argument("--rate", type=float, default=None,
                   help="rate: publications per second (default: 5 single, 5000 rooms)")
    p.add_argument("--duration", type=float, default=10.0, help="rate: seconds of publishing")
    p.add_argument("--drain-timeout", type=float, default=60.0,
                   help="rate: after the last publication, wait at most this long for the "
                        "deliveries, seconds")
    p.add_argument("--kept-up-within", type=float, default=1.0,
                   help="rate: the server kept up if its last delivery came at most this long "
                        "after the last publication, seconds")
    p.add_argument("--servers", default="trioserve,websockets,trio-websocket",
                   help=f"comma-separated subset of: {', '.join(SERVERS)}")
    p.add_argument("--client-procs", type=int, default=2, help="load-client processes")
    p.add_argument("--connect-concurrency", type=int, default=200,
                   help="connections in flight per load-client process")
    p.add_argument("--conns-per-ip", type=int, default=2000,
                   help="subscribers per source address (127.0.0.2, .3, ...)")
    p.add_argument("--connect-timeout", type=float, default=30, help="per connection, seconds")
    p.add_argument("--phase-timeout", type=float, default=180, help="whole connect phase, seconds")
    p.add_argument("--burst-timeout", type=float, default=120, help="burst: one burst, seconds")
    p.add_argument("--stall-timeout", type=float, default=15,
                   help="end a burst or the rate phase after this long without any delivery, seconds")
    p.add_argument("--settle", type=float, default=1.0, help="idle seconds before RSS samples")
    p.add_argument("--pause", type=float, default=0.5, help="burst: idle seconds between bursts")
    p.add_argument("--json", metavar="PATH", help="write all raw numbers as JSON")
    p.add_argument("--markdown", metavar="PATH", help="write a markdown section for BENCHMARKS.md")
    p.add_argument("--log-dir", metavar="DIR", help="keep server logs here (default: a temp dir)")
    args = p.parse_args(argv)
    names = [s.strip() for s in args.servers.split(",") if s.strip()]
    unknown = [n for n in names if n not in SERVERS]
    if unknown or not names:
        p.error(f"unknown server(s) {unknown}; choose from {', '.join(SERVERS)}")
    args.server_names = names
    rooms = args.scenario == "rooms"
    args.subscribers = args.subscribers or (4000 if rooms else 5000)
    args.topics = 1 if not rooms else args.topics or max(1, args.subscribers // 10)
    args.publications = args.publications or (20_000 if rooms else 100)
    args.publications -= args.publications % args.topics
    args.rate = args.rate or (5000.0 if rooms else 5.0)
    args.bursts = args.bursts or (2 if rooms else 3)
    args.topic_names = topic_names(args.scenario, args.topics)
    if args.publications < 1 or args.topics > args.subscribers:
        p.error("rooms: need --publications >= --topics and --topics <= --subscribers")
    if min(args.subscribers, args.publications, args.bursts, args.client_procs,
           args.connect_concurrency, args.conns_per_ip) < 1:
        p.error("counts must be >= 1")
    if min(args.rate, args.duration, args.drain_timeout) <= 0 or args.kept_up_within < 0:
        p.error("--rate, --duration and --drain-timeout must be > 0, --kept-up-within >= 0")
    planned = planned_publications(args.rate, args.duration)
    args.rate_publications = max(args.topics, planned - planned % args.topics)
    if 2 + (args.subscribers - 1) // args.conns_per_ip > 254:
        p.error("too many subscribers for --conns-per-ip: source addresses run past 127.0.0.255")
    return args


async def run(args: argparse.Namespace) -> int:
    soft, _hard = raise_fd_limit()
    need = args.subscribers + 200
    if need > soft:
        print(f"warning: the server needs ~{need} fds but the limit is {soft}", file=sys.stderr)
    machine = report.machine_info()
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="fanout-logs-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for name in args.server_names:
        print(f"== {name}", flush=True)
        results.append(await bench_server(SERVERS[name], args, log_dir))
    if args.mode == "rate":
        summaries = [report.summarize_rate(r) for r in results]
        rats = report.rate_ratios(summaries)
        rows = report.rate_table_rows(summaries, rats, report.rate_ratios(summaries, report.GO_HUB))
        notes = report.rate_notes(summaries, args.kept_up_within)
    else:
        summaries = [report.summarize(r) for r in results]
        rats = report.ratios(summaries)
        rows = report.table_rows(summaries, rats, go_rats=report.ratios(summaries, report.GO_HUB))
        notes = report.notes(summaries)
    command = report.command_line()
    print()
    print(report.render_text(rows))
    for note in notes:
        print(f"note: {note}")
    config = {k: v for k, v in vars(args).items() if k not in ("server_names", "topic_names")}
    config["client_loop"] = resolve_loop("auto")
    if args.json:
        report.write_json(args.json, {"command": command, "machine": machine, "config": config,
                                      "summary": summaries, "ratios": rats,
                                      "redis_vs_memory": report.broker_ratios(summaries),
                                      "results": results})
    if args.markdown:
        report.write_markdown(args.markdown, report.render_markdown(rows, notes, command, machine, config))
    return 0 if all(r["status"] == "ok" for r in results) else 1


def main() -> None:
    sys.exit(asyncio.run(run(parse_args())))


if __name__ == "__main__":
    main()
