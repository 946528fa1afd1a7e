"""The proxy under pressure: slow and idle clients timed out (with short limits injected, never
sleeps), clients vanishing mid-tunnel, and a thousand tunnels at once without a leaked fd."""

from __future__ import annotations

import asyncio
import gc
import os
import resource
import socket
import struct
from collections.abc import Iterator

import pytest

from corral.proxy.session import Limits
from tests.test_proxy_support import (
    ALLOWED_ADDRESS,
    LoopbackServer,
    events_for,
    network_events,
    recv_all,
    running_proxy,
    socks_connect,
    wait_for,
)

SHORT = Limits(handshake_timeout=0.2, idle_timeout=0.3, connect_timeout=5.0)
TUNNELS = 1000


@pytest.fixture(scope="module")
def allowed() -> Iterator[LoopbackServer]:
    server = LoopbackServer("allowed", ALLOWED_ADDRESS)
    yield server
    server.close()


def _connect(port: int) -> socket.socket:
    # The timeout is an upper bound for a broken proxy, not part of any check.
    return socket.create_connection(("127.0.0.1", port), timeout=20)


@pytest.mark.parametrize(
    "partial",
    [b"", b"CONNECT allowed.test:80 HTTP/1.1\r\n", b"GET http://allowed.test/ HTTP/1.1\r\nA: b"],
    ids=["silent", "connect-line", "half-head"],
)
def test_slow_http_client_gets_408_and_is_closed(partial: bytes) -> None:
    with running_proxy(limits=SHORT) as (server, ports, sink):
        with _connect(ports.http) as sock:
            sock.sendall(partial)
            answer = recv_all(sock)  # returns only because the proxy closed
        assert answer.startswith(b"HTTP/1.1 408 ")
        wait_for(lambda: server.active_connections == 0)
        assert [e["rule"] for e in network_events(sink)] == ["timeout"]


def test_slow_socks_client_is_closed() -> None:
    with running_proxy(limits=SHORT) as (_, ports, sink):
        with _connect(ports.socks) as sock:
            sock.sendall(b"\x05\x01\x00\x05\x01")
            assert sock.recv(2) == b"\x05\x00"
            assert recv_all(sock) == b""
        wait_for(lambda: bool(network_events(sink)))
        assert network_events(sink)[0]["rule"] == "timeout"


def test_tunnel_without_client_hello_is_closed(allowed: LoopbackServer) -> None:
    tls_port = frozenset({allowed.port})
    with running_proxy(limits=SHORT, tls_ports=tls_port) as (_, ports, sink):
        with _connect(ports.http) as sock:
            sock.sendall(f"CONNECT allowed.test:{allowed.port} HTTP/1.1\r\n\r\n".encode())
            assert sock.recv(100).startswith(b"HTTP/1.1 200 ")
            sock.sendall(b"\x16\x03\x01")  # a ClientHello that never finishes
            assert recv_all(sock) == b""
        wait_for(lambda: bool(network_events(sink)))
        assert network_events(sink)[0]["rule"] == "timeout"


def test_idle_tunnel_is_closed(allowed: LoopbackServer) -> None:
    with running_proxy(limits=SHORT) as (server, ports, sink):
        sock, reply = socks_connect(ports.socks, "allowed.test", allowed.port)
        with sock:
            assert reply == 0
            sock.sendall(b"ECHO once")
            assert sock.recv(100) == b"ECHO once"
            assert recv_all(sock) == b""  # the proxy closed the idle tunnel
        wait_for(lambda: server.active_connections == 0)
        event = events_for(sink, "allowed.test")[0]
        assert event["error"] == "idle for 0.3 s"
        assert (event["bytes_up"], event["bytes_down"]) == (9, 9)


def test_client_vanishing_mid_tunnel_closes_the_upstream(allowed: LoopbackServer) -> None:
    with running_proxy() as (server, ports, sink):
        before = allowed.open_connections
        sock, reply = socks_connect(ports.socks, "allowed.test", allowed.port)
        assert reply == 0
        sock.sendall(b"STREAM")
        assert len(sock.recv(65536)) > 0
        wait_for(lambda: allowed.open_connections == before + 1)
        # Close with unread data and SO_LINGER 0: the proxy sees a reset, not a polite EOF.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
        wait_for(lambda: server.active_connections == 0)
        wait_for(lambda: allowed.open_connections == before)
        event = events_for(sink, "allowed.test")[0]
        assert event["decision"] == "allow" and int(str(event["bytes_down"])) > 0


def _open_fds() -> int:
    # Sockets that earlier tests dropped without closing are closed by the collector at a
    # moment of its choosing; collect first so that they do not count on either side.
    gc.collect()
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def many_fds() -> Iterator[None]:
    """Each tunnel costs this process about six descriptors (client, the proxy's received
    socket and upstream, the echo server's end, spare pipes)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = TUNNELS * 6 + 1024
    if hard != resource.RLIM_INFINITY and hard < needed:
        pytest.fail(f"RLIMIT_NOFILE hard limit {hard} is below the {needed} this test needs")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, needed), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


class _Barrier:
    """Lets every tunnel finish its echo before any closes: all are open at once."""

    def __init__(self, parties: int) -> None:
        self.waiting = parties
        self.all_open = asyncio.Event()

    async def wait(self) -> None:
        self.waiting -= 1
        if self.waiting == 0:
            self.all_open.set()
        await self.all_open.wait()


async def _tunnel(socks_port: int, port: int, index: int, barrier: _Barrier) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", socks_port)
    name = b"allowed.test"
    writer.write(
        b"\x05\x01\x00\x05\x01\x00\x03" + bytes((len(name),)) + name + port.to_bytes(2, "big")
    )
    assert await reader.readexactly(2) == b"\x05\x00"
    assert (await reader.readexactly(10))[1] == 0
    message = b"ECHO %d" % index
    writer.write(message)
    echoed = await reader.readexactly(len(message))
    await barrier.wait()
    writer.close()
    await writer.wait_closed()
    return echoed


async def _many_tunnels(socks_port: int, port: int) -> list[bytes]:
    barrier = _Barrier(TUNNELS)
    async with asyncio.timeout(120):  # an upper bound for a hung proxy only
        tunnels = (_tunnel(socks_port, port, i, barrier) for i in range(TUNNELS))
        return await asyncio.gather(*tunnels)


def test_a_thousand_concurrent_tunnels_and_no_fd_leak(
    allowed: LoopbackServer, many_fds: None
) -> None:
    before = _open_fds()
    with running_proxy() as (server, ports, sink):
        echoed = asyncio.run(_many_tunnels(ports.socks, allowed.port))
        assert echoed == [b"ECHO %d" % i for i in range(TUNNELS)]
        wait_for(lambda: len(events_for(sink, "allowed.test")) == TUNNELS, timeout=60)
        wait_for(lambda: server.active_connections == 0)
        assert all(e["decision"] == "allow" for e in events_for(sink, "allowed.test"))
    wait_for(lambda: allowed.open_connections == 0, timeout=60)
    assert _open_fds() == before
