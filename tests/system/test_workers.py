"""``trioserve serve --workers N`` as real processes: a supervisor, its workers and a real Redis."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families
from trio_websocket import ConnectionClosed, open_websocket_url

from trioserve.bench import scrape as bench_scrape
from trioserve.config import Config, ConfigError, HistoryRule, load_config
from trioserve.ops.supervisor import Supervisor
from trioserve.ops.worker import read_worker_config, write_worker_config
from trioserve.server import metrics

from ..conftest import RedisServer
from ..peers import OP_CLOSE, EndOfStream, RawWebSocket, dumps, http_publish, http_request
from ..serverproc import REPO, STARTUP_TIMEOUT, ServerProcess, trioserve_process
from .helpers import close_code

pytestmark = pytest.mark.system

_SERVING = re.compile(rb"(\d+) workers serving http://127\.0\.0\.1:(\d+):")
_READY = re.compile(rb"worker (\d+) \(pid (\d+)\) ready")
# Every wait in a test is bounded by this, on top of start-up.
LIMIT = 30.0
CLIENTS = 40


@asynccontextmanager
async def run_workers(*args: str, workers: int = 2) -> AsyncIterator[ServerProcess]:
    """``trioserve serve --port 0 --workers N ARGS``; yields once every worker is ready."""
    pids: dict[int, int] = {}
    try:
        async with trioserve_process("serve", "--port", "0", "--log-level", "info",
                                     "--workers", str(workers), *args) as sp:
            try:
                with trio.fail_after(STARTUP_TIMEOUT):
                    match = await sp.wait_for_log(_SERVING)
                assert int(match.group(1)) == workers
                sp.port = int(match.group(2))
                yield sp
            finally:
                pids = worker_pids(sp)
    finally:
        # Workers the supervisor could not stop (it was killed itself, say).
        for pid in pids.values():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def worker_pids(sp: ServerProcess) -> dict[int, int]:
    """Each worker's latest pid, from the supervisor's "worker N (pid P) ready" lines."""
    return {int(m.group(1)): int(m.group(2)) for m in _READY.finditer(sp.log)}


async def scrape(port: int) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """``/metrics`` as {sample name: {sorted labels: value}}."""
    resp = await http_request(port, "GET", "/metrics")
    assert resp.status == 200, resp
    return parse_samples(resp.body.decode())


def parse_samples(text: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def per_worker(samples: dict[tuple[tuple[str, str], ...], float]) -> dict[str, float]:
    """Values summed over every label but ``worker``."""
    totals: dict[str, float] = {}
    for labels, value in samples.items():
        worker = dict(labels)["worker"]
        totals[worker] = totals.get(worker, 0) + value
    return totals


async def connections_by_worker(port: int) -> dict[str, float]:
    return per_worker((await scrape(port))["trioserve_connections"])


async def subscribed(port: int, topic: str = "t") -> RawWebSocket:
    ws = await RawWebSocket.connect(port)
    await ws.send_json({"op": "subscribe", "topic": topic, "id": "sub"})
    while True:
        reply = await ws.recv_json()
        if reply.get("id") == "sub":
            assert reply["ok"] is True, reply
            return ws


async def next_pub(ws: RawWebSocket) -> Any:
    """The next publication's data; None when the server went away (EOF or reset)."""
    try:
        while True:
            msg = await ws.recv_json()
            if msg.get("op") == "pub":
                return msg["data"]
    except (EndOfStream, trio.BrokenResourceError):
        return None


async def next_pubs(clients: list[RawWebSocket]) -> list[Any]:
    results: list[Any] = [None] * len(clients)

    async def read(i: int) -> None:
        results[i] = await next_pub(clients[i])

    async with trio.open_nursery() as nursery:
        for i in range(len(clients)):
            nursery.start_soon(read, i)
    return results


async def close_all(clients: list[RawWebSocket]) -> None:
    for ws in clients:
        await ws.aclose()


# --- start-up ----------------------------------------------------------------------------------


