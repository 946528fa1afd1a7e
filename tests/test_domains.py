"""Domain patterns: tables of accepted and rejected hosts, patterns and matches."""

from __future__ import annotations

import pytest

from corral.policy.domains import (
    DomainPattern,
    address_in,
    first_match,
    is_ip_literal,
    matches,
    normalize_host,
    parse_pattern,
)

NORMALIZED = [
    ("example.com", "example.com"),
    ("EXAMPLE.Com", "example.com"),
    ("example.com.", "example.com"),
    ("localhost", "localhost"),
    ("_acme-challenge.example.com", "_acme-challenge.example.com"),
    ("bücher.example", "xn--bcher-kva.example"),
    ("BÜCHER.EXAMPLE.", "xn--bcher-kva.example"),
    ("Bücher.EXAMPLE", "xn--bcher-kva.example"),
    ("xn--bcher-kva.example", "xn--bcher-kva.example"),
    ("ｅｘａｍｐｌｅ．ｃｏｍ", "example.com"),  # full-width letters and full stop (IDNA)
    ("例え。テスト", "xn--r8jz45g.xn--zckzah"),  # ideographic full stop separates labels
    ("127.0.0.1", "127.0.0.1"),
    ("::1", "::1"),
    ("[::1]", "::1"),
    ("[2001:DB8:0:0:0:0:0:1]", "2001:db8::1"),
    ("2001:0db8::0001", "2001:db8::1"),
    ("::ffff:127.0.0.1", "127.0.0.1"),  # mapped IPv6 reaches the IPv4 host
    ("[::ffff:7f00:1]", "127.0.0.1"),
    ("a" * 63 + ".com", "a" * 63 + ".com"),
    (".".join(["a" * 49] * 5) + ".abc", ".".join(["a" * 49] * 5) + ".abc"),  # 253 characters
]

REJECTED_HOSTS = [
    ("", "empty host"),
    (".", "empty label"),
    ("example.com..", "empty label"),
    ("a..example.com", "empty label"),
    ("exa mple.com", "white space"),
    (" example.com", "white space"),
    ("https://example.com", "scheme"),
    ("example.com/path", "path"),
    ("user@example.com", "user info"),
    ("example.com:443", "port"),
    ("[::1]:443", "port"),
    ("[127.0.0.1]", "IPv6 address"),
    ("[fe80::1%eth0]", "IPv6 address"),
    ("fe80::1%eth0", "zone id"),
    ("[::g]", "not a valid IPv6"),
    ("a" * 64 + ".com", "longer than 63"),
    (".".join(["a" * 49] * 5) + ".abcd", "limit is 253"),
    ("exa!mple.com", "'!'"),
    ("example.com：443", "':'"),  # full-width colon becomes ':' under NFKC
    ("127.1", "dotted-decimal"),
    ("0x7f.0.0.1", "dotted-decimal"),
    ("example.0x10", "dotted-decimal"),
    ("1.2.3.04", "dotted-decimal"),
    ("4294967295", "dotted-decimal"),
]


@pytest.mark.parametrize(("host", "expected"), NORMALIZED)
def test_normalize_host_accepts(host: str, expected: str) -> None:
    assert normalize_host(host) == expected


@pytest.mark.parametrize(("host", "reason"), REJECTED_HOSTS)
def test_normalize_host_rejects(host: str, reason: str) -> None:
    with pytest.raises(ValueError) as info:
        normalize_host(host)
    assert reason in str(info.value)


PATTERNS = [
    ("example.com", DomainPattern("exact", "example.com")),
    ("Example.COM.", DomainPattern("exact", "example.com")),
    ("*.example.com", DomainPattern("wildcard", "example.com")),
    ("*.Bücher.example", DomainPattern("wildcard", "xn--bcher-kva.example")),
    ("*.com", DomainPattern("wildcard", "com")),  # legal here; `policy check` warns about it
    ("127.0.0.1", DomainPattern("ip", "127.0.0.1")),
    ("::1", DomainPattern("ip", "::1")),
    ("[::1]", DomainPattern("ip", "::1")),
    ("10.0.0.0/8", DomainPattern("cidr", "10.0.0.0/8")),
    ("192.168.1.7/32", DomainPattern("cidr", "192.168.1.7/32")),
    ("fd00::/8", DomainPattern("cidr", "fd00::/8")),
    ("2001:DB8::/32", DomainPattern("cidr", "2001:db8::/32")),
]

