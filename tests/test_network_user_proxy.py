"""`network.httpProxyPort` / `socksProxyPort`: the user's own proxy on the host, as in Anthropic's
sandbox-runtime. What a command sends to the proxy ports inside (still 3128 and 1080) reaches
127.0.0.1:PORT on the host unchanged, and corral decides nothing about it; without the setting
the same bytes meet corral's own proxy and the user's proxy sees nothing. Evidence is what the
fake user proxy on the host received."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from corral.audit.events import MemorySink
from corral.sandbox import Sandbox
from tests.conftest import Canary, Layout
from tests.test_network_support import filtered_policy, resolve
from tests.test_proxy_support import LoopbackServer

pytestmark = pytest.mark.usefixtures("sandbox_available")

# Bytes no proxy protocol accepts: corral's own proxy refuses them (400), a relay passes them
# (the fake proxy echoes them back).
MESSAGE = b"ECHO raw bytes for the user's proxy\r\n\r\n"
EXCHANGE = f"""
import socket, sys
message = {MESSAGE!r}
with socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=20) as sock:
    sock.sendall(message)
    answer = b""
    while len(answer) < len(message) and (more := sock.recv(4096)):
        answer += more
    print(answer.decode(errors="replace").split("\\r\\n")[0])
"""


@pytest.fixture
def user_proxy() -> Iterator[LoopbackServer]:
    server = LoopbackServer("user-proxy", "127.0.0.1")
    yield server
    server.close()


def _run(layout: Layout, policy_extra: dict[str, int], argv: list[str]) -> tuple[str, MemorySink]:
    policy = filtered_policy(layout)
    network = policy.network._replace(
        http_proxy_port=policy_extra.get("http_proxy_port"),
        socks_proxy_port=policy_extra.get("socks_proxy_port"),
    )
    policy = policy._replace(network=network)
    sink = MemorySink()
    with Sandbox(policy, resolver=resolve, sink=sink) as sandbox:
        result = sandbox.run(argv, env=layout.env, capture_output=True, timeout=60)
    return (result.stdout or b"").decode(errors="replace"), sink


@pytest.mark.parametrize(("key", "inside"), [("http_proxy_port", 3128), ("socks_proxy_port", 1080)])
def test_proxy_port_is_relayed_unchanged_to_the_users_proxy(
    layout: Layout, user_proxy: LoopbackServer, key: str, inside: int
) -> None:
    out, sink = _run(layout, {key: user_proxy.port}, ["python3", "-c", EXCHANGE, str(inside)])
    assert out.strip() == "ECHO raw bytes for the user's proxy"
    assert bytes(user_proxy.received) == MESSAGE
    events = [e.fields for e in sink.of_kind("network")]
    setting = "httpProxyPort" if key == "http_proxy_port" else "socksProxyPort"
    assert [(e["protocol"], e["host"], e["port"], e["decision"], e["rule"]) for e in events] == [
        ("user-proxy", "127.0.0.1", user_proxy.port, "allow", f"{setting}: {user_proxy.port}")
    ]
    assert "relayed to the user's proxy" in str(events[0]["reason"])
    assert events[0]["bytes_up"] == len(MESSAGE)


def test_without_the_setting_corral_decides_and_the_users_proxy_sees_nothing(
    layout: Layout,
) -> None:
    with Canary() as would_be_proxy:
        out, sink = _run(layout, {}, ["python3", "-c", EXCHANGE, "3128"])
        assert would_be_proxy.count() == 0
    assert "400" in out  # corral's own proxy read the bytes and refused them
    assert [e.fields["protocol"] for e in sink.of_kind("network")] == ["http"]


def test_curl_through_the_users_http_proxy(layout: Layout, user_proxy: LoopbackServer) -> None:
    """A real client: curl reads HTTP_PROXY (127.0.0.1:3128 inside) and the request line
    reaches the user's proxy as curl wrote it, for a host no list of corral's names."""
    argv = ["curl", "-sS", "-m", "20", "http://unlisted.test/path"]
    out, sink = _run(layout, {"http_proxy_port": user_proxy.port}, argv)
    assert out == "user-proxy GET http://unlisted.test/path HTTP/1.1 host=unlisted.test\n"
    assert user_proxy.requests == [b"GET http://unlisted.test/path HTTP/1.1"]
    assert [e.fields["protocol"] for e in sink.of_kind("network")] == ["user-proxy"]


def test_unreachable_users_proxy_is_a_502_naming_the_setting(layout: Layout) -> None:
    with Canary() as closed:
        port = closed.port
    argv = ["curl", "-sS", "-m", "20", "http://unlisted.test/"]
    out, sink = _run(layout, {"http_proxy_port": port}, argv)
    assert "network.httpProxyPort" in out and "unreachable" in out
    events = [e.fields for e in sink.of_kind("network")]
    assert [(e["protocol"], e["port"]) for e in events] == [("user-proxy", port)]
    assert events[0]["error"]
