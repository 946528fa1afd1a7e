"""Opening the upstream connection: to the chosen address, or through an HTTP proxy by CONNECT.

Failures become `UpstreamError`, which carries the answer each client protocol gives: the HTTP
status (502, 504) and the SOCKS5 reply code.
"""

from __future__ import annotations

import asyncio
import socket
from typing import NamedTuple

from corral.errors import UsageError
from corral.proxy import socks5
from corral.proxy.http1_body import FramingError, take_head
from corral.proxy.sansio import ReceiveBuffer, split_authority

# An upstream proxy's answer to CONNECT is a short head; anything longer is not a proxy.
_CONNECT_REPLY_LIMIT = 16 * 1024


class UpstreamError(Exception):
    def __init__(self, reason: str, *, http_status: int, socks_reply: int) -> None:
        super().__init__(reason)
        self.reason = reason
        self.http_status = http_status
        self.socks_reply = socks_reply


class UpstreamProxy(NamedTuple):
    host: str
    port: int
    authorization: str | None
    """A `Proxy-Authorization` value built from the URL's user info, if it had any."""


def parse_upstream_proxy(url: str) -> UpstreamProxy:
    """`http://[user:password@]host:port` (the port defaults to 8080). UsageError otherwise."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() != "http":
        raise UsageError(f"upstream proxy {url!r}: only http://host:port proxies are supported")
    rest = rest.rstrip("/")
    userinfo, at, authority = rest.rpartition("@")
    authorization = None
    if at:
        import base64
        from urllib.parse import unquote

        user, _, password = userinfo.partition(":")
        token = f"{unquote(user)}:{unquote(password)}".encode()
        authorization = "Basic " + base64.b64encode(token).decode("ascii")
    try:
        host, port = split_authority(authority, default_port=8080)
    except ValueError as exc:
        raise UsageError(f"upstream proxy {url!r}: {exc}") from None
    return UpstreamProxy(host, port, authorization)


def _error_for(exc: OSError, target: str) -> UpstreamError:
    import errno

    if isinstance(exc, ConnectionRefusedError):
        return UpstreamError(
            f"{target} refused the connection",
            http_status=502,
            socks_reply=socks5.CONNECTION_REFUSED,
        )
    if exc.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EADDRNOTAVAIL):
        return UpstreamError(
            f"{target} is unreachable: {exc.strerror}",
            http_status=502,
            socks_reply=socks5.HOST_UNREACHABLE
            if exc.errno != errno.ENETUNREACH
            else socks5.NETWORK_UNREACHABLE,
        )
    return UpstreamError(
        f"cannot connect to {target}: {exc.strerror or exc}",
        http_status=502,
        socks_reply=socks5.GENERAL_FAILURE,
    )


async def connect_tcp(address: str, port: int, *, timeout: float) -> socket.socket:
    """A non-blocking socket connected to `address` (an IP literal) and `port`."""
    loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setblocking(False)
    target = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
    try:
        async with asyncio.timeout(timeout):
            await loop.sock_connect(sock, (address, port))
    except TimeoutError:
        sock.close()
        raise UpstreamError(
            f"connecting to {target} timed out", http_status=504, socks_reply=socks5.TTL_EXPIRED
        ) from None
    except OSError as exc:
        sock.close()
        raise _error_for(exc, target) from None
    except BaseException:
        sock.close()
        raise
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


async def connect_via_proxy(
    proxy: UpstreamProxy, proxy_address: str, host: str, port: int, *, timeout: float
) -> tuple[socket.socket, bytes]:
    """A tunnel to host:port through `proxy`; also the bytes that came after its 200 reply."""
    loop = asyncio.get_running_loop()
    sock = await connect_tcp(proxy_address, proxy.port, timeout=timeout)
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    lines = [f"CONNECT {authority} HTTP/1.1", f"Host: {authority}"]
    if proxy.authorization:
        lines.append(f"Proxy-Authorization: {proxy.authorization}")
    try:
        async with asyncio.timeout(timeout):
            await loop.sock_sendall(sock, ("\r\n".join(lines) + "\r\n\r\n").encode())
            buffer = ReceiveBuffer()
            head = None
            while head is None:
                data = await loop.sock_recv(sock, _CONNECT_REPLY_LIMIT)
                buffer.append(data)
                if not data:
                    raise UpstreamError(
                        "the upstream proxy closed the connection",
                        http_status=502,
                        socks_reply=socks5.GENERAL_FAILURE,
                    )
                head = take_head(buffer, too_large=502)
    except TimeoutError:
        sock.close()
        raise UpstreamError(
            "the upstream proxy did not answer", http_status=504, socks_reply=socks5.TTL_EXPIRED
        ) from None
    except (OSError, FramingError, UpstreamError) as exc:
        sock.close()
        if isinstance(exc, UpstreamError):
            raise
        raise UpstreamError(
            f"upstream proxy: {exc}", http_status=502, socks_reply=socks5.GENERAL_FAILURE
        ) from None
    status_line = head.split(b"\r\n", 1)[0]
    parts = status_line.split(b" ", 2)
    if len(parts) < 2 or not parts[1].startswith(b"2"):
        sock.close()
        raise UpstreamError(
            f"the upstream proxy refused: {status_line.decode('latin-1')[:80]}",
            http_status=502,
            socks_reply=socks5.NOT_ALLOWED_BY_RULESET,
        )
    return sock, buffer.take_all()
