"""Go-style channels, the trio way: producer → workers → consumer over memory channels.

Run it with ``python examples/pipeline_channels.py``. Each part is a Go idiom
next to its trio spelling:

==========================================  ==============================================
Go                                          trio
==========================================  ==============================================
``ch := make(chan T)``  (unbuffered)        ``send, recv = trio.open_memory_channel[T](0)``
``ch := make(chan T, 8)``  (buffered)       ``trio.open_memory_channel[T](8)``
``ch <- v`` / ``v := <-ch``                 ``await send.send(v)`` / ``await recv.receive()``
``close(ch)``                               leave ``async with send:`` (or ``await send.aclose()``)
``for v := range ch``                       ``async for v in recv``
many senders, close once all are done       each sender gets ``send.clone()``; the channel
(a ``sync.WaitGroup`` and a closer)         closes when the last clone is closed
``go worker()``                             ``nursery.start_soon(worker)``
``wg.Wait()``                               the end of the ``async with trio.open_nursery()``
``context.WithTimeout`` + ``<-ctx.Done()``  ``with trio.move_on_after(t):`` — cancellation
                                            reaches every ``await`` inside, in every task
==========================================  ==============================================

The difference that matters most: a trio task cannot outlive the nursery that
started it, so a pipeline cannot leak a goroutine blocked on a channel nobody
reads any more.
"""

from __future__ import annotations

import argparse
import hashlib
import signal
import sys
from collections.abc import Sequence

import trio


def out(line: str) -> None:
    print(line, flush=True)


# --- 1. unbuffered vs buffered --------------------------------------------------------


async def sends_before_a_receiver(buffer: int, items: int = 8) -> int:
    """How many sends complete on a channel of size *buffer* while nobody receives.

    Go: ``make(chan int)`` is a rendezvous — a send waits until a receiver takes
    the value. ``open_memory_channel(0)`` is the same. With a buffer of N, N
    sends complete at once and the next one waits for a receiver.
    """
    send, recv = trio.open_memory_channel[int](buffer)
    sent = 0

    async def producer() -> None:
        nonlocal sent
        async with send:  # close(ch) when done: the receiver's loop then ends
            for i in range(items):
                await send.send(i)
                sent += 1

    async with trio.open_nursery() as nursery:
        nursery.start_soon(producer)
        await trio.sleep(0.05)  # the receiver is late; the producer runs alone meanwhile
        completed = sent
        async with recv:
            async for _ in recv:
                pass
    return completed


# --- 2. fan-in: close once every sender is done ----------------------------------------


async def fan_in(producers: int = 3, each: int = 4) -> list[str]:
    """Several producers, one consumer; the consumer's loop ends by itself.

    Go needs a WaitGroup and a goroutine that closes the channel after
    ``wg.Wait()``. In trio each producer owns a ``clone()`` of the send side
    and closes it when it finishes; the channel is closed when the last clone
    is, and ``async for`` on the receive side ends.
    """
    send, recv = trio.open_memory_channel[str](0)
    got: list[str] = []

    async def producer(name: str, send: trio.MemorySendChannel[str]) -> None:
        async with send:
            for i in range(each):
                await send.send(f"{name}{i}")

    async with trio.open_nursery() as nursery:
        async with send:  # the original is closed here; only the clones remain open
            for p in range(producers):
                nursery.start_soon(producer, "abc"[p % 3], send.clone())
        async for item in recv:
            got.append(item)
    return got


# --- 3. a worker pool with backpressure ------------------------------------------------


