"""SNI from a TLS ClientHello: real hellos made by the ssl module (no network), split across
reads and across records, and broken ones."""

from __future__ import annotations

import ssl

import pytest

from corral.proxy.tls import MAX_CLIENT_HELLO_BYTES, ClientHello, ClientHelloReader, NotTls
from tests.test_proxy_feed import check_core


def client_hello(server_name: str | None) -> bytes:
    """The first flight of a real TLS client for `server_name` (None: no SNI)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def refragment(hello: bytes, size: int) -> bytes:
    """The same handshake message spread over records of at most `size` payload bytes."""
    header, payload = hello[:5], hello[5:]
    return b"".join(
        header[:3] + len(part).to_bytes(2, "big") + part
        for part in (payload[i : i + size] for i in range(0, len(payload), size))
    )


@pytest.mark.parametrize("name", ["example.com", "xn--bcher-kva.example", "a.b.c.d.example"])
def test_server_name_of_a_real_client_hello(name: str) -> None:
    check_core(ClientHelloReader, client_hello(name), [ClientHello(name)])


def test_no_sni_without_a_name_and_for_an_ip_address() -> None:
    check_core(ClientHelloReader, client_hello(None), [ClientHello(None)])
    check_core(ClientHelloReader, client_hello("127.0.0.1"), [ClientHello(None)])


@pytest.mark.parametrize("size", [1, 7, 100])
def test_hello_split_across_records(size: int) -> None:
    check_core(
        ClientHelloReader,
        refragment(client_hello("example.com"), size),
        [ClientHello("example.com")],
    )


def _hello_with_extensions(extensions: bytes) -> bytes:
    body = (
        b"\x03\x03"
        + b"\x00" * 32
        + b"\x00"  # session id
        + b"\x00\x02\x13\x01"  # one cipher suite
        + b"\x01\x00"  # null compression
        + len(extensions).to_bytes(2, "big")
        + extensions
    )
    message = b"\x01" + len(body).to_bytes(3, "big") + body
    return b"\x16\x03\x01" + len(message).to_bytes(2, "big") + message


def _sni(*entries: tuple[int, bytes]) -> bytes:
    names = b"".join(bytes((kind,)) + len(v).to_bytes(2, "big") + v for kind, v in entries)
    data = len(names).to_bytes(2, "big") + names
    return b"\x00\x00" + len(data).to_bytes(2, "big") + data


BROKEN: list[tuple[bytes, str]] = [
    (b"GET / HTTP/1.1\r\n\r\n", "not a TLS handshake"),
    (b"\x17\x03\x03\x00\x05hello", "not a TLS handshake"),
    (b"\x80\x2e\x01\x00\x02", "not a TLS handshake"),  # SSLv2-style hello
    (b"\x16\x02\x00\x00\x05", "not TLS"),
    (b"\x16\x03\x01\x00\x00", "record of 0 bytes"),
    (b"\x16\x03\x01\x40\x01", "record of 16385 bytes"),
    (b"\x16\x03\x01\x00\x04\x02\x00\x00\x00", "not a ClientHello"),
    (b"\x16\x03\x01\x00\x04\x01\x01\x00\x00", "ClientHello of 65536 bytes"),
    (_hello_with_extensions(_sni((0, b"a.example")) * 2), "appears twice"),
    (_hello_with_extensions(_sni((0, b"a.example"), (0, b"b.example"))), "2 host names"),
    (_hello_with_extensions(_sni((0, "ä.example".encode()))), "not ASCII"),
    (_hello_with_extensions(b"\x00\x00\x00\x09\x00"), "runs past"),
]


@pytest.mark.parametrize(("data", "reason"), BROKEN, ids=repr)
def test_broken_or_foreign_input_is_not_tls(data: bytes, reason: str) -> None:
    reader = ClientHelloReader()
    reader.receive_data(data)
    event = reader.next_event()
    assert isinstance(event, NotTls), event
    assert reason in event.reason


def test_hand_built_hellos() -> None:
    check_core(
        ClientHelloReader,
        _hello_with_extensions(_sni((0, b"x.example"))),
        [ClientHello("x.example")],
    )
    check_core(ClientHelloReader, _hello_with_extensions(b""), [ClientHello(None)])


def test_limit_is_above_real_hellos() -> None:
    assert len(client_hello("example.com")) < MAX_CLIENT_HELLO_BYTES // 8


def test_not_tls_is_known_from_the_first_byte() -> None:
    reader = ClientHelloReader()
    reader.receive_data(b"G")
    assert isinstance(reader.next_event(), NotTls)


def test_closed_mid_hello() -> None:
    hello = client_hello("example.com")
    check_core(
        ClientHelloReader,
        hello[:50],
        [NotTls("connection closed inside the ClientHello")],
        trailing=False,
        eof=True,
    )
