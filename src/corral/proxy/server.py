"""The host-side proxy server: two unix sockets (HTTP proxy and SOCKS5) in a private directory,
an asyncio loop in a background thread, and the handlers of `handlers` behind them.

    with ProxyServer(policy=..., sink=..., sandbox_id=..., socket_dir=...) as server:
        endpoints = server.endpoints        # bind-mount these into the sandbox
        ...

The directory is created with mode 0700 (or must already be an empty-enough directory of ours
with no access for others): the sockets are the sandbox's only way out, and anyone who can
connect to them speaks with the sandbox's network rights.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import stat
import threading
from collections.abc import Callable, Coroutine
from types import TracebackType
from typing import NamedTuple

from corral.audit.events import Sink
from corral.errors import UsageError
from corral.policy.model import NetworkPolicy
from corral.proxy.decision import TLS_PORTS, Ask, DomainRules, MissingSni
from corral.proxy.handlers import serve_http, serve_socks
from corral.proxy.session import Limits, ProxyContext, Resolver, default_resolver
from corral.proxy.upstream import parse_upstream_proxy

HTTP_SOCKET_NAME = "http.sock"
SOCKS_SOCKET_NAME = "socks.sock"
# How long stop() waits for the loop to wind down before leaving the thread to die with us.
STOP_TIMEOUT = 10.0

Handler = Callable[[ProxyContext, socket.socket], Coroutine[None, None, None]]


class ProxyEndpoints(NamedTuple):
    http_socket: str
    socks_socket: str


class ProxyServer:
    def __init__(
        self,
        *,
        policy: NetworkPolicy,
        sink: Sink,
        sandbox_id: str,
        socket_dir: str,
        resolver: Resolver | None = None,
        ask: Ask | None = None,
        upstream_proxy: str | None = None,
        missing_sni: MissingSni = "refuse",
        tls_ports: frozenset[int] = TLS_PORTS,
        limits: Limits = Limits(),  # noqa: B008 - an immutable NamedTuple
    ) -> None:
        """`upstream_proxy` defaults to the policy's; `resolver` maps a host name to its
        addresses (getaddrinfo by default); `ask` decides hosts in neither list (see
        `decision`); tunnels to `tls_ports` must carry TLS naming their host.
        SettingsError for a bad domain pattern, UsageError for a bad proxy URL."""
        rules = DomainRules.from_policy(policy)
        proxy_url = upstream_proxy if upstream_proxy is not None else policy.upstream_proxy
        self._socket_dir = os.path.abspath(socket_dir)
        self._made_dir = False
        self._ctx = ProxyContext(
            rules=rules,
            sink=sink,
            sandbox_id=sandbox_id,
            resolver=resolver or default_resolver,
            ask=ask,
            upstream_proxy=parse_upstream_proxy(proxy_url) if proxy_url else None,
            missing_sni=missing_sni,
            limits=limits,
            tls_ports=tls_ports,
        )
        self._listeners: list[tuple[socket.socket, Handler]] = []
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.endpoints: ProxyEndpoints | None = None

    def start(self) -> ProxyEndpoints:
        """Bind both sockets (errors raise here) and serve them from a background thread.
        A server starts once; after stop() make a new one."""
        if self.endpoints is not None:
            raise UsageError("this proxy server was started already")
        self._prepare_dir()
        endpoints = ProxyEndpoints(
            os.path.join(self._socket_dir, HTTP_SOCKET_NAME),
            os.path.join(self._socket_dir, SOCKS_SOCKET_NAME),
        )
        try:
            self._listeners = [
                (_listen(endpoints.http_socket), serve_http),
                (_listen(endpoints.socks_socket), serve_socks),
            ]
        except OSError as exc:
            self._close_listeners()
            raise UsageError(f"cannot listen in {self._socket_dir}: {exc.strerror}") from None
        ready = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(ready,), name="corral-proxy", daemon=True
        )
        self._thread.start()
        ready.wait()
        self.endpoints = endpoints
        return endpoints

    def stop(self) -> None:
        """Close the listeners and every connection (each still emits its audit event), then
        remove the sockets and the directory if this server made it. Safe to call twice."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        future = asyncio.run_coroutine_threadsafe(self._shutdown(), loop)
        try:
            future.result(STOP_TIMEOUT)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(STOP_TIMEOUT)
            self._thread = None
            self._loop = None
            self._cleanup_dir()

    @property
    def active_connections(self) -> int:
        """Client connections being served now (for tests and status displays)."""
        return len(self._tasks)

    def __enter__(self) -> ProxyServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _run(self, ready: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        for listener, handler in self._listeners:
            loop.add_reader(listener.fileno(), self._accept, listener, handler)
        loop.call_soon(ready.set)
        try:
            loop.run_forever()
        finally:
            loop.close()

    def _accept(self, listener: socket.socket, handler: Handler) -> None:
        assert self._loop is not None
        while True:
            try:
                client, _ = listener.accept()
            except BlockingIOError:
                return
            except OSError:
                return  # out of file descriptors: the backlog keeps the client waiting
            client.setblocking(False)
            task = self._loop.create_task(handler(self._ctx, client))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _shutdown(self) -> None:
        assert self._loop is not None
        for listener, _ in self._listeners:
            self._loop.remove_reader(listener.fileno())
        self._close_listeners()
        self._ctx.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _close_listeners(self) -> None:
        for listener, _ in self._listeners:
            listener.close()
        self._listeners = []

    def _prepare_dir(self) -> None:
        try:
            os.mkdir(self._socket_dir, 0o700)
            self._made_dir = True
        except FileExistsError:
            info = os.lstat(self._socket_dir)
            if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
                raise UsageError(f"{self._socket_dir} is not a directory of this user") from None
            if info.st_mode & 0o077:
                raise UsageError(
                    f"{self._socket_dir} is open to other users (mode {info.st_mode & 0o777:o})",
                    hint=f"chmod 700 {self._socket_dir}",
                ) from None
        except OSError as exc:
            raise UsageError(f"cannot create {self._socket_dir}: {exc.strerror}") from None
        os.chmod(self._socket_dir, 0o700)

    def _cleanup_dir(self) -> None:
        for name in (HTTP_SOCKET_NAME, SOCKS_SOCKET_NAME):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self._socket_dir, name))
        if self._made_dir:
            with contextlib.suppress(OSError):  # someone put something else there: leave it
                os.rmdir(self._socket_dir)


def _listen(path: str) -> socket.socket:
    if os.path.lexists(path):
        os.unlink(path)  # a stale socket of an earlier run in our own 0700 directory
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(path)
        listener.listen(socket.SOMAXCONN)
    except OSError:
        listener.close()
        raise
    listener.setblocking(False)
    return listener
