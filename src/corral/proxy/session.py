"""What every client connection needs, whatever its protocol: the shared context, the audit
record, reading events under a deadline, deciding and connecting, the TLS peek and the relay.

Rules:
1. Every client connection emits audit events through `Record.emit`, exactly one per target
   (a refused or broken connection emits one with what was known), from a `finally`, so a
   connection cut by `stop()` is recorded too. A refusal is emitted before the client is
   answered: by the time a client sees its 403, the sink (and the user's terminal) has it.
2. A target is decided, then resolved once, then connected to at the chosen address
   (`decision.choose_address`); with an upstream proxy the name goes to that proxy instead,
   which resolves it in its own network.
3. Waiting on the client has a deadline: `handshake_timeout` for a head or ClientHello,
   `idle_timeout` once a tunnel or a kept-alive connection is idle.
"""

from __future__ import annotations

import asyncio
import copy
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Literal, NamedTuple, Protocol

from corral.audit.events import Sink, network_event
from corral.policy.domains import DomainPattern, is_ip_literal, normalize_host
from corral.policy.model import Origin
from corral.proxy.decision import (
    TLS_PORTS,
    Ask,
    Decision,
    DomainRules,
    MissingSni,
    Request,
    Resolved,
    check_server_name,
    choose_address,
    decide_by_lists,
    decision_from_answer,
    not_tls,
)
from corral.proxy.decision import (
    Protocol as RequestProtocol,
)
from corral.proxy.relay import PipePool, Tunnel
from corral.proxy.sansio import NeedData
from corral.proxy.tls import ClientHello, ClientHelloReader
from corral.proxy.upstream import (
    UpstreamError,
    UpstreamProxy,
    connect_tcp,
    connect_via_proxy,
)

# A client must finish a request head, a SOCKS handshake or a ClientHello within this time
# (slowloris). Tests inject shorter ones through `Limits`.
HANDSHAKE_TIMEOUT = 10.0
# A tunnel or a kept-alive connection with no traffic either way for this long is closed.
IDLE_TIMEOUT = 300.0
# Resolving plus connecting upstream.
CONNECT_TIMEOUT = 15.0
# After an error reply, how long to drain what the client still sends before closing: closing
# with unread bytes sends a RST, which can destroy the reply before the client reads it.
LINGER_TIMEOUT = 1.0
LINGER_BYTES = 256 * 1024
RECV_SIZE = 64 * 1024

Resolver = Callable[[str], list[str]]
RecordProtocol = RequestProtocol | Literal["host-port", "user-proxy", "publish", "channel"]
"""How a connection came: a proxy protocol, a host port reached from inside (`hostPorts`), a
proxy port relayed to the user's own proxy (`httpProxyPort`/`socksProxyPort`), a host client
reaching a port published from inside (`publishPorts`), or something the sandbox sent over
its channel that is no connection at all."""


class Limits(NamedTuple):
    handshake_timeout: float = HANDSHAKE_TIMEOUT
    idle_timeout: float = IDLE_TIMEOUT
    connect_timeout: float = CONNECT_TIMEOUT


class Core(Protocol):
    def receive_data(self, data: bytes) -> None: ...

    def next_event(self) -> object: ...


def default_resolver(host: str) -> list[str]:
    """The addresses of `host` in the order getaddrinfo gives, without duplicates."""
    infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


class Record:
    """The audit event of one target, filled in as the connection goes."""

    def __init__(self, protocol: RecordProtocol) -> None:
        self.protocol = protocol
        self.host = ""
        self.port = 0
        self.address = ""
        self.decision: Decision = Decision(False, "malformed", "no request was read")
        self.bytes_up = 0
        self.bytes_down = 0
        self.started = time.monotonic()
        self.error = ""
        self.emitted = False

    def emit(self, ctx: ProxyContext) -> None:
        """Send the event to the sink; only the first call of a record does (rule 1)."""
        if self.emitted:
            return
        self.emitted = True
        event = network_event(
            ctx.sandbox_id,
            host=self.host,
            port=self.port,
            decision="allow" if self.decision.allowed else "deny",
            rule=self.decision.rule,
            reason=self.decision.reason,
            bytes_up=self.bytes_up,
            bytes_down=self.bytes_down,
            duration=round(time.monotonic() - self.started, 6),
        )
        # Beyond the common fields: how the client asked, where the proxy connected, and what
        # went wrong after an allowed decision (a JSON Lines sink keeps them).
        event.fields.update(protocol=self.protocol, address=self.address, error=self.error)
        ctx.sink.emit(event)


