"""Real clients inside real sandboxes with a filtered network: curl through HTTP_PROXY, through
CONNECT and through SOCKS5, Python's urllib, and a program that ignores the proxy variables.
Each allowed connection is seen by the server it was meant for and audited under the
command's sandbox id; each refusal is audited, printed as one line on corral's stderr, and the
denied server saw nothing."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest

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


@pytest.fixture
def world(layout: Layout, servers: Servers) -> Iterator[World]:
    with filtered_world(layout, servers) as made:
        yield made


CURL = {
    "env HTTP_PROXY": "curl -sS -m 20 {url}",
    "env HTTP_PROXY, CONNECT": "curl -sS -m 20 -p {url}",
    "socks5h": "curl -sS -m 20 --socks5-hostname 127.0.0.1:1080 {url}",
    "env ALL_PROXY only": "env -u http_proxy -u HTTP_PROXY curl -sS -m 20 {url}",
}
PROTOCOL = {
    "env HTTP_PROXY": "http",
    "env HTTP_PROXY, CONNECT": "connect",
    "socks5h": "socks5",
    "env ALL_PROXY only": "socks5",
}


@pytest.mark.parametrize("how", list(CURL))
def test_curl_reaches_an_allowed_host(world: World, how: str) -> None:
    url = f"http://allowed.test:{world.servers.allowed.port}/curl/{how.replace(' ', '_')}"
    code, out, err, sandbox_id = world.run(CURL[how].format(url=url))
    assert code == 0, err
    assert out.startswith(f"allowed GET /curl/{how.replace(' ', '_')} HTTP/1.1"), out
    events = world.events("allowed.test", at_least=1)
    assert [(e["decision"], e["protocol"], e["sandbox_id"]) for e in events] == [
        ("allow", PROTOCOL[how], sandbox_id)
    ]
    assert events[0]["address"] == ALLOWED_ADDRESS
    assert err == ""


def test_python_urllib_uses_the_proxy_variables(world: World) -> None:
    url = f"http://allowed.test:{world.servers.allowed.port}/urllib"
    script = f"python3 -c \"import urllib.request;print(urllib.request.urlopen('{url}').read())\""
    code, out, err, _ = world.run(script)
    assert code == 0, err
    assert "allowed GET /urllib HTTP/1.1" in out
    assert [e["decision"] for e in world.events("allowed.test", at_least=1)] == ["allow"]


@pytest.mark.parametrize(
    ("how", "failure"),
    [("env HTTP_PROXY", "403"), ("env HTTP_PROXY, CONNECT", "403"), ("socks5h", "(97)")],
)
@pytest.mark.parametrize(
    ("name", "rule"),
    [("other.test", "default-deny"), ("denied.test", "deniedDomains: denied.test")],
)
def test_refused_hosts_get_nothing_through(
    world: World, how: str, failure: str, name: str, rule: str, capsys: pytest.CaptureFixture[str]
) -> None:
    before = world.servers.denied.connections
    url = f"http://{name}:{world.servers.denied.port}/secret"
    code, _, err, sandbox_id = world.run(CURL[how].format(url=url) + " -f")
    assert code != 0
    assert failure in err, err
    events = world.events(name)
    assert [(e["decision"], e["sandbox_id"]) for e in events] == [("deny", sandbox_id)]
    assert events[0]["rule"] == rule
    assert world.servers.denied.connections == before
    assert b"/secret" not in world.servers.denied.received
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"corral: blocked connection to {name}:{world.servers.denied.port} ")


def test_denial_line_names_the_setting_that_allows_it(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"http://other.test:{world.servers.denied.port}/"
    # Twice: a client that retries prints its line once.
    world.run(f"curl -sS -m 20 {url}; curl -sS -m 20 {url}")
    settings = f"{world.layout.workspace}/.corral/settings.local.json"
    assert capsys.readouterr().err.splitlines() == [
        f"corral: blocked connection to other.test:{world.servers.denied.port} (not in "
        'network.allowedDomains); to allow it add "network": {"allowedDomains": '
        f'["other.test"]}} to {settings}'
    ]
    assert len(world.events("other.test")) == 2


def _host_address() -> str | None:
    """A non-loopback address of this machine, if it has one."""
    found = subprocess.run(
        ["ip", "-4", "-o", "addr", "show", "scope", "global"], capture_output=True, text=True
    )
    for line in found.stdout.splitlines():
        words = line.split()
        if "inet" in words:
            return words[words.index("inet") + 1].split("/")[0]
    return None


DIRECT = """
import errno, socket, sys
for address in sys.argv[2:]:
    try:
        socket.create_connection((address, int(sys.argv[1])), timeout=10).sendall(b"leak")
        print(address, "connected")
    except OSError as exc:
        print(address, errno.errorcode.get(exc.errno, exc))
