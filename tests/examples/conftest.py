"""Run the examples as a user would: as processes, with their output read line by line."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# How long an example may take to print what a test waits for; generous for a loaded CI machine.
WAIT = 20.0


def free_port() -> int:
    """A port that was free a moment ago: for a server that must come back on the same port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Example:
    """An example running as a subprocess of the repository root.

    A thread collects its merged stdout and stderr, so waiting for a line has
    a timeout and the whole output is at hand when a test fails.
    """

    def __init__(self, args: Sequence[str], *, stdin: bool = False) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.args = list(args)
        self.proc = subprocess.Popen(
            [sys.executable, *args], cwd=REPO, env=env, text=True, bufsize=1,
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        try:
            for line in self.proc.stdout:
                with self._changed:
                    self.lines.append(line.rstrip("\n"))
                    self._changed.notify_all()
        except ValueError:
            # Closed by the test's teardown while a child of a killed process
            # (a worker of a supervisor) still held the pipe open.
            pass
        with self._changed:
            self._changed.notify_all()

    @property
    def output(self) -> str:
        with self._changed:
            return "\n".join(self.lines)

    def mark(self) -> int:
        """The number of lines so far; pass it to :meth:`wait_for` to look only at later ones."""
        with self._changed:
            return len(self.lines)

    def wait_for(self, pattern: str, timeout: float = WAIT, since: int = 0) -> re.Match[str]:
        """The first line from line *since* on that matches *pattern* (``re.search``)."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self.lines[since:]:
                    if match := regex.search(line):
                        return match
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    break
                self._changed.wait(min(left, 0.5))
        raise AssertionError(f"{self.args}: no line matching {pattern!r} within {timeout}s; "
                             f"exit status {self.proc.poll()}; output:\n{self.output}")

    def send_line(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = WAIT) -> int:
        """Send *sig* and wait for the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.wait(timeout)

    def wait(self, timeout: float = WAIT) -> int:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"{self.args} did not exit within {timeout}s; "
                                 f"output:\n{self.output}") from None
        self._reader.join(timeout)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(WAIT)


@pytest.fixture
def run_example() -> Iterator[type[Example]]:
    """``run_example([...args])`` starts an example; whatever is still running at the end is killed."""
    started: list[Example] = []

    class Tracked(Example):
        def __init__(self, args: Sequence[str], *, stdin: bool = False) -> None:
            super().__init__(args, stdin=stdin)
            started.append(self)

    yield Tracked
    for example in started:
        example.kill()
        for stream in (example.proc.stdin, example.proc.stdout):
            if stream is not None:
                stream.close()
