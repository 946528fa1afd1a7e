"""SOCKS5, the server side, without sockets (RFC 1928), for CONNECT only.

    client                                   server (this core)
    greeting: 05 n methods...        ->      Greeting
                                     <-      send(MethodSelection(NO_AUTH | NO_ACCEPTABLE))
    request:  05 cmd 00 atyp addr port ->    ConnectRequest | Unsupported
                                     <-      send(Reply(code))
    tunnel bytes                      <->    (the driver relays; `trailing_data` holds early ones)

The states and their legal transitions are one table, `TRANSITIONS`: an event received or sent
in a state that has no edge for it is a bug in the driver (RuntimeError). Rules:
1. Only "no authentication" is offered: the proxy's socket is private to one sandbox, and a
   password would have to live inside the sandbox anyway.
2. BIND and UDP ASSOCIATE are refused with reply 07 (command not supported): the proxy filters
   outgoing TCP connections only. Unknown address types get 08.
3. A domain name is passed on as the client wrote it (decoded as UTF-8); `decision` normalises
   it. An IPv6 address is passed on in its canonical text form.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from corral.proxy.sansio import NEED_DATA, PAUSED, NeedData, Paused, ReceiveBuffer

VERSION = 5
NO_AUTH = 0x00
NO_ACCEPTABLE_METHODS = 0xFF

CMD_CONNECT = 1
CMD_BIND = 2
CMD_UDP_ASSOCIATE = 3

ATYP_IPV4 = 1
ATYP_DOMAIN = 3
ATYP_IPV6 = 4

# Reply codes, RFC 1928 section 6.
SUCCEEDED = 0x00
GENERAL_FAILURE = 0x01
NOT_ALLOWED_BY_RULESET = 0x02
NETWORK_UNREACHABLE = 0x03
HOST_UNREACHABLE = 0x04
CONNECTION_REFUSED = 0x05
TTL_EXPIRED = 0x06
COMMAND_NOT_SUPPORTED = 0x07
ADDRESS_TYPE_NOT_SUPPORTED = 0x08

State = Literal["greeting", "choosing", "request", "replying", "tunnel", "closed", "error"]
EventName = Literal[
    "Greeting",
    "MethodSelection.accept",
    "MethodSelection.refuse",
    "ConnectRequest",
    "Unsupported",
    "Reply.success",
    "Reply.failure",
    "ProtocolError",
]

# (state, event received or sent) -> next state.
TRANSITIONS: dict[State, dict[EventName, State]] = {
    "greeting": {"Greeting": "choosing", "ProtocolError": "error"},
    "choosing": {"MethodSelection.accept": "request", "MethodSelection.refuse": "closed"},
    "request": {"ConnectRequest": "replying", "Unsupported": "replying", "ProtocolError": "error"},
    "replying": {"Reply.success": "tunnel", "Reply.failure": "closed"},
    "tunnel": {},
    "closed": {},
    "error": {},
}


@dataclass(frozen=True, slots=True)
class Greeting:
    methods: tuple[int, ...]

    @property
    def offers_no_auth(self) -> bool:
        return NO_AUTH in self.methods


@dataclass(frozen=True, slots=True)
class ConnectRequest:
    host: str
    port: int
    address_type: int


@dataclass(frozen=True, slots=True)
class Unsupported:
    """A well-formed request this proxy refuses; answer with `Reply(reply)`."""

    reply: int
    reason: str


@dataclass(frozen=True, slots=True)
class ProtocolError:
    """Not SOCKS5, or broken: close without a reply (there is no reply for a bad greeting)."""

    reason: str


@dataclass(frozen=True, slots=True)
class MethodSelection:
    method: int


@dataclass(frozen=True, slots=True)
class Reply:
    code: int
    bind_host: str = "0.0.0.0"  # noqa: S104 - an address reported to the client, not bound
    bind_port: int = 0


ReceivedEvent = Greeting | ConnectRequest | Unsupported | ProtocolError
_RECEIVED_NAMES: dict[type[ReceivedEvent], EventName] = {
    Greeting: "Greeting",
    ConnectRequest: "ConnectRequest",
    Unsupported: "Unsupported",
    ProtocolError: "ProtocolError",
}
_COMMAND_NAMES = {CMD_BIND: "BIND", CMD_UDP_ASSOCIATE: "UDP ASSOCIATE"}


class Socks5Server:
    def __init__(self) -> None:
        self._buffer = ReceiveBuffer()
        self.state: State = "greeting"

    def receive_data(self, data: bytes) -> None:
        self._buffer.append(data)

    @property
    def trailing_data(self) -> bytes:
        return bytes(self._buffer)

    def take_trailing_data(self) -> bytes:
        return self._buffer.take_all()

    def next_event(self) -> ReceivedEvent | NeedData | Paused:
        event: ReceivedEvent | NeedData
        if self.state == "greeting":
            event = self._read_greeting()
        elif self.state == "request":
            event = self._read_request()
        else:
            return PAUSED
        if isinstance(event, NeedData):
            if self._buffer.closed:
                event = ProtocolError("connection closed during the handshake")
            else:
                return event
        self._transition(_RECEIVED_NAMES[type(event)])
        return event

    def send(self, event: MethodSelection | Reply) -> bytes:
        """The bytes to send the client for `event`; moves the state on."""
        if isinstance(event, MethodSelection):
            ok = event.method != NO_ACCEPTABLE_METHODS
            self._transition("MethodSelection.accept" if ok else "MethodSelection.refuse")
            return bytes((VERSION, event.method))
        self._transition("Reply.success" if event.code == SUCCEEDED else "Reply.failure")
        return _render_reply(event)

    def _transition(self, name: EventName) -> None:
        edges = TRANSITIONS[self.state]
        if name not in edges:
            raise RuntimeError(f"SOCKS5: {name} is not allowed in state {self.state}")
        self.state = edges[name]

    def _read_greeting(self) -> Greeting | ProtocolError | NeedData:
        head = self._buffer.peek(2)
        if head[:1] and head[0] != VERSION:
            return ProtocolError(f"not SOCKS5 (version byte {head[0]})")
        if len(head) < 2:
            return NEED_DATA
        count = head[1]
        if count == 0:
            return ProtocolError("greeting offers no methods")
        if len(self._buffer) < 2 + count:
            return NEED_DATA
        return Greeting(tuple(self._buffer.take(2 + count)[2:]))

    def _read_request(self) -> ConnectRequest | Unsupported | ProtocolError | NeedData:
        head = self._buffer.peek(5)
        if head[:1] and head[0] != VERSION:
            return ProtocolError(f"request has version byte {head[0]}")
        if len(head) < 5:
            return NEED_DATA
        _, command, reserved, address_type, first = head
        if reserved != 0:
            return ProtocolError("reserved byte is not zero")
        if address_type == ATYP_IPV4:
            length = 4 + 4 + 2
        elif address_type == ATYP_IPV6:
            length = 4 + 16 + 2
        elif address_type == ATYP_DOMAIN:
            if first == 0:
                return ProtocolError("empty domain name")
            length = 4 + 1 + first + 2
        else:
            # The length of an unknown address is unknowable: reply and close (RFC 1928 s. 6).
            self._buffer.take_all()
            return Unsupported(ADDRESS_TYPE_NOT_SUPPORTED, f"address type {address_type}")
        if len(self._buffer) < length:
            return NEED_DATA
        raw = self._buffer.take(length)
        if command != CMD_CONNECT:
            name = _COMMAND_NAMES.get(command, f"command {command}")
            return Unsupported(COMMAND_NOT_SUPPORTED, f"{name} is not supported")
        port = int.from_bytes(raw[-2:], "big")
        host = _decode_address(address_type, raw[4:-2])
        if host is None:
            return ProtocolError("domain name is not UTF-8")
        if port == 0:
            return Unsupported(GENERAL_FAILURE, "port 0")
        return ConnectRequest(host, port, address_type)


def _decode_address(address_type: int, raw: bytes) -> str | None:
    import ipaddress

    if address_type == ATYP_IPV4:
        return str(ipaddress.IPv4Address(raw))
    if address_type == ATYP_IPV6:
        return str(ipaddress.IPv6Address(raw))
    try:
        return raw[1:].decode("utf-8")
    except UnicodeDecodeError:
        return None


def _render_reply(reply: Reply) -> bytes:
    import ipaddress

    address = ipaddress.ip_address(reply.bind_host)
    address_type = ATYP_IPV4 if address.version == 4 else ATYP_IPV6
    return (
        bytes((VERSION, reply.code, 0, address_type))
        + address.packed
        + reply.bind_port.to_bytes(2, "big")
    )
