"""Fault-injection tests: print the figures each test recorded at the end of the run."""

from __future__ import annotations

import json
from typing import Any

import pytest

from .helpers import FIGURES


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    if not FIGURES:
        return
    terminalreporter.section("fault-injection figures")
    for name, figures in FIGURES.items():
        terminalreporter.write_line(f"{name}: {json.dumps(figures, sort_keys=True)}")
