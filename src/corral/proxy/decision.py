"""Who may be reached: pure functions of a request, the domain lists and a few facts.

The order of the checks is the policy (rules 1-4 run before connecting, 5-7 after):
1. A host that cannot be normalised (see `corral.policy.domains`) is refused.
2. A host in `deniedDomains` is refused, even when `allowedDomains` also has it: deny wins.
3. A host in `allowedDomains` is allowed.
4. An IP literal in neither list is refused without asking: an address says nothing a person
   can judge, and allowing one by accident opens the host's own services.
5. Any other host is put to the `ask` callback ("once", "always" or "deny", or an `Answer`
   that also says how it was answered); without one it is refused.
6. After resolving an allowed name, an address in `deniedDomains` is refused, and so is a
   loopback, link-local, private or otherwise non-global address unless that address (or a
   CIDR holding it) is itself in `allowedDomains`: a name an attacker controls must not lead
   to the host's or the LAN's services (DNS rebinding). The address chosen here is the one
   connected to; the name is never resolved a second time.
7. The client's own words must agree with the target: the TLS server name (SNI) in a tunnel to
   port 443 must be the tunnel's host, and a plain-HTTP Host header must be the URI's host
   (domain fronting, where an allowed front carries a request for a forbidden host).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable
from typing import Literal, NamedTuple

from corral.errors import SettingsError
from corral.policy.domains import (
    DomainPattern,
    address_in,
    first_match,
    is_ip_literal,
    normalize_host,
    parse_pattern,
)
from corral.policy.model import NetworkPolicy, Origin, Rule

Protocol = Literal["http", "connect", "socks5"]
AskAnswer = Literal["once", "always", "deny"]
ASK_ANSWERS: tuple[AskAnswer, ...] = ("once", "always", "deny")
MissingSni = Literal["refuse", "allow"]
"""What to do with a TLS tunnel whose ClientHello names no server."""

# Tunnels to these ports must carry TLS whose SNI names the tunnel's host (rule 7).
TLS_PORTS = frozenset({443})


class Request(NamedTuple):
    host: str
    port: int
    protocol: Protocol
    sandbox_id: str


class Decision(NamedTuple):
    allowed: bool
    rule: str
    """What decided, short and stable: `deniedDomains: *.example.com`, `ask: once`,
    `ip-literal`, `rebinding`, `sni-mismatch`..."""
    reason: str
    """One sentence for a person: the host, the rule and where the rule came from."""


class Answer(NamedTuple):
    """What an `ask` callback may return instead of a bare "once", "always" or "deny": the
    choice and how it came about, which the audit record keeps in its reason ("no answer
    within 60 s", "added to network.allowedDomains in ...")."""

    choice: str
    detail: str = ""


Ask = Callable[[Request], "str | Answer"]


class Entry(NamedTuple):
    pattern: DomainPattern
    origin: Origin


class DomainRules(NamedTuple):
    allowed: tuple[Entry, ...]
    denied: tuple[Entry, ...]

    @classmethod
    def from_policy(cls, policy: NetworkPolicy) -> DomainRules:
        """Parse the policy's lists; a bad entry is a SettingsError naming where it came from."""
        return cls(
            tuple(_parse_rules(policy.allowed_domains, "allowedDomains")),
            tuple(_parse_rules(policy.denied_domains, "deniedDomains")),
        )

    @classmethod
    def from_texts(
        cls, allowed: Iterable[str] = (), denied: Iterable[str] = (), *, source: str = "test"
    ) -> DomainRules:
        def rules(texts: Iterable[str]) -> tuple[Rule, ...]:
            return tuple(Rule(text, Origin(source)) for text in texts)

        return cls.from_policy(NetworkPolicy("filtered", rules(allowed), rules(denied)))

    def allowing(self, pattern: DomainPattern, origin: Origin) -> DomainRules:
        """These rules plus one allowed entry (an "always" answer)."""
        return self._replace(allowed=(*self.allowed, Entry(pattern, origin)))


def _parse_rules(rules: Iterable[Rule], key: str) -> Iterable[Entry]:
    for rule in rules:
        try:
            yield Entry(parse_pattern(rule.value), rule.origin)
        except ValueError as exc:
            raise SettingsError(
                f"{rule.value!r}: {exc}", file=rule.origin.source, key=rule.origin.key or key
            ) from None


def _match(entries: tuple[Entry, ...], host: str) -> Entry | None:
    pattern = first_match((entry.pattern for entry in entries), host)
    return next((entry for entry in entries if entry.pattern == pattern), None)


def decide_by_lists(request: Request, rules: DomainRules) -> Decision | None:
    """Rules 1-4; None when the host is in neither list and the `ask` callback decides."""
    try:
        host = normalize_host(request.host)
    except ValueError as exc:
        return Decision(False, "invalid-host", f"{request.host!r} is not a valid host: {exc}")
    denied = _match(rules.denied, host)
    if denied is not None:
        return Decision(
            False,
            f"deniedDomains: {denied.pattern}",
            f"{host} matches {denied.pattern} in deniedDomains ({denied.origin})",
        )
    allowed = _match(rules.allowed, host)
    if allowed is not None:
        return Decision(
            True,
            f"allowedDomains: {allowed.pattern}",
            f"{host} matches {allowed.pattern} in allowedDomains ({allowed.origin})",
        )
    if is_ip_literal(host):
        return Decision(
            False, "ip-literal", f"{host} is an IP address that allowedDomains does not list"
        )
    return None


def decision_from_answer(request: Request, answer: str | Answer) -> Decision:
    """Rule 5, given what `ask` answered; an answer other than once/always/deny denies."""
    choice, detail = answer if isinstance(answer, Answer) else (answer, "")
    how = f": {detail}" if detail else " when asked"
    if choice in ("once", "always"):
        return Decision(True, f"ask: {choice}", f"{request.host} was allowed{how}")
    if choice == "deny":
        return Decision(False, "ask: deny", f"{request.host} was denied{how}")
    return Decision(False, "ask: invalid", f"the ask callback answered {answer!r}")


NOT_LISTED = "not in allowedDomains and nobody to ask"


def decide(request: Request, rules: DomainRules, ask: Ask | None) -> Decision:
    """Rules 1-5. `ask` is called only for a host in neither list."""
    decision = decide_by_lists(request, rules)
    if decision is not None:
        return decision
    if ask is None:
        return Decision(False, "default-deny", f"{request.host} is {NOT_LISTED}")
    return decision_from_answer(request, ask(request))


def _ip(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    parsed = ipaddress.ip_address(address.partition("%")[0])
    if isinstance(parsed, ipaddress.IPv6Address) and parsed.ipv4_mapped is not None:
        return parsed.ipv4_mapped
    return parsed


def is_internal(address: str) -> bool:
    """Loopback, link-local, private, shared, reserved, unspecified or multicast: anything
    that is not an ordinary public address."""
    ip = _ip(address)
    return not ip.is_global or ip.is_multicast


class Resolved(NamedTuple):
    address: str
    """The address to connect to, as the resolver wrote it (a zone id kept)."""


def choose_address(host: str, addresses: Iterable[str], rules: DomainRules) -> Resolved | Decision:
    """Rule 6: the first resolved address that may be connected to, or the refusal of the first
    that may not. `host` is normalised; an IP literal is its own (already allowed) address."""
    if is_ip_literal(host):
        return Resolved(host)
    refusal: Decision | None = None
    for address in addresses:
        verdict = _check_address(host, address, rules)
        if verdict is None:
            return Resolved(address)
        refusal = refusal or verdict
    return refusal or Decision(False, "resolve", f"{host} has no address")


def _check_address(host: str, address: str, rules: DomainRules) -> Decision | None:
    patterns = [entry.pattern for entry in rules.denied]
    denied = address_in(patterns, address)
    if denied is not None:
        return Decision(
            False,
            f"deniedDomains: {denied}",
            f"{host} resolves to {address}, which {denied} in deniedDomains holds",
        )
    if is_internal(address) and address_in([e.pattern for e in rules.allowed], address) is None:
        return Decision(
            False,
            "rebinding",
            f"{host} resolves to the internal address {address}, which allowedDomains does "
            "not list",
        )
    return None


def check_server_name(
    host: str, server_name: str | None, *, missing: MissingSni
) -> Decision | None:
    """Rule 7 for TLS: None when the ClientHello's SNI agrees with the tunnel's `host`
    (normalised). Clients send no SNI for an IP address, so there none is expected."""
    if server_name is None:
        if is_ip_literal(host) or missing == "allow":
            return None
        return Decision(False, "sni-missing", f"the TLS ClientHello for {host} names no server")
    try:
        name = normalize_host(server_name)
    except ValueError as exc:
        return Decision(False, "sni-mismatch", f"the TLS server name is not a host: {exc}")
    if name == host:
        return None
    return Decision(
        False,
        "sni-mismatch",
        f"the tunnel goes to {host} but its TLS ClientHello asks for {name} (domain fronting)",
    )


def not_tls(host: str, port: int, reason: str) -> Decision:
    return Decision(False, "not-tls", f"the tunnel to {host}:{port} does not carry TLS: {reason}")


def check_host_header(host: str, port: int, values: list[str]) -> Decision | None:
    """Rule 7 for plain HTTP: the Host header (if any) must name the URI's host and port.
    `host` is normalised; `values` are the request's Host header values."""
    from corral.proxy.sansio import split_authority

    if not values:
        return None  # HTTP/1.0 without Host: the proxy adds the URI's
    if len(values) > 1:
        return Decision(False, "host-mismatch", "the request has more than one Host header")
    try:
        header_host, header_port = split_authority(values[0], default_port=80)
        named = normalize_host(header_host)
    except ValueError as exc:
        return Decision(False, "host-mismatch", f"the Host header is not a host: {exc}")
    if (named, header_port) == (host, port):
        return None
    return Decision(
        False,
        "host-mismatch",
        f"the request goes to {host}:{port} but its Host header names {named}:{header_port}",
    )
