"""The JavaScript client's own tests (clients/js/test/), run by Node's test runner.

Each test file is one pytest test: ``node --test FILE`` starts the real
servers it needs (``python -m trioserve serve`` with this interpreter, and
redis-server) and exits non-zero when any of its tests fails; the TAP output
is shown on failure. The ``ws`` package comes from tests/interop (scripts/test
runs ``npm ci`` there).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.system

REPO = Path(__file__).resolve().parents[2]
JS_TESTS = REPO / "clients" / "js" / "test"
WS_PACKAGE = REPO / "tests" / "interop" / "node_modules" / "ws" / "package.json"
# The slowest file restarts servers and workers; far more than it needs on a loaded machine.
TIMEOUT = 300


@pytest.fixture
def node() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is not on PATH; install Node >= 18 (scripts/test does)")
    if not WS_PACKAGE.is_file():
        pytest.fail("tests/interop/node_modules/ws is missing; run `npm ci --prefix tests/interop`")
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed (scripts/test installs it)")
    return node


@pytest.mark.parametrize("name", sorted(p.name for p in JS_TESTS.glob("*.test.mjs")))
def test_node(node: str, name: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIOSERVE_")}
    env["TRIOSERVE_PYTHON"] = sys.executable
    # Node has EventSource (a real one, undici's) behind a flag; the
    # SSE fallback's tests use it, the others test the client without one.
    flags = ["--experimental-eventsource"] if name.startswith("sse") else []
    proc = subprocess.run(
        [node, *flags, "--test", "--test-reporter=tap", str(JS_TESTS / name)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT, check=False,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    counts = dict(re.findall(r"^# (pass|fail|skipped|cancelled|todo) (\d+)$", proc.stdout, re.MULTILINE))
    assert counts.get("fail") == "0" and counts.get("cancelled") == "0", output
    assert counts.get("skipped") == "0" and counts.get("todo") == "0", output
    assert int(counts.get("pass", "0")) > 0, output


def test_every_test_file_is_run() -> None:
    """A test file that does not end in .test.mjs would be skipped silently above."""
    stray = [p.name for p in JS_TESTS.glob("*.mjs")
             if not p.name.endswith(".test.mjs") and p.name != "helpers.mjs"]
    assert stray == []
