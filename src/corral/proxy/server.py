"""The host-side proxy server: an asyncio loop in a background thread, one channel per sandbox.

    server = ProxyServer(policy=..., sink=...)
    server.start()
    far_end = server.attach(sandbox_id)     # pass into the sandbox, to `launcher`'s forwarder
    ...
    server.stop()

Connections reach the server only as descriptors sent over a channel (see `channel`): there is
no listening socket on the host for the proxy itself, so no other process of the machine can
speak with the sandbox's network rights, and there is no directory of sockets to protect.
The published ports (`ports.Publisher`) are the only host listeners, and only when the
policy lists them.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Coroutine
from types import TracebackType

from corral.audit.events import Sink
from corral.errors import UsageError
from corral.policy.model import NetworkPolicy
from corral.proxy.channel import Channel
from corral.proxy.decision import TLS_PORTS, Ask, DomainRules, MissingSni
from corral.proxy.handlers import serve_http, serve_socks
from corral.proxy.ports import Publisher, UserProxyKey, serve_host_port, serve_user_proxy
from corral.proxy.session import Limits, ProxyContext, Resolver, default_resolver
from corral.proxy.upstream import parse_upstream_proxy

# How long stop() waits for the loop to wind down before leaving the thread to die with us.
STOP_TIMEOUT = 10.0


class ProxyServer:
    def __init__(
        self,
        *,
        policy: NetworkPolicy,
        sink: Sink,
        resolver: Resolver | None = None,
        ask: Ask | None = None,
        upstream_proxy: str | None = None,
        missing_sni: MissingSni = "refuse",
        tls_ports: frozenset[int] = TLS_PORTS,
        limits: Limits = Limits(),  # noqa: B008 - an immutable NamedTuple
    ) -> None:
        """`upstream_proxy` defaults to the policy's; `resolver` maps a host name to its
        addresses (getaddrinfo by default); `ask` decides hosts in neither list (see
        `decision`); tunnels to `tls_ports` must carry TLS naming their host. The policy's
        `host_ports` may be reached from inside, its `publish_ports` from the host; with
        `http_proxy_port` (`socks_proxy_port`) set, what comes to the HTTP (SOCKS5) proxy
        port inside goes unchanged to the user's own proxy on the host (see `ports`).
        SettingsError for a bad domain pattern, UsageError for a bad proxy URL."""
        rules = DomainRules.from_policy(policy)
        proxy_url = upstream_proxy if upstream_proxy is not None else policy.upstream_proxy
        self._ctx = ProxyContext(
            rules=rules,
            sink=sink,
            sandbox_id="",
            resolver=resolver or default_resolver,
            ask=ask,
            upstream_proxy=parse_upstream_proxy(proxy_url) if proxy_url else None,
            missing_sni=missing_sni,
            limits=limits,
            tls_ports=tls_ports,
        )
        self._host_ports = frozenset(policy.host_ports)
        # The user's own proxies, by the kind of in-sandbox listener relayed to each.
        self._user_proxies: dict[bytes, tuple[UserProxyKey, int]] = {}
        if policy.http_proxy_port:
            self._user_proxies[b"h"] = ("httpProxyPort", policy.http_proxy_port)
        if policy.socks_proxy_port:
            self._user_proxies[b"s"] = ("socksProxyPort", policy.socks_proxy_port)
        self._publisher = Publisher(policy.publish_ports)
        self._channels: list[Channel] = []
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._started = False
        self._lock = threading.Lock()

    def start(self) -> None:
        """Bind the published ports (UsageError when one is taken) and run the loop in a
        background thread. A server starts once; after stop() make a new one."""
        if self._started:
            raise UsageError("this proxy server was started already")
        self._started = True
        self._publisher.bind()
        ready = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(ready,), name="corral-proxy", daemon=True
        )
        self._thread.start()
        ready.wait()

    def attach(self, sandbox_id: str) -> socket.socket:
        """A new channel for one sandbox. Returns its far end, to pass into the sandbox (the
        caller closes its copy once the sandbox has it); connections that come over it are
        recorded under `sandbox_id`. Thread-safe."""
        host_end, far_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        host_end.setblocking(False)
        with self._lock:
            loop = self._loop
            if loop is None:
                host_end.close()
                far_end.close()
                raise UsageError("the proxy server is not running")
            # Messages wait in the socket until the loop gets to this; nothing is lost.
            loop.call_soon_threadsafe(self._open_channel, host_end, sandbox_id)
        return far_end

    def stop(self) -> None:
        """Close the channels (each forwarder inside then exits), the published ports and
        every connection (each still emits its audit event). Safe to call twice."""
        with self._lock:
            loop, thread = self._loop, self._thread
            self._loop = None
        if loop is None or thread is None:
            return
        future = asyncio.run_coroutine_threadsafe(self._shutdown(), loop)
        try:
            future.result(STOP_TIMEOUT)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(STOP_TIMEOUT)
            self._thread = None

    @property
    def active_connections(self) -> int:
        """Client connections being served now (for tests and status displays)."""
        return len(self._tasks)

    @property
    def open_channels(self) -> int:
        """Channels whose sandbox has not gone away yet."""
        return len(self._channels)

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
        asyncio.set_event_loop(loop)
        with self._lock:
            self._loop = loop
        loop.call_soon(self._start_publisher)
        loop.call_soon(ready.set)
        try:
            loop.run_forever()
        finally:
            loop.close()

    def _start_publisher(self) -> None:
        self._publisher.start(newest=self._newest_channel, spawn=self._spawn, fallback=self._ctx)

    def _newest_channel(self) -> Channel | None:
        return self._channels[-1] if self._channels else None

    def _open_channel(self, sock: socket.socket, sandbox_id: str) -> None:
        channel = Channel(
            sock,
            self._ctx.for_sandbox(sandbox_id),
            serve=self._serve,
            spawn=self._spawn,
            on_close=self._channels.remove,
        )
        self._channels.append(channel)

    def _serve(
        self, ctx: ProxyContext, client: socket.socket, kind: bytes, port: int
    ) -> Coroutine[None, None, None]:
        user_proxy = self._user_proxies.get(kind)
        if user_proxy is not None:
            key, user_port = user_proxy
            return serve_user_proxy(ctx, client, user_port, key=key)
        if kind == b"h":
            return serve_http(ctx, client)
        if kind == b"s":
            return serve_socks(ctx, client)
        return serve_host_port(ctx, client, port, allowed=self._host_ports)

    def _spawn(self, coroutine: Coroutine[None, None, None]) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _shutdown(self) -> None:
        self._publisher.close()
        for channel in list(self._channels):
            channel.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._ctx.close()
