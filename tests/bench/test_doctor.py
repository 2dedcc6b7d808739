"""``trioserve doctor`` on fake /proc trees: values parsed, pass and fail, --json, exit status."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from trioserve.ops.cli import main
from trioserve.ops.doctor import run_checks

LIMITS = """\
Limit                     Soft Limit           Hard Limit           Units
Max cpu time              unlimited            unlimited            seconds
Max open files            {soft}                {hard}                files
Max locked memory         8388608              8388608              bytes
"""

ROOMY = {
    "self/limits": LIMITS.format(soft=1024, hard=1048576),
    "sys/fs/nr_open": "1048576\n",
    "sys/fs/file-max": "9223372036854775807\n",
    "sys/fs/file-nr": "1000\t0\t9223372036854775807\n",
    "sys/net/core/somaxconn": "4096\n",
    "sys/net/ipv4/tcp_max_syn_backlog": "4096\n",
    "sys/net/ipv4/ip_local_port_range": "1024\t65535\n",
    "sys/net/ipv4/tcp_mem": "1000000\t2000000\t3000000\n",
    "sys/net/ipv4/tcp_rmem": "4096\t131072\t6291456\n",
    "sys/net/ipv4/tcp_wmem": "4096\t16384\t4194304\n",
    "sys/net/netfilter/nf_conntrack_max": "1048576\n",
    "sys/net/netfilter/nf_conntrack_count": "10\n",
    "meminfo": "MemTotal:       33554432 kB\nMemFree:        1000 kB\nMemAvailable:   16777216 kB\n",
}


def fake_proc(tmp_path: Path, **changes: str | None) -> Path:
    root = tmp_path / "proc"
    files = dict(ROOMY)
    for key, value in changes.items():
        files[key.replace("__", "/")] = value  # type: ignore[assignment]
    for rel, text in files.items():
        if text is None:
            continue
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def by_key(result: dict) -> dict[str, dict]:
    return {c["key"]: c for c in result["checks"]}


def test_a_roomy_host_passes(tmp_path: Path) -> None:
    result = run_checks(100_000, fake_proc(tmp_path))
    checks = by_key(result)
    assert result["ok"] is True
    assert checks["fd_hard"]["current"] == 1048576 and checks["fd_hard"]["recommended"] == 100_064
    # The soft limit is low, but the server raises it to the hard limit itself.
    assert checks["fd_soft"]["current"] == 1024 and checks["fd_soft"]["status"] == "ok"
    assert checks["port_range"]["current"] == "1024 65535"
    assert "64,512 ephemeral ports" in checks["port_range"]["note"]
    assert checks["conntrack"]["recommended"] == 10 + 100_000 + 10_000
    assert checks["memory"]["status"] == "ok"
    assert all(c["status"] == "ok" for c in result["checks"]), result["checks"]


def test_limits_too_low_fail_with_the_fix(tmp_path: Path) -> None:
    root = fake_proc(tmp_path, **{
        "self__limits": LIMITS.format(soft=1024, hard=20000),
        "sys__net__netfilter__nf_conntrack_max": "65536\n",
        "sys__net__core__somaxconn": "128\n",
        "sys__fs__file-max": "50000\n",
        "meminfo": "MemAvailable:   524288 kB\n",  # 0.5 GiB
    })
    result = run_checks(100_000, root)
    checks = by_key(result)
    assert result["ok"] is False
    assert checks["fd_hard"]["status"] == "fail"
    assert "ulimit -Hn 100064" in checks["fd_hard"]["fix"]
    assert "--workers 6" in checks["fd_hard"]["fix"]  # 100,000 / (20,000 - 64)
    assert checks["conntrack"]["status"] == "fail"
    assert "nf_conntrack_max=" in checks["conntrack"]["fix"]
    assert checks["file_max"]["status"] == "fail"
    assert checks["somaxconn"]["status"] == "warn"  # bursts suffer; the count still fits
    assert checks["somaxconn"]["fix"] == "sysctl -w net.core.somaxconn=4096"
    assert checks["memory"]["status"] == "fail"
    # Split over 6 processes, the fd limit fits.
    assert by_key(run_checks(100_000, root, processes=6))["fd_hard"]["status"] == "ok"


def test_loopback_counts_both_ends_and_the_client(tmp_path: Path) -> None:
    root = fake_proc(tmp_path, meminfo="MemAvailable:   1572864 kB\n")  # 1.5 GiB
    server_only = run_checks(100_000, root)
    loopback = run_checks(100_000, root, loopback=True)
    assert by_key(server_only)["memory"]["status"] == "ok"  # 100k x 12.5 KB = 1.16 GiB
    assert by_key(loopback)["memory"]["status"] == "fail"   # 100k x 20.6 KB = 1.96 GiB
    assert loopback["per_connection_kb"]["sockets_per_connection"] == 2
    assert by_key(run_checks(100_000, root, per_conn_kb=1.0, loopback=True))["memory"]["status"] == "ok"


def test_missing_files_are_unknown_and_no_conntrack_is_fine(tmp_path: Path) -> None:
    root = fake_proc(tmp_path, **{"sys__net__netfilter__nf_conntrack_max": None,
                                  "sys__net__ipv4__tcp_mem": None, "sys__fs__nr_open": None})
    checks = by_key(run_checks(1000, root))
    assert checks["conntrack"]["status"] == "ok" and checks["conntrack"]["current"] == "not loaded"
    assert checks["tcp_mem"]["status"] == "unknown"
    assert checks["nr_open"]["status"] == "unknown"


@pytest.mark.parametrize(("hard", "code"), [(1048576, 0), (4096, 1)])
def test_cli_json_and_exit_status(tmp_path: Path, hard: int, code: int) -> None:
    root = fake_proc(tmp_path, **{"self__limits": LIMITS.format(soft=1024, hard=hard)})
    res = CliRunner().invoke(main, ["doctor", "--connections", "10000", "--json", "--proc-root", str(root)])
    assert res.exit_code == code, res.output
    data = json.loads(res.output)
    assert data["connections"] == 10000 and data["ok"] is (code == 0)
    assert {c["key"] for c in data["checks"]} >= {
        "fd_hard", "fd_soft", "nr_open", "file_max", "somaxconn", "syn_backlog", "port_range",
        "tcp_mem", "tcp_rmem", "tcp_wmem", "conntrack", "memory"}
    assert data["per_connection_kb"]["server"] == 8.0


def test_cli_text_names_numbers_and_sources(tmp_path: Path) -> None:
    root = fake_proc(tmp_path, **{"self__limits": LIMITS.format(soft=1024, hard=4096)})
    res = CliRunner().invoke(main, ["doctor", "-n", "10000", "--per-conn-kb", "9", "--proc-root", str(root)])
    assert res.exit_code == 1
    out = res.output
    assert "open files, hard limit (per process)" in out and "FAIL" in out
    assert "ulimit -Hn 10064" in out
    assert "server memory per connection: 9 KB, from --per-conn-kb" in out
    assert "kernel memory per socket: 5 KB" in out
    assert "FAIL: 10,000 connections do not fit" in out
