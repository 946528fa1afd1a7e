"""HTTP/1.1 proxy request parsing: tables of accepted and rejected heads and bodies, each fed
whole, byte by byte and with trailing bytes."""

from __future__ import annotations

import pytest

from corral.proxy.http1 import (
    MAX_HEAD_BYTES,
    TRANSITIONS,
    ConnectionClosed,
    ConnectRequest,
    Data,
    EndOfMessage,
    ForwardRequest,
    Rejected,
    RequestParser,
    render_forward_head,
)
from corral.proxy.sansio import PAUSED
from tests.test_proxy_feed import Core, check_core


def _forward(
    target: str,
    host: str,
    port: int = 80,
    *,
    method: str = "GET",
    version: str = "HTTP/1.1",
    headers: tuple[tuple[str, str], ...] = (),
    keep_alive: bool = True,
) -> ForwardRequest:
    return ForwardRequest(method, host, port, target, version, headers, keep_alive)


H_EX = (("Host", "example.com"),)

ACCEPTED: list[tuple[bytes, list[object]]] = [
    (b"CONNECT example.com:443 HTTP/1.1\r\n\r\n", [ConnectRequest("example.com", 443, ())]),
    (
        b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
        [ConnectRequest("example.com", 443, (("Host", "example.com:443"),))],
    ),
    (b"CONNECT [::1]:8443 HTTP/1.1\r\n\r\n", [ConnectRequest("::1", 8443, ())]),
    (b"CONNECT 127.0.0.1:22 HTTP/1.0\r\n\r\n", [ConnectRequest("127.0.0.1", 22, ())]),
    (
        b"GET http://example.com/a/b?q=1 HTTP/1.1\r\nHost: example.com\r\n\r\n",
        [_forward("/a/b?q=1", "example.com", headers=H_EX), EndOfMessage()],
    ),
    (
        b"\r\n\r\nGET http://example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n",
        [_forward("/", "example.com", headers=H_EX), EndOfMessage()],
    ),
    (
        b"GET HTTP://example.com HTTP/1.0\r\n\r\n",
        [_forward("/", "example.com", version="HTTP/1.0", keep_alive=False), EndOfMessage()],
    ),
    (
        b"GET http://example.com?x HTTP/1.1\r\nConnection: close\r\n\r\n",
        [
            _forward("/?x", "example.com", headers=(("Connection", "close"),), keep_alive=False),
            EndOfMessage(),
        ],
    ),
    (
        b"GET http://[::1]:8080/x#frag HTTP/1.1\r\n\r\n",
        [_forward("/x", "::1", 8080), EndOfMessage()],
    ),
    (
        b"GET http://example.com/ HTTP/1.0\r\nProxy-Connection: keep-alive\r\n\r\n",
        [
            _forward(
                "/",
                "example.com",
                version="HTTP/1.0",
                headers=(("Proxy-Connection", "keep-alive"),),
            ),
            EndOfMessage(),
        ],
    ),
    (
        b"POST http://example.com/ HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello",
        [
            _forward("/", "example.com", method="POST", headers=(("Content-Length", "5"),)),
            Data(b"hello"),
            EndOfMessage(),
        ],
    ),
    (
        b"POST http://example.com/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5;ext=1\r\nhello\r\n0\r\nTrailer: x\r\n\r\n",
        [
            _forward(
                "/", "example.com", method="POST", headers=(("Transfer-Encoding", "chunked"),)
            ),
            Data(b"5;ext=1\r\nhello\r\n0\r\nTrailer: x\r\n\r\n"),
            EndOfMessage(),
        ],
    ),
    (
        b"POST http://example.com/ HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
        [
            _forward("/", "example.com", method="POST", headers=(("Content-Length", "0"),)),
            EndOfMessage(),
        ],
    ),
]


@pytest.mark.parametrize(("data", "expected"), ACCEPTED, ids=repr)
def test_accepted_requests(data: bytes, expected: list[object]) -> None:
    check_core(RequestParser, data, expected)


