"""The fuzz targets: the corpus replayed (always), and atheris for a bounded time.

``test_corpus_input`` runs every file of fuzz/corpus through the harness, so the
seeds and every kept reproducer stay regression tests without atheris.
``test_atheris_target`` runs each coverage-guided target (fuzz/fuzz_*.py) for
``TRIOSERVE_FUZZ_SECONDS`` (default 20), starting from the corpus without the
``repro-*`` files (known bugs, which the replay covers), and fails on any new
crash, hang or oracle violation, quoting the reproducer. It needs the ``fuzz`` extra
(``pip install -e '.[fuzz]'``). New inputs and crash files go to a temporary
folder, never into the committed corpus.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from fuzz import harness

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT / "fuzz" / "corpus"
TARGETS: dict[str, Callable[[bytes], None]] = {
    "http": harness.http_one_input,
    "websocket": harness.websocket_one_input,
}
SECONDS = int(os.environ.get("TRIOSERVE_FUZZ_SECONDS", "20"))


def corpus_files() -> list[Path]:
    return sorted(p for target in TARGETS for p in (CORPUS / target).iterdir() if p.is_file())


@pytest.mark.parametrize("path", corpus_files(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_corpus_input(path: Path) -> None:
    TARGETS[path.parent.name](path.read_bytes())


def _stats(log: str) -> dict[str, str]:
    stats = dict(re.findall(r"stat::(\w+):\s*(\d+)", log))
    done = re.findall(r"#(\d+)\s+DONE\s+cov: (\d+) ft: (\d+) corp: (\d+)", log)
    if done:
        stats.update(zip(("runs", "cov", "features", "corpus"), done[-1], strict=True))
    return stats


def test_atheris_target(tmp_path: Path) -> None:
    pytest.importorskip("atheris", reason="atheris is in the fuzz extra: pip install -e '.[fuzz]'")
    procs = {}
    # libFuzzer re-runs the script by name in some modes; its shebang must find this Python.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("TRIOSERVE_FUZZ_SKIP_KNOWN", None)
    # Both targets at once: one core each on a 2-core machine.
    for target in TARGETS:
        # The fuzzer starts from the corpus minus the repro-* files: those are known
        # bugs, replayed by test_corpus_input; here a failure means a new finding.
        out = tmp_path / target
        out.mkdir()
        for path in (CORPUS / target).iterdir():
            if path.is_file() and not path.name.startswith("repro-"):
                (out / path.name).write_bytes(path.read_bytes())
        log = (tmp_path / f"{target}.log").open("w")
        procs[target] = (subprocess.Popen(
            [sys.executable, str(ROOT / "fuzz" / f"fuzz_{target}.py"), f"-max_total_time={SECONDS}",
             "-timeout=20", "-rss_limit_mb=2048", "-print_final_stats=1",
             f"-artifact_prefix={tmp_path}/{target}-", str(out)],
            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env), log)
    problems = []
    summary = []
    for target, (proc, log) in procs.items():
        try:
            proc.wait(timeout=SECONDS + 120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        text = (tmp_path / f"{target}.log").read_text(errors="replace")
        crashes = sorted(tmp_path.glob(f"{target}-*"))
        stats = _stats(text)
        summary.append(f"{target}: {stats.get('number_of_executed_units', '?')} executions, "
                       f"cov {stats.get('cov', '?')}, corpus {stats.get('corpus', '?')} "
                       f"(+{stats.get('new_units_added', '?')} new), exit {proc.returncode}, "
                       f"{len(crashes)} crash files")
        if proc.returncode != 0 or crashes:
            tail = "\n".join(text.splitlines()[-40:])
            reproducers = "\n".join(f"  {p} = {p.read_bytes()[:300]!r}" for p in crashes)
            problems.append(f"--- {target} (exit {proc.returncode}):\n{tail}\nreproducers:\n{reproducers}")
    print("\n".join(summary))
    if os.environ.get("CI"):
        artifacts = ROOT / "artifacts"
        artifacts.mkdir(exist_ok=True)
        (artifacts / "fuzz-stats.txt").write_text("\n".join(summary) + "\n")
    assert not problems, "\n\n".join(problems)
