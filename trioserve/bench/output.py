"""Formatting and machine description shared by ``trioserve bench`` and ``benchmarks/fanout.py``."""

from __future__ import annotations

import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from array import array
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path
from typing import Any

LIBRARIES = ("trio", "trio-websocket", "websockets", "wsproto", "h11", "orjson", "psutil")


def percentile(sorted_samples: array[float] | list[float], pct: float) -> float:
    """Nearest-rank percentile of already sorted samples (exact, no binning)."""
    n = len(sorted_samples)
    if n == 0:
        return math.nan
    rank = max(1, math.ceil(pct / 100.0 * n))
    return sorted_samples[rank - 1]


def latency_stats(samples: array[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "count": len(ordered),
        "p50_ms": percentile(ordered, 50) * 1e3,
        "p90_ms": percentile(ordered, 90) * 1e3,
        "p99_ms": percentile(ordered, 99) * 1e3,
        "max_ms": (ordered[-1] * 1e3) if ordered else math.nan,
        "min_ms": (ordered[0] * 1e3) if ordered else math.nan,
    }


# -- machine description ------------------------------------------------------

def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def nproc() -> str:
    try:
        return subprocess.run(["nproc"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return str(len(os.sched_getaffinity(0)))


def library_versions(names: Iterable[str] = LIBRARIES) -> dict[str, str]:
    versions = {}
    for name in (*names, "trioserve"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed" if name != "trioserve" else "working tree"
    return versions


def machine_info(libraries: Iterable[str] = LIBRARIES) -> dict[str, Any]:
    mem_kb = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    except OSError:
        pass
    return {
        "nproc": nproc(),
        "cpu_model": cpu_model(),
        "memory_gib": round(mem_kb / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "loadavg_at_start": os.getloadavg(),
        "libraries": library_versions(libraries),
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime()),
    }


# -- rendering -------------------------------------------------------------------

def fmt(value: Any, spec: str = ",.0f", suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:{spec}}{suffix}"


def render_text(rows: list[list[str]]) -> str:
    """A plain table: first column left-aligned, the others right-aligned."""
    widths = [max(len(r[i]) for r in rows if i < len(r)) for i in range(len(rows[0]))]
    widths = [min(w, 60) for w in widths]
    lines = []
    for n, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
        lines.append("  ".join(cells))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def json_safe(value: Any) -> Any:
    """NaN (no sample) becomes null: NaN is not valid JSON."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def write_json(path: str, payload: dict[str, Any]) -> None:
    text = json.dumps(json_safe(payload), indent=2, default=str, allow_nan=False)
    Path(path).write_text(text + "\n")


def command_line() -> str:
    """The command as typed, runnable again from the same directory."""
    exe = sys.executable
    if not os.path.relpath(exe).startswith(".."):
        exe = os.path.relpath(exe)
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    head = [exe, "-m", spec.name] if spec is not None and spec.name else [exe, sys.argv[0]]
    return shlex.join([*head, *sys.argv[1:]])
