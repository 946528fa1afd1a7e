"""The server name (SNI) of a TLS ClientHello, without sockets (RFC 8446 4.1.2, RFC 6066 3).

The proxy peeks at the first bytes a client sends through a tunnel to port 443 and compares
the name in the ClientHello with the host the tunnel was opened to: a mismatch is domain
fronting (a tunnel to an allowed CDN host carrying a request for a forbidden one). The bytes
are only read, never changed: the driver forwards everything it received.

`ClientHelloReader.next_event()` returns NEED_DATA (the hello is incomplete: it may arrive
split across reads and across TLS records), `ClientHello(server_name)` (None: the client sent
no SNI, as clients do for IP addresses) or `NotTls(reason)` (not a TLS handshake, or a broken
one, which the proxy treats alike).
"""

from __future__ import annotations

from dataclasses import dataclass

from corral.proxy.sansio import NEED_DATA, PAUSED, NeedData, Paused

# RFC 8446 5.1: a record's payload is at most 2**14 bytes.
MAX_RECORD_PAYLOAD = 2**14
# A real ClientHello is under 2 KiB even with post-quantum key shares; 32 KiB leaves room for
# odd clients while bounding what the proxy buffers before it has decided.
MAX_CLIENT_HELLO_BYTES = 32 * 1024

CONTENT_HANDSHAKE = 0x16
HANDSHAKE_CLIENT_HELLO = 0x01
EXTENSION_SERVER_NAME = 0x0000
NAME_TYPE_HOST_NAME = 0x00
_RECORD_HEADER = 5
_HANDSHAKE_HEADER = 4


@dataclass(frozen=True, slots=True)
class ClientHello:
    server_name: str | None


@dataclass(frozen=True, slots=True)
class NotTls:
    reason: str


class _Malformed(Exception):
    pass


class ClientHelloReader:
    """Incremental: each call looks only at bytes it has not looked at, so a client that
    trickles a hello one byte per record costs linear time, not quadratic."""

    def __init__(self) -> None:
        self._data = bytearray()
        self._closed = False
        self._offset = 0
        """Where the next unread record starts."""
        self._handshake = bytearray()
        """The payloads of the complete records so far."""
        self._result: ClientHello | NotTls | None = None

    def receive_data(self, data: bytes) -> None:
        if not data:
            self._closed = True
        else:
            self._data += data

    @property
    def trailing_data(self) -> bytes:
        """Bytes after the records that held the ClientHello."""
        return bytes(self._data[self._offset :]) if self._result is not None else b""

    def next_event(self) -> ClientHello | NotTls | NeedData | Paused:
        if self._result is not None:
            return PAUSED
        found: ClientHello | NotTls | None
        try:
            found = self._parse()
        except _Malformed as exc:
            found = NotTls(str(exc))
        if found is None:
            if not self._closed:
                return NEED_DATA
            found = NotTls("connection closed inside the ClientHello")
        self._result = found
        return found

    def _parse(self) -> ClientHello | None:
        while True:
            handshake = self._handshake
            if len(handshake) >= _HANDSHAKE_HEADER:
                length = int.from_bytes(handshake[1:4], "big")
                if len(handshake) >= _HANDSHAKE_HEADER + length:
                    body = bytes(handshake[_HANDSHAKE_HEADER : _HANDSHAKE_HEADER + length])
                    return ClientHello(_server_name(body))
            start = self._offset
            record = bytes(self._data[start : start + _RECORD_HEADER])
            _check_record_header(record)
            if len(record) < _RECORD_HEADER:
                return None
            payload_length = int.from_bytes(record[3:5], "big")
            if payload_length == 0 or payload_length > MAX_RECORD_PAYLOAD:
                raise _Malformed(f"TLS record of {payload_length} bytes")
            begin = start + _RECORD_HEADER
            if len(self._data) < begin + payload_length:
                # Check the handshake header early: a foreign or huge message fails at once.
                partial = handshake + self._data[begin : begin + _HANDSHAKE_HEADER]
                _check_handshake_header(bytes(partial[:_HANDSHAKE_HEADER]))
                return None
            handshake += self._data[begin : begin + payload_length]
            _check_handshake_header(bytes(handshake[:_HANDSHAKE_HEADER]))
            self._offset = begin + payload_length


def _check_record_header(record: bytes) -> None:
    if record[:1] and record[0] != CONTENT_HANDSHAKE:
        raise _Malformed(f"first byte {record[0]:#04x} is not a TLS handshake record")
    if len(record) >= 2 and record[1] != 3:
        raise _Malformed(f"record version {record[1]}.x is not TLS")


def _check_handshake_header(handshake: bytes) -> None:
    if handshake[:1] and handshake[0] != HANDSHAKE_CLIENT_HELLO:
        raise _Malformed(f"handshake message {handshake[0]} is not a ClientHello")
    if len(handshake) >= _HANDSHAKE_HEADER:
        length = int.from_bytes(handshake[1:4], "big")
        if length > MAX_CLIENT_HELLO_BYTES:
            raise _Malformed(f"ClientHello of {length} bytes is over {MAX_CLIENT_HELLO_BYTES}")


class _Cursor:
    """Reads length-prefixed fields; any overrun is a malformed hello."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, count: int) -> bytes:
        if self.pos + count > len(self.data):
            raise _Malformed("ClientHello field runs past its end")
        chunk = self.data[self.pos : self.pos + count]
        self.pos += count
        return chunk

    def number(self, size: int) -> int:
        return int.from_bytes(self.take(size), "big")

    def vector(self, length_size: int) -> bytes:
        return self.take(self.number(length_size))

    def at_end(self) -> bool:
        return self.pos == len(self.data)


def _server_name(body: bytes) -> str | None:
    hello = _Cursor(body)
    hello.take(2 + 32)  # legacy_version, random
    if len(hello.vector(1)) > 32:
        raise _Malformed("session id longer than 32 bytes")
    suites = hello.vector(2)
    if not suites or len(suites) % 2:
        raise _Malformed("bad cipher suite list")
    if not hello.vector(1):
        raise _Malformed("no compression methods")
    if hello.at_end():
        return None  # no extensions at all (TLS 1.0 clients may omit them)
    extensions = _Cursor(hello.vector(2))
    if not hello.at_end():
        raise _Malformed("bytes after the extensions")
    seen: set[int] = set()
    name: str | None = None
    while not extensions.at_end():
        kind = extensions.number(2)
        data = extensions.vector(2)
        if kind in seen:
            # RFC 8446 4.2: at most one extension of each type; two SNIs read two ways.
            raise _Malformed(f"extension {kind} appears twice")
        seen.add(kind)
        if kind == EXTENSION_SERVER_NAME:
            name = _host_name(data)
    return name


def _host_name(data: bytes) -> str:
    outer = _Cursor(data)
    names = _Cursor(outer.vector(2))
    if not outer.at_end():
        raise _Malformed("bytes after the server name list")
    host_names: list[bytes] = []
    while not names.at_end():
        name_type = names.number(1)
        value = names.vector(2)
        if name_type == NAME_TYPE_HOST_NAME:
            host_names.append(value)
    if len(host_names) != 1:
        # RFC 6066 3: exactly one host_name.
        raise _Malformed(f"{len(host_names)} host names in the server_name extension")
    try:
        return host_names[0].decode("ascii")
    except UnicodeDecodeError:
        raise _Malformed("server name is not ASCII") from None