class _SharedRules:
    """The domain rules every sandbox of one server sees: an "always" answer for one
    command's request holds for the next command too; one question is asked at a time."""

    def __init__(self, rules: DomainRules) -> None:
        self.rules = rules
        self.ask_lock = asyncio.Lock()


class ProxyContext:
    """Everything a connection handler needs, used on the server's loop only. One per
    server, and a copy per sandbox (`for_sandbox`) that shares all but the sandbox id."""

    def __init__(
        self,
        *,
        rules: DomainRules,
        sink: Sink,
        sandbox_id: str,
        resolver: Resolver,
        ask: Ask | None,
        upstream_proxy: UpstreamProxy | None,
        missing_sni: MissingSni,
        limits: Limits,
        tls_ports: frozenset[int] = TLS_PORTS,
    ) -> None:
        self._shared = _SharedRules(rules)
        self.sink = sink
        self.sandbox_id = sandbox_id
        self.resolver = resolver
        self.ask = ask
        self.upstream_proxy = upstream_proxy
        self.missing_sni = missing_sni
        self.limits = limits
        self.tls_ports = tls_ports
        self.pool = PipePool()
        self.executor = ThreadPoolExecutor(max_workers=8, thread_name_prefix="corral-proxy")
        self.tunnels: set[Tunnel] = set()

    @property
    def rules(self) -> DomainRules:
        return self._shared.rules

    def for_sandbox(self, sandbox_id: str) -> ProxyContext:
        """This context for the connections of one sandbox: its events carry `sandbox_id`."""
        view = copy.copy(self)
        view.sandbox_id = sandbox_id
        return view

    async def authorize(self, request: Request) -> Decision:
        """Rules 1-5 of `decision`; `ask` runs in a thread, one question at a time."""
        decision = decide_by_lists(request, self.rules)
        if decision is not None:
            return decision
        if self.ask is None:
            return Decision(False, "default-deny", f"{request.host} is not in allowedDomains")
        async with self._shared.ask_lock:
            # An "always" answered while this request waited decides it without asking again.
            decision = decide_by_lists(request, self.rules)
            if decision is not None:
                return decision
            loop = asyncio.get_running_loop()
            try:
                answer = await loop.run_in_executor(self.executor, self.ask, request)
            except Exception as exc:  # the callback is foreign code; a failure denies
                return Decision(False, "ask: failed", f"the ask callback failed: {exc!r}")
        decision = decision_from_answer(request, answer)
        if decision.rule == "ask: always":
            pattern = DomainPattern("exact", normalize_host(request.host))
            self._shared.rules = self.rules.allowing(pattern, Origin("ask", "always"))
        return decision

    async def open(self, record: Record) -> tuple[socket.socket, bytes]:
        """Resolve (once) and connect to the decided target. UpstreamError or a refusal
        (`Refused`) on failure; the upstream proxy's early bytes are returned with the socket."""
        host = normalize_host(record.host)
        timeout = self.limits.connect_timeout
        if self.upstream_proxy is not None:
            proxy = self.upstream_proxy
            proxy_address = (await self._resolve(proxy.host))[0]
            return await connect_via_proxy(proxy, proxy_address, host, record.port, timeout=timeout)
        addresses = [host] if is_ip_literal(host) else await self._resolve(host)
        chosen = choose_address(host, addresses, self.rules)
        if isinstance(chosen, Decision):
            raise Refused(chosen)
        assert isinstance(chosen, Resolved)
        record.address = chosen.address
        return await connect_tcp(chosen.address, record.port, timeout=timeout), b""

    async def _resolve(self, host: str) -> list[str]:
        if is_ip_literal(host):
            return [host]
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.limits.connect_timeout):
                addresses = await loop.run_in_executor(self.executor, self.resolver, host)
        except TimeoutError:
            raise UpstreamError(
                f"resolving {host} timed out", http_status=504, socks_reply=4
            ) from None
        except OSError as exc:
            raise UpstreamError(
                f"cannot resolve {host}: {exc.strerror or exc}", http_status=502, socks_reply=4
            ) from None
        if not addresses:
            raise UpstreamError(f"{host} has no address", http_status=502, socks_reply=4)
        return addresses

    def close(self) -> None:
        for tunnel in list(self.tunnels):
            tunnel.close()
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.pool.close()