_BAD_FLAG = "Error: Invalid value for '--workers' (env var: 'TRIOSERVE_WORKERS'): "


@pytest.mark.parametrize("args, env, message", [
    ([], {"TRIOSERVE_WORKERS": "0"}, 'Error: workers must be an integer 1-1024 or "auto", got 0'),
    ([], {"TRIOSERVE_WORKERS": "many"}, "Error: TRIOSERVE_WORKERS must be an integer, got 'many'"),
    (["--workers", "many"], {}, f"{_BAD_FLAG}'many' is not a number of workers (1-1024) or 'auto'"),
    (["--workers", "0"], {}, f"{_BAD_FLAG}0 is not in the range 1-1024"),
])
async def test_bad_worker_counts_exit_2(args: list[str], env: dict[str, str], message: str) -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TRIOSERVE_")}
    with trio.fail_after(STARTUP_TIMEOUT):
        result = await trio.run_process(
            [sys.executable, "-m", "trioserve", "serve", "--port", "0", *args],
            cwd=REPO, env={**clean, **env}, capture_stdout=True, capture_stderr=True, check=False,
        )
    assert result.returncode == 2, result
    lines = result.stderr.decode().splitlines()
    assert any(line.startswith(message) for line in lines), lines


def test_workers_without_a_broker_share_the_supervisors() -> None:
    # Once refused ("needs a broker that spans processes"); now the embedded broker.
    assert Config(workers=3).embedded_broker
    assert Config(workers=2, broker="MEMORY://").embedded_broker
    assert not Config(workers=2, broker="redis://h:6379/0").embedded_broker
    assert not Config().embedded_broker
    # "auto": one worker per core, from every source.
    cores = len(os.sched_getaffinity(0))
    assert Config(workers="auto").workers == cores  # type: ignore[arg-type]
    assert load_config(None, {"TRIOSERVE_WORKERS": "auto"}).workers == cores
    assert load_config(None, {}, {"workers": "AUTO"}).workers == cores


