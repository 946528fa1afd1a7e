"""The channel from the host's side, fed by hand as a hostile sandbox could feed it: whatever
comes that is not a connected TCP socket is closed and recorded, a host port not listed is
never connected to, and an answer nobody asked for is dropped. Also: the forwarder exits when
the host closes the channel."""

from __future__ import annotations

import gc
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator

import pytest

from corral.audit.events import MemorySink
from corral.policy.model import NetworkPolicy
from corral.proxy import launcher
from corral.proxy.launcher import encode_accepted, encode_reply, fd_rights
from corral.proxy.server import ProxyServer
from tests.conftest import Canary
from tests.test_proxy_support import (
    ALLOWED_ADDRESS,
    POLICY,
    LoopbackServer,
    network_events,
    recv_all,
    resolve,
    wait_for,
)


class Fed:
    """A running proxy server and the sandbox's end of one of its channels, held by the test."""

    def __init__(self, policy: NetworkPolicy) -> None:
        self.sink = MemorySink()
        self.server = ProxyServer(policy=policy, sink=self.sink, resolver=resolve)
        self.server.start()
        self.end = self.server.attach("fed")

    def send(self, message: bytes, fd: int | None = None) -> None:
        self.end.sendmsg([message], fd_rights(fd) if fd is not None else [])

    def close(self) -> None:
        self.end.close()
        self.server.stop()


@pytest.fixture
def fed() -> Iterator[Fed]:
    made = Fed(POLICY)
    yield made
    made.close()


def _open_fds() -> int:
    gc.collect()  # what earlier tests dropped unclosed must not count
    return len(os.listdir("/proc/self/fd"))


def _udp() -> socket.socket:
    return socket.socket(socket.AF_INET, socket.SOCK_DGRAM)


def _unix() -> socket.socket:
    return socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)


def _listening() -> socket.socket:
    return socket.create_server(("127.0.0.1", 0))


def _unconnected() -> socket.socket:
    return socket.socket(socket.AF_INET, socket.SOCK_STREAM)


@pytest.mark.parametrize(
    "make", [_udp, _unix, _listening, _unconnected], ids=["udp", "unix", "listening", "unconnected"]
)
def test_what_is_no_tcp_connection_is_closed_and_recorded(
    fed: Fed, make: Callable[[], socket.socket]
) -> None:
    before = _open_fds()
    sock = make()
    fed.send(encode_accepted(b"h", 3128), sock.fileno())
    sock.close()
    wait_for(lambda: len(network_events(fed.sink)) == 1)
    event = network_events(fed.sink)[0]
    assert (event["decision"], event["rule"], event["protocol"]) == ("deny", "channel", "channel")
    wait_for(lambda: _open_fds() <= before)  # the server's received copy is closed too


def test_a_pipe_and_a_bare_message_are_refused(fed: Fed) -> None:
    read_end, write_end = os.pipe()
    fed.send(encode_accepted(b"s", 1080), read_end)
    fed.send(encode_accepted(b"s", 1080))
    fed.send(b"garbage", write_end)
    for fd in (read_end, write_end):
        os.close(fd)
    wait_for(lambda: len(network_events(fed.sink)) == 3)
    assert {e["rule"] for e in network_events(fed.sink)} == {"channel"}


def test_a_connection_handed_over_is_served(fed: Fed) -> None:
    allowed = LoopbackServer("allowed", ALLOWED_ADDRESS)
    listener = _listening()
    try:
        client = socket.create_connection(listener.getsockname(), timeout=20)
        accepted, _ = listener.accept()
        fed.send(encode_accepted(b"h", 3128), accepted.fileno())
        accepted.close()
        with client:
            client.sendall(
                f"GET http://allowed.test:{allowed.port}/fed HTTP/1.1\r\n"
                "Connection: close\r\n\r\n".encode()
            )
            assert b"allowed GET /fed HTTP/1.1" in recv_all(client)
    finally:
        listener.close()
        allowed.close()
    wait_for(lambda: bool(network_events(fed.sink)))
    assert [(e["host"], e["decision"]) for e in network_events(fed.sink)] == [
        ("allowed.test", "allow")
    ]
    assert fed.sink.of_kind("network")[0].sandbox_id == "fed"


def test_a_host_port_that_is_not_listed_is_never_connected(fed: Fed) -> None:
    canary = Canary()
    listener = _listening()
    try:
        client = socket.create_connection(listener.getsockname(), timeout=20)
        accepted, _ = listener.accept()
        fed.send(encode_accepted(b"p", canary.port), accepted.fileno())
        accepted.close()
        with client:
            assert recv_all(client) == b""
        wait_for(lambda: bool(network_events(fed.sink)))
        assert canary.count() == 0
    finally:
        listener.close()
        canary.close()
    event = network_events(fed.sink)[0]
    assert (event["decision"], event["rule"], event["port"]) == ("deny", "hostPorts", canary.port)


def test_an_answer_nobody_asked_for_is_dropped(fed: Fed) -> None:
    before = _open_fds()
    sock = _unconnected()
    fed.send(encode_reply(12345, 0), sock.fileno())
    sock.close()
    fed.send(encode_accepted(b"h", 3128))  # a marker: recorded once the answer was handled
    wait_for(lambda: len(network_events(fed.sink)) == 1)
    wait_for(lambda: _open_fds() <= before)


def test_the_forwarder_exits_when_the_channel_closes() -> None:
    server = ProxyServer(policy=POLICY, sink=MemorySink(), resolver=resolve)
    server.start()
    far_end = server.attach("exits")
    argv = [sys.executable, "-I", "-S", launcher.__file__, "--channel", str(far_end.fileno())]
    with far_end:
        process = subprocess.Popen(
            [*argv, "--listen", "h:0"], stdout=subprocess.PIPE, pass_fds=(far_end.fileno(),)
        )
    try:
        assert process.stdout is not None
        assert process.stdout.readline().startswith(b"ready ")
        wait_for(lambda: server.open_channels == 1)
        server.stop()
        assert process.wait(timeout=20) == 0  # an upper bound for a hang, not a measurement
    finally:
        process.kill()
        process.wait()
    assert server.open_channels == 0
