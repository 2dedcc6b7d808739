"""The bench's pieces without a server: histograms, /metrics parsing, gates, options, the CLI."""

from __future__ import annotations

import asyncio
import importlib.util
import time
from array import array
from pathlib import Path
from typing import Any

import click
import orjson
import pytest
from click.testing import CliRunner

from trioserve.bench import cli as bench_cli
from trioserve.bench import hist, pool, scrape
from trioserve.bench.options import Options, UsageError, parse_target, plan, validate
from trioserve.bench.report import verdict
from trioserve.ops.cli import main


def test_histograms_merge_across_processes_exactly() -> None:
    a, b = hist.Recorder(), hist.Recorder()
    a.drain(array("d", [0.001] * 900))  # 1 ms
    b.drain(array("d", [0.010] * 90 + [0.100] * 10))  # 10 ms, 100 ms
    merged = hist.merge([hist.encode(a.total), hist.encode(b.total), b""])
    s = hist.summary(merged)
    assert s["count"] == 1000
    assert s["p50_ms"] == pytest.approx(1.0, rel=1e-3)
    assert s["p99_ms"] == pytest.approx(10.0, rel=1e-3)
    assert s["max_ms"] == pytest.approx(100.0, rel=1e-3)
    # The interval histogram starts afresh after each take.
    assert hist.summary(hist.decode(b.take_interval()))["count"] == 100
    assert hist.summary(hist.decode(b.take_interval()))["count"] == 0


def test_many_distinct_latencies_keep_three_significant_figures() -> None:
    samples = array("d", [i * 1e-6 for i in range(1, 200_001)])  # 1 µs .. 200 ms, all distinct
    rec = hist.Recorder()
    rec.drain(samples)
    s = hist.summary(rec.total)
    assert s["count"] == 200_000
    assert s["p50_ms"] == pytest.approx(100.0, rel=2e-3)
    assert s["p99_ms"] == pytest.approx(198.0, rel=2e-3)
    assert hist.summary(hist.new_histogram())["p99_ms"] is None


METRICS_BEFORE = """\
# TYPE trioserve_deliveries counter
trioserve_deliveries_total 100.0
# TYPE trioserve_connections gauge
trioserve_connections{transport="websocket"} 0.0
# TYPE trioserve_disconnects counter
trioserve_disconnects_total{code="1001"} 1.0
# TYPE process_resident_memory_bytes gauge
process_resident_memory_bytes 1.048576e+07
# TYPE process_cpu_seconds counter
process_cpu_seconds_total 1.0
"""


def test_metrics_scrapes_are_parsed_and_compared() -> None:
    before = scrape.parse(METRICS_BEFORE)
    assert before['trioserve_connections{transport="websocket"}'] == 0
    mid = dict(before, process_resident_memory_bytes=10485760 + 1000 * 1024 * 8)
    after = dict(mid, **{"trioserve_deliveries_total": 2100.0, "process_cpu_seconds_total": 1.5,
                         'trioserve_connections{transport="websocket"}': 1000.0,
                         'trioserve_disconnects_total{code="1001"}': 1.0,
                         'trioserve_disconnects_total{code="4008"}': 3.0})
    out = scrape.compare(before, after, connected=1000, deliveries=2000, mid=mid)
    rows = {r["key"]: r for r in out["rows"]}
    assert rows["trioserve_deliveries_total"]["delta"] == 2000
    assert rows['trioserve_connections{transport="websocket"}']["after"] == 1000
    assert rows["process_resident_memory_bytes"]["before"] == 10.0  # MiB
    assert out["server_rss_per_conn_kb"] == pytest.approx(8.0)
    assert out["server_cpu_us_per_delivery"] == pytest.approx(250.0)
    assert out["disconnects_by_code"] == {"4008": 3.0}
    assert scrape.compare(None, after, 1, 1) == {}


