"""Moving bytes between two connected sockets, zero-copy with splice(2), for the server.

A `Tunnel` is two `Pump`s (a->b and b->a) driven by a reactor: anything with asyncio's
`add_reader`/`add_writer` shape (the asyncio loop itself, or a small selector loop). Each
pump moves data socket -> pipe -> socket with non-blocking splice, so the bytes never enter
Python; a pipe is borrowed from a shared `PipePool` only while data is in flight,
so a thousand idle tunnels hold no pipes.

Rules:
1. Half-close is passed on: EOF from one side becomes shutdown(SHUT_WR) on the other, and the
   tunnel closes when both directions have ended or either side fails.
2. One readiness callback moves at most `MAX_STEP_BYTES`, so a fast tunnel cannot starve the
   others on the same loop.
3. Only os, socket, fcntl and time are imported, so a small process can relay without asyncio.
"""

from __future__ import annotations

import os
import socket
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # typing's Protocol and collections.abc cost start-up time
    from collections.abc import Callable
    from typing import Protocol

    class Reactor(Protocol):
        def add_reader(self, fd: int, callback: Callable[[], None]) -> None: ...

        def remove_reader(self, fd: int) -> bool: ...

        def add_writer(self, fd: int, callback: Callable[[], None]) -> None: ...

        def remove_writer(self, fd: int) -> bool: ...


# Bytes one splice asks for, and the pipe size set with F_SETPIPE_SZ. Larger pipes mean fewer
# system calls per megabyte; 256 KiB keeps a busy pipe well under the per-user pipe budget
# (/proc/sys/fs/pipe-user-pages-soft, 64 MiB by default). See bench/proxy.py.
PIPE_SIZE = 256 * 1024
MAX_STEP_BYTES = 4 * 1024 * 1024
# Idle pipes kept for reuse; more are closed.
MAX_FREE_PIPES = 64
_F_SETPIPE_SZ = 1031  # fcntl.F_SETPIPE_SZ, missing from Python < 3.10's fcntl on some builds
_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)

WANT_READ = 1
WANT_WRITE = 2
DONE = 3


