"""``trioserve doctor``: can this host hold N connections? The kernel and process limits that decide it.

Each check has the current value, the value the target needs, a status and
the command that fixes it. Everything is read from ``/proc`` under a root
path (``--proc-root``), so tests can point it at a fake tree; the fd limits
come from ``/proc/self/limits``, which are the limits a server started from
the same shell inherits.

Status: ``ok``; ``warn`` (the connections fit, but bursts or fan-out may
suffer); ``fail`` (the target cannot be met: exit status 1); ``unknown``
(not readable here).

:mod:`trioserve.ops.cli` adds the command to ``trioserve``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import click

#: Server RSS per idle WebSocket connection (subscribed to one topic), in KB:
#: 7.5-7.9 measured by benchmarks/fanout.py at 5,000-15,000 connections and 7.8
#: per worker in the 100k run (benchmarks/results/, BENCHMARKS.md); rounded up.
SERVER_KB_PER_CONN = 8.0
SERVER_KB_SOURCE = ("trioserve RSS per idle WebSocket connection: 7.5-7.9 KB measured at 5,000 to "
                    "100,000 connections (BENCHMARKS.md, benchmarks/results/), rounded up; "
                    "measure yours with `trioserve bench idle` (\"RSS per connection\")")
#: Kernel memory per idle loopback TCP socket, in KB: the Slab growth in
#: /proc/meminfo over 5,000 connected socket pairs on the project machine
#: (Linux 6.x), 3.9 to 4.8 KB; rounded up. Queued data comes on top.
KERNEL_KB_PER_SOCKET = 5.0
KERNEL_KB_SOURCE = ("kernel slab per idle TCP socket (socket, inode, file, dentry, epoll), "
                    "measured as /proc/meminfo Slab growth over 5,000 loopback socket pairs: "
                    "3.9-4.8 KB; queued data comes on top")
#: `trioserve bench` load-client RSS per connection, in KB: 3.1 in an idle run of
#: 5,000 connections on the project machine (docs/bench.md).
CLIENT_KB_PER_CONN = 3.1
CLIENT_KB_SOURCE = "trioserve bench load-client RSS per connection (`trioserve bench idle`, docs/bench.md)"
#: Descriptors a server process keeps for itself (trioserve.net.listeners.FD_RESERVE).
FD_RESERVE = 64
#: trioserve's listen() backlog (Config.backlog); the kernel caps it at somaxconn.
BACKLOG = 4096
#: Connections per source address that `trioserve bench` opens by default.
BENCH_CONNS_PER_IP = 10_000
PAGE = 4096


@dataclasses.dataclass
class Check:
    key: str
    name: str
    current: Any
    recommended: Any
    status: str
    fix: str = ""
    note: str = ""


class Proc:
    """Reads files under a /proc root; None when a file is missing or unreadable."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def text(self, rel: str) -> str | None:
        try:
            return (self.root / rel).read_text()
        except (OSError, UnicodeDecodeError):
            return None

    def ints(self, rel: str) -> list[int] | None:
        text = self.text(rel)
        if text is None:
            return None
        try:
            return [int(x) for x in text.split()]
        except ValueError:
            return None

    def number(self, rel: str) -> int | None:
        values = self.ints(rel)
        return values[0] if values else None

    def fd_limits(self) -> tuple[int | None, int | None]:
        """(soft, hard) "Max open files" from self/limits; a very large value for "unlimited"."""
        text = self.text("self/limits")
        for line in (text or "").splitlines():
            if line.startswith("Max open files"):
                parts = line[len("Max open files"):].split()

                def value(v: str) -> int | None:
                    return 2**62 if v == "unlimited" else int(v) if v.isdigit() else None

                if len(parts) >= 2:
                    return value(parts[0]), value(parts[1])
        return None, None

    def meminfo(self) -> dict[str, int]:
        out = {}
        for line in (self.text("meminfo") or "").splitlines():
            name, _, rest = line.partition(":")
            fields = rest.split()
            if fields and fields[0].isdigit():
                out[name.strip()] = int(fields[0])
        return out


def _n(value: int | None) -> str:
    return "?" if value is None else "unlimited" if value >= 2**62 else f"{value:,}"


