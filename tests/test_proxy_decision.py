"""The proxy's decisions as tables: lists, asking, rebinding, SNI and Host agreement."""

from __future__ import annotations

import pytest

from corral.errors import SettingsError
from corral.policy.domains import DomainPattern
from corral.policy.model import NetworkPolicy, Origin, Rule
from corral.proxy.decision import (
    Decision,
    DomainRules,
    MissingSni,
    Request,
    Resolved,
    check_host_header,
    check_server_name,
    choose_address,
    decide,
    is_internal,
)

RULES = DomainRules.from_texts(
    allowed=[
        "example.com",
        "*.github.com",
        "bücher.example",
        "203.0.113.7",
        "10.1.0.0/16",
        "blocked.github.com",
    ],
    denied=["blocked.github.com", "*.evil.example", "10.1.2.0/24"],
)


def _request(host: str, port: int = 443) -> Request:
    return Request(host, port, "connect", "sb-1")


# (host, allowed, rule)
BY_LISTS: list[tuple[str, bool, str]] = [
    ("example.com", True, "allowedDomains: example.com"),
    ("EXAMPLE.com.", True, "allowedDomains: example.com"),
    ("api.github.com", True, "allowedDomains: *.github.com"),
    ("a.b.github.com", True, "allowedDomains: *.github.com"),
    ("xn--bcher-kva.example", True, "allowedDomains: xn--bcher-kva.example"),
    ("BÜCHER.example", True, "allowedDomains: xn--bcher-kva.example"),
    ("203.0.113.7", True, "allowedDomains: 203.0.113.7"),
    ("::ffff:203.0.113.7", True, "allowedDomains: 203.0.113.7"),
    ("10.1.9.9", True, "allowedDomains: 10.1.0.0/16"),
    ("blocked.github.com", False, "deniedDomains: blocked.github.com"),
    ("x.evil.example", False, "deniedDomains: *.evil.example"),
    ("10.1.2.3", False, "deniedDomains: 10.1.2.0/24"),
    ("github.com", False, "default-deny"),
    ("evilexample.com", False, "default-deny"),
    ("example.com.evil.example", False, "deniedDomains: *.evil.example"),
    ("127.0.0.1", False, "ip-literal"),
    ("::1", False, "ip-literal"),
    ("203.0.113.8", False, "ip-literal"),
    ("127.1", False, "invalid-host"),
    ("0x7f.0.0.1", False, "invalid-host"),
    ("exa mple.com", False, "invalid-host"),
    ("", False, "invalid-host"),
]


@pytest.mark.parametrize(("host", "allowed", "rule"), BY_LISTS)
def test_decide_by_lists(host: str, allowed: bool, rule: str) -> None:
    decision = decide(_request(host), RULES, None)
    assert (decision.allowed, decision.rule) == (allowed, rule), decision.reason


def test_reason_names_the_origin_of_the_rule() -> None:
    rules = DomainRules.from_policy(
        NetworkPolicy(
            "filtered",
            allowed_domains=(Rule("example.com", Origin("/p/settings.json", "network.x")),),
        )
    )
    reason = decide(_request("example.com"), rules, None).reason
    assert "/p/settings.json (network.x)" in reason


def test_bad_pattern_is_a_settings_error_naming_the_file() -> None:
    policy = NetworkPolicy(
        "filtered", allowed_domains=(Rule("*", Origin("/p/s.json", "network.allowedDomains")),)
    )
    with pytest.raises(SettingsError) as caught:
        DomainRules.from_policy(policy)
    assert caught.value.file == "/p/s.json"
    assert caught.value.key == "network.allowedDomains"


@pytest.mark.parametrize(
    ("answer", "allowed", "rule"),
    [
        ("once", True, "ask: once"),
        ("always", True, "ask: always"),
        ("deny", False, "ask: deny"),
        ("yes", False, "ask: invalid"),
    ],
)
def test_ask_decides_hosts_in_neither_list(answer: str, allowed: bool, rule: str) -> None:
    asked: list[Request] = []

    def ask(request: Request) -> str:
        asked.append(request)
        return answer

    decision = decide(_request("new.example"), RULES, ask)
    assert (decision.allowed, decision.rule) == (allowed, rule)
    assert asked == [_request("new.example")]


@pytest.mark.parametrize("host", ["example.com", "blocked.github.com", "127.0.0.1", "127.1"])
def test_ask_is_not_called_for_listed_hosts_or_ip_literals(host: str) -> None:
    def ask(request: Request) -> str:
        raise AssertionError(f"asked about {request.host}")

    decide(_request(host), RULES, ask)