class PipePool:
    def __init__(self) -> None:
        self._free: list[tuple[int, int]] = []
        self.created = 0

    def acquire(self) -> tuple[int, int]:
        if self._free:
            return self._free.pop()
        read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            import fcntl

            fcntl.fcntl(write_end, _F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            pass  # over the per-user pipe budget: the default 64 KiB pipe still works
        self.created += 1
        return read_end, write_end

    def release(self, pipe: tuple[int, int]) -> None:
        if len(self._free) < MAX_FREE_PIPES:
            self._free.append(pipe)
        else:
            os.close(pipe[0])
            os.close(pipe[1])

    def discard(self, pipe: tuple[int, int]) -> None:
        """A pipe that may still hold bytes: never reused."""
        os.close(pipe[0])
        os.close(pipe[1])

    def close(self) -> None:
        while self._free:
            self.discard(self._free.pop())


class Pump:
    """One direction of a tunnel: src -> (pending bytes, then a pipe) -> dst."""

    __slots__ = ("_pipe", "_pool", "copy", "dst", "eof", "in_pipe", "moved", "pending", "src")

    def __init__(self, src: socket.socket, dst: socket.socket, pool: PipePool, pending: bytes):
        self.src = src
        self.dst = dst
        self._pool = pool
        self._pipe: tuple[int, int] | None = None
        self.pending = pending
        """Bytes already read by the driver (a parsed head's leftovers): sent first."""
        self.in_pipe = 0
        self.moved = 0
        self.eof = False
        self.copy = False
        """Fallback for sockets splice(2) refuses: recv/send through Python."""

    def step(self) -> int:
        """Move what can be moved now; WANT_READ, WANT_WRITE or DONE. OSError on failure."""
        budget = MAX_STEP_BYTES
        while True:
            if self.pending and not self._flush_pending():
                return WANT_WRITE
            if self.in_pipe and not self._flush_pipe():
                return WANT_WRITE
            if self.eof:
                return DONE
            if budget <= 0:
                return WANT_READ
            filled = self._fill()
            if filled is None:
                return WANT_READ
            budget -= filled

    def _flush_pending(self) -> bool:
        try:
            sent = self.dst.send(self.pending)
        except BlockingIOError:
            return False
        self.moved += sent
        self.pending = self.pending[sent:]
        return not self.pending

    def _flush_pipe(self) -> bool:
        assert self._pipe is not None
        try:
            sent = os.splice(self._pipe[0], self.dst.fileno(), self.in_pipe, flags=_SPLICE_FLAGS)
        except BlockingIOError:
            return False
        self.moved += sent
        self.in_pipe -= sent
        return self.in_pipe == 0

    def _fill(self) -> int | None:
        """Read from src; the byte count, None when nothing is there yet. Sets eof."""
        if self.copy:
            return self._fill_by_copy()
        if self._pipe is None:
            self._pipe = self._pool.acquire()
        try:
            count = os.splice(self.src.fileno(), self._pipe[1], PIPE_SIZE, flags=_SPLICE_FLAGS)
        except BlockingIOError:
            self._return_pipe()
            return None
        except OSError as exc:
            import errno

            if exc.errno != errno.EINVAL:
                raise
            self._return_pipe()
            self.copy = True
            return self._fill_by_copy()
        if count == 0:
            self.eof = True
            self._return_pipe()
        self.in_pipe = count
        return count

    def _fill_by_copy(self) -> int | None:
        try:
            data = self.src.recv(PIPE_SIZE)
        except BlockingIOError:
            return None
        if not data:
            self.eof = True
        self.pending = data
        return len(data)

    def _return_pipe(self) -> None:
        if self._pipe is not None and self.in_pipe == 0:
            self._pool.release(self._pipe)
            self._pipe = None

    def close(self) -> None:
        if self._pipe is not None:
            self._pool.discard(self._pipe)
            self._pipe = None


class Tunnel:
    """Relays a <-> b until both directions end, either fails, or `close()` is called."""

    def __init__(
        self,
        reactor: Reactor,
        a: socket.socket,
        b: socket.socket,
        *,
        pool: PipePool,
        a_to_b: bytes = b"",
        b_to_a: bytes = b"",
        on_close: Callable[[Tunnel], None] | None = None,
    ) -> None:
        for sock in (a, b):
            sock.setblocking(False)
        self._reactor = reactor
        self.a = a
        self.b = b
        self.up = Pump(a, b, pool, a_to_b)
        self.down = Pump(b, a, pool, b_to_a)
        self._wants = {id(self.up): 0, id(self.down): 0}
        self._on_close = on_close
        self.closed = False
        self.error: OSError | None = None
        self.last_activity = time.monotonic()

    @property
    def bytes_up(self) -> int:
        return self.up.moved

    @property
    def bytes_down(self) -> int:
        return self.down.moved

    def start(self) -> None:
        self._run(self.up)
        self._run(self.down)

    def _run(self, pump: Pump) -> None:
        if self.closed:
            return
        before = pump.moved
        try:
            want = pump.step()
        except OSError as exc:
            self.error = exc
            self.close()
            return
        if pump.moved != before:
            self.last_activity = time.monotonic()
        if want == DONE:
            self._finish(pump)
        self._watch(pump, want)

    def _finish(self, pump: Pump) -> None:
        try:  # noqa: SIM105 - contextlib is one import more for a small relay process
            pump.dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the other side is gone already; the other pump will see it
        if self.up.eof and self.down.eof and not self.up.in_pipe and not self.down.in_pipe:
            self.close()

    def _watch(self, pump: Pump, want: int) -> None:
        if self.closed:
            return
        had = self._wants[id(pump)]
        if had == want:
            return
        self._wants[id(pump)] = want
        if had == WANT_READ:
            self._reactor.remove_reader(pump.src.fileno())
        elif had == WANT_WRITE:
            self._reactor.remove_writer(pump.dst.fileno())
        if want == WANT_READ:
            self._reactor.add_reader(pump.src.fileno(), lambda: self._run(pump))
        elif want == WANT_WRITE:
            self._reactor.add_writer(pump.dst.fileno(), lambda: self._run(pump))

    def close(self) -> None:
        if self.closed:
            return
        for pump in (self.up, self.down):
            self._watch(pump, 0)
            pump.close()
        self.closed = True
        for sock in (self.a, self.b):
            sock.close()
        if self._on_close is not None:
            self._on_close(self)