REJECTED_PATTERNS = [
    ("", "empty host"),
    ("*", "every host"),
    ("*example.com", "whole first label"),
    ("a.*.com", "whole first label"),
    ("*.*.example.com", "whole first label"),
    ("**.example.com", "whole first label"),
    ("*.", "empty host"),
    ("*.10.0.0.1", "not an IP address"),
    ("https://x", "scheme"),
    ("x.com/path", "path"),
    ("x.com:443", "port"),
    ("10.0.0.1/8", "host bits set"),
    ("10.0.0.0/33", "not a valid network"),
    ("10.0.0.0/x", "not a valid network"),
    ("127.1", "dotted-decimal"),
]


@pytest.mark.parametrize(("text", "expected"), PATTERNS)
def test_parse_pattern_accepts(text: str, expected: DomainPattern) -> None:
    assert parse_pattern(text) == expected


@pytest.mark.parametrize(("text", "reason"), REJECTED_PATTERNS)
def test_parse_pattern_rejects(text: str, reason: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_pattern(text)
    assert reason in str(info.value)


def test_pattern_str_round_trips() -> None:
    for text in ("example.com", "*.example.com", "10.0.0.0/8", "::1"):
        assert str(parse_pattern(text)) == text


MATCHES = [
    ("example.com", "example.com", True),
    ("example.com", "www.example.com", False),
    ("example.com", "example.com.evil.net", False),
    ("*.example.com", "www.example.com", True),
    ("*.example.com", "a.b.example.com", True),
    ("*.example.com", "example.com", False),  # never the apex
    ("*.example.com", "evilexample.com", False),  # lookalike without the dot
    ("*.example.com", "www.evilexample.com", False),
    ("*.example.com", "example.com.evil.net", False),
    ("*.bücher.example", "www.xn--bcher-kva.example", True),
    ("127.0.0.1", "127.0.0.1", True),
    ("127.0.0.1", "127.0.0.2", False),
    ("127.0.0.1", "localhost", False),  # names never match IP patterns
    ("::1", "::1", True),
    ("::1", "0.0.0.1", False),
    ("10.0.0.0/8", "10.200.3.4", True),
    ("10.0.0.0/8", "11.0.0.1", False),
    ("10.0.0.0/8", "::1", False),
    ("fd00::/8", "fd12::1", True),
    ("fd00::/8", "10.0.0.1", False),
    ("10.0.0.0/8", "ten.example", False),
]


@pytest.mark.parametrize(("pattern", "host", "expected"), MATCHES)
def test_matches(pattern: str, host: str, expected: bool) -> None:
    assert matches(parse_pattern(pattern), normalize_host(host)) is expected


def test_first_match_returns_the_first_hit_in_order() -> None:
    patterns = [parse_pattern(p) for p in ("a.example", "*.example.com", "www.example.com")]
    assert first_match(patterns, "www.example.com") == DomainPattern("wildcard", "example.com")
    assert first_match(patterns, "example.com") is None
    assert first_match([], "example.com") is None


ADDRESSES = [
    ("127.0.0.1", "127.0.0.1"),
    ("10.1.2.3", "10.0.0.0/8"),
    ("::ffff:10.1.2.3", "10.0.0.0/8"),  # mapped IPv6 from the resolver
    ("fe80::1%eth0", "fe80::/10"),  # zone id from getaddrinfo is ignored
    ("192.168.0.1", None),
    ("::1", None),
]


@pytest.mark.parametrize(("address", "expected"), ADDRESSES)
def test_address_in(address: str, expected: str | None) -> None:
    patterns = [parse_pattern(p) for p in ("example.com", "*.example.com", "127.0.0.1")]
    patterns += [parse_pattern("10.0.0.0/8"), parse_pattern("fe80::/10")]
    found = address_in(patterns, address)
    assert (str(found) if found else None) == expected


def test_address_in_refuses_a_name() -> None:
    with pytest.raises(ValueError, match="not an IP address"):
        address_in([parse_pattern("127.0.0.1")], "localhost")


@pytest.mark.parametrize(
    ("host", "expected"),
    [("127.0.0.1", True), ("::1", True), ("example.com", False), ("localhost", False)],
)
def test_is_ip_literal(host: str, expected: bool) -> None:
    assert is_ip_literal(normalize_host(host)) is expected
