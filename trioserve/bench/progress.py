"""The live progress display (rich) and its plain fallback.

On a terminal the display redraws a few times a second: phase, connections
up, deliveries/s, errors. Without one (CI logs, a pipe) or with
``--no-progress``, each phase is one line on stderr instead.
"""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table


def _n(value: Any, spec: str = ",.0f") -> str:
    return "-" if value is None else f"{value:{spec}}"


class Progress:
    def __init__(self, enabled: bool, scenario: str, target: int) -> None:
        self.enabled = enabled
        self.scenario = scenario
        self.target = target
        self.phase_name = "starting"
        self.start = time.monotonic()
        self.phase_start = self.start
        self.last: dict[str, Any] = {}
        self.console = Console(stderr=True)
        self.live: Live | None = None

    def __enter__(self) -> Progress:
        if self.enabled:
            self.live = Live(self._render(), console=self.console, refresh_per_second=4,
                             transient=False)
            self.live.__enter__()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.live is not None:
            self.live.update(self._render())
            self.live.__exit__(exc_type, exc, tb)
            self.live = None

    def phase(self, name: str, detail: str = "") -> None:
        self.phase_name = name
        self.phase_start = time.monotonic()
        if self.live is not None:
            self.live.update(self._render())
        else:
            elapsed = time.monotonic() - self.start
            print(f"[{elapsed:6.1f}s] {name}{': ' + detail if detail else ''}", file=sys.stderr,
                  flush=True)

    def note(self, text: str) -> None:
        """A line that stays (above the live display, or on stderr)."""
        if self.live is not None:
            self.live.console.print(text)
        else:
            elapsed = time.monotonic() - self.start
            print(f"[{elapsed:6.1f}s]   {text}", file=sys.stderr, flush=True)

    def update(self, snapshot: dict[str, Any]) -> None:
        self.last = snapshot
        if self.live is not None:
            self.live.update(self._render())

    def _render(self) -> Table:
        s = self.last
        table = Table.grid(padding=(0, 2))
        table.add_column(style="bold")
        table.add_column()
        now = time.monotonic()
        table.add_row(f"trioserve bench {self.scenario}",
                      f"{self.phase_name} ({now - self.phase_start:.0f}s, total {now - self.start:.0f}s)")
        up = s.get("connections")
        failed = s.get("connect_failed") or 0
        table.add_row("connections up", f"{_n(up)} / {self.target:,}"
                      + (f"  ({failed:,} failed)" if failed else ""))
        if s.get("published") is not None:
            table.add_row("published", _n(s.get("published")))
        table.add_row("deliveries/s", _n(s.get("deliveries_per_s")))
        table.add_row("received", _n(s.get("received")))
        if s.get("p99_ms") is not None:
            table.add_row("latency p50 / p99", f"{s['p50_ms']:.1f} / {s['p99_ms']:.1f} ms")
        table.add_row("errors", _n(s.get("errors")))
        return table
