"""Listeners on their own: binding, accepting, the fd limit."""

from __future__ import annotations

import errno
import resource
import socket

import pytest
import trio

from trioserve.net import listeners


def test_port_zero_binds_every_address_on_one_free_port() -> None:
    socks = listeners.bind_listeners("localhost", 0, 16)
    try:
        ports = {s.getsockname()[1] for s in socks}
        assert len(ports) == 1 and ports != {0}
        assert all(not s.getblocking() for s in socks)
    finally:
        for s in socks:
            s.close()


def test_a_port_in_use_names_the_address() -> None:
    (taken,) = listeners.bind_listeners("127.0.0.1", 0, 16)
    try:
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port}") as info:
            listeners.bind_listeners("127.0.0.1", port, 16)
        assert info.value.errno == errno.EADDRINUSE
    finally:
        taken.close()


async def test_accept_loop_hands_over_non_blocking_sockets_with_their_address() -> None:
    (lsock,) = listeners.bind_listeners("127.0.0.1", 0, 16)
    port = lsock.getsockname()[1]
    accepted: list[tuple[socket.socket, str]] = []
    got_two = trio.Event()

    def on_accept(sock: socket.socket, remote: str) -> None:
        accepted.append((sock, remote))
        if len(accepted) == 2:
            got_two.set()

    clients = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(listeners.accept_loop, lsock, on_accept)
        for _ in range(2):
            clients.append(await trio.open_tcp_stream("127.0.0.1", port))
        with trio.fail_after(5):
            await got_two.wait()
        nursery.cancel_scope.cancel()
    listeners.close_listener(lsock)
    for sock, remote in accepted:
        assert not sock.getblocking()
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        host, _, peer_port = remote.rpartition(":")
        assert host == "127.0.0.1" and int(peer_port) > 0
        sock.close()
    for c in clients:
        await c.aclose()
    assert lsock.fileno() == -1


def test_raise_fd_limit_raises_the_soft_limit_to_the_hard_one() -> None:
    before = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        if before[1] != resource.RLIM_INFINITY and before[1] > 256:
            resource.setrlimit(resource.RLIMIT_NOFILE, (256, before[1]))
            soft, hard = listeners.raise_fd_limit()
            assert (soft, hard) == (before[1], before[1])
        else:
            soft, hard = listeners.raise_fd_limit()
            assert soft >= before[0]
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, before)


def test_fd_budget_keeps_a_reserve() -> None:
    assert listeners.fd_budget(20_000) == 20_000 - listeners.FD_RESERVE
    assert listeners.fd_budget(10) == 1
