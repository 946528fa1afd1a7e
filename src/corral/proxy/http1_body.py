"""HTTP/1.1 message bodies and response heads, without sockets (RFC 9112 sections 6 and 7).

The proxy passes bodies through unchanged, so the readers here only find where a message ends:
each returns the raw bytes it consumed (chunk framing included) and says when it is done. The
response side reads a status line and headers to learn how the body is framed (section 6.3),
so that a kept-alive client connection knows where one response stops and the next starts.

Rule: a message whose framing is ambiguous is refused, never guessed at. Transfer-Encoding
together with Content-Length, differing Content-Length values and unknown transfer codings are
how request smuggling starts (RFC 9112 section 6.3, rule 3; CVE-2019-18277 and friends).
"""

from __future__ import annotations

from dataclasses import dataclass

from corral.proxy.sansio import NEED_DATA, PAUSED, NeedData, Paused, ReceiveBuffer

# The status line plus headers of a request or a response, CRLFs included. Larger heads get
# 431 (requests) or 502 (responses). 32 KiB holds real-world cookies; h11 allows 16 KiB.
MAX_HEAD_BYTES = 32 * 1024
# A chunk-size line with extensions. Extensions are rare and short; a long line is an attack.
MAX_CHUNK_LINE_BYTES = 4 * 1024
# 16 hex digits is 2**64: beyond that a size cannot be meant.
MAX_CHUNK_SIZE_DIGITS = 16

_TOKEN_CHARS = frozenset(
    b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
)
_HEX = frozenset(b"0123456789abcdefABCDEF")

Headers = tuple[tuple[str, str], ...]


class FramingError(Exception):
    """Internal: a head or body cannot be read. Cores turn it into a `Rejected` event."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Data:
    data: bytes


@dataclass(frozen=True, slots=True)
class EndOfMessage:
    pass


@dataclass(frozen=True, slots=True)
class Rejected:
    """The peer sent something this core will not accept. `status` is the HTTP status the
    proxy answers with (400, 431, 501, 502...)."""

    status: int
    reason: str


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The peer closed the connection between messages: nothing was lost."""


def take_head(buffer: ReceiveBuffer, *, too_large: int) -> bytes | None:
    """The head (up to and including the blank line) if complete; None when more is needed.

    Raises FramingError(too_large) past MAX_HEAD_BYTES and 400 for a bare LF line end, which
    some servers treat as a line end and others do not.
    """
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        if len(buffer) > MAX_HEAD_BYTES:
            raise FramingError(too_large, f"head larger than {MAX_HEAD_BYTES} bytes")
        if buffer.find(b"\n\n") >= 0 or buffer.find(b"\n\r\n") >= 0:
            raise FramingError(400, "line ended by a bare LF")
        return None
    if end + 4 > MAX_HEAD_BYTES:
        raise FramingError(too_large, f"head larger than {MAX_HEAD_BYTES} bytes")
    head = buffer.take(end + 4)
    if head.count(b"\n") != head.count(b"\r\n"):
        raise FramingError(400, "line ended by a bare LF")
    return head


def is_token(text: bytes) -> bool:
    return bool(text) and all(ch in _TOKEN_CHARS for ch in text)


def parse_header_lines(lines: list[bytes], *, status: int) -> Headers:
    """Header fields as (name, value) in order. Folded lines, space before the colon and
    control characters are refused (RFC 9112 section 5)."""
    headers: list[tuple[str, str]] = []
    for line in lines:
        name, colon, value = line.partition(b":")
        if not colon or not is_token(name):
            raise FramingError(status, f"malformed header line {line[:40]!r}")
        value = value.strip(b" \t")
        if any((ch < 0x20 and ch != 0x09) or ch == 0x7F for ch in value):
            raise FramingError(status, f"control character in header {name.decode()!r}")
        headers.append((name.decode("ascii"), value.decode("latin-1")))
    return tuple(headers)


def header_values(headers: Headers, name: str) -> list[str]:
    """All values of `name` (case-insensitive), comma-separated lists split and stripped."""
    wanted = name.lower()
    values: list[str] = []
    for key, value in headers:
        if key.lower() == wanted:
            values.extend(part.strip() for part in value.split(","))
    return [value for value in values if value]


