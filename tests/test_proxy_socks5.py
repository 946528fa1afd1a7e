"""SOCKS5 server core: greetings and requests fed whole, byte by byte and with trailing bytes."""

from __future__ import annotations

import pytest

from corral.proxy import socks5
from corral.proxy.sansio import PAUSED, NeedData, Paused
from corral.proxy.socks5 import (
    ConnectRequest,
    Greeting,
    MethodSelection,
    ProtocolError,
    Reply,
    Socks5Server,
    Unsupported,
)
from tests.test_proxy_feed import Core, check_core

HELLO = b"\x05\x01\x00"
IPV6_LOOPBACK = b"\x00" * 15 + b"\x01"


def _answer(core: Core, last: object) -> bool:
    """Play the server: accept no-auth, grant CONNECT, refuse the rest."""
    assert isinstance(core, Socks5Server)
    if isinstance(last, Greeting) and core.state == "choosing":
        method = socks5.NO_AUTH if last.offers_no_auth else socks5.NO_ACCEPTABLE_METHODS
        core.send(MethodSelection(method))
        return True
    if isinstance(last, ConnectRequest) and core.state == "replying":
        core.send(Reply(socks5.SUCCEEDED))
    elif isinstance(last, Unsupported) and core.state == "replying":
        core.send(Reply(last.reply))
    return False


def _request(command: int, address_type: int, address: bytes, port: int) -> bytes:
    return bytes((5, command, 0, address_type)) + address + port.to_bytes(2, "big")


def _domain(name: bytes) -> bytes:
    return bytes((len(name),)) + name


ACCEPTED: list[tuple[bytes, list[object]]] = [
    (
        HELLO + _request(1, 3, _domain(b"example.com"), 443),
        [Greeting((0,)), ConnectRequest("example.com", 443, 3)],
    ),
    (
        b"\x05\x02\x02\x00" + _request(1, 1, b"\x7f\x00\x00\x01", 80),
        [Greeting((2, 0)), ConnectRequest("127.0.0.1", 80, 1)],
    ),
    (
        HELLO + _request(1, 4, IPV6_LOOPBACK, 8080),
        [Greeting((0,)), ConnectRequest("::1", 8080, 4)],
    ),
    (
        HELLO + _request(1, 3, _domain("bücher.example".encode()), 443),
        [Greeting((0,)), ConnectRequest("bücher.example", 443, 3)],
    ),
    (
        HELLO + _request(1, 3, _domain(b"a" * 255), 1),
        [Greeting((0,)), ConnectRequest("a" * 255, 1, 3)],
    ),
]


@pytest.mark.parametrize(("data", "expected"), ACCEPTED, ids=repr)
def test_connect_requests(data: bytes, expected: list[object]) -> None:
    core = check_core(Socks5Server, data, expected, respond=_answer)
    assert isinstance(core, Socks5Server)
    assert core.state == "tunnel"


REFUSED: list[tuple[bytes, int, str]] = [
    (
        HELLO + _request(2, 1, b"\x7f\x00\x00\x01", 80),
        socks5.COMMAND_NOT_SUPPORTED,
        "BIND is not supported",
    ),
    (
        HELLO + _request(3, 1, b"\x00" * 4, 0),
        socks5.COMMAND_NOT_SUPPORTED,
        "UDP ASSOCIATE is not supported",
    ),
    (
        HELLO + _request(9, 3, _domain(b"e.com"), 80),
        socks5.COMMAND_NOT_SUPPORTED,
        "command 9 is not supported",
    ),
    (HELLO + _request(1, 1, b"\x7f\x00\x00\x01", 0), socks5.GENERAL_FAILURE, "port 0"),
]


@pytest.mark.parametrize(("data", "reply", "reason"), REFUSED, ids=repr)
def test_refused_commands_get_their_reply_code(data: bytes, reply: int, reason: str) -> None:
    expected = [Greeting((0,)), Unsupported(reply, reason)]
    core = check_core(Socks5Server, data, expected, respond=_answer)
    assert isinstance(core, Socks5Server)
    assert core.state == "closed"