REJECTED: list[tuple[bytes, int, str]] = [
    (b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n", 400, "not a proxy request"),
    (b"OPTIONS * HTTP/1.1\r\n\r\n", 400, "not a proxy request"),
    (b"GET https://example.com/ HTTP/1.1\r\n\r\n", 400, "only http://"),
    (b"GET ftp://example.com/ HTTP/1.1\r\n\r\n", 400, "only http://"),
    (b"GET http://allowed.test@evil.test/ HTTP/1.1\r\n\r\n", 400, "user info"),
    (b"GET http:///path HTTP/1.1\r\n\r\n", 400, "empty host"),
    (b"GET http://example.com:99999/ HTTP/1.1\r\n\r\n", 400, "port"),
    (b"CONNECT ::1:443 HTTP/1.1\r\n\r\n", 400, "brackets"),
    (b"CONNECT [::1 HTTP/1.1\r\n\r\n", 400, "without ']'"),
    (b"CONNECT example.com HTTP/1.1\r\n\r\n", 400, "port is required"),
    (b"CONNECT example.com: HTTP/1.1\r\n\r\n", 400, "port"),
    (b"CONNECT example.com:+443 HTTP/1.1\r\n\r\n", 400, "port"),
    (b"CONNECT example.com:4_43 HTTP/1.1\r\n\r\n", 400, "port"),
    (b"CONNECT example.com:0 HTTP/1.1\r\n\r\n", 400, "port"),
    (b"CONNECT example.com:443 HTTP/2.0\r\n\r\n", 505, "version"),
    (b"CONNECT example.com:443 HTTP/1.1 \r\n\r\n", 400, "request line"),
    (b"GET  http://example.com/ HTTP/1.1\r\n\r\n", 400, "request line"),
    (b"G(T http://example.com/ HTTP/1.1\r\n\r\n", 400, "method"),
    (b"CONNECT B\xc3\xbccher.example:443 HTTP/1.1\r\n\r\n", 400, "target"),
    (b"GET http://example.com/ HTTP/1.1\nHost: x\r\n\r\n", 400, "bare LF"),
    (b"GET http://example.com/ HTTP/1.1\n\n", 400, "bare LF"),
    (b"GET http://example.com/ HTTP/1.1\r\nHost : x\r\n\r\n", 400, "header line"),
    (b"GET http://example.com/ HTTP/1.1\r\nA: b\r\n c\r\n\r\n", 400, "header line"),
    (b"GET http://example.com/ HTTP/1.1\r\nA: b\x00c\r\n\r\n", 400, "control"),
    (b"GET http://example.com/ HTTP/1.1\r\nA: b\rc\r\n\r\n", 400, "control"),
    (
        b"POST http://e.com/ HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        400,
        "differing",
    ),
    (b"POST http://e.com/ HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400, "Content-Length"),
    (
        b"POST http://e.com/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
        400,
        "both",
    ),
    (b"POST http://e.com/ HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", 400, "Transfer-Enc"),
    (
        b"POST http://e.com/ HTTP/1.1\r\nTransfer-Encoding: chunked, chunked\r\n\r\n",
        400,
        "Transfer-Enc",
    ),
]


@pytest.mark.parametrize(("data", "status", "reason"), REJECTED, ids=repr)
def test_rejected_requests(data: bytes, status: int, reason: str) -> None:
    core = check_core(RequestParser, data, [_AnyRejected(status, reason)], trailing=False)
    assert core.next_event() is PAUSED


class _AnyRejected:
    """Equal to a Rejected event with this status whose reason contains `fragment`."""

    def __init__(self, status: int, fragment: str) -> None:
        self.status = status
        self.fragment = fragment

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Rejected)
            and other.status == self.status
            and self.fragment in other.reason
        )

    def __hash__(self) -> int:
        return hash(self.status)

    def __repr__(self) -> str:
        return f"Rejected({self.status}, *{self.fragment}*)"


# (body, the part passed on before the fault, reason)
BAD_BODIES = [
    (b"3\r\nabcXY", b"3\r\nabc", "CRLF"),
    (b"zz\r\n", b"", "chunk size"),
    (b"1\r\na\r\n12345678901234567\r\n", b"1\r\na\r\n", "chunk size"),
    (b"5" + b";x" * 3000 + b"\r\n", b"", "too long"),
    (b"0\r\nA: b\nc\r\n", b"0\r\n", "bare CR or LF"),
]


@pytest.mark.parametrize(("body", "passed", "reason"), BAD_BODIES, ids=repr)
def test_bad_chunked_bodies(body: bytes, passed: bytes, reason: str) -> None:
    head = b"POST http://e.com/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
    request = _forward("/", "e.com", method="POST", headers=(("Transfer-Encoding", "chunked"),))
    expected = [request, *([Data(passed)] if passed else []), _AnyRejected(400, reason)]
    events = check_core(RequestParser, head + body, expected, trailing=False)
    assert events.next_event() is PAUSED


