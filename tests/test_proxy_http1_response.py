"""Response framing: where one response ends, so a kept-alive connection can carry the next."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from corral.proxy.http1_body import (
    Data,
    EndOfMessage,
    Rejected,
    ResponseHead,
    ResponseReader,
)
from tests.test_proxy_feed import Core, check_core


def _reader(method: str = "GET") -> Callable[[], Core]:
    return lambda: ResponseReader(method)


class _Head:
    """Equal to a ResponseHead with this status and keep-alive flag."""

    def __init__(self, status: int, *, keep_alive: bool = True) -> None:
        self.status = status
        self.keep_alive = keep_alive

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ResponseHead) and (other.status, other.keep_alive) == (
            self.status,
            self.keep_alive,
        )

    def __hash__(self) -> int:
        return self.status

    def __repr__(self) -> str:
        return f"Head({self.status}, keep_alive={self.keep_alive})"


FRAMED: list[tuple[str, bytes, list[object]]] = [
    (
        "GET",
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc",
        [_Head(200), Data(b"abc"), EndOfMessage()],
    ),
    (
        "GET",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        [_Head(200), Data(b"3\r\nabc\r\n0\r\n\r\n"), EndOfMessage()],
    ),
    ("HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n", [_Head(200), EndOfMessage()]),
    ("GET", b"HTTP/1.1 204 No Content\r\n\r\n", [_Head(204), EndOfMessage()]),
    (
        "GET",
        b"HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n",
        [_Head(304), EndOfMessage()],
    ),
    (
        "POST",
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
        [_Head(100), _Head(200), EndOfMessage()],
    ),
    (
        "GET",
        b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 1\r\n\r\nx",
        [_Head(200), Data(b"x"), EndOfMessage()],
    ),
    (
        "GET",
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\nx",
        [_Head(200, keep_alive=False), Data(b"x"), EndOfMessage()],
    ),
    ("GET", b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n", [_Head(101)]),
]


@pytest.mark.parametrize(("method", "data", "expected"), FRAMED, ids=repr)
def test_framed_responses(method: str, data: bytes, expected: list[object]) -> None:
    check_core(_reader(method), data, expected)


def test_body_until_close_ends_with_the_connection() -> None:
    data = b"HTTP/1.1 200 OK\r\n\r\nall of it"
    expected = [_Head(200, keep_alive=False), Data(b"all of it"), EndOfMessage()]
    check_core(_reader(), data, expected, trailing=False, eof=True)


BROKEN = [
    b"HTTP/2 200 OK\r\n\r\n",
    b"HTTP/1.1 2x0 OK\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 1, 2\r\n\r\n",
]


@pytest.mark.parametrize("data", BROKEN, ids=repr)
def test_broken_responses_get_502(data: bytes) -> None:
    core = ResponseReader("GET")
    core.receive_data(data)
    event = core.next_event()
    assert isinstance(event, Rejected) and event.status == 502


def test_upstream_closing_mid_body_is_reported() -> None:
    core = ResponseReader("GET")
    core.receive_data(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    core.receive_data(b"")
    events = [core.next_event(), core.next_event(), core.next_event()]
    assert events[1] == Data(b"abc")
    assert isinstance(events[2], Rejected) and events[2].status == 502