def test_unknown_address_type_gets_08_and_ends_the_conversation() -> None:
    data = HELLO + b"\x05\x01\x00\x05\x01\x02\x03"
    expected = [Greeting((0,)), Unsupported(socks5.ADDRESS_TYPE_NOT_SUPPORTED, "address type 5")]
    core = check_core(Socks5Server, data, expected, respond=_answer, trailing=False)
    assert isinstance(core, Socks5Server)
    assert core.state == "closed"


BROKEN: list[tuple[bytes, str]] = [
    (b"\x04\x01\x00\x50\x7f\x00\x00\x01\x00", "not SOCKS5"),
    (b"GET http://example.com/ HTTP/1.1\r\n\r\n", "not SOCKS5"),
    (b"\x05\x00", "no methods"),
    (HELLO + b"\x04\x01\x00\x01", "version byte 4"),
    (HELLO + b"\x05\x01\x01\x01\x7f\x00\x00\x01\x00\x50", "reserved"),
    (HELLO + _request(1, 3, b"\x00", 80), "empty domain"),
    (HELLO + _request(1, 3, _domain(b"\xff\xfe"), 80), "UTF-8"),
]


@pytest.mark.parametrize(("data", "reason"), BROKEN, ids=repr)
def test_broken_handshakes_are_protocol_errors(data: bytes, reason: str) -> None:
    core = Socks5Server()
    events: list[object] = []
    core.receive_data(data)
    while not isinstance(event := core.next_event(), NeedData | Paused):
        events.append(event)
        _answer(core, event)
    assert isinstance(events[-1], ProtocolError) and reason in events[-1].reason
    assert core.state == "error"


def test_closing_mid_handshake_is_a_protocol_error() -> None:
    expected = [Greeting((0,)), ProtocolError("connection closed during the handshake")]
    check_core(
        Socks5Server,
        HELLO + b"\x05\x01\x00\x03\x05ab",
        expected,
        respond=_answer,
        trailing=False,
        eof=True,
    )


def test_no_acceptable_method_is_answered_with_ff_and_closes() -> None:
    core = Socks5Server()
    core.receive_data(b"\x05\x01\x02")
    event = core.next_event()
    assert event == Greeting((2,))
    assert core.send(MethodSelection(socks5.NO_ACCEPTABLE_METHODS)) == b"\x05\xff"
    assert core.state == "closed"
    assert core.next_event() is PAUSED


REPLIES = [
    (Reply(socks5.SUCCEEDED), b"\x05\x00\x00\x01\x00\x00\x00\x00\x00\x00"),
    (Reply(socks5.NOT_ALLOWED_BY_RULESET), b"\x05\x02\x00\x01\x00\x00\x00\x00\x00\x00"),
    (Reply(socks5.SUCCEEDED, "::1", 1080), b"\x05\x00\x00\x04" + IPV6_LOOPBACK + b"\x04\x38"),
]


@pytest.mark.parametrize(("reply", "wire"), REPLIES, ids=repr)
def test_replies_on_the_wire(reply: Reply, wire: bytes) -> None:
    core = Socks5Server()
    core.receive_data(HELLO + _request(1, 3, _domain(b"e.com"), 443))
    core.next_event()
    core.send(MethodSelection(socks5.NO_AUTH))
    core.next_event()
    assert core.send(reply) == wire


def test_sending_out_of_turn_is_a_driver_bug() -> None:
    core = Socks5Server()
    with pytest.raises(RuntimeError, match="not allowed in state greeting"):
        core.send(Reply(socks5.SUCCEEDED))


def test_transition_table_is_closed() -> None:
    states = set(socks5.TRANSITIONS)
    for edges in socks5.TRANSITIONS.values():
        assert set(edges.values()) <= states