WORKERS_METRICS = """\
# TYPE trioserve_connections gauge
trioserve_connections{transport="websocket",worker="1"} 300.0
trioserve_connections{transport="websocket",worker="2"} 200.0
# TYPE trioserve_worker_up gauge
trioserve_worker_up{worker="1"} 1.0
trioserve_worker_up{worker="2"} 1.0
# TYPE trioserve_fanout_latency_seconds histogram
trioserve_fanout_latency_seconds_bucket{le="0.1",worker="1"} 90.0
trioserve_fanout_latency_seconds_bucket{le="0.5",worker="1"} 98.0
trioserve_fanout_latency_seconds_bucket{le="+Inf",worker="1"} 100.0
trioserve_fanout_latency_seconds_count{worker="1"} 100.0
trioserve_fanout_latency_seconds_sum{worker="1"} 9.0
trioserve_fanout_latency_seconds_bucket{le="0.1",worker="2"} 100.0
trioserve_fanout_latency_seconds_bucket{le="0.5",worker="2"} 100.0
trioserve_fanout_latency_seconds_bucket{le="+Inf",worker="2"} 100.0
trioserve_fanout_latency_seconds_count{worker="2"} 100.0
trioserve_fanout_latency_seconds_sum{worker="2"} 1.0
"""


def test_a_multi_worker_scrape_is_summed_over_the_workers() -> None:
    whole = scrape.parse(WORKERS_METRICS)
    assert scrape.workers(whole) == 2
    assert whole['trioserve_connections{transport="websocket"}'] == 500
    assert scrape.workers(scrape.parse(METRICS_BEFORE)) == 1
    # 190 of 200 fan-outs took ≤ 0.1 s, 198 ≤ 0.5 s, 2 longer.
    empty: scrape.Scrape = {}
    assert scrape.bucket_quantile(empty, whole, "trioserve_fanout_latency_seconds", 0.5) == 0.1
    assert scrape.bucket_quantile(empty, whole, "trioserve_fanout_latency_seconds", 0.99) == 0.5
    assert scrape.bucket_quantile(empty, whole, "trioserve_fanout_latency_seconds", 0.999) == float("inf")
    # Only what happened between the scrapes counts.
    assert scrape.bucket_quantile(whole, whole, "trioserve_fanout_latency_seconds", 0.5) is None
    out = scrape.compare(dict.fromkeys(whole, 0.0), whole, connected=500, deliveries=1)
    assert out["workers"] == 2
    assert out["fanout_latency_mean_ms"] == pytest.approx(50.0)
    assert out["fanout_latency_p99_le_ms"] == pytest.approx(500.0)


def test_the_load_client_event_loop_choice() -> None:
    assert pool.resolve_loop("asyncio") == "asyncio"
    expected = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    assert pool.resolve_loop("auto") == expected
    with pytest.raises(ValueError, match="unknown event loop"):
        pool.resolve_loop("tokio")


def test_metrics_url_comes_from_the_bench_url() -> None:
    assert scrape.metrics_url("ws://127.0.0.1:8000/ws") == "http://127.0.0.1:8000/metrics"
    assert scrape.metrics_url("ws://[::1]:9/ws") == "http://[::1]:9/metrics"
    assert scrape.metrics_url("tcp://127.0.0.1:9000") is None
    assert scrape.metrics_url("tcp://127.0.0.1:9000", "http://x:1/metrics") == "http://x:1/metrics"


def _report(lost: int = 0, expected: int = 1000, p99: float | None = 5.0, failed: int = 0,
            closed: int = 0) -> dict[str, Any]:
    return {"connect": {"failed": failed}, "connections": {"closed_by_reason": {"close 4008": closed}
                                                            if closed else {}},
            "messages": {"lost": lost, "expected": expected, "loss_fraction": lost / expected, "dups": 0},
            "latency": {"p99_ms": p99}}


@pytest.mark.parametrize(("kwargs", "opts", "ok"), [
    ({}, {}, True),
    ({"lost": 1}, {}, False),
    ({"lost": 1}, {"max_loss": 0.01}, True),
    ({"lost": 20}, {"max_loss": 0.01}, False),
    ({"p99": 5.0}, {"max_p99_ms": 5.0}, True),
    ({"p99": 5.1}, {"max_p99_ms": 5.0}, False),
    ({"p99": None}, {"max_p99_ms": 5.0}, False),
    ({"failed": 2}, {}, False),
    ({"failed": 2}, {"max_connect_failures": 2}, True),
    ({"closed": 1}, {}, False),
])
def test_gates(kwargs: dict[str, Any], opts: dict[str, Any], ok: bool) -> None:
    assert verdict(Options("fanout", **opts), _report(**kwargs))["ok"] is ok