"""


@pytest.mark.parametrize("sandboxed", [False, True], ids=["unsandboxed", "sandboxed"])
def test_a_program_that_ignores_the_proxy_reaches_nothing(world: World, sandboxed: bool) -> None:
    canary = Canary("0.0.0.0")  # every host address, loopback included
    address = _host_address()
    targets = ["127.0.0.1", *([address] if address else [])]
    argv = ["python3", "-c", DIRECT, str(canary.port), *targets]
    try:
        if sandboxed:
            result = world.sandbox.run(argv, env=world.layout.env, capture_output=True)
            out = (result.stdout or b"").decode()
        else:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=60).stdout
        reached = canary.count()
    finally:
        canary.close()
    if not sandboxed:
        assert reached == len(targets), out  # the control: the script does reach the host
        return
    assert reached == 0, out
    # Inside, 127.0.0.1 is the sandbox's own loopback, where nothing listens on that port;
    # every other address has no route at all.
    expected = ["127.0.0.1 ECONNREFUSED", *([f"{address} ENETUNREACH"] if address else [])]
    assert out.splitlines() == expected
    assert world.events() == []


def test_a_shell_does_not_wait_for_the_forwarder(world: World) -> None:
    # Were the forwarder the shell's child, `wait` would block until the timeout.
    code, out, _, _ = world.run("sleep 0 & wait; echo waited", timeout=20)
    assert (code, out) == (0, "waited\n")


def test_signals_to_the_command_group_leave_the_network_up(world: World) -> None:
    # `kill 0` signals the whole process group; the forwarder is in a session of its own.
    url = f"http://allowed.test:{world.servers.allowed.port}/after-kill"
    code, out, err, _ = world.run(f"trap '' TERM; kill -TERM 0; curl -sS -m 20 {url}")
    assert code == 0, err
    assert out.startswith("allowed GET /after-kill ")


def test_the_command_gets_default_sigpipe_and_sigxfsz(world: World) -> None:
    result = world.sandbox.run(
        ["grep", "SigIgn", "/proc/self/status"], env=world.layout.env, capture_output=True
    )
    ignored = int((result.stdout or b"").split()[1], 16)
    sigpipe, sigxfsz = 13, 25
    assert ignored & (1 << (sigpipe - 1) | 1 << (sigxfsz - 1)) == 0, hex(ignored)


def test_the_command_holds_no_channel_or_launcher_fd(world: World) -> None:
    result = world.sandbox.run(
        ["ls", "-l", "/proc/self/fd"], env=world.layout.env, capture_output=True
    )
    listing = (result.stdout or b"").decode()
    assert "socket:" not in listing
    assert "memfd:corral-proxy-launcher" not in listing


def test_a_host_port_below_1024_stops_the_launch_with_a_reason(
    layout: Layout, servers: Servers
) -> None:
    policy = filtered_policy(layout, host_ports=(80,))
    with filtered_world(layout, servers, policy) as world:
        code, out, err, _ = world.run("echo ran")
    assert (code, out) == (125, "")
    assert "cannot listen on 127.0.0.1:80: Permission denied (ports below 1024" in err
