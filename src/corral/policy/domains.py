"""Domain patterns: parsing what users write in `allowedDomains`, and matching hosts against it.

Pure functions, no I/O. The proxy normalises the host it was asked for with `normalize_host`,
then asks `first_match` of the denied list and of the allowed list; after resolving a name it
asks `address_in` whether the resolved address is itself allowed (the DNS-rebinding rule).

Rules:
1. One spelling per host. `normalize_host` lower-cases, strips one trailing dot, turns Unicode
   labels into punycode (IDNA 2003, Python's `encodings.idna`) and writes IP literals in
   canonical form, so a deny rule cannot be dodged by writing the same host another way.
   An IPv4-mapped IPv6 literal (`::ffff:127.0.0.1`) becomes the IPv4 address: it reaches the
   same host, so it must meet the same rules.
2. Hosts whose last label is a number (`127.1`, `0x7f.1`) are IPv4 addresses to resolvers
   (WHATWG URL "ends in a number"); unless they are dotted-decimal they are refused rather
   than treated as names, because `getaddrinfo("127.1")` connects to 127.0.0.1.
3. `*.example.com` matches sub-domains at any depth, never `example.com` itself, and never
   `evilexample.com`. A bare `*`, `*example.com` and `a.*.com` are refused.
4. `ip` and `cidr` patterns match IP-literal hosts only; names never match them (a name is
   checked against the addresses it resolves to with `address_in`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Literal, NamedTuple

if TYPE_CHECKING:
    from ipaddress import IPv4Address, IPv6Address

PatternKind = Literal["exact", "wildcard", "ip", "cidr"]

# RFC 1035 section 2.3.4: 63 octets a label, 255 a name on the wire, i.e. 253 as text.
MAX_LABEL_LENGTH = 63
MAX_HOST_LENGTH = 253

# Letters, digits and hyphen (RFC 1123) plus underscore, which real hosts use (`_acme`).
_LABEL_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_")
_HEX_DIGITS = frozenset("0123456789abcdef")
# IDNA (RFC 3490 section 3.1): these full stops separate labels like "." does.
_IDEOGRAPHIC_DOTS = ("\u3002", "\uff0e", "\uff61")


class DomainPattern(NamedTuple):
    kind: PatternKind
    value: str
    """Normalised: punycode, lower case, no trailing dot; a wildcard without its `*.` prefix;
    an IP in canonical form; a CIDR as `net/len`."""

    def __str__(self) -> str:
        return f"*.{self.value}" if self.kind == "wildcard" else self.value


def _parse_ip(text: str) -> IPv4Address | IPv6Address | None:
    """The address `text` spells, mapped IPv6 turned into IPv4; None when it is no IP literal."""
    import ipaddress

    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _ends_in_number(host: str) -> bool:
    last = host.rsplit(".", 1)[-1]
    if last.isascii() and last.isdigit():
        return True
    return last[:2] == "0x" and all(ch in _HEX_DIGITS for ch in last[2:])


def _check_shape(host: str) -> None:
    """Refuse what is a URL, a host:port or plain garbage rather than a host name."""
    if not host:
        raise ValueError("empty host")
    if any(ch.isspace() for ch in host):
        raise ValueError(f"{host!r} contains white space")
    if "://" in host:
        raise ValueError(f"{host!r} has a scheme; write the host name only")
    if "/" in host:
        raise ValueError(f"{host!r} has a path; write the host name only")
    if "@" in host:
        raise ValueError(f"{host!r} has user info; write the host name only")


def _to_ascii(host: str) -> str:
    from encodings import idna

    labels: list[str] = []
    for label in host.split("."):
        if not label:
            labels.append(label)  # left for _check_labels to report with the whole host
            continue
        try:
            labels.append(idna.ToASCII(label).decode("ascii"))
        except UnicodeError as exc:
            raise ValueError(f"label {label!r} is not a valid international name: {exc}") from None
    return ".".join(labels)


def _check_labels(host: str) -> None:
    if len(host) > MAX_HOST_LENGTH:
        raise ValueError(f"host is {len(host)} characters long; the limit is {MAX_HOST_LENGTH}")
    for label in host.split("."):
        if not label:
            raise ValueError(f"{host!r} has an empty label")
        if len(label) > MAX_LABEL_LENGTH:
            raise ValueError(
                f"label {label[:20]!r}... is longer than {MAX_LABEL_LENGTH} characters"
            )
        bad = sorted(set(label) - _LABEL_CHARS)
        if bad:
            raise ValueError(f"{host!r} contains {bad[0]!r}, which is not allowed in a host name")


def normalize_host(host: str) -> str:
    """The one spelling of `host` that patterns are matched against (see rule 1 and 2).

    Raises ValueError(reason) for an empty host, white space, a scheme, a path, a port, empty
    or over-long labels and characters that cannot be in a host name.
    """
    _check_shape(host)
    if host.startswith("["):
        if not host.endswith("]"):
            raise ValueError(f"{host!r} has a port or a stray '['; write the address only")
        inner = host[1:-1]
        if ":" not in inner or "%" in inner:
            raise ValueError(f"{host!r}: brackets hold an IPv6 address (without a zone id) only")
        address = _parse_ip(inner)
        if address is None:
            raise ValueError(f"{host!r} is not a valid IPv6 address")
        return str(address)
    if ":" in host:
        if "%" in host:
            raise ValueError(f"{host!r} has an IPv6 zone id, which is not allowed")
        address = _parse_ip(host)
        if address is None:
            raise ValueError(f"{host!r} has a port or is not a valid IPv6 address")
        return str(address)
    for dot in _IDEOGRAPHIC_DOTS:
        host = host.replace(dot, ".")
    host = host.removesuffix(".")
    # Nameprep lower-cases only the Unicode labels, so lower-case after IDNA as well.
    host = (host if host.isascii() else _to_ascii(host)).lower()
    _check_labels(host)
    if _ends_in_number(host):
        address = _parse_ip(host)
        if address is None:
            raise ValueError(
                f"{host!r} ends in a number, so resolvers read it as an IPv4 address; "
                "write the address in dotted-decimal form (such as 127.0.0.1)"
            )
        return str(address)
    return host


def is_ip_literal(host: str) -> bool:
    """True when the normalised `host` is an IP address rather than a name."""
    return ":" in host or _ends_in_number(host)


def _parse_cidr(text: str) -> DomainPattern:
    import ipaddress

    address, _, length = text.partition("/")
    if _parse_ip(address) is None:
        raise ValueError(f"{text!r} has a path; write the host name only")
    if not length.isdigit():
        raise ValueError(f"{text!r} is not a valid network: write it as address/prefix-length")
    try:
        network = ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        raise ValueError(f"{text!r} is not a valid network: {exc}") from None
    return DomainPattern("cidr", str(network))


def parse_pattern(text: str) -> DomainPattern:
    """Parse one entry of `allowedDomains`/`deniedDomains`; ValueError names what is wrong."""
    if text == "*":
        raise ValueError("a lone '*' would match every host; list the domains instead")
    if text.startswith("*."):
        rest = text[2:]
        if "*" in rest:
            raise ValueError(f"{text!r}: '*' may only be the whole first label ('*.example.com')")
        base = normalize_host(rest)
        if is_ip_literal(base):
            raise ValueError(f"{text!r}: a wildcard needs a domain name, not an IP address")
        return DomainPattern("wildcard", base)
    if "*" in text:
        raise ValueError(f"{text!r}: '*' may only be the whole first label ('*.example.com')")
    if "/" in text and "://" not in text and not any(ch.isspace() for ch in text):
        return _parse_cidr(text)
    host = normalize_host(text)
    return DomainPattern("ip" if is_ip_literal(host) else "exact", host)


def _address_matches(pattern: DomainPattern, address: IPv4Address | IPv6Address) -> bool:
    import ipaddress

    if pattern.kind == "ip":
        return address == ipaddress.ip_address(pattern.value)
    if pattern.kind == "cidr":
        return address in ipaddress.ip_network(pattern.value)
    return False


def matches(pattern: DomainPattern, host: str) -> bool:
    """Does `host` (already passed through `normalize_host`) fall under `pattern`?"""
    if pattern.kind == "exact":
        return host == pattern.value
    if pattern.kind == "wildcard":
        # The dot keeps `evilexample.com` out of `*.example.com`; rule 3 keeps the apex out.
        return host.endswith("." + pattern.value)
    if not is_ip_literal(host):
        return False
    address = _parse_ip(host)
    return address is not None and _address_matches(pattern, address)


def first_match(patterns: Iterable[DomainPattern], host: str) -> DomainPattern | None:
    """The first pattern that `host` (normalised) matches, or None."""
    for pattern in patterns:
        if matches(pattern, host):
            return pattern
    return None


def address_in(patterns: Iterable[DomainPattern], address: str) -> DomainPattern | None:
    """The first `ip`/`cidr` pattern holding the resolved `address`, or None.

    `address` is what the resolver returned (a zone id such as `%eth0` is ignored);
    ValueError when it is not an IP address at all, which is the caller's bug.
    """
    parsed = _parse_ip(address.partition("%")[0])
    if parsed is None:
        raise ValueError(f"{address!r} is not an IP address")
    for pattern in patterns:
        if _address_matches(pattern, parsed):
            return pattern
    return None