def has_token(headers: Headers, name: str, token: str) -> bool:
    return token in (value.lower() for value in header_values(headers, name))


class ContentLengthReader:
    def __init__(self, length: int) -> None:
        self.remaining = length

    @property
    def done(self) -> bool:
        return self.remaining == 0

    def read(self, buffer: ReceiveBuffer) -> bytes:
        if buffer.closed and not len(buffer):
            raise FramingError(400, "connection closed inside a message body")
        data = buffer.take(min(self.remaining, len(buffer)))
        self.remaining -= len(data)
        return data


class UntilCloseReader:
    """A response body without a length: it ends when the server closes (RFC 9112 6.3 rule 8)."""

    def __init__(self) -> None:
        self.done = False

    def read(self, buffer: ReceiveBuffer) -> bytes:
        data = buffer.take_all()
        if buffer.closed:
            self.done = True
        return data


class ChunkedReader:
    """Finds the end of a chunked body (RFC 9112 section 7.1) and returns it unchanged."""

    def __init__(self) -> None:
        self.done = False
        self._chunk_left = 0
        self._stage = "size"  # size -> data -> crlf -> size ... -> trailers
        self._trailer_bytes = 0
        self._error: FramingError | None = None

    def read(self, buffer: ReceiveBuffer) -> bytes:
        if self._error is not None:
            raise self._error
        out = bytearray()
        while not self.done:
            try:
                piece = self._step(buffer)
            except FramingError as exc:
                if not out:
                    raise
                # Pass on the good bytes first, however the input was split; fail next time.
                self._error = exc
                break
            if piece is None:
                break
            out += piece
        if not out and not self.done and buffer.closed:
            raise FramingError(400, "connection closed inside a chunked body")
        return bytes(out)

    def _step(self, buffer: ReceiveBuffer) -> bytes | None:
        if self._stage == "data":
            data = buffer.take(min(self._chunk_left, len(buffer)))
            self._chunk_left -= len(data)
            if self._chunk_left == 0:
                self._stage = "crlf"
            return data or None
        if self._stage == "crlf":
            if len(buffer) < 2:
                return None
            if buffer.peek(2) != b"\r\n":
                raise FramingError(400, "chunk data not followed by CRLF")
            self._stage = "size"
            return buffer.take(2)
        line = self._take_line(buffer)
        if line is None:
            return None
        if self._stage == "size":
            self._start_chunk(line)
        elif line == b"\r\n":
            self.done = True
        return line

    def _take_line(self, buffer: ReceiveBuffer) -> bytes | None:
        end = buffer.find(b"\r\n")
        limit = MAX_CHUNK_LINE_BYTES if self._stage == "size" else MAX_HEAD_BYTES
        if end < 0:
            if len(buffer) > limit:
                raise FramingError(400, "chunk line too long")
            return None
        if end + 2 > limit:
            raise FramingError(400, "chunk line too long")
        line = buffer.take(end + 2)
        if b"\n" in line[:-1] or b"\r" in line[:-2]:
            raise FramingError(400, "bare CR or LF in a chunk line")
        if self._stage == "trailers":
            self._trailer_bytes += len(line)
            if self._trailer_bytes > MAX_HEAD_BYTES:
                raise FramingError(400, "trailers too large")
        return line

    def _start_chunk(self, line: bytes) -> None:
        size_text = line[:-2].partition(b";")[0].rstrip(b" \t")
        if not size_text or len(size_text) > MAX_CHUNK_SIZE_DIGITS:
            raise FramingError(400, f"bad chunk size {size_text[:20]!r}")
        if not all(ch in _HEX for ch in size_text):
            raise FramingError(400, f"bad chunk size {size_text[:20]!r}")
        self._chunk_left = int(size_text, 16)
        self._stage = "data" if self._chunk_left else "trailers"


BodyReader = ContentLengthReader | ChunkedReader | UntilCloseReader


