"""The proxy with real clients on the host: curl (HTTP proxy, CONNECT, SOCKS5 by name) and
urllib through the launcher's forwarder (run on the host here, handing each connection over a
channel as inside a sandbox), raw sockets for what clients will not send. Every refusal is
checked on the host side too: the server the refused name leads to saw nothing. The same
clients inside real sandboxes are in test_network_sandbox.py."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import NamedTuple

import pytest

from corral.audit.events import MemorySink
from corral.proxy.decision import Request
from corral.proxy.server import ProxyServer
from tests.test_proxy_support import (
    ALLOWED_ADDRESS,
    DENIED_ADDRESS,
    LoopbackServer,
    Ports,
    events_for,
    recv_all,
    running_proxy,
    socks_connect,
    wait_for,
)
from tests.test_proxy_tls import client_hello


class Servers(NamedTuple):
    allowed: LoopbackServer
    denied: LoopbackServer


class Proxy(NamedTuple):
    server: ProxyServer
    sink: MemorySink
    http_port: int
    socks_port: int


@pytest.fixture(scope="module")
def servers() -> Iterator[Servers]:
    pair = Servers(
        LoopbackServer("allowed", ALLOWED_ADDRESS), LoopbackServer("denied", DENIED_ADDRESS)
    )
    yield pair
    pair.allowed.close()
    pair.denied.close()


@pytest.fixture
def proxy(servers: Servers) -> Iterator[Proxy]:
    with running_proxy() as (server, ports, sink):
        yield Proxy(server, sink, ports.http, ports.socks)


def _curl(mode: str, proxy: Proxy, url: str) -> subprocess.CompletedProcess[str]:
    via = {
        "http": ["-x", f"http://127.0.0.1:{proxy.http_port}"],
        "connect": ["-p", "-x", f"http://127.0.0.1:{proxy.http_port}"],
        "socks": ["--socks5-hostname", f"127.0.0.1:{proxy.socks_port}"],
    }[mode]
    # No *_proxy variables from the caller; a UTF-8 locale so curl converts IDNs itself.
    env = {"PATH": os.environ["PATH"], "LC_ALL": "C.UTF-8"}
    return subprocess.run(
        ["curl", "-sS", "-m", "20", "-w", "\n%{http_code}", *via, url],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip


MODES = ["http", "connect", "socks"]
PROTOCOL = {"http": "http", "connect": "connect", "socks": "socks5"}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("name", "recorded"),
    [
        ("allowed.test", "allowed.test"),
        ("api.wild.test", "api.wild.test"),
        ("deep.api.wild.test", "deep.api.wild.test"),
        ("bücher.test", "xn--bcher-kva.test"),  # curl sends IDNA; the policy wrote Unicode
        ("ALLOWED.test", "allowed.test"),
    ],
)
def test_curl_reaches_allowed_hosts(
    mode: str, name: str, recorded: str, proxy: Proxy, servers: Servers
) -> None:
    port = servers.allowed.port
    result = _curl(mode, proxy, f"http://{name}:{port}/path?q=1")
    assert result.returncode == 0, result.stderr
    body, _, status = result.stdout.rpartition("\n")
    assert status == "200"
    assert body.startswith("allowed GET /path?q=1 HTTP/1.1 host=")
    wait_for(
        lambda: len(events_for(proxy.sink, recorded)) == 1 or events_for(proxy.sink, name) != []
    )
    event = (events_for(proxy.sink, recorded) or events_for(proxy.sink, name))[0]
    assert event["decision"] == "allow"
    assert event["protocol"] == PROTOCOL[mode]
    assert event["address"] == ALLOWED_ADDRESS
    assert event["bytes_down"] and event["bytes_up"]


DENIED = [
    ("denied.test", "deniedDomains: denied.test"),
    ("wild.test", "default-deny"),  # *.wild.test does not cover wild.test itself
    ("other.test", "default-deny"),
    ("x.denied.wild.test", "deniedDomains: *.denied.wild.test"),  # deny beats *.wild.test
    ("rebind.test", "rebinding"),  # allowed, but resolves to an address nobody allowed
    (DENIED_ADDRESS, "ip-literal"),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("name", "rule"), DENIED)
def test_curl_is_refused_and_nothing_reaches_the_denied_server(
    mode: str, name: str, rule: str, proxy: Proxy, servers: Servers
) -> None:
    before = servers.denied.connections
    result = _curl(mode, proxy, f"http://{name}:{servers.denied.port}/secret")
    if mode == "http":
        assert result.stdout.endswith("\n403"), result
        assert rule in result.stdout or "corral proxy" in result.stdout
    else:
        assert result.returncode == {"connect": 56, "socks": 97}[mode], result
    wait_for(lambda: bool(events_for(proxy.sink, name)))
    event = events_for(proxy.sink, name)[0]
    assert (event["decision"], event["rule"]) == ("deny", rule), event
    assert servers.denied.connections == before


def test_urllib_with_a_proxy_handler(proxy: Proxy, servers: Servers) -> None:
    handler = urllib.request.ProxyHandler({"http": f"http://127.0.0.1:{proxy.http_port}"})
    opener = urllib.request.build_opener(handler)
    with opener.open(f"http://allowed.test:{servers.allowed.port}/u", timeout=20) as response:
        assert response.read().startswith(b"allowed GET /u HTTP/1.1")
    before = servers.denied.connections
    with pytest.raises(urllib.error.HTTPError) as caught:
        opener.open(f"http://denied.test:{servers.denied.port}/u", timeout=20)
    assert caught.value.code == 403
    assert caught.value.headers["X-Corral-Rule"] == "deniedDomains: denied.test"
    assert servers.denied.connections == before


def test_socks_with_a_unicode_name(proxy: Proxy, servers: Servers) -> None:
    sock, reply = socks_connect(proxy.socks_port, "BÜCHER.test", servers.allowed.port)
    with sock:
        assert reply == 0
        sock.sendall(b"GET /s HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.shutdown(socket.SHUT_WR)  # half-close: the server sees EOF, answers, closes
        assert b"allowed GET /s" in recv_all(sock)


def _raw_http(proxy: Proxy, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", proxy.http_port), timeout=20) as sock:
        sock.sendall(data)
        return recv_all(sock)


def test_host_header_must_name_the_uri_host(proxy: Proxy, servers: Servers) -> None:
    before = servers.allowed.connections
    port = servers.allowed.port
    answer = _raw_http(
        proxy,
        f"GET http://allowed.test:{port}/ HTTP/1.1\r\nHost: denied.test:{port}\r\n\r\n".encode(),
    )
    assert answer.startswith(b"HTTP/1.1 403 ")
    assert b"X-Corral-Rule: host-mismatch" in answer
    assert servers.allowed.connections == before


def test_keep_alive_carries_requests_to_two_hosts(proxy: Proxy, servers: Servers) -> None:
    port = servers.allowed.port
    answer = _raw_http(
        proxy,
        (
            f"GET http://allowed.test:{port}/1 HTTP/1.1\r\nHost: allowed.test:{port}\r\n\r\n"
            f"GET http://api.wild.test:{port}/2 HTTP/1.1\r\n\r\n"
            f"GET http://api.wild.test:{port}/3 HTTP/1.1\r\nConnection: close\r\n\r\n"
        ).encode(),
    )
    assert answer.count(b"HTTP/1.1 200 OK") == 3
    assert b"allowed GET /1" in answer and b"allowed GET /3" in answer
    wait_for(lambda: len(events_for(proxy.sink, "api.wild.test")) == 1)
    assert len(events_for(proxy.sink, "allowed.test")) == 1  # one record per upstream


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"GET / HTTP/1.1\r\n\r\n", b"400"),
        (b"CONNECT ::1:443 HTTP/1.1\r\n\r\n", b"400"),
        (b"GET http://allowed.test/ HTTP/1.1\r\nX: " + b"a" * 40000 + b"\r\n\r\n", b"431"),
        (b"GET http://allowed.test/ HTTP/3\r\n\r\n", b"505"),
    ],
    ids=["origin-form", "bare-ipv6", "oversized", "version"],
)
def test_malformed_requests_get_their_status(proxy: Proxy, data: bytes, status: bytes) -> None:
    assert _raw_http(proxy, data).startswith(b"HTTP/1.1 " + status + b" ")
    wait_for(lambda: bool(events_for(proxy.sink, "")))
    assert events_for(proxy.sink, "")[0]["rule"] == "malformed"


def test_ask_always_is_asked_once(servers: Servers) -> None:
    asked: list[Request] = []

    def ask(request: Request) -> str:
        asked.append(request)
        return "always"

    with running_proxy(ask=ask) as (_, ports, sink):
        for _ in range(2):
            sock, reply = socks_connect(ports.socks, "asked.test", servers.allowed.port)
            sock.close()
            assert reply == 0
        assert [r.host for r in asked] == ["asked.test"]
        wait_for(lambda: len(events_for(sink, "asked.test")) == 2)
        # Each tunnel is recorded when it ends, and the two may end in either order.
        assert sorted(str(e["rule"]) for e in events_for(sink, "asked.test")) == [
            "allowedDomains: asked.test",
            "ask: always",
        ]


def _tls_tunnel(ports: Ports, port: int, hello: bytes) -> bytes:
    """CONNECT allowed.test:port, send `hello`, return what comes back until the proxy closes."""
    with socket.create_connection(("127.0.0.1", ports.http), timeout=20) as sock:
        sock.sendall(f"CONNECT allowed.test:{port} HTTP/1.1\r\n\r\n".encode())
        assert sock.recv(100).startswith(b"HTTP/1.1 200")
        sock.sendall(hello)
        sock.shutdown(socket.SHUT_WR)
        return recv_all(sock)


@pytest.mark.parametrize(
    ("server_name", "missing", "rule"),
    [
        ("allowed.test", "refuse", None),
        ("ALLOWED.test.", "refuse", None),
        ("denied.test", "refuse", "sni-mismatch"),
        ("api.wild.test", "refuse", "sni-mismatch"),  # allowed too, but not the tunnel's host
        (None, "refuse", "sni-missing"),
        (None, "allow", None),
    ],
)
def test_tls_tunnel_must_name_its_host(
    servers: Servers, server_name: str | None, missing: str, rule: str | None
) -> None:
    port = servers.allowed.port
    hello = client_hello(server_name)
    with running_proxy(
        tls_ports=frozenset({port}),
        missing_sni="allow" if missing == "allow" else "refuse",
    ) as (_, ports, sink):
        _tls_tunnel(ports, port, hello)
        wait_for(lambda: bool(events_for(sink, "allowed.test")))
        event = events_for(sink, "allowed.test")[0]
        if rule is None:
            assert event["decision"] == "allow"
            wait_for(lambda: hello in servers.allowed.received)
        else:
            assert (event["decision"], event["rule"]) == ("deny", rule)
            assert hello not in servers.allowed.received
            assert hello[:40] not in servers.allowed.received


def test_tls_port_refuses_what_is_not_tls(servers: Servers) -> None:
    port = servers.allowed.port
    with running_proxy(tls_ports=frozenset({port})) as (_, ports, sink):
        _tls_tunnel(ports, port, b"GET /plain-on-tls-port HTTP/1.1\r\n\r\n")
        wait_for(lambda: bool(events_for(sink, "allowed.test")))
        assert events_for(sink, "allowed.test")[0]["rule"] == "not-tls"
    assert b"plain-on-tls-port" not in servers.allowed.received


def test_upstream_proxy_receives_the_name(servers: Servers) -> None:
    seen: list[bytes] = []
    listener = socket.create_server(("127.0.0.1", 0))

    def upstream_proxy() -> None:
        client, _ = listener.accept()
        head = b""
        while b"\r\n\r\n" not in head:
            head += client.recv(4096)
        seen.append(head)
        target = socket.create_connection((ALLOWED_ADDRESS, servers.allowed.port))
        client.sendall(b"HTTP/1.1 200 OK\r\n\r\n")

        def upload() -> None:
            target.sendall(recv_all(client))
            target.shutdown(socket.SHUT_WR)

        threading.Thread(target=upload, daemon=True).start()
        client.sendall(recv_all(target))
        client.close()

    thread = threading.Thread(target=upstream_proxy, daemon=True)
    thread.start()
    url = f"http://user:pw@127.0.0.1:{listener.getsockname()[1]}"
    with running_proxy(upstream_proxy=url) as (_, ports, _sink):
        sock, reply = socks_connect(ports.socks, "allowed.test", servers.allowed.port)
        with sock:
            assert reply == 0
            sock.sendall(b"GET /via HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            sock.shutdown(socket.SHUT_WR)
            assert b"allowed GET /via" in recv_all(sock)
    thread.join(20)
    listener.close()
    assert seen[0].startswith(f"CONNECT allowed.test:{servers.allowed.port} HTTP/1.1\r\n".encode())
    assert b"Proxy-Authorization: Basic dXNlcjpwdw==" in seen[0]
