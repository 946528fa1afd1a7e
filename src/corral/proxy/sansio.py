"""What every protocol core in this package shares: sentinels, the receive buffer, and
the rule for splitting `host:port`.

Every core follows h11's shape: `receive_data(data)` appends bytes (b"" means the peer closed),
`next_event()` returns an event, `NEED_DATA` (feed more bytes) or `PAUSED` (this core is done
or waits for the other side; what arrived after its last event is in `trailing_data`).
"""

from __future__ import annotations

from typing import NamedTuple


class _Sentinel:
    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return self._name


class NeedData(_Sentinel):
    pass


class Paused(_Sentinel):
    pass


NEED_DATA = NeedData("NEED_DATA")
PAUSED = Paused("PAUSED")

# The port range of TCP; port 0 cannot be connected to.
MIN_PORT = 1
MAX_PORT = 65535


class ReceiveBuffer:
    """Bytes received but not yet turned into events. Consumption is from the front."""

    def __init__(self) -> None:
        self._data = bytearray()
        self.closed = False
        """The peer sent EOF (receive_data(b""))."""

    def __len__(self) -> int:
        return len(self._data)

    def __bytes__(self) -> bytes:
        return bytes(self._data)

    def append(self, data: bytes) -> None:
        if not data:
            self.closed = True
        elif self.closed:
            raise RuntimeError("data received after end of file")
        else:
            self._data += data

    def find(self, needle: bytes, start: int = 0) -> int:
        return self._data.find(needle, start)

    def peek(self, count: int) -> bytes:
        return bytes(self._data[:count])

    def take(self, count: int) -> bytes:
        taken = bytes(self._data[:count])
        del self._data[:count]
        return taken

    def take_all(self) -> bytes:
        return self.take(len(self._data))


def parse_port(text: str) -> int:
    """A decimal TCP port. Stricter than int(): no sign, space, underscore or leading zeros
    beyond five digits, because `int("+8_0")` is 80 and a proxy must read ports as a
    server would."""
    if not (text.isascii() and text.isdigit()) or len(text) > 5:
        raise ValueError(f"port {text!r} is not a number from {MIN_PORT} to {MAX_PORT}")
    port = int(text)
    if not MIN_PORT <= port <= MAX_PORT:
        raise ValueError(f"port {text!r} is not a number from {MIN_PORT} to {MAX_PORT}")
    return port


class Authority(NamedTuple):
    host: str
    """As written, brackets removed from an IPv6 literal; not yet normalised."""
    port: int


def split_authority(text: str, *, default_port: int | None = None) -> Authority:
    """Split `host:port`, `[v6]:port` or (with a default port) a bare host.

    Never splits on "the" colon: an IPv6 literal must be in brackets, and a host with more
    than one colon outside brackets is refused rather than guessed at (RFC 3986 section 3.2.2).
    """
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"{text!r}: '[' without ']'")
        host, rest = text[1:end], text[end + 1 :]
        if not host:
            raise ValueError(f"{text!r}: empty brackets")
        if ":" not in host:
            raise ValueError(f"{text!r}: brackets hold an IPv6 address only")
        if rest and not rest.startswith(":"):
            raise ValueError(f"{text!r}: unexpected text after ']'")
        port_text = rest[1:] if rest else None
    else:
        colons = text.count(":")
        if colons > 1:
            raise ValueError(f"{text!r}: an IPv6 address must be written in brackets")
        host, _, port_text_or_empty = text.partition(":")
        port_text = port_text_or_empty if colons else None
        if not host:
            raise ValueError(f"{text!r}: empty host")
    if port_text is None:
        if default_port is None:
            raise ValueError(f"{text!r}: a port is required")
        return Authority(host, default_port)
    return Authority(host, parse_port(port_text))