def run_checks(connections: int, proc_root: Path | str = "/proc", processes: int = 1, loopback: bool = False,
               per_conn_kb: float = SERVER_KB_PER_CONN, kernel_kb: float = KERNEL_KB_PER_SOCKET,
               client_kb: float = CLIENT_KB_PER_CONN) -> dict[str, Any]:
    """Every check for *connections* held by *processes* server processes.

    With *loopback* the load client (``trioserve bench``) runs on this host
    too, so each connection is two sockets here and the client's memory counts.
    """
    proc = Proc(Path(proc_root))
    checks: list[Check] = []
    per_proc = math.ceil(connections / processes) + FD_RESERVE
    sockets = connections * (2 if loopback else 1)

    soft, hard = proc.fd_limits()
    if hard is None:
        checks.append(Check("fd_hard", "open files, hard limit (per process)", None, per_proc, "unknown"))
    else:
        workers = math.ceil(connections / max(1, hard - FD_RESERVE))
        fix = (f"as root: `ulimit -Hn {per_proc}` in the shell that starts the server, or "
               f"LimitNOFILE={per_proc} in its systemd unit; or split the connections over "
               f"{workers} server processes (`trioserve serve --workers {workers} --broker redis://…`)")
        checks.append(Check("fd_hard", "open files, hard limit (per process)", hard, per_proc,
                            "ok" if hard >= per_proc else "fail", "" if hard >= per_proc else fix,
                            f"{math.ceil(connections / processes):,} connections per process + "
                            f"{FD_RESERVE} for listeners and logs"))
    if soft is not None:
        ok = soft >= per_proc
        checks.append(Check("fd_soft", "open files, soft limit", soft, per_proc,
                            "ok" if ok or (hard or 0) >= per_proc else "fail",
                            "" if ok else f"`ulimit -n {per_proc}` (up to the hard limit)",
                            "" if ok else
                            "trioserve serve raises its soft limit to the hard limit at start-up"))
    nr_open = proc.number("sys/fs/nr_open")
    checks.append(Check("nr_open", "fs.nr_open (ceiling for the hard limit)", nr_open, per_proc,
                        "unknown" if nr_open is None else "ok" if nr_open >= per_proc else "fail",
                        "" if nr_open is None or nr_open >= per_proc
                        else f"sysctl -w fs.nr_open={max(per_proc, 1048576)}"))
    file_nr = proc.ints("sys/fs/file-nr")
    in_use = file_nr[0] if file_nr else 0
    file_need = in_use + sockets + sockets // 10 + 1000
    file_max = proc.number("sys/fs/file-max")
    checks.append(Check("file_max", "fs.file-max (open files, whole system)", file_max, file_need,
                        "unknown" if file_max is None else "ok" if file_max >= file_need else "fail",
                        "" if file_max is None or file_max >= file_need
                        else f"sysctl -w fs.file-max={file_need * 2}",
                        f"{in_use:,} open now + {sockets:,} sockets + 10%"))
    for key, rel, name in (("somaxconn", "sys/net/core/somaxconn", "net.core.somaxconn"),
                           ("syn_backlog", "sys/net/ipv4/tcp_max_syn_backlog",
                            "net.ipv4.tcp_max_syn_backlog")):
        value = proc.number(rel)
        checks.append(Check(key, name, value, BACKLOG,
                            "unknown" if value is None else "ok" if value >= BACKLOG else "warn",
                            "" if value is None or value >= BACKLOG else f"sysctl -w {name}={BACKLOG}",
                            "caps trioserve's listen backlog (4096); a connect burst beyond it "
                            "waits for SYN retries (1 s, 3 s, …)" if key == "somaxconn" else
                            "half-open connections queued during a connect burst"))
    checks.append(_port_range(proc, connections, loopback))
    checks.extend(_tcp_memory(proc, sockets))
    conntrack = proc.number("sys/net/netfilter/nf_conntrack_max")
    if conntrack is None:
        checks.append(Check("conntrack", "net.netfilter.nf_conntrack_max", "not loaded", "-", "ok",
                            note="no connection tracking, no limit"))
    else:
        count = proc.number("sys/net/netfilter/nf_conntrack_count") or 0
        need = count + connections + connections // 10
        checks.append(Check("conntrack", "net.netfilter.nf_conntrack_max", conntrack, need,
                            "ok" if conntrack >= need else "fail",
                            "" if conntrack >= need
                            else f"sysctl -w net.netfilter.nf_conntrack_max={need * 2}",
                            f"{count:,} tracked now; when full the kernel drops new connections "
                            "('nf_conntrack: table full')"))
    memory = _memory(proc, connections, loopback, per_conn_kb, kernel_kb, client_kb)
    checks.append(memory)
    ok = not any(c.status == "fail" for c in checks)
    return {
        "connections": connections,
        "processes": processes,
        "loopback_client": loopback,
        "proc_root": str(proc_root),
        "ok": ok,
        "checks": [dataclasses.asdict(c) for c in checks],
        "per_connection_kb": {
            "server": per_conn_kb, "server_source": SERVER_KB_SOURCE
            if per_conn_kb == SERVER_KB_PER_CONN else "--per-conn-kb",
            "kernel_per_socket": kernel_kb, "kernel_source": KERNEL_KB_SOURCE,
            "sockets_per_connection": 2 if loopback else 1,
            **({"client": client_kb, "client_source": CLIENT_KB_SOURCE} if loopback else {}),
        },
    }


