"""Latency histograms: HDR histograms (the ``hdrhistogram`` package) in microseconds.

The load client's hot path only appends a float (seconds) to an ``array``;
:meth:`Recorder.drain` moves such a batch into the histograms off the hot
path. ``HdrHistogram.record_value`` costs about 1 µs in pure Python, so a
batch is first counted by value (``collections.Counter``, in C), and values
above 2,048 µs are first rounded down to the histogram's own resolution at 3
significant figures, which bounds the number of distinct values per batch.

Workers send histograms to the orchestrator encoded
(:meth:`HdrHistogram.encode`, compressed base64) and the orchestrator adds
them up (:func:`merge`), so percentiles over all processes are exact to the
histogram's precision (0.1%).
"""

from __future__ import annotations

import math
from array import array
from collections import Counter
from collections.abc import Iterable
from typing import Any

from hdrh.histogram import HdrHistogram  # type: ignore[import-untyped]

LOWEST_US = 1
HIGHEST_US = 3_600_000_000  # one hour
SIGNIFICANT_FIGURES = 3
# At 3 significant figures HDR keeps 2,048 sub-buckets: values below that are
# exact, larger ones lose their low (bit_length - 11) bits.
_SUB_BUCKET_BITS = 11
PERCENTILES = (50.0, 90.0, 99.0, 99.9)


def new_histogram() -> Any:
    return HdrHistogram(LOWEST_US, HIGHEST_US, SIGNIFICANT_FIGURES)


def _quantize(value: int) -> int:
    shift = value.bit_length() - _SUB_BUCKET_BITS
    return value if shift <= 0 else (value >> shift) << shift


def record_batch(hists: Iterable[Any], seconds: Iterable[float]) -> int:
    """Record a batch of latencies (seconds) into every histogram of *hists*; returns the count."""
    counts = Counter(min(HIGHEST_US, max(LOWEST_US, int(s * 1e6))) for s in seconds)
    if len(counts) > 2 * (1 << _SUB_BUCKET_BITS):
        coarse: Counter[int] = Counter()
        for value, n in counts.items():
            coarse[_quantize(value)] += n
        counts = coarse
    targets = list(hists)
    for value, n in counts.items():
        for h in targets:
            h.record_value(value, n)
    return sum(counts.values())


class Recorder:
    """A worker's latency histograms: everything so far, and the current interval."""

    def __init__(self) -> None:
        self.total = new_histogram()
        self.interval = new_histogram()

    def drain(self, samples: array[float]) -> None:
        if samples:
            record_batch((self.total, self.interval), samples)

    def take_interval(self) -> bytes:
        """The interval's histogram, encoded; a new interval starts."""
        encoded = encode(self.interval)
        self.interval = new_histogram()
        return encoded


def encode(hist: Any) -> bytes:
    return bytes(hist.encode())


def decode(encoded: bytes) -> Any:
    return HdrHistogram.decode(encoded)


def merge(encoded: Iterable[bytes]) -> Any:
    """One histogram holding every count of the encoded ones."""
    total = new_histogram()
    for blob in encoded:
        if blob:
            other = decode(blob)
            if other.get_total_count():
                total.add(other)
    return total


def summary(hist: Any, mean: bool = True) -> dict[str, float | int | None]:
    """Count, p50/p90/p99/p99.9, max, min and mean, in milliseconds (None without samples).

    The mean walks every recorded value in Python (~80 ms for a wide
    histogram), so the progress poll leaves it out.
    """
    count = int(hist.get_total_count())
    out: dict[str, float | int | None] = {"count": count}
    names = {50.0: "p50_ms", 90.0: "p90_ms", 99.0: "p99_ms", 99.9: "p99_9_ms"}
    values = hist.get_percentile_to_value_dict(list(PERCENTILES)) if count else {}
    for pct, name in names.items():
        out[name] = values[pct] / 1e3 if count else None
    out["max_ms"] = hist.get_max_value() / 1e3 if count else None
    out["min_ms"] = hist.get_min_value() / 1e3 if count else None
    value = hist.get_mean_value() / 1e3 if count and mean else None
    out["mean_ms"] = value if value is None or math.isfinite(value) else None
    return out


def percentile_curve(hist: Any, points: int = 60) -> list[tuple[float, float]]:
    """(percentile, ms) pairs from p0 to p99.99, denser towards the tail, for a plot."""
    if not hist.get_total_count():
        return []
    pcts = sorted({min(99.999, 100.0 * (1 - 10 ** (-4.5 * i / points))) for i in range(points + 1)})
    values = hist.get_percentile_to_value_dict(pcts)
    return [(p, values[p] / 1e3) for p in pcts]