def test_source_ips_ranges_and_lists() -> None:
    parse = bench_cli.parse_source_ips
    assert parse("127.0.0.2-127.0.0.4") == ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
    assert parse("127.0.0.2-3, 127.0.0.9") == ["127.0.0.2", "127.0.0.3", "127.0.0.9"]
    assert parse("127.0.0.255-127.0.1.0") == ["127.0.0.255", "127.0.1.0"]
    assert parse(None) is None and parse("auto") is None
    for bad in ("127.0.0.5-127.0.0.2", "nope", ",", "127.0.0.1-127.2.0.0"):
        with pytest.raises(click.BadParameter):
            parse(bad)


def test_options_defaults_and_plan() -> None:
    opts = Options("fanout", url="ws://127.0.0.1:1/ws", connections=25_000, topics=2)
    validate(opts)
    assert opts.procs == 2  # no process above 15,000
    assert opts.source_ips == ["127.0.0.2", "127.0.0.3", "127.0.0.4"]  # one per 10,000
    shares = plan(opts)
    assert [len(s) for s in shares] == [12_500, 12_500]
    assert shares[0][:2] == [["127.0.0.2", f"{opts.topic_prefix}.0"], ["127.0.0.4", f"{opts.topic_prefix}.0"]]
    rooms = Options("rooms", url="ws://127.0.0.1:1/ws", connections=4, topics=5, subscriptions=3, procs=1)
    validate(rooms)
    p = rooms.topic_prefix
    assert [topics for _, topics in plan(rooms)[0]] == [
        [f"{p}.0", f"{p}.1", f"{p}.2"], [f"{p}.3", f"{p}.4", f"{p}.0"],
        [f"{p}.1", f"{p}.2", f"{p}.3"], [f"{p}.4", f"{p}.0", f"{p}.1"]]
    for bad in (Options("rooms", url="ws://127.0.0.1:1/ws", topics=2, subscriptions=3),
                Options("fanout", url="ws://127.0.0.1:1/ws", topics=4, subscriptions=2)):
        with pytest.raises(UsageError):
            validate(bad)
    remote = Options("idle", url="ws://10.1.2.3:80/ws")
    validate(remote)
    assert remote.source_ips is None  # no source binding towards a non-loopback server
    assert parse_target("tcp://127.0.0.1:9000")["scheme"] == "tcp"
    for url in ("wss://127.0.0.1:1/ws", "ws://127.0.0.1/ws", "http://x:1/"):
        with pytest.raises(UsageError):
            parse_target(url)


def test_usage_errors_exit_2() -> None:
    runner = CliRunner()
    res = runner.invoke(main, ["bench", "fanout", "--url", "wss://127.0.0.1:1/ws"])
    assert res.exit_code == 2 and "wss is not supported" in res.output
    res = runner.invoke(main, ["bench", "nosuch"])
    assert res.exit_code == 2
    res = runner.invoke(main, ["bench", "idle", "-n", "100000", "--procs", "1"])
    assert res.exit_code == 2 and "exceed the open-files limit" in res.output


def test_without_the_bench_extra_it_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "hdrh" else real(name, *a))
    res = CliRunner().invoke(main, ["bench", "idle"])
    assert res.exit_code == 2
    assert "needs the 'bench' extra (missing: hdrhistogram)" in res.output
    assert "pip install 'trioserve[bench]'" in res.output