def _port_range(proc: Proc, connections: int, loopback: bool) -> Check:
    name = "net.ipv4.ip_local_port_range"
    values = proc.ints("sys/net/ipv4/ip_local_port_range")
    if not values or len(values) < 2:
        return Check("port_range", name, None, "-", "unknown")
    ports = values[1] - values[0] + 1
    need_ips = math.ceil(connections / ports)
    bench_ips = math.ceil(connections / BENCH_CONNS_PER_IP)
    note = (f"{ports:,} ephemeral ports = at most {ports:,} connections from one source address to one "
            f"server address:port. A loopback load test of {connections:,} needs >= {need_ips} source "
            f"addresses (trioserve bench uses {bench_ips} by default: --source-ips "
            f"127.0.0.2-127.0.0.{1 + bench_ips}). The server side uses no ephemeral ports.")
    status = "ok"
    fix = ""
    if loopback and need_ips > 250:
        status, fix = "fail", f'sysctl -w {name}="1024 65535"'
    elif ports < 28000:
        status, fix = "warn", f'sysctl -w {name}="1024 65535"'
    return Check("port_range", name, f"{values[0]} {values[1]}", f">= {need_ips} source address(es)",
                 status, fix, note)


def _tcp_memory(proc: Proc, sockets: int) -> list[Check]:
    tcp_mem = proc.ints("sys/net/ipv4/tcp_mem")
    rmem = proc.ints("sys/net/ipv4/tcp_rmem")
    wmem = proc.ints("sys/net/ipv4/tcp_wmem")
    out = []
    for key, name, values in (("tcp_rmem", "net.ipv4.tcp_rmem", rmem),
                              ("tcp_wmem", "net.ipv4.tcp_wmem", wmem)):
        shown = " ".join(str(v) for v in values) if values else None
        out.append(Check(key, name, shown, "-", "ok" if values else "unknown",
                         note="min default max bytes per socket; buffers are allocated as data "
                              "queues, so idle sockets hold none"))
    if not tcp_mem or len(tcp_mem) < 3 or not rmem or not wmem:
        out.insert(0, Check("tcp_mem", "net.ipv4.tcp_mem", None, "-", "unknown"))
        return out
    # Under memory pressure the kernel still lets every socket keep its minimum buffers.
    need_pages = math.ceil(sockets * (rmem[0] + wmem[0]) / PAGE)
    status = "ok" if tcp_mem[1] >= need_pages else "warn"
    fix = "" if status == "ok" else (
        f'sysctl -w net.ipv4.tcp_mem="{need_pages} {need_pages * 2} {need_pages * 3}"')
    out.insert(0, Check("tcp_mem", "net.ipv4.tcp_mem (pages: min pressure max)",
                        " ".join(str(v) for v in tcp_mem), f"pressure >= {need_pages:,}", status, fix,
                        f"{sockets:,} sockets x (rmem min + wmem min) = "
                        f"{need_pages * PAGE / 2**20:,.0f} MiB, "
                        f"the buffer memory for a small write queued to every connection at once; "
                        f"max is {tcp_mem[2] * PAGE / 2**20:,.0f} MiB"))
    return out


