"""The bad-input matrix table: each case records what it sent, expected and saw.

At the end of the session the rows go to ``artifacts/reliability-matrix.md``
when ``CI`` is set, otherwise to ``$TMPDIR/trioserve-reliability-matrix.md``;
``TRIOSERVE_MATRIX_OUT`` names another path. docs/reliability.md carries the
table of the last run by hand.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Generator
from pathlib import Path

import pytest

MATRIX_ROW = pytest.StashKey[dict[str, str]]()
_rows: list[dict[str, str]] = []
_written: list[Path] = []

COLUMNS = [("id", "case"), ("category", "area"), ("sent", "sent"), ("expected", "expected"),
           ("observed", "observed (code and reason)"), ("result", "result")]


@pytest.fixture
def matrix_row(request: pytest.FixtureRequest) -> dict[str, str]:
    """The table row of this test; the case fills in sent/expected/observed."""
    row: dict[str, str] = {"id": request.node.callspec.id}
    request.node.stash[MATRIX_ROW] = row
    _rows.append(row)
    return row


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    row = item.stash.get(MATRIX_ROW, None)
    if row is not None and (report.when == "call" or report.failed):
        if report.passed:
            row.setdefault("result", "pass")
        else:
            row["result"] = "**FAIL**"
            if call.excinfo is not None:
                message = "; ".join(_leaves(call.excinfo.value))[:300]
                row["failure"] = message
                row.setdefault("observed", message)
    return report


def _leaves(exc: BaseException) -> list[str]:
    """``Type: message`` of the innermost exceptions (trio wraps them in groups)."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    first = str(exc).splitlines()[0] if str(exc) else ""
    return [f"{type(exc).__name__}: {first}"]


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render(rows: list[dict[str, str]]) -> str:
    passed = sum(1 for r in rows if r.get("result") == "pass")
    lines = [
        f"Cases tried: {len(rows)}; passed: {passed}; failed: {len(rows) - passed}.",
        "",
        "| # | " + " | ".join(title for _, title in COLUMNS) + " |",
        "|---|" + "---|" * len(COLUMNS),
    ]
    for i, row in enumerate(rows, 1):
        cells = [_cell(row.get(key, "")) for key, _ in COLUMNS]
        cells[0] = f"`{cells[0]}`"
        lines.append(f"| {i} | " + " | ".join(cells) + " |")
    failures = [r for r in rows if r.get("failure")]
    if failures:
        lines += ["", "Failures:", ""]
        lines += [f"- `{r['id']}`: {_cell(r['failure'])}" for r in failures]
    return "\n".join(lines) + "\n"


def _out_path(root: Path) -> Path:
    if os.environ.get("TRIOSERVE_MATRIX_OUT"):
        return Path(os.environ["TRIOSERVE_MATRIX_OUT"])
    if os.environ.get("CI"):
        return root / "artifacts" / "reliability-matrix.md"
    return Path(tempfile.gettempdir()) / "trioserve-reliability-matrix.md"


def pytest_sessionfinish(session: pytest.Session) -> None:
    rows = [r for r in _rows if "result" in r]
    if not rows:
        return
    path = _out_path(session.config.rootpath)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("# Bad-input matrix\n\n" + render(rows))
    _written.append(path)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for path in _written:
        terminalreporter.write_line(f"bad-input matrix: {path}")
