"""The orchestrator of ``trioserve bench``: phases, publishers, polling, the result.

One asyncio loop in the parent process drives the worker processes
(``worker.py``) and, for ``fanout`` and ``storm``, runs the publishers
itself. Phases: start the workers → scrape ``/metrics`` → connect (ramped at
``--connect-rate``) → settle and scrape again (memory per connection) → the
scenario for ``--duration`` → wait for publish replies and for every
subscriber to catch up → scrape → collect. Every phase has a deadline.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from . import hist, report, scrape
from .options import Options, plan, topic_names, validate
from .output import fmt
from .pool import PhaseError, Workers, connect_totals
from .progress import Progress
from .publisher import Publishers
from .worker import BenchWorker

POLL = 0.5


class Run:
    def __init__(self, opts: Options, progress: Progress) -> None:
        self.opts = opts
        self.progress = progress
        self.workers: Workers | None = None
        self.publishers: Publishers | None = None
        self.timeline: list[dict[str, Any]] = []
        self.start = time.monotonic()
        self._last_poll: tuple[float, int] | None = None
        self.client_cpu_connected = 0.0

    # -- polling -------------------------------------------------------------------

    async def poll_forever(self) -> None:
        while True:
            await asyncio.sleep(POLL)
            try:
                await self.poll()
            except PhaseError:
                pass

    async def poll(self) -> None:
        assert self.workers is not None
        stats = await self.workers.ask_all({"op": "stats"}, 10)
        now = time.monotonic()
        received = sum(s["received"] + s["echo_ok"] for s in stats)
        interval = hist.summary(hist.merge(s["hist"] for s in stats), mean=False)
        rate = None
        if self._last_poll is not None and now > self._last_poll[0]:
            rate = (received - self._last_poll[1]) / (now - self._last_poll[0])
        self._last_poll = (now, received)
        snapshot = {
            "t": round(now - self.start, 3),
            "phase": self.progress.phase_name,
            "connections": sum(s["open"] for s in stats),
            "connect_ok": sum(s["connect_ok"] for s in stats),
            "connect_failed": sum(s["connect_failed"] for s in stats),
            "received": received,
            "deliveries_per_s": rate,
            "errors": sum(s["errors"] for s in stats),
            "p50_ms": interval["p50_ms"],
            "p99_ms": interval["p99_ms"],
            "published": self.publishers.sent if self.publishers is not None else None,
        }
        self.timeline.append(snapshot)
        self.progress.update(snapshot)

    # -- phases ----------------------------------------------------------------------

    async def connect(self) -> dict[str, Any]:
        assert self.workers is not None
        opts = self.opts
        shares = plan(opts)
        per_proc_rate = opts.connect_rate / len(shares) if opts.connect_rate > 0 else 0.0
        expected_s = opts.connections / opts.connect_rate if opts.connect_rate > 0 else opts.connections / 500
        phase_timeout = expected_s * 1.5 + opts.connect_timeout + 10
        cmds = [{"op": "connect", **opts.target, "plan": share, "rate": per_proc_rate,
                 "concurrency": opts.connect_concurrency, "timeout": opts.connect_timeout,
                 "phase_timeout": phase_timeout} for share in shares]
        replies = await self.workers.ask(cmds, phase_timeout + 30)
        totals = connect_totals(replies)
        grown = sum(r["rss_after"] - r["rss_before"] for r in replies)
        self.client_cpu_connected = sum(r["cpu"][0] for r in replies)
        ok = totals["ok"]
        return {"target": opts.connections, **totals,
                "client_rss_per_conn_kb": grown / ok / 1024 if ok else None}

    async def storm_waves(self, duration: float) -> list[dict[str, Any]]:
        assert self.workers is not None
        opts = self.opts
        waves: list[dict[str, Any]] = []
        end = time.monotonic() + duration
        while True:
            await asyncio.sleep(min(opts.storm_interval, max(0.0, end - time.monotonic())))
            if time.monotonic() >= end - 0.5:
                return waves
            t = time.monotonic() - self.start
            replies = await self.workers.ask_all(
                {"op": "storm", "percent": opts.storm_percent, "timeout": opts.connect_timeout,
                 "concurrency": opts.connect_concurrency,
                 "phase_timeout": opts.connect_timeout * 2 + 10}, opts.connect_timeout * 2 + 30)
            wave: dict[str, Any] = {"t": round(t, 3)}
            for key in ("dropped", "reconnected", "failed", "recovered", "unrecovered"):
                wave[key] = sum(r.get(key, 0) for r in replies)
            maxes = [r["reconnect_max_ms"] for r in replies if r.get("reconnect_max_ms") is not None]
            wave["reconnect_max_ms"] = max(maxes) if maxes else None
            waves.append(wave)
            self.progress.note(f"storm: dropped {wave['dropped']:,}, reconnected {wave['reconnected']:,}"
                               f" ({wave['recovered']:,} recovered, {wave['unrecovered']:,} not),"
                               f" failed {wave['failed']:,}")

    async def publish(self, storm: bool) -> dict[str, Any]:
        assert self.workers is not None
        opts = self.opts
        self.publishers = pubs = await Publishers.open(opts.publishers, opts.target, topic_names(opts),
                                                       opts.size, opts.connect_timeout)
        waves: list[dict[str, Any]] = []
        # The publishers stay open until the final /metrics scrape (execute() closes
        # them), so their close is not counted among the run's disconnects.
        self.progress.phase(f"publishing {opts.rate:,.0f}/s to {opts.topics} topic(s)"
                            + (f", dropping {opts.storm_percent:g}% every {opts.storm_interval:g}s"
                               if storm else ""), f"{opts.duration:g}s")
        if storm:
            _, waves = await asyncio.gather(pubs.run(opts.rate, opts.duration),
                                            self.storm_waves(opts.duration))
        else:
            await pubs.run(opts.rate, opts.duration)
        self.progress.phase("waiting for publish replies and deliveries")
        await pubs.wait_acks(opts.drain_timeout)
        if pubs.sent and not pubs.acked and "publish: forbidden" in pubs.errors:
            raise PhaseError("the server refuses client publishing: start it with --client-publish")
        final = dict(pubs.last_offset)
        drained = await self.workers.ask_all({"op": "drain", "final": final,
                                              "timeout": opts.drain_timeout}, opts.drain_timeout + 30)
        behind = sum(r["behind"] for r in drained)
        return {"publishers": pubs.summary(), "first_send": pubs.first_send,
                "storm_waves": waves, "behind_after_drain": behind}

    async def echo(self) -> dict[str, Any]:
        assert self.workers is not None
        opts = self.opts
        self.progress.phase(f"echo: {opts.rate:,.0f} ping round trips/s", f"{opts.duration:g}s")
        replies = await self.workers.ask_all(
            {"op": "echo", "rate": opts.rate / len(self.workers), "duration": opts.duration,
             "timeout": opts.drain_timeout}, opts.duration + opts.drain_timeout + 30)
        return {"echo_sent": sum(r["sent"] for r in replies)}

    async def execute(self) -> dict[str, Any]:
        opts = self.opts
        result: dict[str, Any] = {"options": report.options_dict(opts), "started": time.time()}
        murl = scrape.metrics_url(opts.url, opts.metrics_url)
        assert opts.procs is not None
        self.progress.phase(f"starting {opts.procs} load-client process(es)")
        self.workers = Workers(opts.procs, BenchWorker, name="trioserve-bench", loop=opts.loop)
        result["client_loop"] = self.workers.loop
        poller: asyncio.Task[None] | None = None
        try:
            await self.workers.ask_all({"op": "ping"}, 60)
            before, why = await scrape.scrape(murl)
            result["metrics_error"] = why
            poller = asyncio.create_task(self.poll_forever())
            self.progress.phase(f"connecting {opts.connections:,}",
                                f"{opts.connect_rate:,.0f}/s" if opts.connect_rate > 0 else "")
            connect = result["connect"] = await self.connect()
            errs = f", failures: {connect['errors']}" if connect["errors"] else ""
            self.progress.note(f"connected {connect['ok']:,}/{opts.connections:,} in "
                               f"{connect['seconds']:.2f}s ({fmt(connect['rate'])}/s){errs}")
            if connect["ok"] == 0:
                raise PhaseError(f"no connection succeeded: {connect['errors']}")
            await asyncio.sleep(opts.settle)
            mid, _ = await scrape.scrape(murl)
            t0 = time.monotonic()
            if opts.scenario == "idle":
                self.progress.phase("holding idle connections", f"{opts.duration:g}s")
                await asyncio.sleep(opts.duration)
            elif opts.scenario == "echo":
                result.update(await self.echo())
            else:
                result.update(await self.publish(storm=opts.scenario == "storm"))  # fanout, rooms
            result["scenario_seconds"] = time.monotonic() - t0
            await self.poll()
            after, why_after = await scrape.scrape(murl)
            result["metrics_error"] = result["metrics_error"] or why_after
            self.progress.phase("collecting")
            collected = await self.workers.ask_all({"op": "collect"}, 60)
            result["metrics"] = {"url": murl, "before": before, "mid": mid, "after": after}
            result["collected"] = collected
            result["client_cpu_s"] = sum(c["cpu"][0] for c in collected) - self.client_cpu_connected
            result["end_received_at"] = time.monotonic()
        finally:
            if poller is not None:
                poller.cancel()
                await asyncio.gather(poller, return_exceptions=True)
            if self.publishers is not None:
                self.publishers.close()
            try:
                await self.workers.ask_all({"op": "close"}, 30)
            except PhaseError:
                pass
            await self.workers.stop()
        result["timeline"] = self.timeline
        return result


async def run(opts: Options) -> dict[str, Any]:
    """Run the benchmark; returns the report (``report.build``). Raises PhaseError if it cannot run."""
    validate(opts)
    with Progress(opts.progress, opts.scenario, opts.connections) as progress:
        raw = await Run(opts, progress).execute()
    return report.build(opts, raw)
