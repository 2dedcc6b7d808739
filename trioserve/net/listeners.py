"""Listening sockets, the accept loop, and the file-descriptor budget.

Sockets are plain non-blocking stdlib sockets waited on with trio's lowlevel
API: an accepted socket then needs no trio wrapper object, which keeps the
per-connection memory down and lets the hot path call ``send()`` directly.
"""

from __future__ import annotations

import errno
import logging
import resource
import socket
from collections.abc import Callable

import trio

__all__ = ["accept_loop", "bind_listeners", "fd_budget", "raise_fd_limit"]

log = logging.getLogger("trioserve.listeners")

#: File descriptors kept back from connections: listeners, logs, Redis, imports.
FD_RESERVE = 64
#: Connections accepted per wake-up, so one listener cannot starve the others.
ACCEPT_BURST = 256
# Out of descriptors or memory: accepting again at once would spin.
_RESOURCE_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
_RESOURCE_PAUSE = 0.1


def raise_fd_limit() -> tuple[int, int]:
    """Raise RLIMIT_NOFILE's soft limit to the hard limit; return (soft, hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        target = max(soft, 1 << 20) if soft != resource.RLIM_INFINITY else soft
    else:
        target = hard
    if soft != target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("could not raise the fd soft limit from %d to %d: %s", soft, target, exc)
    return soft, hard


def fd_budget(soft_limit: int) -> int:
    """How many client sockets fit under *soft_limit*."""
    return max(soft_limit - FD_RESERVE, 1)


def bind_listeners(host: str, port: int, backlog: int, reuse_port: bool = False, *,
                   listen: bool = True) -> list[socket.socket]:
    """Bind and listen on every address *host* resolves to (e.g. 127.0.0.1 and ::1).

    With port 0 the first socket picks a free port and the others reuse it.
    Raises OSError with the address in the message, so "address in use" says which.
    With ``listen=False`` the sockets are only bound: with *reuse_port* that
    reserves the port for other processes' listeners without taking connections.
    """
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    seen: set[tuple[int, tuple[object, ...]]] = set()
    socks: list[socket.socket] = []
    try:
        for family, type_, proto, _, addr in infos:
            if (family, addr) in seen:
                continue
            seen.add((family, addr))
            if socks and port == 0:
                addr = (addr[0], socks[0].getsockname()[1], *addr[2:])
            sock = socket.socket(family, type_, proto)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(addr)
            except OSError as exc:
                where = f"{addr[0]!s}:{addr[1]!s}"
                raise OSError(exc.errno, f"cannot listen on {where}: {exc.strerror}") from None
            if listen:
                sock.listen(backlog)
            sock.setblocking(False)
    except BaseException:
        for s in socks:
            s.close()
        raise
    return socks


async def accept_loop(
    lsock: socket.socket, on_accept: Callable[[socket.socket, str], None]
) -> None:
    """Accept connections on *lsock* forever, calling ``on_accept(sock, remote)``."""
    last_warning = -1e9
    while True:
        await trio.lowlevel.wait_readable(lsock)
        for _ in range(ACCEPT_BURST):
            try:
                sock, addr = lsock.accept()
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno in _RESOURCE_ERRNOS:
                    now = trio.current_time()
                    if now - last_warning > 10:
                        log.warning("accept failed: %s; pausing accepts", exc)
                        last_warning = now
                    await trio.sleep(_RESOURCE_PAUSE)
                    break
                continue  # ECONNABORTED and friends: that client is already gone
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            on_accept(sock, _format_addr(addr))


def close_listener(lsock: socket.socket) -> None:
    if lsock.fileno() >= 0:
        trio.lowlevel.notify_closing(lsock)
        lsock.close()


def _format_addr(addr: object) -> str:
    if isinstance(addr, tuple) and len(addr) >= 2:
        host = addr[0]
        return f"[{host}]:{addr[1]}" if ":" in str(host) else f"{host}:{addr[1]}"
    return str(addr)
