"""The network seam's pure parts: when a proxy runs, the variables a command gets, the
launcher's ports and arguments, and the one line printed for each refusal."""

from __future__ import annotations

import pytest

from corral.audit.events import Event, MemorySink, network_event
from corral.errors import UsageError
from corral.network import add_network_environment, needs_proxy, start_network
from corral.policy.model import NetworkAccess, NetworkPolicy, Origin, Policy, Rule
from corral.policy.presets import preset_policy
from corral.proxy.launcher import launcher_argv, parse_args
from corral.proxy.notice import DenialNotices, denial_line
from corral.proxy.service import listen_plan, proxy_environment
from tests.conftest import Layout

SETTINGS = "/ws/.corral/settings.local.json"
ALLOW = (Rule("example.test", Origin("test")),)


def _policy(layout: Layout, network: NetworkPolicy) -> Policy:
    return preset_policy("standard", layout.host())._replace(network=network)


@pytest.mark.parametrize(
    ("access", "extra", "expected"),
    [
        ("filtered", {}, True),
        ("filtered", {"allowed_domains": ALLOW}, True),
        ("local", {}, False),
        ("local", {"allowed_domains": ALLOW}, True),
        ("local", {"host_ports": (5432,)}, True),
        ("local", {"publish_ports": (3000,)}, True),
        ("none", {"allowed_domains": ALLOW, "host_ports": (5432,)}, False),
    ],
)
def test_needs_proxy(
    layout: Layout, access: NetworkAccess, extra: dict[str, object], expected: bool
) -> None:
    policy = _policy(layout, NetworkPolicy(access, **extra))  # type: ignore[arg-type]
    assert needs_proxy(policy) is expected


def test_no_proxy_no_service(layout: Layout) -> None:
    assert start_network(_policy(layout, NetworkPolicy("local")), sink=MemorySink()) is None


def test_proxy_environment() -> None:
    http, socks, direct = (
        "http://127.0.0.1:3128",
        "socks5h://127.0.0.1:1080",
        "localhost,127.0.0.1,::1",
    )
    assert proxy_environment(3128, 1080) == {
        "HTTP_PROXY": http,
        "HTTPS_PROXY": http,
        "ALL_PROXY": socks,
        "NO_PROXY": direct,
        "http_proxy": http,
        "https_proxy": http,
        "all_proxy": socks,
        "no_proxy": direct,
        "GIT_CONFIG_COUNT": "1",
        "GIT_CONFIG_KEY_0": "http.proxy",
        "GIT_CONFIG_VALUE_0": http,
        "npm_config_proxy": http,
        "npm_config_https_proxy": http,
        "npm_config_noproxy": direct,
        "NODE_USE_ENV_PROXY": "1",
        "PIP_PROXY": http,
    }


@pytest.mark.parametrize(
    ("theirs", "expected"),
    [
        ({"A": "1"}, {"A": "1", "GIT_CONFIG_COUNT": "1", "GIT_CONFIG_KEY_0": "http.proxy"}),
        ({"GIT_CONFIG_COUNT": "0"}, {"GIT_CONFIG_COUNT": "1", "GIT_CONFIG_KEY_0": "http.proxy"}),
        (
            {"GIT_CONFIG_COUNT": "2", "GIT_CONFIG_KEY_0": "a.b", "GIT_CONFIG_KEY_1": "http.proxy"},
            {
                "GIT_CONFIG_COUNT": "3",
                "GIT_CONFIG_KEY_0": "a.b",
                "GIT_CONFIG_KEY_1": "http.proxy",
                "GIT_CONFIG_KEY_2": "http.proxy",
                "GIT_CONFIG_VALUE_2": "http://127.0.0.1:3128",
            },
        ),
    ],
    ids=["none", "zero", "two"],
)
def test_git_config_entries_follow_the_callers(
    theirs: dict[str, str], expected: dict[str, str]
) -> None:
    env = dict(theirs)
    add_network_environment(env, proxy_environment(3128, 1080))
    assert env.items() >= expected.items()
    assert env["HTTP_PROXY"] == "http://127.0.0.1:3128"


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({}, [("h", 3128), ("s", 1080)]),
        # The user's own proxy is on the host: the ports inside stay where clients look.
        ({"http_proxy_port": 8080, "socks_proxy_port": 9050}, [("h", 3128), ("s", 1080)]),
        ({"host_ports": (5432, 6379, 5432)}, [("h", 3128), ("s", 1080), ("p", 5432), ("p", 6379)]),
    ],
)
def test_listen_plan(layout: Layout, extra: dict[str, object], expected: list[object]) -> None:
    policy = _policy(layout, NetworkPolicy("filtered", **extra))  # type: ignore[arg-type]
    assert listen_plan(policy) == expected


@pytest.mark.parametrize(
    "extra",
    [
        {"host_ports": (3128,)},
        {"host_ports": (1080,)},
        {"http_proxy_port": 8080, "publish_ports": (8080,)},
        {"socks_proxy_port": 9050, "publish_ports": (9050,)},
        {"host_ports": (5432,), "publish_ports": (5432,)},
        {"publish_ports": (1080,)},
    ],
)
def test_listen_plan_refuses_shared_ports(layout: Layout, extra: dict[str, object]) -> None:
    policy = _policy(layout, NetworkPolicy("filtered", **extra))  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="port"):
        listen_plan(policy)


