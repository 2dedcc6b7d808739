"""``benchmarks/fanout.py --mode rate``: a small real run, and the kept-up verdict's wording.

The run starts the real servers as subprocesses (the harness does), at small
N, with every wait bounded, like the other tests here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

from benchmarks import report

from .helpers import REPO

RUN_TIMEOUT = 120.0
SUBSCRIBERS, RATE, DURATION = 50, 20, 1


@pytest.mark.system
async def test_rate_mode_measures_every_delivery_of_both_servers(tmp_path: Path) -> None:
    out, md = tmp_path / "rate.json", tmp_path / "rate.md"
    cmd = [sys.executable, "benchmarks/fanout.py", "--mode", "rate", "--subscribers", str(SUBSCRIBERS),
           "--rate", str(RATE), "--duration", str(DURATION), "--servers", "trioserve,websockets",
           "--client-procs", "1", "--settle", "0.1", "--drain-timeout", "10", "--stall-timeout", "5",
           "--json", str(out), "--markdown", str(md), "--log-dir", str(tmp_path / "logs")]
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIOSERVE_")}
    with trio.fail_after(RUN_TIMEOUT):
        done = await trio.run_process(cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                                      capture_stdout=True, capture_stderr=True, check=False)
    text = done.stdout.decode(errors="replace") + done.stderr.decode(errors="replace")
    assert done.returncode == 0, text
    r = json.loads(out.read_text())
    assert r["config"]["mode"] == "rate"
    assert [s["server"] for s in r["summary"]] == ["trioserve", "websockets"], text
    planned = RATE * DURATION
    for s, result in zip(r["summary"], r["results"], strict=True):
        phase = result["rate_phase"]
        assert s["status"] == "ok", text
        assert (s["publications_planned"], s["publications_sent"], phase["acks_ok"]) == (planned,) * 3
        assert s["expected"] == s["received"] == planned * SUBSCRIBERS and s["lost"] == 0, text
        assert (s["gaps"], s["dups"]) == (0, 0)
        # Fresh topic: offsets 1..20, and every subscriber saw the last one.
        assert phase["offsets_contiguous"] and phase["final_offset"] == planned
        assert phase["subscriber_last_offset"] == [planned, planned]
        assert phase["latency"]["count"] == planned * SUBSCRIBERS
        assert 0 < s["p50_ms"] <= s["p90_ms"] <= s["p99_ms"] <= s["p99_9_ms"] <= s["max_ms"] < 10_000
        assert s["kept_up"] is True and 0 <= s["backlog_s"] <= 1, text
        # 20 sends on a fixed schedule span 19/20 s: the rate held, however late one send was.
        assert s["send_rate"] == pytest.approx(RATE, rel=0.3)
        assert s["server_cpu_us_per_delivery"] > 0 and s["client_cpu_us_per_delivery"] > 0
    assert r["ratios"]["websockets"] == {"p50_ms": 1.0, "p99_ms": 1.0, "server_cpu_us_per_delivery": 1.0}
    assert all(v > 0 for v in r["ratios"]["trioserve"].values())
    markdown = md.read_text()
    assert markdown.startswith("## Fan-out latency at a fixed rate")
    for line in ("| latency p99.9 ms |", "| kept up (last delivery - last pub) |",
                 "| vs websockets: latency p99 ratio (lower=better) |", "--mode rate", "Libraries: "):
        assert line in markdown
    assert "kept up: yes" in done.stdout.decode()


def rate_result(server: str, **phase: Any) -> dict[str, Any]:
    base = {"publications_planned": 50, "publications_sent": 50, "send_rate": 5.0,
            "send_lag_max_ms": 1.0, "expected": 5000, "received": 5000, "lost": 0, "gaps": 0,
            "dups": 0, "worker_status": ["ok"], "server_cpu_us_per_delivery": 2.0,
            "client_cpu_us_per_delivery": 3.0, "kept_up": True, "backlog_s": 0.01,
            "latency": {"p50_ms": 1.0, "p90_ms": 2.0, "p99_ms": 4.0, "p99_9_ms": 5.0, "max_ms": 6.0}}
    return {"server": server, "status": "ok", "connect": {"ok": 100, "failed": 0, "rate": 900.0},
            "rate_phase": {**base, **phase}}


def test_rate_table_says_who_kept_up_and_who_fell_behind() -> None:
    results = [
        rate_result("websockets"),
        rate_result("trioserve", backlog_s=3.5, kept_up=False,
                    latency={"p50_ms": 0.5, "p90_ms": 1.0, "p99_ms": 8.0, "p99_9_ms": 9.0, "max_ms": 9.5}),
        rate_result("trio-websocket", received=4000, lost=1000, worker_status=["timeout"],
                    kept_up=False, backlog_s=0.2, send_lag_max_ms=120.0),
        {"server": "broken", "status": "failed in connect: boom", "rate_phase": None},
    ]
    summaries = [report.summarize_rate(r) for r in results]
    rats = report.rate_ratios(summaries)
    assert rats["trioserve"] == {"p50_ms": 0.5, "p99_ms": 2.0, "server_cpu_us_per_delivery": 1.0}
    rows = {row[0]: row[1:] for row in report.rate_table_rows(summaries, rats)}
    assert rows["kept up (last delivery - last pub)"] == [
        "yes (0.010 s)", "fell behind (3.500 s)", "no: timeout (1,000 undelivered)", "n/a"]
    assert rows["deliveries lost"] == ["0", "0", "1,000", "0"]
    assert rows["latency p99.9 ms"] == ["5.0", "9.0", "5.0", "n/a"]
    assert rows["vs websockets: latency p50 ratio (lower=better)"][:2] == ["1.00x", "0.500x"]
    notes = report.rate_notes(summaries, kept_up_within=1.0)
    assert notes == [
        "broken: failed in connect: boom",
        "trioserve: fell behind: its last delivery came 3.50 s after the last publication (limit 1 s)",
        "trio-websocket: 1,000 of 5,000 deliveries missing when the phase ended (timeout)",
        "trio-websocket: the publisher sent up to 120 ms behind its schedule (the harness was busy); "
        "latency counts from the actual send",
    ]
