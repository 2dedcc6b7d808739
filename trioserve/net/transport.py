"""Byte transports under a Connection: a raw non-blocking socket, or any trio Stream.

The socket transport is what makes the hot path cheap: ``try_send`` is a plain
synchronous ``send()`` with no checkpoint, so a delivery to a connection with
an empty queue costs one syscall and no task switch. The stream transport runs
the same Connection over ``trio.testing.memory_stream_pair``, and
:class:`TlsTransport` runs it over ``trio.SSLStream``; they never send
synchronously, so everything goes through the queue and the writer task.
"""

from __future__ import annotations

import errno
import socket
import ssl
from collections.abc import Sequence

import trio

__all__ = ["SocketTransport", "StreamTransport", "TlsTransport", "Transport"]

_RECV_SIZE = 65536
# Seconds a TLS close_notify may take to go out before the socket is closed anyway.
_TLS_CLOSE_TIMEOUT = 1.0


class Transport:
    """What a Connection needs from the bytes below it."""

    __slots__ = ()

    def try_send(self, data: bytes) -> int:
        """Send what fits now without blocking; return the count. Raises OSError if broken."""
        raise NotImplementedError

    async def wait_writable(self) -> None:
        """Return when a send can make progress."""
        raise NotImplementedError

    async def send_some(self, buffers: Sequence[bytes | memoryview]) -> int:
        """Send a prefix of *buffers* (after :meth:`wait_writable`); return the count."""
        raise NotImplementedError

    async def receive_some(self) -> bytes:
        """Next chunk of bytes; ``b""`` at EOF. Raises OSError if broken."""
        raise NotImplementedError

    def try_receive(self) -> bytes | None:
        """A chunk the kernel already holds, without waiting; None if there is
        none (or this transport cannot tell without waiting)."""
        return None

    async def send_all(self, data: bytes) -> None:
        """Send all of *data*, waiting as needed (for small control-path writes)."""
        view = memoryview(data)
        while view:
            await self.wait_writable()
            view = view[await self.send_some([view]) :]

    def shutdown_write(self) -> None:
        """Send EOF (FIN) after what was written, keeping the read side open."""

    def close(self) -> None:
        """Close at once; idempotent. Wakes tasks blocked on this transport."""
        raise NotImplementedError

    async def aclose(self) -> None:
        """Close, including whatever needs a checkpoint; idempotent."""
        self.close()


class SocketTransport(Transport):
    """A connected non-blocking stdlib socket, driven with trio's lowlevel waits."""

    __slots__ = ("sock",)

    def __init__(self, sock: socket.socket):
        self.sock = sock

    def try_send(self, data: bytes) -> int:
        try:
            return self.sock.send(data)
        except BlockingIOError:
            return 0

    async def wait_writable(self) -> None:
        try:
            await trio.lowlevel.wait_writable(self.sock)
        except trio.ClosedResourceError as exc:
            # Closed by another task (a failed send, a forced close): to the
            # caller that is a broken connection like any other.
            raise ConnectionResetError(errno.ECONNRESET, "socket closed") from exc

    async def send_some(self, buffers: Sequence[bytes | memoryview]) -> int:
        # No checkpoint here: the caller waited already, so the buffers it just
        # took from its queue go out before any other task can touch that queue.
        try:
            return self.sock.sendmsg(buffers)
        except BlockingIOError:
            return 0

    def try_receive(self) -> bytes | None:
        try:
            data = self.sock.recv(_RECV_SIZE)
        except (BlockingIOError, OSError):
            # A broken socket is left for receive_some(), which reports it.
            return None
        # EOF too is left for receive_some(): recv() keeps returning it.
        return data or None

    async def receive_some(self) -> bytes:
        # Waiting first, rather than trying recv() first, gives every reader one
        # checkpoint per chunk, so a client that floods us cannot starve the rest.
        try:
            await trio.lowlevel.wait_readable(self.sock)
        except trio.ClosedResourceError as exc:
            raise ConnectionResetError(errno.ECONNRESET, "socket closed") from exc
        try:
            return self.sock.recv(_RECV_SIZE)
        except BlockingIOError:
            return await self.receive_some()

    def shutdown_write(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
        if self.sock.fileno() < 0:
            return
        trio.lowlevel.notify_closing(self.sock)
        self.sock.close()


class StreamTransport(Transport):
    """Any ``trio.abc.Stream``: memory streams in tests; :class:`TlsTransport` for TLS.

    A generic stream has only an async close, so ``close()`` here closes what
    can be closed synchronously (memory streams' halves) and the connection's
    task finishes the job with ``aclose()``.
    """

    __slots__ = ("stream",)

    def __init__(self, stream: trio.abc.Stream):
        self.stream = stream

    def try_send(self, data: bytes) -> int:
        return 0

    async def wait_writable(self) -> None:
        pass

    async def send_some(self, buffers: Sequence[bytes | memoryview]) -> int:
        data = b"".join(buffers)
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise BrokenPipeError(errno.EPIPE, "stream closed") from exc
        return len(data)

    async def receive_some(self) -> bytes:
        try:
            return bytes(await self.stream.receive_some(_RECV_SIZE))
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise ConnectionResetError(errno.ECONNRESET, "stream closed") from exc

    def _half(self, name: str) -> None:
        close = getattr(getattr(self.stream, name, None), "close", None)
        if close is not None:
            close()

    def shutdown_write(self) -> None:
        self._half("send_stream")

    def close(self) -> None:
        self._half("send_stream")
        self._half("receive_stream")

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)


class TlsTransport(StreamTransport):
    """TLS over an accepted socket: ``trio.SSLStream`` on a ``trio.SocketStream``.

    TLS has no half-close that trio exposes (``SSLStream`` has no ``send_eof``),
    so :meth:`shutdown_write` sends a plain TCP FIN after the last record: the
    peer has read everything we wrote, including the close frame or close line,
    then sees EOF without a TLS ``close_notify``. :meth:`close` closes the socket
    itself, which wakes a reader or writer blocked in the TLS stream (a generic
    stream could not be closed synchronously). :meth:`aclose` sends
    ``close_notify`` when nothing has closed the socket yet (plain HTTP answers,
    refusals).
    """

    __slots__ = ("_handshake_done", "sock")

    def __init__(self, sock: socket.socket, context: ssl.SSLContext):
        self.sock = trio.socket.from_stdlib_socket(sock)
        self._handshake_done = False
        super().__init__(trio.SSLStream(trio.SocketStream(self.sock), context, server_side=True))

    async def handshake(self) -> bool:
        """Do the TLS handshake; False if it failed (the caller bounds its time)."""
        assert isinstance(self.stream, trio.SSLStream)
        try:
            await self.stream.do_handshake()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        self._handshake_done = True
        return True

    def shutdown_write(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
        self.sock.close()

    async def aclose(self) -> None:
        if self.sock.fileno() < 0:
            await trio.lowlevel.checkpoint()
            return
        try:
            if self._handshake_done:
                with trio.move_on_after(_TLS_CLOSE_TIMEOUT):
                    await self.stream.aclose()
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError, OSError):
            pass
        finally:
            self.sock.close()