async def worker_pool(jobs: int, workers: int, queue: int = 4) -> tuple[int, int]:
    """producer → *workers* workers → consumer, with a bounded job queue.

    When every worker is busy and the queue is full, the producer's ``send``
    waits: backpressure, as with a full buffered channel in Go. Returns the
    number of results and how many sends had to wait.
    """
    job_send, job_recv = trio.open_memory_channel[int](queue)
    result_send, result_recv = trio.open_memory_channel[tuple[int, str]](queue)
    waited = 0

    async def producer() -> None:
        nonlocal waited
        async with job_send:
            for n in range(jobs):
                stats = job_send.statistics()
                if stats.current_buffer_used >= stats.max_buffer_size:
                    waited += 1  # this send will block until a worker takes a job
                await job_send.send(n)

    async def worker(jobs: trio.MemoryReceiveChannel[int],
                     results: trio.MemorySendChannel[tuple[int, str]]) -> None:
        async with jobs, results:
            async for n in jobs:
                await trio.sleep(0.002)  # stands in for I/O: a request, a query
                digest = hashlib.sha256(str(n).encode()).hexdigest()[:8]
                await results.send((n, digest))

    done = 0
    async with trio.open_nursery() as nursery:
        nursery.start_soon(producer)
        # Every worker shares the one job queue (Go: several goroutines ranging
        # over one channel) and holds a clone of the result channel.
        async with job_recv, result_send:
            for _ in range(workers):
                nursery.start_soon(worker, job_recv.clone(), result_send.clone())
        async for _n, _digest in result_recv:
            done += 1
    return done, waited


# --- 4. a deadline instead of context.WithTimeout ----------------------------------------


async def with_deadline(seconds: float, workers: int = 4) -> tuple[int, bool]:
    """An endless pipeline, stopped by a deadline.

    Go passes a ``ctx`` to every goroutine and each one must ``select`` on
    ``ctx.Done()``. In trio the deadline belongs to a cancel scope: when it
    expires, every task inside is cancelled at its next ``await``, and the
    ``with`` block exits once all of them have finished. Returns the results
    that made it, and whether the deadline ended the run.
    """
    results = 0

    async def endless(send: trio.MemorySendChannel[int]) -> None:
        async with send:
            n = 0
            while True:
                await send.send(n)
                n += 1

    async def worker(recv: trio.MemoryReceiveChannel[int]) -> None:
        nonlocal results
        async with recv:
            async for _ in recv:
                await trio.sleep(0.005)
                results += 1

    with trio.move_on_after(seconds) as scope:
        async with trio.open_nursery() as nursery:
            send, recv = trio.open_memory_channel[int](0)
            nursery.start_soon(endless, send)
            async with recv:
                for _ in range(workers):
                    nursery.start_soon(worker, recv.clone())
    return results, scope.cancelled_caught


# --- main ----------------------------------------------------------------------------


async def demo(jobs: int, workers: int, timeout: float) -> None:
    out("1. unbuffered vs buffered (make(chan T) vs make(chan T, 3))")
    out(f"   unbuffered: {await sends_before_a_receiver(0)} sends completed before a receiver came "
        "(a rendezvous)")
    out(f"   buffer 3:   {await sends_before_a_receiver(3)} sends completed, then the producer waited")

    got = await fan_in()
    out("2. fan-in with clone() (close(ch) after a WaitGroup)")
    out(f"   received {len(got)} items from 3 producers: {' '.join(sorted(got))}; the loop ended by itself")

    done, waited = await worker_pool(jobs, workers)
    out(f"3. worker pool: {jobs} jobs, {workers} workers, a queue of 4")
    out(f"   {done} results; the producer waited for a free slot {waited} times (backpressure)")

    results, expired = await with_deadline(timeout)
    out(f"4. deadline of {timeout:g}s instead of context.WithTimeout")
    ending = "cancelled every task" if expired else "was not reached"
    out(f"   {results} results, then the deadline {ending}; no task outlived the pipeline")


async def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Go-style channels, the trio way.")
    parser.add_argument("--jobs", type=int, default=100,
                        help="jobs for the worker pool (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=8,
                        help="workers in the pool (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=0.2,
                        help="deadline of the endless pipeline, seconds (default: %(default)s)")
    args = parser.parse_args(argv)
    async with trio.open_nursery() as nursery:
        # Go: signal.Notify(ch, os.Interrupt, syscall.SIGTERM). Either signal
        # cancels the whole demo, and the program exits normally.
        async def on_signal() -> None:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for signum in signals:
                    out(f"{signal.Signals(signum).name}: stopping")
                    nursery.cancel_scope.cancel()

        nursery.start_soon(on_signal)
        await demo(args.jobs, args.workers, args.timeout)
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    trio.run(main, sys.argv[1:])
