"""The host's end of one sandbox's channel: sockets handed over by the in-sandbox forwarder.

Each command gets a SOCK_SEQPACKET socketpair; the sandbox's end goes to `launcher`'s
forwarder, which sends every connection accepted inside (on the HTTP proxy, SOCKS5 and host
ports) here as a file descriptor, and answers requests to connect to a published port inside.
The wire format is `launcher`'s docstring.

Rules:
1. Nothing that comes over the channel is trusted. A descriptor is used only when it is a
   connected TCP socket (family, type and protocol asked of the kernel, never taken from the
   message); anything else is closed and recorded. A host port is connected to only when it
   is in `network.hostPorts`. A reply nobody asked for, or that came too late, is closed.
2. The channel carries only sockets of the sandbox's own network namespace, in both ways, so
   holding it grants nothing beyond connecting to the forwarder's ports inside: no host
   socket ever goes into the sandbox (published ports are relayed here, on the host).
3. A connection received is served like any proxy client, under the channel's sandbox id.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
from collections.abc import Callable, Coroutine

from corral.proxy.decision import Decision
from corral.proxy.launcher import (
    ACCEPTED_SIZE,
    CONNECT_REPLY,
    REPLY_SIZE,
    encode_request,
)
from corral.proxy.session import ProxyContext, Record

# Messages read per wake-up before other connections get the loop again.
MAX_MESSAGES_PER_WAKEUP = 64
# Each message carries at most one descriptor; room for a few more lets extras be closed
# rather than leave MSG_CTRUNC behind.
MAX_FDS = 4
MESSAGE_SIZE = 64

Spawn = Callable[[Coroutine[None, None, None]], None]
Serve = Callable[[ProxyContext, socket.socket, bytes, int], Coroutine[None, None, None]]


def adopt_tcp_socket(fd: int, *, connected: bool) -> socket.socket | None:
    """`fd` as a socket when the kernel says it is an IPv4 TCP socket (and, when `connected`,
    that it has a peer); otherwise None, with `fd` closed."""
    try:
        sock = socket.socket(fileno=fd)  # reads SO_DOMAIN, SO_TYPE and SO_PROTOCOL
    except OSError:
        os.close(fd)
        return None
    ok = (sock.family, sock.type, sock.proto) == (
        socket.AF_INET,
        socket.SOCK_STREAM,
        socket.IPPROTO_TCP,
    )
    if ok and connected:
        try:
            sock.getpeername()
        except OSError:
            ok = False
    if not ok:
        sock.close()
        return None
    sock.setblocking(False)
    return sock


class Channel:
    """One sandbox's channel, served on the proxy's loop (create and use it there)."""

    def __init__(
        self,
        sock: socket.socket,
        ctx: ProxyContext,
        *,
        serve: Serve,
        spawn: Spawn,
        on_close: Callable[[Channel], None],
    ) -> None:
        """`serve(ctx, client, kind, port)` handles one connection accepted inside; `spawn`
        runs a handler as a task of the server; `on_close` hears when the channel ends."""
        self.sock = sock
        self.ctx = ctx
        self._serve = serve
        self._spawn = spawn
        self._on_close = on_close
        self._loop = asyncio.get_running_loop()
        self._pending: dict[int, asyncio.Future[socket.socket]] = {}
        self._next_id = 0
        self.closed = False
        self._loop.add_reader(sock.fileno(), self._readable)

    def _readable(self) -> None:
        for _ in range(MAX_MESSAGES_PER_WAKEUP):
            try:
                data, fds, _flags, _ = socket.recv_fds(
                    self.sock, MESSAGE_SIZE, MAX_FDS, socket.MSG_CMSG_CLOEXEC
                )
            except BlockingIOError:
                return
            except OSError:
                self.close()
                return
            if not data and not fds:
                self.close()  # the forwarder is gone: the command has ended
                return
            for extra in fds[1:]:
                os.close(extra)
            self._dispatch(data, fds[0] if fds else None)

    def _dispatch(self, data: bytes, fd: int | None) -> None:
        kind = data[:1]
        if kind == CONNECT_REPLY and len(data) == REPLY_SIZE:
            self._reply(int.from_bytes(data[1:5], "big"), int.from_bytes(data[5:], "big"), fd)
            return
        client = adopt_tcp_socket(fd, connected=True) if fd is not None else None
        if client is not None and kind in (b"h", b"s", b"p") and len(data) == ACCEPTED_SIZE:
            self._spawn(self._serve(self.ctx, client, kind, int.from_bytes(data[1:], "big")))
            return
        if client is not None:
            client.close()
        self._record_refusal(
            f"the sandbox sent {data[:8]!r} with "
            + ("no descriptor" if fd is None else "a descriptor that is no TCP connection")
        )

    def _reply(self, ident: int, error: int, fd: int | None) -> None:
        sock = adopt_tcp_socket(fd, connected=False) if fd is not None else None
        future = self._pending.pop(ident, None)
        if future is None or future.done():
            if sock is not None:
                sock.close()  # nobody asked, or the asker gave up
            return
        if sock is None:
            error = error or errno.EPROTO
            future.set_exception(OSError(error, os.strerror(error)))
        else:
            future.set_result(sock)

    def _record_refusal(self, reason: str) -> None:
        record = Record("channel")
        record.decision = Decision(False, "channel", reason)
        record.emit(self.ctx)

    async def connect_inside(self, port: int) -> socket.socket:
        """A socket connected to 127.0.0.1:`port` inside the sandbox. OSError (the errno seen
        inside) or TimeoutError (`connect_timeout`) on failure."""
        if self.closed:
            raise ConnectionError(errno.ESHUTDOWN, "the sandbox's command has ended")
        ident = self._next_id
        self._next_id = (self._next_id + 1) % (1 << 32)
        future: asyncio.Future[socket.socket] = self._loop.create_future()
        self._pending[ident] = future
        sock: socket.socket | None = None
        try:
            async with asyncio.timeout(self.ctx.limits.connect_timeout):
                # Waits for room should the socket's send buffer ever be full, rather than
                # failing the connection.
                await self._loop.sock_sendall(self.sock, encode_request(ident, port))
                sock = await future
                await _writable(sock)
            error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if error:
                raise OSError(error, os.strerror(error))
        except BaseException:
            answered = future.done() and not future.cancelled() and future.exception() is None
            if sock is None and answered:
                sock = future.result()  # answered just as the wait was cancelled
            if sock is not None:
                sock.close()
            raise
        finally:
            self._pending.pop(ident, None)
        return sock

    def close(self) -> None:
        """Stop reading; the forwarder inside sees the channel close and exits."""
        if self.closed:
            return
        self.closed = True
        self._loop.remove_reader(self.sock.fileno())
        self.sock.close()
        for future in self._pending.values():
            if not future.done():
                future.set_exception(ConnectionError(errno.ESHUTDOWN, "the channel closed"))
        self._pending.clear()
        self._on_close(self)


async def _writable(sock: socket.socket) -> None:
    """Until a non-blocking connect has finished (either way)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not done.done():
            done.set_result(None)

    loop.add_writer(sock.fileno(), ready)
    try:
        await done
    finally:
        loop.remove_writer(sock.fileno())