def test_always_answer_extends_the_rules() -> None:
    rules = RULES.allowing(DomainPattern("exact", "new.example"), Origin("asked"))
    assert decide(_request("new.example"), rules, None).allowed


# (addresses the name resolves to, chosen address or refusing rule)
RESOLVED: list[tuple[list[str], str]] = [
    (["93.184.216.34"], "93.184.216.34"),
    (["2606:2800:220:1:248:1893:25c8:1946"], "2606:2800:220:1:248:1893:25c8:1946"),
    (["127.0.0.1"], "rebinding"),
    (["::1"], "rebinding"),
    (["::ffff:127.0.0.1"], "rebinding"),
    (["169.254.169.254"], "rebinding"),
    (["fe80::1%eth0"], "rebinding"),
    (["192.168.1.1"], "rebinding"),
    (["172.16.0.1"], "rebinding"),
    (["100.64.0.1"], "rebinding"),
    (["0.0.0.0"], "rebinding"),
    (["fd00::1"], "rebinding"),
    (["224.0.0.1"], "rebinding"),
    (["10.1.9.9"], "10.1.9.9"),  # internal, but its CIDR is allowed
    (["10.1.2.3"], "deniedDomains: 10.1.2.0/24"),  # denied beats the allowed CIDR
    (["127.0.0.1", "93.184.216.34"], "93.184.216.34"),
    ([], "resolve"),
]


@pytest.mark.parametrize(("addresses", "expected"), RESOLVED, ids=repr)
def test_rebinding_rule(addresses: list[str], expected: str) -> None:
    result = choose_address("example.com", addresses, RULES)
    if isinstance(result, Resolved):
        assert result.address == expected
    else:
        assert not result.allowed and result.rule == expected, result.reason


def test_ip_literal_target_is_its_own_address() -> None:
    assert choose_address("10.1.9.9", ["1.2.3.4"], RULES) == Resolved("10.1.9.9")


def test_is_internal_pairs() -> None:
    assert is_internal("127.0.0.1") and not is_internal("8.8.8.8")
    assert is_internal("::ffff:10.0.0.1") and not is_internal("2001:4860:4860::8888")


# (target host, SNI, missing-SNI mode, refusing rule or None)
SNI: list[tuple[str, str | None, MissingSni, str | None]] = [
    ("example.com", "example.com", "refuse", None),
    ("example.com", "EXAMPLE.COM.", "refuse", None),
    ("xn--bcher-kva.example", "xn--bcher-kva.example", "refuse", None),
    ("example.com", "evil.example", "refuse", "sni-mismatch"),
    ("example.com", "www.example.com", "refuse", "sni-mismatch"),
    ("example.com", "exa mple", "refuse", "sni-mismatch"),
    ("example.com", None, "refuse", "sni-missing"),
    ("example.com", None, "allow", None),
    ("203.0.113.7", None, "refuse", None),
    ("203.0.113.7", "example.com", "refuse", "sni-mismatch"),
]


@pytest.mark.parametrize(("host", "sni", "missing", "rule"), SNI, ids=repr)
def test_server_name_must_match_the_tunnel(
    host: str, sni: str | None, missing: MissingSni, rule: str | None
) -> None:
    verdict = check_server_name(host, sni, missing=missing)
    assert (verdict.rule if verdict else None) == rule


# (target host, port, Host header values, refusing rule or None)
HOST_HEADERS: list[tuple[str, int, list[str], str | None]] = [
    ("example.com", 80, ["example.com"], None),
    ("example.com", 80, ["Example.COM:80"], None),
    ("example.com", 8080, ["example.com:8080"], None),
    ("::1", 80, ["[::1]"], None),
    ("example.com", 80, [], None),
    ("example.com", 80, ["evil.example"], "host-mismatch"),
    ("example.com", 8080, ["example.com"], "host-mismatch"),
    ("example.com", 80, ["example.com", "example.com"], "host-mismatch"),
    ("example.com", 80, ["example.com:x"], "host-mismatch"),
]


@pytest.mark.parametrize(("host", "port", "values", "rule"), HOST_HEADERS, ids=repr)
def test_host_header_must_match_the_uri(
    host: str, port: int, values: list[str], rule: str | None
) -> None:
    verdict = check_host_header(host, port, values)
    assert (verdict.rule if verdict else None) == rule
    assert verdict is None or isinstance(verdict, Decision)
