"""Host ports, the user's own proxy and published ports: plain TCP between the host's loopback
and the sandbox's.

- `hostPorts`: a host loopback service (say 127.0.0.1:5432) is reachable inside at the same
  address. The forwarder listens on the port inside and hands each connection over the
  channel; `serve_host_port` connects to the port on the host and relays.
- `httpProxyPort` / `socksProxyPort` (as in Anthropic's sandbox-runtime: "an external proxy to
  use instead of starting a local one; the external proxy must handle domain filtering"): a
  connection made inside to the HTTP (or SOCKS5) proxy port, which stays 3128 (or 1080)
  inside, is relayed unchanged to 127.0.0.1:PORT on the host by `serve_user_proxy`. corral
  reads none of its bytes and decides nothing; the user's proxy does.
- `publishPorts`: a server started inside on a port is reachable from the host at
  127.0.0.1:PORT. `Publisher` listens on the host; for each connection it asks the sandbox's
  forwarder to connect to the port inside and send that socket back, then relays here.
  Chosen over sending the host's socket in and relaying inside: no host socket ever enters
  the sandbox, the bytes move with the same splice relay as every tunnel, and the forwarder
  stays a thing that only passes descriptors.

All are allowed by the policy alone (nothing to ask) and each connection is one audit event
(`protocol` "host-port", "user-proxy" or "publish"). Ports are off unless the policy lists them.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable, Coroutine
from typing import Literal

from corral.errors import UsageError
from corral.proxy.channel import Channel
from corral.proxy.decision import Decision
from corral.proxy.session import ProxyContext, Record, http_error, relay
from corral.proxy.upstream import UpstreamError, connect_tcp

LOOPBACK = "127.0.0.1"


async def serve_host_port(
    ctx: ProxyContext, client: socket.socket, port: int, *, allowed: frozenset[int]
) -> None:
    """Relay a connection made inside to 127.0.0.1:`port` on the host, if `port` is allowed."""
    record = Record("host-port")
    record.host, record.port = LOOPBACK, port
    try:
        if port not in allowed:
            record.decision = Decision(
                False, "hostPorts", f"{LOOPBACK}:{port} is not in network.hostPorts"
            )
            return
        record.decision = Decision(
            True, f"hostPorts: {port}", f"{LOOPBACK}:{port} is in network.hostPorts"
        )
        await _relay_to_host(ctx, client, record)
    finally:
        record.emit(ctx)
        client.close()


UserProxyKey = Literal["httpProxyPort", "socksProxyPort"]


async def serve_user_proxy(
    ctx: ProxyContext, client: socket.socket, port: int, *, key: UserProxyKey
) -> None:
    """Relay a connection made to a proxy port inside, unchanged, to the user's own proxy at
    127.0.0.1:`port` on the host (`key` names the setting). When that proxy cannot be
    reached, an HTTP client is told so with a 502; a SOCKS5 client sees the connection close
    (a reply would need the greeting read first, and nothing here reads the client)."""
    record = Record("user-proxy")
    record.host, record.port = LOOPBACK, port
    record.decision = Decision(
        True,
        f"{key}: {port}",
        f"relayed to the user's proxy at {LOOPBACK}:{port} (network.{key}), which decides",
    )
    try:
        error = await _relay_to_host(ctx, client, record)
        if error is not None and key == "httpProxyPort":
            reason = f"the proxy at {LOOPBACK}:{port} (network.{key}) is unreachable: {error}"
            with contextlib.suppress(OSError):
                await asyncio.get_running_loop().sock_sendall(client, http_error(502, reason))
    finally:
        record.emit(ctx)
        client.close()


async def _relay_to_host(ctx: ProxyContext, client: socket.socket, record: Record) -> str | None:
    """Connect to 127.0.0.1:`record.port` on the host and relay; the connect error, if any
    (also recorded)."""
    try:
        upstream = await connect_tcp(LOOPBACK, record.port, timeout=ctx.limits.connect_timeout)
    except UpstreamError as exc:
        record.error = exc.reason
        return exc.reason
    record.address = LOOPBACK
    try:
        await relay(ctx, client, upstream, record)
    finally:
        upstream.close()
    return None


class Publisher:
    """Host listeners for `publishPorts`. Each connection goes to the newest sandbox whose
    command still runs (one Sandbox runs its commands one after another, typically)."""

    def __init__(self, ports: tuple[int, ...]) -> None:
        self.ports = ports
        self._listeners: list[tuple[socket.socket, int]] = []

    def bind(self) -> None:
        """Listen on every port now, so a port in use fails the start (UsageError)."""
        for port in dict.fromkeys(self.ports):
            try:
                listener = socket.create_server((LOOPBACK, port), backlog=socket.SOMAXCONN)
            except OSError as exc:
                self.close()
                raise UsageError(
                    f"cannot publish port {port}: {LOOPBACK}:{port}: {exc.strerror}",
                    hint="stop what listens there, or remove it from network.publishPorts",
                ) from None
            listener.setblocking(False)
            self._listeners.append((listener, port))

    def start(
        self,
        *,
        newest: Callable[[], Channel | None],
        spawn: Callable[[Coroutine[None, None, None]], None],
        fallback: ProxyContext,
    ) -> None:
        """Serve on the running loop. `newest()` names the sandbox to connect to; `fallback`
        records connections that find none."""
        loop = asyncio.get_running_loop()
        for listener, port in self._listeners:

            def accept(listener: socket.socket = listener, port: int = port) -> None:
                while True:
                    try:
                        client, _ = listener.accept()
                    except OSError:
                        return  # nothing waiting, or out of descriptors (the backlog waits)
                    client.setblocking(False)
                    spawn(serve_published(newest(), fallback, client, port))

            loop.add_reader(listener.fileno(), accept)

    def close(self) -> None:
        for listener, _ in self._listeners:
            with contextlib.suppress(RuntimeError):  # not started: no loop watches it
                asyncio.get_running_loop().remove_reader(listener.fileno())
            listener.close()
        self._listeners = []


async def serve_published(
    channel: Channel | None, fallback: ProxyContext, client: socket.socket, port: int
) -> None:
    """Relay a host client to `port` inside the sandbox of `channel`."""
    ctx = channel.ctx if channel is not None else fallback
    record = Record("publish")
    record.host, record.port = LOOPBACK, port
    record.decision = Decision(
        True, f"publishPorts: {port}", f"{LOOPBACK}:{port} is in network.publishPorts"
    )
    try:
        if channel is None:
            record.error = "no sandboxed command is running"
            return
        try:
            inside = await channel.connect_inside(port)
        except TimeoutError:
            record.error = f"connecting to port {port} inside timed out"
            return
        except OSError as exc:
            record.error = f"port {port} inside: {exc.strerror or exc}"
            return
        record.address = LOOPBACK
        try:
            # The sandbox's side is the "client": bytes_up counts what leaves the sandbox,
            # as it does for every other record.
            await relay(ctx, inside, client, record)
        finally:
            inside.close()
    finally:
        record.emit(ctx)
        client.close()