def test_broker_and_workers_validation() -> None:
    assert Config(workers=4, broker="redis://127.0.0.1:6379/0").workers == 4
    assert Config(broker="rediss://cache.example.com:6380/2", broker_password="pw").broker_password == "pw"
    cases: list[tuple[dict[str, Any], str]] = [
        ({"broker": "http://127.0.0.1:6379"}, r"broker 'http://127.0.0.1:6379' is not a broker URL; "
                                               r"use memory:// or redis://"),
        ({"broker": "redis://:secret@h:x/0"}, r"broker 'redis://:\*\*\*@h:x/0' has an invalid port"),
        ({"broker": "redis:///0"}, r"has no host"),
        ({"broker": "redis://h:6379/zero"}, r"the path is the Redis database number"),
        ({"broker": "memory://elsewhere"}, r"memory:// takes no host"),
        ({"broker_password": "pw"}, r"broker_password is set but broker is memory://"),
        ({"broker": "redis://:a@h", "broker_password": "b"}, r"keep one"),
        ({"workers": 0}, r"workers must be an integer 1-1024"),
        ({"worker_id": 3, "workers": 2, "broker": "redis://h"}, r"worker_id 3 is over workers = 2"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ConfigError, match=match) as info:
            Config(**kwargs)
        assert "secret" not in str(info.value)
    # From the environment, like every option; worker_id is the supervisor's alone.
    cfg = load_config(None, {"TRIOSERVE_WORKERS": "3", "TRIOSERVE_BROKER": "redis://h:1/0",
                             "TRIOSERVE_BROKER_PASSWORD": "pw"})
    assert (cfg.workers, cfg.broker, cfg.broker_password) == (3, "redis://h:1/0", "pw")
    with pytest.raises(ConfigError, match="unknown option 'worker_id'"):
        load_config(None, {}, {"worker_id": 1})


def test_the_worker_config_round_trips(tmp_path: Path) -> None:
    config = Config(
        port=4321, tcp_port=4322, reuse_port=True, workers=3, broker="redis://127.0.0.1:6379/1",
        broker_password="pw", token_secret="s" * 32, allowed_origins=["https://a.example"],
        history_rules=[HistoryRule("chat.*", 5, 60.0)], presence_events=["room.*"],
        slow_consumer_policy="drop-oldest",
    )
    write_worker_config(tmp_path, config)
    assert (tmp_path / "config.json").stat().st_mode & 0o777 == 0o600
    assert read_worker_config(tmp_path, 2) == attrs.evolve(config, worker_id=2)


def test_merged_families_keep_each_worker_apart() -> None:
    from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily, Metric

    def families(connects: int) -> list[Metric]:
        counter = CounterMetricFamily("trioserve_connects", "help", labels=["transport"])
        counter.add_metric(["websocket"], connects)
        hist = HistogramMetricFamily("lat_seconds", "help", buckets=[("0.1", 1), ("+Inf", 2)],
                                     sum_value=0.5, unit="seconds")
        return [counter, hist]

    groups = [metrics.families_from_json(metrics.families_to_json(
        [metrics.with_label(f, "worker", str(w)) for f in families(w * 10)])) for w in (1, 2)]
    merged = metrics.merge_families(groups)
    assert [f.name for f in merged] == ["trioserve_connects", "lat_seconds"]
    text = metrics.families_response(merged, _request()).body.decode()
    parsed = {f.name: f for f in text_string_to_metric_families(text)}
    connects = {s.labels["worker"]: s.value for s in parsed["trioserve_connects"].samples}
    assert connects == {"1": 10.0, "2": 20.0}
    inf = [s for s in parsed["lat_seconds"].samples if s.labels.get("le") == "+Inf"]
    assert sorted(s.labels["worker"] for s in inf) == ["1", "2"]


def _request() -> Any:
    from trioserve.net.httpd import Request

    return Request("GET", "/metrics", {}, [], b"", None)


# --- a running supervisor ----------------------------------------------------------------------


async def test_connections_spread_and_metrics_and_publications_span_workers(redis: RedisServer) -> None:
    with trio.fail_after(STARTUP_TIMEOUT + LIMIT):
        async with run_workers("--broker", redis.url) as sp:
            assert b" w1 trioserve.server: listening on" in sp.log
            assert b" w2 trioserve.server: listening on" in sp.log
            clients = [await subscribed(sp.port) for _ in range(CLIENTS)]
            try:
                # Whichever worker the kernel hands the scrape to, it answers for both.
                for _ in range(6):
                    by_worker = await connections_by_worker(sp.port)
                    assert set(by_worker) == {"1", "2"}, by_worker
                    assert sum(by_worker.values()) == CLIENTS, by_worker
                    assert min(by_worker.values()) > 0, f"one worker got every client: {by_worker}"
                scraped = await scrape(sp.port)
                assert per_worker(scraped["trioserve_worker_up"]) == {"1": 1.0, "2": 1.0}
                pids = {dict(labels)["worker"]: int(dict(labels)["pid"])
                        for labels in scraped["trioserve_worker_info"]}
                assert pids == {str(w): pid for w, pid in worker_pids(sp).items()}
                # Every series says which worker it is from, the process ones too.
                assert set(per_worker(scraped["process_resident_memory_bytes"])) == {"1", "2"}
                assert per_worker(scraped["trioserve_max_connections"])["1"] > 0
                # `trioserve bench` reports the server as a whole: the workers added up.
                text = (await http_request(sp.port, "GET", "/metrics")).body.decode()
                whole = bench_scrape.parse(text)
                assert bench_scrape.workers(whole) == 2
                assert whole['trioserve_connections{transport="websocket"}'] == CLIENTS
                # Both sums of one scrape: memory moves between two.
                assert whole["process_resident_memory_bytes"] == sum(
                    per_worker(parse_samples(text)["process_resident_memory_bytes"]).values())

                for _ in range(4):
                    ready = await http_request(sp.port, "GET", "/readyz")
                    assert ready.status == 200, ready
                    assert ready.json()["workers"] == {"1": "ready", "2": "ready"}

                # A publication reaches the subscribers of both workers, whichever takes it.
                for n in range(3):
                    resp = await http_publish(sp.port, "t", {"n": n})
                    assert resp.status == 200, resp.body
                    assert await next_pubs(clients) == [{"n": n}] * CLIENTS
            finally:
                await close_all(clients)


async def test_a_killed_worker_is_restarted_and_only_its_clients_notice(redis: RedisServer) -> None:
    with trio.fail_after(STARTUP_TIMEOUT + LIMIT):
        async with run_workers("--broker", redis.url) as sp:
            clients = [await subscribed(sp.port) for _ in range(CLIENTS)]
            try:
                by_worker = await connections_by_worker(sp.port)
                assert min(by_worker.values()) > 0, by_worker
                victim = worker_pids(sp)[1]
                os.kill(victim, signal.SIGKILL)
                await sp.wait_for_log(re.compile(
                    rb"worker 1 \(pid %d\) killed by signal SIGKILL after [\d.]+s; restarting it in "
                    % victim))

                resp = await http_publish(sp.port, "t", "after the kill")
                assert resp.status == 200, resp.body
                got = await next_pubs(clients)
                survivors = [ws for ws, data in zip(clients, got, strict=True) if data is not None]
                lost = [ws for ws, data in zip(clients, got, strict=True) if data is None]
                assert all(data in (None, "after the kill") for data in got), got
                assert len(lost) == by_worker["1"] and len(survivors) == by_worker["2"], by_worker

                match = await sp.wait_for_log(re.compile(rb"worker 1 \(pid (\d+)\) ready again"))
                assert int(match.group(1)) != victim
                # The dead worker's clients reconnect; everyone hears the next publication.
                for ws in lost:
                    await ws.aclose()
                clients = survivors + [await subscribed(sp.port) for _ in lost]
                resp = await http_publish(sp.port, "t", "again")
                assert resp.status == 200, resp.body
                assert await next_pubs(clients) == ["again"] * CLIENTS
                scraped = await scrape(sp.port)
                assert sum(per_worker(scraped["trioserve_connections"]).values()) == CLIENTS
                assert per_worker(scraped["trioserve_worker_up"]) == {"1": 1.0, "2": 1.0}
                ready = await http_request(sp.port, "GET", "/readyz")
                assert ready.status == 200, ready
            finally:
                await close_all(clients)


async def _subscriber(url: str, codes: list[int | None], *, task_status: trio.TaskStatus[None]) -> None:
    """Subscribe, report ready, then read until the server closes; record its close code."""
    async with open_websocket_url(url) as ws:
        await ws.send_message(dumps({"op": "subscribe", "topic": "t", "id": 1}))
        assert json.loads(await ws.get_message())["ok"] is True
        task_status.started()
        try:
            while True:
                await ws.get_message()
        except ConnectionClosed as exc:
            codes.append(close_code(exc))


async def test_sigterm_drains_every_worker_and_exits_0(redis: RedisServer) -> None:
    codes: list[int | None] = []
    with trio.fail_after(STARTUP_TIMEOUT + LIMIT):
        async with run_workers("--broker", redis.url, "--drain-timeout", "10") as sp:
            async with trio.open_nursery() as nursery:
                for _ in range(20):
                    await nursery.start(_subscriber, f"ws://127.0.0.1:{sp.port}/ws", codes)
                by_worker = await connections_by_worker(sp.port)
                assert min(by_worker.values()) > 0, by_worker
                sp.proc.send_signal(signal.SIGTERM)
                with trio.fail_after(15):
                    returncode = await sp.proc.wait()
            await sp.wait_for_log(b"all workers stopped")
    assert returncode == 0, sp.text
    assert codes == [1001] * 20, sp.text
    assert "SIGTERM: draining 2 workers" in sp.text
    drained = re.findall(r" w(\d) trioserve\.server: drained (\d+), forced (\d+)", sp.text)
    assert sorted(w for w, _, _ in drained) == ["1", "2"], sp.text
    assert {w: int(n) for w, n, _ in drained} == {w: int(n) for w, n in by_worker.items()}
    assert [int(forced) for _, _, forced in drained] == [0, 0]
    assert "restarting" not in sp.text


async def _held_clients(port: int, n: int) -> list[RawWebSocket]:
    """At least *n* subscribed clients, with some on every worker.

    The kernel picks the worker of each connection (SO_REUSEPORT hashes the
    addresses), so *n* connections can all land on one: more are opened, up to
    a bound, until every worker holds one.
    """
    clients = [await subscribed(port) for _ in range(n)]
    for _ in range(20 * n):
        by_worker = await connections_by_worker(port)
        if len(by_worker) > 1 and min(by_worker.values()) > 0:
            return clients
        clients.append(await subscribed(port))
    raise AssertionError(f"{len(clients)} connections and a worker has none: {by_worker}")


async def _close_frame(ws: RawWebSocket) -> int | None:
    while True:
        frame = await ws.recv_frame()
        if frame.opcode == OP_CLOSE:
            return frame.close_code


async def test_second_sigterm_kills_the_workers_at_once(redis: RedisServer) -> None:
    with trio.fail_after(STARTUP_TIMEOUT + LIMIT):
        async with run_workers("--broker", redis.url, "--drain-timeout", "30") as sp:
            # Clients that never answer the close keep both drains waiting.
            held = await _held_clients(sp.port, 10)
            try:
                sp.proc.send_signal(signal.SIGTERM)
                await sp.wait_for_log(b"SIGTERM: draining 2 workers")
                for ws in held:
                    assert await _close_frame(ws) == 1001
                sp.proc.send_signal(signal.SIGTERM)
                # Well under the 30 s drain: only the second signal ends it this soon.
                with trio.fail_after(3):
                    returncode = await sp.proc.wait()
                    for ws in held:
                        with pytest.raises((EndOfStream, trio.BrokenResourceError)):
                            await ws.recv_frame()
                await sp.wait_for_log(b"SIGTERM again: killing the workers")
            finally:
                await close_all(held)
    assert returncode == 128 + signal.SIGTERM, sp.text


async def test_not_ready_while_any_worker_drains(redis: RedisServer) -> None:
    with trio.fail_after(STARTUP_TIMEOUT + LIMIT):
        async with run_workers("--broker", redis.url, "--drain-timeout", "30") as sp:
            held = await _held_clients(sp.port, 10)
            try:
                pid = worker_pids(sp)[1]
                os.kill(pid, signal.SIGTERM)  # worker 1 alone drains, held up by its clients
                await sp.wait_for_log(b" w1 trioserve.server: draining")
                for _ in range(6):  # both workers answer, and both say not ready
                    ready = await http_request(sp.port, "GET", "/readyz")
                    assert ready.status == 503, ready
                    assert ready.json()["status"] == "draining", ready.json()
                draining = per_worker((await scrape(sp.port))["trioserve_draining"])
                assert draining == {"1": 1.0, "2": 0.0}
            finally:
                await close_all(held)
            # Its clients gone, worker 1 finishes its drain, exits 0 and is started again.
            await sp.wait_for_log(re.compile(
                rb"worker 1 \(pid %d\) exited with status 0 after [\d.]+s; restarting" % pid))
            await sp.wait_for_log(re.compile(rb"worker 1 \(pid \d+\) ready again"))
            ready = await http_request(sp.port, "GET", "/readyz")
            assert ready.status == 200, ready


async def test_a_worker_that_fails_to_start_stops_the_supervisor(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # In-process, with a "python" that exits at once with status 1.
    config = Config(port=0, workers=2, broker="redis://127.0.0.1:1/0", drain_timeout=1)
    supervisor = Supervisor(config, python="/bin/false")
    with trio.fail_after(LIMIT), caplog.at_level(logging.INFO, "trioserve.ops.supervisor"):
        assert await supervisor.run() == 1
    assert re.search(r"worker \d \(pid \d+\) exited with status 1 during start-up; stopping",
                     caplog.text), caplog.text
    assert "restarting" not in caplog.text
