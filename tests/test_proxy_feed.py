"""One helper feeds every proxy protocol core three ways (h11's tests/helpers.py pattern):
the whole input at once, one byte at a time, and the whole input followed by trailing bytes.
The events must be the same each time, and the trailing bytes must be left over untouched."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from corral.proxy.http1_body import Data
from corral.proxy.sansio import PAUSED, NeedData, Paused

TRAILING = b"\x16TRAILING BYTES\r\n\r\n"


class Core(Protocol):
    def receive_data(self, data: bytes) -> None: ...

    def next_event(self) -> object: ...

    @property
    def trailing_data(self) -> bytes: ...


Respond = Callable[[Core, object], bool]
"""Called on PAUSED with the last event; answers through the core (a SOCKS reply) and returns
True to keep reading, False to stop."""


def run_core(
    core: Core, chunks: list[bytes], *, respond: Respond | None = None, eof: bool = False
) -> list[object]:
    events: list[object] = []
    for chunk in [*chunks, b""] if eof else chunks:
        core.receive_data(chunk)
        while True:
            event = core.next_event()
            if isinstance(event, NeedData):
                break
            if isinstance(event, Paused):
                if respond is not None and events and respond(core, events[-1]):
                    continue
                break
            if isinstance(event, Data) and events and isinstance(events[-1], Data):
                # Body bytes come in as many pieces as they were fed in; only their sum counts.
                events[-1] = Data(events[-1].data + event.data)
            else:
                events.append(event)
    return events


def check_core(
    make: Callable[[], Core],
    data: bytes,
    expected: list[object],
    *,
    respond: Respond | None = None,
    trailing: bool = True,
    eof: bool = False,
) -> Core:
    """Feed `data` whole, byte by byte and with trailing bytes; return the last core.

    `trailing=False` for inputs that do not end in a pause (a half-read body keeps consuming).
    """
    whole = make()
    assert run_core(whole, [data], respond=respond, eof=eof) == expected
    bytewise = make()
    chunks = [data[i : i + 1] for i in range(len(data))]
    assert run_core(bytewise, chunks, respond=respond, eof=eof) == expected
    if not trailing:
        return bytewise
    assert whole.trailing_data == b""
    assert bytewise.trailing_data == b""
    with_rest = make()
    assert run_core(with_rest, [data + TRAILING], respond=respond) == expected
    assert with_rest.next_event() is PAUSED
    assert with_rest.trailing_data == TRAILING
    return with_rest


class _Echo:
    """A core that emits each complete line, to test the helper itself."""

    def __init__(self) -> None:
        self.buffer = b""
        self.done = False

    def receive_data(self, data: bytes) -> None:
        self.buffer += data

    def next_event(self) -> object:
        if self.done:
            return PAUSED
        line, sep, rest = self.buffer.partition(b"\n")
        if not sep:
            from corral.proxy.sansio import NEED_DATA

            return NEED_DATA
        self.buffer = rest
        self.done = line == b"end"
        return line

    @property
    def trailing_data(self) -> bytes:
        return self.buffer


def test_helper_feeds_whole_bytewise_and_with_trailing_bytes() -> None:
    core = check_core(_Echo, b"a\nbc\nend\n", [b"a", b"bc", b"end"])
    assert core.trailing_data == TRAILING
