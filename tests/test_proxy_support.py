"""Loopback servers, a proxy under test and its forwarder, shared by the proxy's socket tests.

Addresses: allowed names resolve (through the test resolver) to the "allowed" server on
127.0.0.2, which the policy lists; denied and rebinding names resolve to the "denied" server on
127.0.0.3, which it does not. The denied server counts every connection it accepts: the
host-side evidence that a refusal happened before any byte left the proxy.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import NamedTuple

from corral.audit.events import MemorySink
from corral.policy.model import NetworkPolicy, Origin, Rule
from corral.proxy import launcher
from corral.proxy.decision import Ask, MissingSni
from corral.proxy.server import ProxyServer
from corral.proxy.session import Limits

ALLOWED_ADDRESS = "127.0.0.2"
DENIED_ADDRESS = "127.0.0.3"

ALLOWED_NAMES = (
    "allowed.test",
    "api.wild.test",
    "deep.api.wild.test",
    "xn--bcher-kva.test",
    "asked.test",
)
DENIED_NAMES = ("denied.test", "rebind.test", "wild.test", "other.test", "x.denied.wild.test")

POLICY = NetworkPolicy(
    "filtered",
    allowed_domains=tuple(
        Rule(v, Origin("test"))
        for v in ("allowed.test", "*.wild.test", "bücher.test", "rebind.test", ALLOWED_ADDRESS)
    ),
    denied_domains=tuple(Rule(v, Origin("test")) for v in ("denied.test", "*.denied.wild.test")),
)


def resolve(host: str) -> list[str]:
    if host in ALLOWED_NAMES:
        return [ALLOWED_ADDRESS]
    if host in DENIED_NAMES:
        return [DENIED_ADDRESS]
    raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")


class LoopbackServer:
    """An asyncio TCP server in a thread. First bytes decide the mode of a connection:
    "ECHO" echoes, "STREAM" sends without end, 0x16 (TLS) only records, anything else is
    HTTP/1.1 with keep-alive, answering `<name> <request line> host=<Host>`."""

    def __init__(self, name: str, address: str) -> None:
        self.name = name
        self.connections = 0
        self.open_connections = 0
        self.received = bytearray()
        self.requests: list[bytes] = []
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(address,), daemon=True)
        self._thread.start()
        self._ready.wait()

    def _run(self, address: str) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(
            asyncio.start_server(self._handle, address, 0, backlog=2048)
        )
        self.port = server.sockets[0].getsockname()[1]
        self._server = server
        self._ready.set()
        self._loop.run_forever()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open_connections += 1
        try:
            data = await reader.read(65536)
            self.received += data
            if data.startswith(b"ECHO"):
                while data:
                    writer.write(data)
                    await writer.drain()
                    data = await reader.read(65536)
            elif data.startswith(b"STREAM"):
                chunk = b"s" * 65536
                while True:
                    writer.write(chunk)
                    await writer.drain()
            elif data.startswith(b"\x16"):
                while data := await reader.read(65536):
                    self.received += data
            else:
                await self._http(reader, writer, bytearray(data))
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self.open_connections -= 1
            writer.close()

    async def _http(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, buffer: bytearray
    ) -> None:
        while True:
            while b"\r\n\r\n" not in buffer:
                more = await reader.read(65536)
                if not more:
                    return
                self.received += more
                buffer += more
            head, _, rest = bytes(buffer).partition(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            headers = {
                k.strip().lower(): v.strip() for k, _, v in (x.partition(b":") for x in lines[1:])
            }
            length = int(headers.get(b"content-length", b"0"))
            while len(rest) < length:
                more = await reader.read(65536)
                self.received += more
                rest += more
            buffer = bytearray(rest[length:])
            self.requests.append(lines[0])
            body = b"%s %s host=%s\n" % (self.name.encode(), lines[0], headers.get(b"host", b"-"))
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._server.close)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


def wait_for(condition: Callable[[], bool], *, timeout: float = 20.0) -> None:
    """Poll until `condition()`; the timeout is a generous upper bound, not a measurement."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


DEFAULT_LIMITS = Limits()


class Ports(NamedTuple):
    """The TCP ports of the forwarder in front of a proxy under test."""

    http: int
    socks: int


@contextmanager
def running_proxy(
    *,
    policy: NetworkPolicy = POLICY,
    limits: Limits = DEFAULT_LIMITS,
    ask: Ask | None = None,
    upstream_proxy: str | None = None,
    missing_sni: MissingSni = "refuse",
    tls_ports: frozenset[int] = frozenset(),
    sandbox_id: str = "test-sandbox",
) -> Iterator[tuple[ProxyServer, Ports, MemorySink]]:
    """A proxy server and, over one channel, the launcher's forwarder as the sandbox runs it
    (here on the host, listening on free ports)."""
    sink = MemorySink()
    server = ProxyServer(
        policy=policy,
        sink=sink,
        resolver=resolve,
        ask=ask,
        upstream_proxy=upstream_proxy,
        missing_sni=missing_sni,
        tls_ports=tls_ports,
        limits=limits,
    )
    server.start()
    try:
        with running_forwarder(server, sandbox_id) as ports:
            yield server, ports, sink
    finally:
        server.stop()


@contextmanager
def running_forwarder(
    server: ProxyServer, sandbox_id: str, *, listens: tuple[str, ...] = ("h:0", "s:0")
) -> Iterator[Ports]:
    """`launcher` in forward-only mode on a new channel of `server`; yields its ports."""
    far_end = server.attach(sandbox_id)
    argv = [sys.executable, "-I", "-S", launcher.__file__, "--channel", str(far_end.fileno())]
    for listen in listens:
        argv += ["--listen", listen]
    with far_end:
        process = subprocess.Popen(
            argv, stdout=subprocess.PIPE, text=True, pass_fds=(far_end.fileno(),)
        )
    try:
        assert process.stdout is not None
        words = process.stdout.readline().split()
        assert words[0] == "ready", words
        yield Ports(int(words[1]), int(words[2]))
    finally:
        process.kill()
        process.wait()


def network_events(sink: MemorySink) -> list[dict[str, object]]:
    return [event.fields for event in sink.of_kind("network")]


def events_for(sink: MemorySink, host: str) -> list[dict[str, object]]:
    return [fields for fields in network_events(sink) if fields["host"] == host]


def socks_connect(port: int, host: str, target_port: int) -> tuple[socket.socket, int]:
    """A SOCKS5 CONNECT by name through the forwarder's SOCKS port; the socket and the reply
    code."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=20)
    name = host.encode()
    sock.sendall(
        b"\x05\x01\x00\x05\x01\x00\x03"
        + bytes((len(name),))
        + name
        + target_port.to_bytes(2, "big")
    )
    method = recv_exactly(sock, 2)
    assert method == b"\x05\x00"
    reply = recv_exactly(sock, 10)
    return sock, reply[1]


def recv_exactly(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        more = sock.recv(count - len(data))
        if not more:
            break
        data += more
    return data


def recv_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def test_resolver_maps_only_test_names() -> None:
    assert resolve("allowed.test") == [ALLOWED_ADDRESS]
    assert resolve("rebind.test") == [DENIED_ADDRESS]