def _memory(proc: Proc, connections: int, loopback: bool, per_conn_kb: float, kernel_kb: float,
            client_kb: float) -> Check:
    mem = proc.meminfo()
    available = mem.get("MemAvailable")
    per_conn = per_conn_kb + kernel_kb * (2 if loopback else 1) + (client_kb if loopback else 0)
    need_kb = math.ceil(connections * per_conn)
    parts = f"{per_conn_kb:g} KB server + {kernel_kb:g} KB kernel per socket"
    if loopback:
        parts += f" x 2 sockets + {client_kb:g} KB load client"
    note = f"{connections:,} x ({parts}) = {need_kb / 2**20:,.2f} GiB"
    if available is None:
        return Check("memory", "memory available", None, f"{need_kb:,} KB", "unknown", note=note)
    status = "ok" if available >= need_kb else "fail"
    return Check("memory", "memory available (MemAvailable)", f"{available / 2**20:,.2f} GiB",
                 f"{need_kb / 2**20:,.2f} GiB", status,
                 "" if status == "ok" else "add memory, or spread the connections over more hosts", note)


def render(result: dict[str, Any]) -> str:
    n = result["connections"]
    where = "load client on this host too" if result["loopback_client"] else "load client elsewhere"
    lines = [f"trioserve doctor: can this host hold {n:,} connections? "
             f"({result['processes']} server process(es), {where})", ""]
    rows = [["check", "current", f"for {n:,}", "status"]]
    for c in result["checks"]:
        current = c["current"]
        rows.append([c["name"], _n(current) if isinstance(current, int) or current is None else str(current),
                     _n(c["recommended"]) if isinstance(c["recommended"], int) else str(c["recommended"]),
                     c["status"].upper()])
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for i, row in enumerate(rows):
        lines.append("  ".join([row[0].ljust(widths[0]), *(cell.rjust(w) for cell, w in
                                                          zip(row[1:], widths[1:], strict=True))]))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    fixes = [c for c in result["checks"] if c["fix"]]
    if fixes:
        lines += ["", "fixes:"]
        lines += [f"  {c['name']}: {c['fix']}" for c in fixes]
    lines += ["", "notes:"]
    lines += [f"  {c['name']}: {c['note']}" for c in result["checks"] if c["note"]]
    per = result["per_connection_kb"]
    lines += [f"  server memory per connection: {per['server']:g} KB, from {per['server_source']}",
              f"  kernel memory per socket: {per['kernel_per_socket']:g} KB, from {per['kernel_source']}"]
    if "client" in per:
        lines.append(f"  load-client memory per connection: {per['client']:g} KB, "
                     f"from {per['client_source']}")
    failed = [c["name"] for c in result["checks"] if c["status"] == "fail"]
    lines.append("")
    lines.append(f"OK: this host can hold {n:,} connections" if not failed else
                 f"FAIL: {n:,} connections do not fit: {', '.join(failed)}")
    return "\n".join(lines)


@click.command()
@click.option("--connections", "-n", type=click.IntRange(1), default=10_000, show_default=True,
              help="The target: connections the host should hold.")
@click.option("--processes", type=click.IntRange(1), default=1, show_default=True,
              help="Server processes the connections are split over (serve --workers).")
@click.option("--loopback", is_flag=True,
              help="The load client (trioserve bench) runs on this host too: two sockets per connection.")
@click.option("--per-conn-kb", type=click.FloatRange(min=0, min_open=True), default=SERVER_KB_PER_CONN,
              show_default=True,
              help="Server memory per connection in KB (trioserve bench idle measures it).")
@click.option("--kernel-kb", type=click.FloatRange(min=0), default=KERNEL_KB_PER_SOCKET, show_default=True,
              help="Kernel memory per TCP socket in KB.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--proc-root", type=click.Path(file_okay=False), default="/proc", show_default=True,
              help="Where to read /proc from (tests point it at a fake tree).")
def doctor(connections: int, processes: int, loopback: bool, per_conn_kb: float, kernel_kb: float,
           as_json: bool, proc_root: str) -> None:
    """Check the limits that decide how many connections this host can hold.

    For each: the current value, what the target needs and the command that
    fixes it. Exit status 1 when the target cannot be met.
    """
    result = run_checks(connections, proc_root, processes=processes, loopback=loopback,
                        per_conn_kb=per_conn_kb, kernel_kb=kernel_kb)
    click.echo(json.dumps(result, indent=2) if as_json else render(result))
    raise SystemExit(0 if result["ok"] else 1)