def _head_of(size: int) -> bytes:
    start = b"GET http://example.com/ HTTP/1.1\r\nX-Fill: "
    return start + b"a" * (size - len(start) - 4) + b"\r\n\r\n"


def test_head_of_exactly_the_limit_is_accepted() -> None:
    head = _head_of(MAX_HEAD_BYTES)
    core = RequestParser()
    core.receive_data(head)
    event = core.next_event()
    assert isinstance(event, ForwardRequest)


@pytest.mark.parametrize("extra", [1, 1000])
def test_head_past_the_limit_gets_431(extra: int) -> None:
    check_core(
        RequestParser,
        _head_of(MAX_HEAD_BYTES + extra),
        [_AnyRejected(431, "larger than")],
        trailing=False,
    )


def test_head_without_end_past_the_limit_gets_431_before_it_ends() -> None:
    core = RequestParser()
    core.receive_data(b"GET http://example.com/ HTTP/1.1\r\nX: " + b"a" * MAX_HEAD_BYTES)
    assert core.next_event() == _AnyRejected(431, "larger than")


def test_closed_between_requests_and_inside_a_head() -> None:
    check_core(RequestParser, b"", [ConnectionClosed()], trailing=False, eof=True)
    check_core(
        RequestParser,
        b"GET http://e.com/ HTTP/1.1\r\n",
        [_AnyRejected(400, "closed inside")],
        trailing=False,
        eof=True,
    )
    request = _forward("/", "e.com", method="POST", headers=(("Content-Length", "9"),))
    check_core(
        RequestParser,
        b"POST http://e.com/ HTTP/1.1\r\nContent-Length: 9\r\n\r\nabc",
        [request, Data(b"abc"), _AnyRejected(400, "closed inside")],
        trailing=False,
        eof=True,
    )


def _next_request(core: Core, last: object) -> bool:
    assert isinstance(core, RequestParser)
    if isinstance(last, EndOfMessage) and core.keep_alive:
        core.start_next_request()
        return True
    return False


def test_keep_alive_carries_several_requests_to_different_hosts() -> None:
    data = (
        b"GET http://a.example/1 HTTP/1.1\r\n\r\n"
        b"POST http://b.example:8080/2 HTTP/1.1\r\nContent-Length: 2\r\n\r\nhi"
        b"GET http://a.example/3 HTTP/1.1\r\nConnection: close\r\n\r\n"
    )
    expected = [
        _forward("/1", "a.example"),
        EndOfMessage(),
        _forward("/2", "b.example", 8080, method="POST", headers=(("Content-Length", "2"),)),
        Data(b"hi"),
        EndOfMessage(),
        _forward("/3", "a.example", headers=(("Connection", "close"),), keep_alive=False),
        EndOfMessage(),
    ]
    core = check_core(RequestParser, data, expected, respond=_next_request)
    assert isinstance(core, RequestParser)
    assert core.state == "done"
    with pytest.raises(RuntimeError):
        core.start_next_request()


def test_tunnel_bytes_after_connect_are_left_for_the_tunnel() -> None:
    core = RequestParser()
    core.receive_data(b"CONNECT e.com:443 HTTP/1.1\r\n\r\n\x16\x03\x01hello")
    assert core.next_event() == ConnectRequest("e.com", 443, ())
    assert core.next_event() is PAUSED
    assert core.take_trailing_data() == b"\x16\x03\x01hello"
    assert core.state == "tunnel"


def test_transition_table_names_every_state_and_event() -> None:
    states = set(TRANSITIONS)
    for edges in TRANSITIONS.values():
        assert set(edges.values()) <= states
    assert {"idle", "body", "done", "tunnel", "closed", "error"} == states


def test_forward_head_is_origin_form_without_proxy_headers() -> None:
    request = _forward(
        "/p?q",
        "example.com",
        8080,
        headers=(("Proxy-Connection", "keep-alive"), ("Proxy-Authorization", "x"), ("A", "b")),
    )
    assert render_forward_head(request) == (
        b"GET /p?q HTTP/1.1\r\nHost: example.com:8080\r\nA: b\r\n\r\n"
    )
    with_host = _forward("/", "::1", headers=(("Host", "[::1]"),))
    assert render_forward_head(with_host) == b"GET / HTTP/1.1\r\nHost: [::1]\r\n\r\n"
    bare = _forward("/", "::1", version="HTTP/1.0", keep_alive=False)
    assert render_forward_head(bare) == b"GET / HTTP/1.0\r\nHost: [::1]\r\n\r\n"
