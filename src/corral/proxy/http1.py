"""HTTP/1.1 proxy requests, without sockets: CONNECT and absolute-URI requests (RFC 9112).

A client of an HTTP proxy sends either `CONNECT host:port HTTP/1.1` (then the connection becomes
a tunnel) or `GET http://host/path HTTP/1.1` (the proxy forwards it to the host, rewritten to
`GET /path`). `RequestParser` turns received bytes into events; the driver answers, forwards
and calls `start_next_request()` when a kept-alive connection may carry the next request.

States and their legal transitions are one table, `TRANSITIONS`; `next_event` follows it and
tests read it. Rules:
1. The head (request line and headers) is at most `MAX_HEAD_BYTES`; larger gets 431.
2. Only proxy forms are accepted: an origin-form request (`GET /`) is not meant for a proxy and
   gets 400, as do user info in the URI (`http://allowed@evil/` reads two ways), schemes other
   than http and versions other than HTTP/1.0 and HTTP/1.1.
3. `host:port` is split by `split_authority`, so `[::1]:80` works and `::1:80` is refused.
4. Body framing follows `http1_body` (ambiguity is refused). CONNECT has no body: whatever
   follows its head belongs to the tunnel and stays in `trailing_data`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from corral.proxy.http1_body import (
    MAX_HEAD_BYTES,
    BodyReader,
    ChunkedReader,
    ConnectionClosed,
    ContentLengthReader,
    Data,
    EndOfMessage,
    FramingError,
    Headers,
    Rejected,
    chunked_or_none,
    content_length,
    has_token,
    header_values,
    is_token,
    parse_header_lines,
    take_head,
)
from corral.proxy.sansio import NEED_DATA, PAUSED, NeedData, Paused, ReceiveBuffer, split_authority

__all__ = [
    "MAX_HEAD_BYTES",
    "TRANSITIONS",
    "ConnectRequest",
    "ConnectionClosed",
    "Data",
    "EndOfMessage",
    "ForwardRequest",
    "Rejected",
    "RequestParser",
    "render_forward_head",
]

State = Literal["idle", "body", "done", "tunnel", "closed", "error"]
EventName = Literal[
    "ConnectRequest", "ForwardRequest", "Data", "EndOfMessage", "Rejected", "ConnectionClosed"
]

# (state, event the parser produced) -> next state. "done" waits for the driver: after the
# response, `start_next_request()` goes back to "idle" (keep-alive) or the driver closes.
TRANSITIONS: dict[State, dict[EventName, State]] = {
    "idle": {
        "ConnectRequest": "tunnel",
        "ForwardRequest": "body",
        "ConnectionClosed": "closed",
        "Rejected": "error",
    },
    "body": {"Data": "body", "EndOfMessage": "done", "Rejected": "error"},
    "done": {},
    "tunnel": {},
    "closed": {},
    "error": {},
}

HTTP_DEFAULT_PORT = 80
_VERSIONS = (b"HTTP/1.1", b"HTTP/1.0")


@dataclass(frozen=True, slots=True)
class ConnectRequest:
    host: str
    """As the client wrote it, IPv6 brackets removed; `decision` normalises it."""
    port: int
    headers: Headers


@dataclass(frozen=True, slots=True)
class ForwardRequest:
    method: str
    host: str
    port: int
    target: str
    """Origin-form: path and query, what the upstream server is sent."""
    version: str
    headers: Headers
    keep_alive: bool


RequestEvent = ConnectRequest | ForwardRequest | Data | EndOfMessage | Rejected | ConnectionClosed
_EVENT_NAMES: dict[type[RequestEvent], EventName] = {
    ConnectRequest: "ConnectRequest",
    ForwardRequest: "ForwardRequest",
    Data: "Data",
    EndOfMessage: "EndOfMessage",
    Rejected: "Rejected",
    ConnectionClosed: "ConnectionClosed",
}


class RequestParser:
    def __init__(self) -> None:
        self._buffer = ReceiveBuffer()
        self._body: BodyReader | None = None
        self.state: State = "idle"
        self.keep_alive = True
        """False once a request asked to close; the driver then closes after the response."""

    def receive_data(self, data: bytes) -> None:
        """Bytes from the client; b"" when it closed its side."""
        self._buffer.append(data)

    @property
    def trailing_data(self) -> bytes:
        """Bytes received after the last event: tunnel data after CONNECT, the next pipelined
        request while "done"."""
        return bytes(self._buffer)

    def take_trailing_data(self) -> bytes:
        return self._buffer.take_all()

    def start_next_request(self) -> None:
        """The response to the last request is complete; read the next one."""
        if self.state != "done" or not self.keep_alive:
            raise RuntimeError(f"cannot start another request in state {self.state}")
        self.state = "idle"

    def next_event(self) -> RequestEvent | NeedData | Paused:
        if self.state not in ("idle", "body"):
            return PAUSED
        event: RequestEvent | NeedData
        try:
            event = self._read_head() if self.state == "idle" else self._read_body()
        except FramingError as exc:
            event = Rejected(exc.status, exc.reason)
        if isinstance(event, NeedData):
            return event
        self.state = TRANSITIONS[self.state][_EVENT_NAMES[type(event)]]
        return event

    def _read_head(self) -> ConnectRequest | ForwardRequest | ConnectionClosed | NeedData:
        # RFC 9112 section 2.2: ignore empty lines before a request (some clients send CRLF
        # after a body).
        while self._buffer.peek(2) == b"\r\n":
            self._buffer.take(2)
        head = take_head(self._buffer, too_large=431)
        if head is None:
            if not self._buffer.closed:
                return NEED_DATA
            if len(self._buffer):
                raise FramingError(400, "connection closed inside a request head")
            return ConnectionClosed()
        request_line, *lines = head[:-4].split(b"\r\n")
        method, target, version = _split_request_line(request_line)
        headers = parse_header_lines(lines, status=400)
        if method == "CONNECT":
            host, port = _parse_connect_target(target)
            return ConnectRequest(host, port, headers)
        return self._forward_request(method, target, version, headers)

    def _forward_request(
        self, method: str, target: str, version: bytes, headers: Headers
    ) -> ForwardRequest:
        host, port, path = _parse_absolute_uri(target)
        self._body = _request_body_reader(headers)
        keep_alive = not (
            has_token(headers, "connection", "close")
            or has_token(headers, "proxy-connection", "close")
        )
        if version == b"HTTP/1.0":
            keep_alive = has_token(headers, "connection", "keep-alive") or has_token(
                headers, "proxy-connection", "keep-alive"
            )
        self.keep_alive = keep_alive
        return ForwardRequest(method, host, port, path, version.decode(), headers, keep_alive)

    def _read_body(self) -> Data | EndOfMessage | NeedData:
        assert self._body is not None
        if self._body.done:
            return EndOfMessage()
        data = self._body.read(self._buffer)
        return Data(data) if data else NEED_DATA


def _split_request_line(line: bytes) -> tuple[str, str, bytes]:
    parts = line.split(b" ")
    if len(parts) != 3:
        raise FramingError(400, f"malformed request line {line[:60]!r}")
    method, target, version = parts
    if not is_token(method):
        raise FramingError(400, f"malformed method {method[:20]!r}")
    if version not in _VERSIONS:
        if version.startswith(b"HTTP/"):
            raise FramingError(505, f"HTTP version {version[:20]!r} is not supported")
        raise FramingError(400, f"malformed request line {line[:60]!r}")
    if not target or any(ch <= 0x20 or ch >= 0x7F for ch in target):
        raise FramingError(400, "malformed request target")
    return method.decode("ascii"), target.decode("ascii"), version


def _parse_connect_target(target: str) -> tuple[str, int]:
    try:
        host, port = split_authority(target)
    except ValueError as exc:
        raise FramingError(400, f"CONNECT target: {exc}") from None
    return host, port


def _parse_absolute_uri(target: str) -> tuple[str, int, str]:
    if target.startswith("/") or target == "*":
        raise FramingError(400, "not a proxy request: the target has no host")
    scheme, sep, rest = target.partition("://")
    if not sep or scheme.lower() != "http":
        raise FramingError(400, f"only http:// URIs can be forwarded, not {target[:40]!r}")
    cut = min((i for i in (rest.find("/"), rest.find("?"), rest.find("#")) if i >= 0), default=-1)
    authority, path = (rest, "") if cut < 0 else (rest[:cut], rest[cut:])
    if "@" in authority:
        # http://allowed.example@evil.example/ names evil.example; refuse rather than pick.
        raise FramingError(400, "user info in the request URI")
    try:
        host, port = split_authority(authority, default_port=HTTP_DEFAULT_PORT)
    except ValueError as exc:
        raise FramingError(400, f"request URI: {exc}") from None
    path = path.partition("#")[0]
    if not path.startswith("/"):
        path = "/" + path
    return host, port, path


def _request_body_reader(headers: Headers) -> BodyReader:
    if chunked_or_none(headers, status=400):
        return ChunkedReader()
    return ContentLengthReader(content_length(headers, status=400) or 0)


# Meant for this proxy, not for the server: never forwarded.
_PROXY_ONLY_HEADERS = frozenset({"proxy-connection", "proxy-authorization"})


def render_forward_head(request: ForwardRequest) -> bytes:
    """The head the upstream server is sent: origin-form target, proxy-only headers dropped,
    a Host header added for HTTP/1.0 clients that sent none."""
    lines = [f"{request.method} {request.target} {request.version}"]
    if not header_values(request.headers, "host"):
        host = f"[{request.host}]" if ":" in request.host else request.host
        lines.append(f"Host: {host}" if request.port == 80 else f"Host: {host}:{request.port}")
    lines.extend(
        f"{name}: {value}"
        for name, value in request.headers
        if name.lower() not in _PROXY_ONLY_HEADERS
    )
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