def test_launcher_argv_round_trips() -> None:
    argv = launcher_argv(
        "/usr/bin/python3", script_fd=4, channel_fd=9, listens=[("h", 3128), ("p", 5432)]
    )
    assert argv == [
        "/usr/bin/python3", "-I", "-S", "/proc/self/fd/4", "--channel", "9",
        "--listen", "h:3128", "--listen", "p:5432", "--",
    ]  # fmt: skip
    assert parse_args([*argv[4:], "ls", "-l"]) == (9, [(b"h", 3128), (b"p", 5432)], ["ls", "-l"])


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--channel", "3", "--listen", "h:0"], (3, [(b"h", 0)], None)),
        (["--channel", "3", "--listen", "s:1", "--", "x"], (3, [(b"s", 1)], ["x"])),
    ],
)
def test_launcher_arguments(args: list[str], expected: object) -> None:
    assert parse_args(args) == expected


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["--channel", "3"],
        ["--listen", "h:1"],
        ["--channel", "x", "--listen", "h:1"],
        ["--channel", "3", "--listen", "q:1"],
        ["--channel", "3", "--listen", "h:70000"],
        ["--channel", "3", "--listen", "h1"],
        ["--channel", "3", "--listen", "h:1", "--"],
        ["--channel", "3", "--listen", "h:1", "--bogus", "1"],
    ],
)
def test_launcher_refuses_bad_arguments(args: list[str]) -> None:
    with pytest.raises(ValueError):
        parse_args(args)


def _denial(host: str, port: int, rule: str, reason: str = "why") -> dict[str, object]:
    return network_event(
        "s", host=host, port=port, decision="deny", rule=rule, reason=reason
    ).fields


@pytest.mark.parametrize(
    ("fields", "line"),
    [
        (
            _denial("Evil.Example", 443, "default-deny"),
            "corral: blocked connection to Evil.Example:443 (not in network.allowedDomains); "
            f'to allow it add "network": {{"allowedDomains": ["evil.example"]}} to {SETTINGS}',
        ),
        (
            _denial("bücher.test", 80, "default-deny"),
            "corral: blocked connection to bücher.test:80 (not in network.allowedDomains); "
            'to allow it add "network": {"allowedDomains": ["xn--bcher-kva.test"]} '
            f"to {SETTINGS}",
        ),
        (
            _denial("10.0.0.1", 22, "ip-literal"),
            "corral: blocked connection to 10.0.0.1:22 (an IP address that network."
            'allowedDomains does not list); to allow it add "network": {"allowedDomains": '
            f'["10.0.0.1"]}} to {SETTINGS}',
        ),
        (
            _denial("::1", 80, "ip-literal"),
            "corral: blocked connection to [::1]:80 (an IP address that network."
            'allowedDomains does not list); to allow it add "network": {"allowedDomains": '
            f'["::1"]}} to {SETTINGS}',
        ),
        (
            _denial("127.0.0.1", 5432, "hostPorts"),
            "corral: blocked connection to 127.0.0.1:5432 (not in network.hostPorts); "
            f'to allow it add "network": {{"hostPorts": [5432]}} to {SETTINGS}',
        ),
        (
            _denial("x.test", 80, "deniedDomains: x.test", "x.test matches it in deniedDomains"),
            "corral: blocked connection to x.test:80 (x.test matches it in deniedDomains)",
        ),
        (
            _denial("a\x1b[2Jb\n", 80, "invalid-host", "'a\\x1b[2Jb\\n' is not valid"),
            "corral: blocked connection to a\\x1b[2Jb\\n:80 ('a\\x1b[2Jb\\n' is not valid)",
        ),
    ],
    ids=["unlisted", "idn", "ip", "ipv6", "host-port", "denied", "escaped"],
)
def test_denial_line(fields: dict[str, object], line: str) -> None:
    assert denial_line(fields, settings_file=SETTINGS) == line


@pytest.mark.parametrize(
    "fields",
    [
        network_event("s", host="ok.test", port=80, decision="allow").fields,
        _denial("", 0, "malformed"),
    ],
    ids=["allowed", "no-host"],
)
def test_no_denial_line(fields: dict[str, object]) -> None:
    assert denial_line(fields, settings_file=SETTINGS) is None


def test_notices_pass_everything_on_and_print_each_denial_once() -> None:
    sink = MemorySink()
    lines: list[str] = []
    notices = DenialNotices(sink, lines.append, settings_file=SETTINGS)

    def event(sandbox: str, host: str, decision: str = "deny") -> Event:
        return network_event(sandbox, host=host, port=80, decision=decision, rule="default-deny")  # type: ignore[arg-type]

    for made in (event("a", "x.test"), event("a", "x.test"), event("b", "x.test")):
        notices.emit(made)
    notices.emit(event("a", "ok.test", "allow"))
    notices.emit(Event.now("session", "a", phase="start"))
    assert len(sink.events) == 5
    assert len(lines) == 2  # once per sandbox
    assert all(line.startswith("corral: blocked connection to x.test:80 ") for line in lines)


def test_an_ignored_denial_prints_no_line() -> None:
    from corral.proxy.notice import denial_line

    fields = {"host": "noisy.example", "port": 443, "decision": "deny", "rule": "default-deny"}
    assert denial_line(fields, settings_file="/w/.corral/settings.local.json") is not None
    ignored = {**fields, "ignored": True}
    assert denial_line(ignored, settings_file="/w/.corral/settings.local.json") is None