def content_length(headers: Headers, *, status: int) -> int | None:
    values = header_values(headers, "content-length")
    if not values:
        return None
    if len(set(values)) != 1:
        raise FramingError(status, "differing Content-Length values")
    text = values[0]
    if not (text.isascii() and text.isdigit()) or len(text) > 18:
        raise FramingError(status, f"bad Content-Length {text[:20]!r}")
    return int(text)


def chunked_or_none(headers: Headers, *, status: int) -> bool:
    """True for `Transfer-Encoding: chunked`, False when absent; anything else is refused."""
    codings = [value.lower() for value in header_values(headers, "transfer-encoding")]
    if not codings:
        return False
    if codings[-1] != "chunked" or codings.count("chunked") != 1:
        raise FramingError(status, f"unsupported Transfer-Encoding {', '.join(codings)!r}")
    if header_values(headers, "content-length"):
        raise FramingError(status, "both Transfer-Encoding and Content-Length")
    return True


@dataclass(frozen=True, slots=True)
class ResponseHead:
    status: int
    headers: Headers
    raw: bytes
    """The head as received: the proxy forwards responses unchanged."""
    keep_alive: bool


class ResponseReader:
    """Reads one response to a request with `method` (a HEAD response has no body).

    Events: `ResponseHead` (any number of 1xx interim heads first), `Data`, `EndOfMessage`,
    `Rejected(502)`; then PAUSED. After `101 Switching Protocols` the connection is a tunnel:
    PAUSED at once, the upgraded bytes in `trailing_data`.
    """

    def __init__(self, method: str) -> None:
        self._buffer = ReceiveBuffer()
        self._method = method
        self._body: BodyReader | None = None
        self.state = "head"  # head -> body -> done | upgraded | error
        self.keep_alive = True

    def receive_data(self, data: bytes) -> None:
        self._buffer.append(data)

    @property
    def trailing_data(self) -> bytes:
        return bytes(self._buffer)

    def next_event(self) -> ResponseHead | Data | EndOfMessage | Rejected | NeedData | Paused:
        if self.state in ("done", "upgraded", "error"):
            return PAUSED
        try:
            return self._next_event()
        except FramingError as exc:
            self.state = "error"
            return Rejected(502, f"bad response from upstream: {exc.reason}")

    def _next_event(self) -> ResponseHead | Data | EndOfMessage | NeedData:
        if self.state == "body":
            assert self._body is not None
            data = b"" if self._body.done else self._body.read(self._buffer)
            if data:
                return Data(data)
            if self._body.done:
                self.state = "done"
                return EndOfMessage()
            return self._need_data()
        head = take_head(self._buffer, too_large=502)
        if head is None:
            return self._need_data()
        return self._start(head)

    def _need_data(self) -> NeedData:
        if self._buffer.closed:
            raise FramingError(502, "upstream closed the connection mid-response")
        return NEED_DATA

    def _start(self, head: bytes) -> ResponseHead:
        status_line, *lines = head[:-4].split(b"\r\n")
        version, _, rest = status_line.partition(b" ")
        code = rest[:3]
        if version not in (b"HTTP/1.1", b"HTTP/1.0") or not code.isdigit() or len(code) != 3:
            raise FramingError(502, f"bad status line {status_line[:40]!r}")
        status = int(code)
        headers = parse_header_lines(lines, status=502)
        self.keep_alive = version == b"HTTP/1.1" and not has_token(headers, "connection", "close")
        if version == b"HTTP/1.0" and has_token(headers, "connection", "keep-alive"):
            self.keep_alive = True
        if status == 101:
            self.state = "upgraded"
        elif 100 <= status < 200:
            pass  # interim: the final head follows
        elif self._method == "HEAD" or status in (204, 304):
            self._body = ContentLengthReader(0)
            self.state = "body"
        else:
            self._body = self._body_reader(headers)
            self.state = "body"
        return ResponseHead(status, headers, head, self.keep_alive)

    def _body_reader(self, headers: Headers) -> BodyReader:
        if chunked_or_none(headers, status=502):
            return ChunkedReader()
        length = content_length(headers, status=502)
        if length is not None:
            return ContentLengthReader(length)
        self.keep_alive = False
        return UntilCloseReader()
