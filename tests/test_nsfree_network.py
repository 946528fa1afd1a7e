"""The Landlock-only backend's filtered network: the host-side proxy on the host's loopback.

With no network namespace, corral listens on two ephemeral ports of the host's 127.0.0.1 for
each command and Landlock lets the command connect to those ports only. Evidence is taken on
the host: the servers' own connection counts, a canary listener's backlog, the audit events.
"""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from corral.errors import SandboxUnavailable
from corral.nsfree import LANDLOCK_NET_ABI, check_nsfree_network
from tests.conftest import Canary, Layout
from tests.test_network_support import (
    Servers,
    World,
    filtered_policy,
    filtered_world,
    loopback_servers,
)
from tests.test_proxy_support import ALLOWED_ADDRESS

pytestmark = pytest.mark.usefixtures("sandbox_available")


@pytest.fixture(scope="module")
def servers() -> Iterator[Servers]:
    with loopback_servers() as pair:
        yield pair


@contextmanager
def nsfree_world(
    layout: Layout,
    servers: Servers,
    *,
    host_ports: tuple[int, ...] = (),
    publish_ports: tuple[int, ...] = (),
) -> Iterator[World]:
    policy = filtered_policy(layout, host_ports=host_ports, publish_ports=publish_ports)
    with filtered_world(layout, servers, policy._replace(backend="landlock")) as world:
        abi = world.sandbox._machine().landlock_abi
        if abi < LANDLOCK_NET_ABI:
            pytest.fail(f"Landlock ABI {abi} has no TCP rules; this backend cannot be tested")
        yield world


@pytest.fixture
def world(layout: Layout, servers: Servers) -> Iterator[World]:
    with nsfree_world(layout, servers) as made:
        yield made


CURL = {
    "env HTTP_PROXY": ("curl -sS -m 20 {url}", "http"),
    "env HTTP_PROXY, CONNECT": ("curl -sS -m 20 -p {url}", "connect"),
    "env ALL_PROXY only": ("env -u http_proxy -u HTTP_PROXY curl -sS -m 20 {url}", "socks5"),
}


@pytest.mark.parametrize("how", list(CURL))
def test_curl_reaches_an_allowed_host_through_the_proxy(world: World, how: str) -> None:
    script, protocol = CURL[how]
    path = f"/nsfree/{how.replace(' ', '_').replace(',', '')}"
    before = world.servers.allowed.connections
    code, out, err, sandbox_id = world.run(
        script.format(url=f"http://allowed.test:{world.servers.allowed.port}{path}")
    )
    assert code == 0, err
    assert out.startswith(f"allowed GET {path} HTTP/1.1"), out
    assert world.servers.allowed.connections == before + 1
    events = world.events("allowed.test", at_least=1)
    assert [(e["decision"], e["protocol"], e["sandbox_id"]) for e in events] == [
        ("allow", protocol, sandbox_id)
    ]
    assert events[0]["address"] == ALLOWED_ADDRESS


@pytest.mark.parametrize(
    ("name", "rule"),
    [("other.test", "default-deny"), ("denied.test", "deniedDomains: denied.test")],
)
def test_a_refused_host_gets_nothing(world: World, name: str, rule: str) -> None:
    before = world.servers.denied.connections
    url = f"http://{name}:{world.servers.denied.port}/secret"
    code, _, err, sandbox_id = world.run(f"curl -sS -m 20 -f {url}")
    assert code != 0
    assert "403" in err, err
    assert world.servers.denied.connections == before
    assert b"/secret" not in world.servers.denied.received
    events = world.events(name)
    assert [(e["decision"], e["rule"], e["sandbox_id"]) for e in events] == [
        ("deny", rule, sandbox_id)
    ]


DIRECT = """
import errno, socket, sys
try:
    socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=10).sendall(b"leak")
    print("connected")
except OSError as exc:
    print(errno.errorcode.get(exc.errno, exc))
"""


@pytest.mark.parametrize("sandboxed", [False, True], ids=["unsandboxed", "sandboxed"])
def test_a_direct_connection_to_a_host_port_is_refused(world: World, sandboxed: bool) -> None:
    argv = ["python3", "-c", DIRECT]
    with Canary() as canary:
        if sandboxed:
            result = world.sandbox.run(
                [*argv, str(canary.port)], env=world.layout.env, capture_output=True
            )
            out = (result.stdout or b"").decode()
        else:
            done = subprocess.run([*argv, str(canary.port)], capture_output=True, timeout=60)
            out = done.stdout.decode()
        reached = canary.count()
    if not sandboxed:
        assert (reached, out) == (1, "connected\n")  # the control: the host port is reachable
        return
    # Shared loopback, so the canary is there to reach: Landlock's TCP rule refuses it.
    assert (reached, out) == (0, "EACCES\n")
    assert world.events() == []


def test_the_listeners_close_when_the_command_ends(world: World) -> None:
    code, out, err, _ = world.run('echo "$http_proxy $ALL_PROXY"')
    assert code == 0, err
    http, socks = out.split()
    ports = [int(http.rsplit(":", 1)[1]), int(socks.rsplit(":", 1)[1])]
    assert http.startswith("http://127.0.0.1:") and socks.startswith("socks5h://127.0.0.1:")
    for port in ports:
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=10).close()


@pytest.mark.parametrize(
    ("ports", "key"),
    [({"host_ports": (5432,)}, "hostPorts"), ({"publish_ports": (8080,)}, "publishPorts")],
)
def test_host_and_published_ports_are_refused(
    layout: Layout,
    servers: Servers,
    ports: dict[str, tuple[int, ...]],
    key: str,
) -> None:
    with (
        nsfree_world(layout, servers, **ports) as world,
        pytest.raises(SandboxUnavailable, match=f"network.{key}"),
    ):
        world.run("echo ran")


@pytest.mark.parametrize(
    ("abi", "have_proxy", "refused"),
    [
        (LANDLOCK_NET_ABI, True, None),
        (LANDLOCK_NET_ABI - 1, True, "ABI"),
        (LANDLOCK_NET_ABI, False, "no proxy"),
        (0, True, "has none"),
    ],
)
def test_check_nsfree_network(
    layout: Layout, abi: int, have_proxy: bool, refused: str | None
) -> None:
    from corral.probe import probe

    facts = probe(cache_dir=layout.host().machine_cache_dir)._replace(landlock_abi=abi)
    policy = filtered_policy(layout)
    if refused is None:
        check_nsfree_network(policy, facts, have_proxy=have_proxy)
        return
    with pytest.raises(SandboxUnavailable, match=refused):
        check_nsfree_network(policy, facts, have_proxy=have_proxy)
