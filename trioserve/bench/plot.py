"""``--plot out.png``: latency by percentile, and connections and deliveries over time.

Needs matplotlib (the ``plot`` extra); it draws off-screen (Agg).
"""

from __future__ import annotations

from typing import Any


class PlotUnavailable(Exception):
    pass


def write_plot(report: dict[str, Any], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotUnavailable(
            "--plot needs matplotlib: pip install 'trioserve[plot]'") from None

    fig, (ax_lat, ax_time) = plt.subplots(2, 1, figsize=(9, 8))
    lat = report["latency"]
    curve = report.get("latency_curve") or []
    title = f"trioserve bench {report['scenario']}: {report['options']['connections']:,} connections"
    fig.suptitle(title)
    if curve:
        # x is 1/(1 - p), so the tail gets room: p90 at 10, p99 at 100, p99.9 at 1000.
        xs = [1 / max(1e-6, 1 - p / 100) for p, _ in curve]
        ax_lat.plot(xs, [ms for _, ms in curve], color="tab:blue")
        ax_lat.set_xscale("log")
        ticks = [(1, "p0"), (2, "p50"), (10, "p90"), (100, "p99"), (1000, "p99.9"), (10000, "p99.99")]
        ax_lat.set_xticks([x for x, _ in ticks], [label for _, label in ticks])
        ax_lat.set_ylabel("ms")
        ax_lat.set_title(f"{lat['kind']} latency by percentile ({lat['count']:,} samples)")
        ax_lat.grid(True, which="both", alpha=0.3)
    else:
        ax_lat.text(0.5, 0.5, "no latency samples", ha="center", va="center")
        ax_lat.set_axis_off()

    timeline = report.get("timeline") or []
    ts = [p["t"] for p in timeline]
    ax_time.plot(ts, [p["connections"] for p in timeline], color="tab:green", label="connections up")
    ax_time.set_xlabel("seconds")
    ax_time.set_ylabel("connections", color="tab:green")
    ax_rate = ax_time.twinx()
    ax_rate.plot(ts, [p["deliveries_per_s"] or 0 for p in timeline], color="tab:orange",
                 label="deliveries/s" if report["scenario"] != "echo" else "round trips/s")
    ax_rate.set_ylabel("per second", color="tab:orange")
    ax_time.set_ylim(bottom=0)
    ax_rate.set_ylim(bottom=0)
    ax_time.set_title("connections and deliveries over time")
    ax_time.grid(True, alpha=0.3)
    lines = ax_time.get_legend_handles_labels()
    rates = ax_rate.get_legend_handles_labels()
    ax_time.legend(lines[0] + rates[0], lines[1] + rates[1], loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
