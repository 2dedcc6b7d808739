"""The status page's view of the nodes' figures, and the server API's body checks."""

from __future__ import annotations

from typing import Any

import pytest

from trioserve.push.hub import LATENCY_BUCKETS
from trioserve.server.admin import AdminView, check_key, percentile
from trioserve.server.api_admin import BadBody, parse_disconnect, parse_unsubscribe


def node(name: str, pid: int = 1, *, ws: int = 0, tcp: int = 0, deliveries: int = 0,
         topics: dict[str, list[int]] | None = None, latency: list[int] | None = None,
         recent: list[list[Any]] | None = None, worker: int | None = None) -> dict[str, Any]:
    return {"node": name, "worker": worker, "pid": pid, "state": "ready", "version": "0", "uptime": 1.0,
            "connections": {"websocket": ws, "tcp": tcp}, "publications": 0, "deliveries": deliveries,
            "latency_buckets": latency or [0] * (len(LATENCY_BUCKETS) + 1),
            "disconnects_total": {"1000": 1}, "recent_disconnects": recent or [], "topics": topics or {}}


def cumulative(counts: dict[int, int]) -> list[int]:
    """Cumulative buckets from counts per bucket index."""
    out, total = [], 0
    for i in range(len(LATENCY_BUCKETS) + 1):
        total += counts.get(i, 0)
        out.append(total)
    return out


def test_percentiles_are_bucket_upper_bounds() -> None:
    assert percentile(cumulative({}), 0.5) is None
    buckets = cumulative({0: 50, 3: 40, 5: 10})
    assert percentile(buckets, 0.5) == LATENCY_BUCKETS[0]
    assert percentile(buckets, 0.9) == LATENCY_BUCKETS[3]
    assert percentile(buckets, 0.99) == LATENCY_BUCKETS[5]
    assert percentile(cumulative({len(LATENCY_BUCKETS): 1}), 0.5) == float("inf")


def test_a_frame_sums_the_nodes_and_rates_come_from_the_previous_one() -> None:
    view = AdminView()
    first = view.frame([node("w1", ws=2, topics={"a": [2, 10]}, worker=1),
                        node("w2", ws=1, tcp=1, topics={"a": [1, 10], "b": [1, 0]}, worker=2)], 0, 100.0)
    assert first["connections"] == {"websocket": 3, "tcp": 1, "total": 4}
    assert first["publications_per_s"] == 0 and first["deliveries_per_s"] == 0
    assert [(t["topic"], t["subscribers"]) for t in first["top_subscribers"]] == [("a", 3), ("b", 1)]
    assert [n["node"] for n in first["nodes"]] == ["w1", "w2"]
    assert first["disconnects_total"] == {"1000": 2}
    # Two seconds on: topic a went from offset 10 to 30 (both workers fan it out:
    # it counts once), and the workers made 40 and 20 deliveries.
    second = view.frame([node("w1", ws=2, deliveries=40, topics={"a": [2, 30]}, worker=1),
                         node("w2", ws=1, deliveries=20, topics={"a": [1, 30]}, worker=2)], 0, 102.0)
    assert second["publications_per_s"] == 10 and second["deliveries_per_s"] == 30
    assert second["top_rate"] == [{"topic": "a", "subscribers": 3, "offset": 30, "rate": 10.0}]


def test_a_restarted_worker_does_not_make_a_negative_or_huge_rate() -> None:
    view = AdminView()
    view.frame([node("w1", pid=1, deliveries=1000)], 0, 100.0)
    again = view.frame([node("w1", pid=2, deliveries=5)], 0, 101.0)
    assert again["deliveries_per_s"] == 0


def test_latency_percentiles_cover_the_window_and_disconnects_are_newest_first() -> None:
    view = AdminView()
    view.frame([node("n", latency=cumulative({0: 1000}))], 0, 0.0)
    frame = view.frame([node("n", latency=cumulative({0: 1000, 6: 10}),
                             recent=[[5.0, 4010, "banned", "websocket"], [7.0, 1000, "", "tcp"]])], 1, 1.0)
    assert frame["latency"]["samples"] == 10 and frame["latency"]["p50"] == LATENCY_BUCKETS[6]
    assert [d["time"] for d in frame["disconnects"]] == [7.0, 5.0] and frame["missing"] == 1
    beyond = view.frame([node("n", latency=cumulative({0: 1000, 6: 10, len(LATENCY_BUCKETS): 100}))], 0, 2.0)
    assert beyond["latency"]["p99"] == -1  # past the last bound


def test_the_key() -> None:
    assert check_key("k", "k") and not check_key("x", "k") and not check_key(None, "k")
    assert not check_key(7, "k") and check_key("anything", None)


def test_a_disconnect_body() -> None:
    assert parse_disconnect(b'{"user":"alice","code":4010,"reason":"r"}') == ("alice", 4010, "r")
    assert parse_disconnect(b'{"user":"alice"}') == ("alice", 4000, "disconnected by the server")
    assert parse_disconnect(('{"user":"a","reason":"' + "\u00e9" * 61 + '"}').encode())[2] == "\u00e9" * 61


@pytest.mark.parametrize(("body", "message"), [
    (b'{"user":"a","code":3999}', "code: must be"),
    (b'{"user":"a","code":4000.5}', "code: must be"),
    (('{"user":"a","reason":"' + "\u00e9" * 62 + '"}').encode(), "reason: at most 123 bytes"),
    (b'{"user":null}', "user: missing"),
    (b"", "invalid JSON"),
])
def test_a_bad_disconnect_body_is_named(body: bytes, message: str) -> None:
    with pytest.raises(BadBody, match=message):
        parse_disconnect(body)


def test_an_unsubscribe_body() -> None:
    assert parse_unsubscribe(b'{"user":"a","topic":"room"}') == ("a", "room")
    with pytest.raises(BadBody, match="topic:"):
        parse_unsubscribe(b'{"user":"a","topic":7}')
