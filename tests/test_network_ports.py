"""Host ports and published ports across the sandbox's network namespace, both off by default.

hostPorts: a host loopback service is reached from inside at the same address, and only the
listed port. publishPorts: a server started inside is reached from the host, and only while a
command runs. Evidence is host-side: what the host service received, what the host client read.
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator

import pytest

from corral.audit.events import Event, MemorySink
from corral.sandbox import Sandbox
from tests.conftest import Canary, Layout
from tests.helpers_cli import DEADLINE
from tests.test_network_support import filtered_policy, resolve
from tests.test_proxy_support import LoopbackServer, recv_all

pytestmark = pytest.mark.usefixtures("sandbox_available")

CONNECT = """
import socket, sys
for port in sys.argv[1:]:
    try:
        with socket.create_connection(("127.0.0.1", int(port)), timeout=20) as sock:
            sock.sendall(b"ECHO from inside")
            print(port, sock.recv(100).decode())
    except OSError as exc:
        print(port, type(exc).__name__)
"""


@pytest.fixture
def host_service() -> Iterator[LoopbackServer]:
    server = LoopbackServer("host-service", "127.0.0.1")
    yield server
    server.close()


@pytest.mark.parametrize("listed", [True, False], ids=["listed", "not-listed"])
def test_host_port_is_reached_only_when_listed(
    layout: Layout, host_service: LoopbackServer, listed: bool
) -> None:
    other = Canary()  # a second host service, never listed
    port = host_service.port
    policy = filtered_policy(layout, host_ports=(port,) if listed else ())
    sink = MemorySink()
    try:
        with Sandbox(policy, resolver=resolve, sink=sink) as sandbox:
            argv = ["python3", "-c", CONNECT, str(port), str(other.port)]
            result = sandbox.run(argv, env=layout.env, capture_output=True, timeout=60)
        reached_other = other.count()
    finally:
        other.close()
    lines = (result.stdout or b"").decode().splitlines()
    assert reached_other == 0
    assert lines[1] == f"{other.port} ConnectionRefusedError"
    if not listed:
        assert lines[0] == f"{port} ConnectionRefusedError"
        assert b"from inside" not in host_service.received
        assert sink.of_kind("network") == []
        return
    assert lines[0] == f"{port} ECHO from inside"
    assert b"ECHO from inside" in host_service.received
    events = [e.fields for e in sink.of_kind("network")]
    assert [(e["protocol"], e["host"], e["port"], e["decision"]) for e in events] == [
        ("host-port", "127.0.0.1", port, "allow")
    ]
    assert events[0]["bytes_up"] == len(b"ECHO from inside")


SERVE = """
import socket, sys
server = socket.create_server(("127.0.0.1", int(sys.argv[1])))
print("listening", flush=True)
conn, _ = server.accept()
data = b""
while chunk := conn.recv(100):
    data += chunk
conn.sendall(b"inside got " + data)
conn.close()
"""


def _free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        return int(probe.getsockname()[1])


@pytest.mark.parametrize("published", [True, False], ids=["published", "not-published"])
def test_published_port_reaches_a_server_inside(layout: Layout, published: bool) -> None:
    port = _free_port()
    policy = filtered_policy(layout, publish_ports=(port,) if published else ())
    sink = MemorySink()
    with Sandbox(policy, resolver=resolve, sink=sink) as sandbox:
        argv = ["python3", "-c", SERVE, str(port)]
        with sandbox.spawn(argv, env=layout.env, stdout=subprocess.PIPE) as proc:
            assert proc.stdout is not None
            assert proc.stdout.readline() == b"listening\n"
            if not published:
                with pytest.raises(ConnectionRefusedError):
                    socket.create_connection(("127.0.0.1", port), timeout=20)
                proc.kill()
                return
            with socket.create_connection(("127.0.0.1", port), timeout=20) as client:
                client.sendall(b"hello from the host")
                client.shutdown(socket.SHUT_WR)
                answer = recv_all(client)
            assert proc.wait(timeout=20) == 0
    # Closing the Sandbox waits for every connection's record.
    assert answer == b"inside got hello from the host"
    events = [e.fields for e in sink.of_kind("network")]
    assert [(e["protocol"], e["port"], e["decision"], e["error"]) for e in events] == [
        ("publish", port, "allow", "")
    ]
    assert (events[0]["bytes_up"], events[0]["bytes_down"]) == (30, 19)


def test_published_port_needs_a_running_command(layout: Layout) -> None:
    port = _free_port()
    sink = MemorySink()
    policy = filtered_policy(layout, publish_ports=(port,))
    with Sandbox(policy, resolver=resolve, sink=sink) as sandbox:
        sandbox.network()  # the proxy, and with it the host listener, starts with the Sandbox
        with socket.create_connection(("127.0.0.1", port), timeout=20) as client:
            assert recv_all(client) == b""
    errors = [e.fields["error"] for e in sink.of_kind("network")]
    assert errors == ["no sandboxed command is running"]


SERVE_MANY = """
import socket, sys
server = socket.create_server(("127.0.0.1", int(sys.argv[1])), backlog=128)
print("listening", flush=True)
for _ in range(int(sys.argv[2])):
    conn, _ = server.accept()
    conn.sendall(b"inside")
    conn.close()
"""
BURST = 40  # requests in flight on one channel at once, each answer matched by its id


def test_a_burst_of_published_connections_all_arrive(layout: Layout) -> None:
    from concurrent.futures import ThreadPoolExecutor

    port = _free_port()
    policy = filtered_policy(layout, publish_ports=(port,))
    sink = MemorySink()

    def fetch(_: int) -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=20) as client:
            return recv_all(client)

    with Sandbox(policy, resolver=resolve, sink=sink) as sandbox:
        argv = ["python3", "-c", SERVE_MANY, str(port), str(BURST)]
        with sandbox.spawn(argv, env=layout.env, stdout=subprocess.PIPE) as proc:
            assert proc.stdout is not None
            assert proc.stdout.readline() == b"listening\n"
            with ThreadPoolExecutor(BURST) as pool:
                answers = list(pool.map(fetch, range(BURST)))
            assert proc.wait(timeout=20) == 0
        # A connection's event is recorded when the proxy has closed it, which can be just
        # after the client here has its answer: wait for all of them before stopping it.
        events = wait_for_events(sink, BURST)
    assert answers == [b"inside"] * BURST
    assert [e.fields["error"] for e in events] == [""] * BURST


def wait_for_events(sink: MemorySink, count: int) -> list[Event]:
    deadline = time.monotonic() + DEADLINE
    while len(found := sink.of_kind("network")) < count and time.monotonic() < deadline:
        time.sleep(0.01)
    return found