class Refused(Exception):
    """A decision made after the first one (rebinding, SNI) said no."""

    def __init__(self, decision: Decision) -> None:
        super().__init__(decision.reason)
        self.decision = decision


async def next_event(sock: socket.socket, core: Core, timeout: float | None = None) -> object:
    """The core's next event, receiving from `sock` as needed; TimeoutError past `timeout`."""
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(timeout):
        while isinstance(event := core.next_event(), NeedData):
            core.receive_data(await loop.sock_recv(sock, RECV_SIZE))
    return event


async def check_tls(
    ctx: ProxyContext, client: socket.socket, host: str, port: int, early: bytes
) -> bytes:
    """Rule 7 of `decision` for tunnels to TLS ports: read the ClientHello (it may have come
    with the request: `early`) and raise Refused unless its SNI names `host`. Returns every
    byte read, for the upstream."""
    if port not in ctx.tls_ports:
        return early
    reader = ClientHelloReader()
    received = bytearray(early)
    if early:
        reader.receive_data(early)
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(ctx.limits.handshake_timeout):
        while isinstance(event := reader.next_event(), NeedData):
            data = await loop.sock_recv(client, RECV_SIZE)
            received += data
            reader.receive_data(data)
    if not isinstance(event, ClientHello):
        raise Refused(not_tls(host, port, getattr(event, "reason", "no ClientHello")))
    verdict = check_server_name(normalize_host(host), event.server_name, missing=ctx.missing_sni)
    if verdict is not None:
        raise Refused(verdict)
    return bytes(received)


async def relay(
    ctx: ProxyContext,
    client: socket.socket,
    upstream: socket.socket,
    record: Record,
    *,
    to_upstream: bytes = b"",
    to_client: bytes = b"",
) -> None:
    """Relay until both sides end, either fails or the tunnel idles past `idle_timeout`."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def closed(_tunnel: Tunnel) -> None:
        if not done.done():
            done.set_result(None)

    tunnel = Tunnel(
        loop, client, upstream, pool=ctx.pool, a_to_b=to_upstream, b_to_a=to_client,
        on_close=closed,
    )  # fmt: skip
    ctx.tunnels.add(tunnel)
    idle = ctx.limits.idle_timeout
    try:
        tunnel.start()
        while not done.done():
            left = tunnel.last_activity + idle - time.monotonic()
            if left <= 0:
                record.error = f"idle for {idle:g} s"
                break
            await asyncio.wait({done}, timeout=left)
        if tunnel.error is not None:
            record.error = f"relay: {tunnel.error.strerror or tunnel.error}"
    finally:
        tunnel.close()
        ctx.tunnels.discard(tunnel)
        record.bytes_up += tunnel.bytes_up
        record.bytes_down += tunnel.bytes_down


async def close_gracefully(sock: socket.socket) -> None:
    """Close after a final reply: shut our side, drain a little, then close (see LINGER_*)."""
    loop = asyncio.get_running_loop()
    try:
        sock.shutdown(socket.SHUT_WR)
        drained = 0
        async with asyncio.timeout(LINGER_TIMEOUT):
            while drained < LINGER_BYTES:
                data = await loop.sock_recv(sock, RECV_SIZE)
                if not data:
                    break
                drained += len(data)
    except (OSError, TimeoutError):
        pass
    finally:
        sock.close()


def http_error(status: int, reason: str, *, rule: str = "") -> bytes:
    """A complete error response that closes the connection; the reason is for the agent."""
    phrase = _PHRASES.get(status, "Error")
    body = f"corral proxy: {reason}\n".encode()
    head = [f"HTTP/1.1 {status} {phrase}", "Content-Type: text/plain; charset=utf-8"]
    if rule:
        head.append(f"X-Corral-Rule: {rule}")
    head += [f"Content-Length: {len(body)}", "Connection: close"]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


_PHRASES = {
    400: "Bad Request",
    403: "Forbidden",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    501: "Not Implemented",
    502: "Bad Gateway",
    504: "Gateway Timeout",
    505: "HTTP Version Not Supported",
}
