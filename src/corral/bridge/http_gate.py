"""The gate in front of the HTTP API: what is checked before any route runs, in this order.

1. Host header (every path): only `127.0.0.1`, `localhost` or `[::1]`, with an optional port.
   A web page on another origin whose name an attacker re-points at 127.0.0.1 (DNS rebinding)
   sends its own name here and gets 403 forbidden, so a browser never reads a bridge response.
2. Bearer token (paths under /v1): `Authorization: Bearer <token>`, compared in constant time;
   missing or wrong is 401 unauthorized with WWW-Authenticate (RFC 6750 section 3). Failures
   share one rate bucket of their own, so guessing is slow and floods cannot starve the owner.
3. Rate (paths under /v1): a token bucket per token; 429 rate_limited with Retry-After.
4. Body size (every path): a Content-Length over the limit is refused before a byte is read;
   without one (chunked), bytes are counted as they arrive and the request is refused as soon as
   the count passes the limit. 413 request_too_large. The body (small, bounded) is buffered and
   replayed to the app.

Checks 1-3 run before the body is read, so an unauthenticated client cannot make the server
buffer anything, and an authenticated one learns about a malformed body only after auth.
The gate is plain ASGI (no per-request objects beyond a closure) because it runs on every call.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any, NamedTuple

from corral.bridge.ratelimit import RateLimiter, retry_after_header
from corral.bridge.token import token_matches

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
TokenSource = Callable[[], "str | None"]

API_PREFIX = "/v1/"
ALLOWED_HOSTS = frozenset({b"127.0.0.1", b"localhost", b"[::1]"})
FAILED_AUTH_KEY = "!unauthenticated"  # cannot collide with a token digest (hex only)


class GateLimits(NamedTuple):
    max_body_bytes: int
    rate_per_s: float
    burst: int


def error_body(code: str, message: str, hint: str = "") -> dict[str, object]:
    return {"error": {"code": code, "message": message, "hint": hint}}


async def send_error(
    send: Send,
    status: int,
    code: str,
    message: str,
    *,
    hint: str = "",
    headers: Mapping[str, str] | None = None,
) -> None:
    body = json.dumps(error_body(code, message, hint), separators=(",", ":")).encode()
    raw_headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *((k.lower().encode(), v.encode()) for k, v in (headers or {}).items()),
    ]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body})


def host_allowed(host: bytes | None) -> bool:
    """`Host` is a loopback name, optionally with a numeric port (IPv6 in brackets)."""
    if not host:
        return False
    name, port = host, b""
    if host.startswith(b"["):
        end = host.find(b"]")
        if end < 0:
            return False
        name, rest = host[: end + 1], host[end + 1 :]
        if rest:
            if not rest.startswith(b":"):
                return False
            port = rest[1:]
            if not port:
                return False
    elif b":" in host:
        name, _, port = host.partition(b":")
        if not port:
            return False
    if port and (not port.isdigit() or len(port) > 5):
        return False
    return name.lower() in ALLOWED_HOSTS


def bearer_of(authorization: bytes | None) -> bytes | None:
    if not authorization:
        return None
    scheme, _, credentials = authorization.strip().partition(b" ")
    if scheme.lower() != b"bearer":
        return None
    return credentials.strip() or None


class Gate:
    def __init__(
        self,
        app: ASGIApp,
        *,
        token: TokenSource,
        limits: GateLimits,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.app = app
        self.token = token
        self.limits = limits
        self.clock = clock
        self.rates = RateLimiter(rate=limits.rate_per_s, burst=limits.burst)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = _headers(scope)
        if not host_allowed(headers.get(b"host")):
            await send_error(
                send,
                403,
                "forbidden",
                "the Host header must name this machine's loopback (127.0.0.1 or localhost)",
                hint="connect to http://127.0.0.1:PORT directly, not through another name",
            )
            return
        if scope["path"].startswith(API_PREFIX) and not await self._admit(headers, send):
            return
        body = await self._read_body(headers, receive, send)
        if body is None:
            return
        await self.app(scope, _replay(body, receive), send)

    async def _admit(self, headers: Mapping[bytes, bytes], send: Send) -> bool:
        """Auth and rate: True if the request may go on, else the error is already sent."""
        expected = self.token()
        presented = bearer_of(headers.get(b"authorization"))
        if expected is None or presented is None or not token_matches(presented, expected):
            if presented is None:
                message, challenge = "no bearer token", 'Bearer realm="corral"'
            else:
                message, challenge = "wrong token", 'Bearer realm="corral", error="invalid_token"'
            wait = self.rates.take(FAILED_AUTH_KEY, now=self.clock())
            if wait:
                await _send_rate_limited(send, wait)
                return False
            hint = "send `Authorization: Bearer TOKEN`; on the host, `corral token` prints it"
            if expected is None:
                message, hint = "the server has no usable token", "run `corral token` on the host"
            await send_error(
                send,
                401,
                "unauthorized",
                message,
                hint=hint,
                headers={"WWW-Authenticate": challenge},
            )
            return False
        wait = self.rates.take(hashlib.sha256(presented).hexdigest()[:32], now=self.clock())
        if wait:
            await _send_rate_limited(send, wait)
            return False
        return True

    async def _read_body(
        self, headers: Mapping[bytes, bytes], receive: Receive, send: Send
    ) -> bytes | None:
        limit = self.limits.max_body_bytes
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            await _send_too_large(send, limit)
            return None
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await _send_too_large(send, limit)
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def _headers(scope: Scope) -> dict[bytes, bytes]:
    # The first of a repeated header wins; ASGI servers give names in lower case.
    found: dict[bytes, bytes] = {}
    for name, value in scope["headers"]:
        found.setdefault(name, value)
    return found


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # after the body: wait for the disconnect, as ASGI apps expect

    return replay


async def _send_rate_limited(send: Send, wait: float) -> None:
    await send_error(
        send,
        429,
        "rate_limited",
        "too many requests",
        hint="wait for the number of seconds in Retry-After",
        headers={"Retry-After": retry_after_header(wait)},
    )


async def _send_too_large(send: Send, limit: int) -> None:
    await send_error(
        send,
        413,
        "request_too_large",
        f"the request body is larger than {limit} bytes",
        hint="send fewer or shorter arguments",
    )