def test_plot_writes_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from trioserve.bench.plot import write_plot

    rec = hist.Recorder()
    rec.drain(array("d", [0.001 * (i % 50 + 1) for i in range(5000)]))
    report = {"scenario": "fanout", "options": {"connections": 10},
              "latency": {"kind": "delivery", **hist.summary(rec.total)},
              "latency_curve": hist.percentile_curve(rec.total),
              "timeline": [{"t": t / 2, "connections": min(10, t * 3), "deliveries_per_s": t * 100.0}
                           for t in range(10)]}
    out = tmp_path / "bench.png"
    write_plot(report, str(out))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_publications_right_behind_a_recovering_subscribe_reply_count_from_it() -> None:
    """The reply and the next live publication often arrive in one read: the reply's
    recovered publications must be counted before the publication that follows it."""
    from trioserve.bench.worker import BenchWorker, Sub
    from trioserve.bench.wsclient import RECV_VIEW, TcpClient

    async def main() -> tuple[int, int, int, int]:
        worker = BenchWorker(0)
        client = TcpClient(worker.deliveries)
        client.last_offset = 100  # seen before the drop
        sub = Sub(client, None, "t")
        task = asyncio.create_task(worker._subscribe(sub, 5, since={"epoch": "e", "offset": 100}))
        await asyncio.sleep(0)  # the request is "sent" (no transport here)
        now = time.monotonic()

        def pub(offset: int) -> dict[str, Any]:
            return {"op": "pub", "topic": "t", "offset": offset, "data": {"t": now}}

        reply = {"id": 1, "ok": True, "topic": "t", "epoch": "e", "offset": 102, "recovered": True,
                 "publications": [pub(101), pub(102)]}
        data = orjson.dumps(reply) + b"\n" + orjson.dumps(pub(103)) + b"\n"
        RECV_VIEW[: len(data)] = data
        client.buffer_updated(len(data))
        await task
        return sub.received, client.gaps, client.dups, sub.recovered

    assert asyncio.run(main()) == (3, 0, 0, 2)


@pytest.mark.skipif(importlib.util.find_spec("uvloop") is None, reason="uvloop is not installed")
def test_command_pipe_survives_uvloop_with_large_messages() -> None:
    # uvloop's add_reader made the pipe non-blocking, so a reply bigger than
    # the socket buffer failed with EAGAIN and the load-client process quit.
    import multiprocessing
    import threading

    import uvloop

    parent, child = multiprocessing.Pipe()
    big = {"hist": "x" * 4_000_000}
    received: list[Any] = []

    async def main() -> None:
        reader = pool.PipeReader(child)
        try:
            sender = threading.Thread(target=parent.send, args=(big,))
            sender.start()
            received.append(await asyncio.wait_for(reader.get(), 30))
            sender.join()
            replier.start()
            child.send(big)  # larger than the socket buffer: it must block, not fail
        finally:
            reader.close()

    reply: list[Any] = []
    replier = threading.Thread(target=lambda: reply.append(parent.recv()), daemon=True)
    uvloop.run(main())
    replier.join(30)
    assert received == [big]
    assert reply == [big]


def test_the_load_client_inflates_permessage_deflate_split_across_reads() -> None:
    """A batch framed by the server's shared compressed framing (large messages
    compressed, small ones not), arriving in arbitrary chunks."""
    import base64
    import hashlib

    from trioserve.bench.payloads import json_document
    from trioserve.bench.wsclient import GUID, RECV_VIEW, Deliveries, WsClient
    from trioserve.protocol import deflate

    async def main() -> tuple[int, int, int, float, bool]:
        d = Deliveries()
        client = WsClient("127.0.0.1", 1, "/ws", d, deflate=True)
        accept = base64.b64encode(hashlib.sha1(client.key + GUID).digest())
        now = time.monotonic()
        pubs = [orjson.dumps({"op": "pub", "topic": "t", "offset": i + 1,
                              "data": json_document(1000, now) if i % 2 else {"t": now}})
                for i in range(10)]
        data = (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Accept: " + accept + b"\r\nSec-WebSocket-Extensions: "
                + deflate.negotiate([(b"sec-websocket-extensions", b"permessage-deflate")]) + b"\r\n\r\n"
                + deflate.frame_batch(pubs))
        d.arm(10, 1)
        for start in range(0, len(data), 333):
            chunk = data[start:start + 333]
            RECV_VIEW[: len(chunk)] = chunk
            client.buffer_updated(len(chunk))
        return d.received, client.gaps, client.unexpected, d.wire / d.plain, client.deflate

    received, gaps, unexpected, ratio, negotiated = asyncio.run(main())
    assert (received, gaps, unexpected, negotiated) == (10, 0, 0, True)
    assert ratio < 0.6  # half the messages are ~1 KB of JSON, compressed


def test_json_payload_is_about_the_size_asked_and_varied() -> None:
    from trioserve.bench.payloads import publication_data

    docs = [orjson.dumps(publication_data(1000, "json")) for _ in range(5)]
    assert all(1000 <= len(doc) < 1200 for doc in docs)
    assert len(set(docs)) == 5


def test_deflate_needs_a_websocket_url() -> None:
    with pytest.raises(UsageError, match="--deflate"):
        validate(Options("fanout", url="tcp://127.0.0.1:9000", deflate=True))
