"""Plain-HTTP forwarding (`GET http://host/path`), with keep-alive on both sides.

Each request is decided like a tunnel, then its Host header must name the URI's host (rule 7
of `decision`). The head is rewritten to origin-form; bodies and responses pass unchanged,
their ends found by the sans-IO readers. One upstream connection is kept while requests go to
the same host and port, and each upstream connection is one audit record. A `101 Switching
Protocols` answer turns the connection into a tunnel (WebSocket over http://).
"""

from __future__ import annotations

import asyncio
import socket

from corral.policy.domains import normalize_host
from corral.proxy.decision import Decision, Request, check_host_header
from corral.proxy.http1 import ForwardRequest, RequestParser, render_forward_head
from corral.proxy.http1_body import (
    Data,
    EndOfMessage,
    Rejected,
    ResponseHead,
    ResponseReader,
    header_values,
)
from corral.proxy.session import (
    ProxyContext,
    Record,
    Refused,
    close_gracefully,
    http_error,
    next_event,
    relay,
)
from corral.proxy.upstream import UpstreamError


class _Upstream:
    def __init__(self, sock: socket.socket, record: Record) -> None:
        self.sock = sock
        self.record = record
        self.target = (record.host, record.port)

    def finish(self, ctx: ProxyContext) -> None:
        self.sock.close()
        self.record.emit(ctx)


async def forward_http(
    ctx: ProxyContext, client: socket.socket, parser: RequestParser, first: ForwardRequest
) -> None:
    """Serve `first` and whatever requests follow on the connection; the caller closes it."""
    upstream: _Upstream | None = None
    request = first
    try:
        while True:
            if upstream is not None and upstream.target != (request.host, request.port):
                upstream.finish(ctx)
                upstream = None
            if upstream is None:
                upstream = await _open(ctx, client, request)
                if upstream is None:
                    return
            elif not await _allowed_on_open_connection(ctx, client, request):
                return
            keep = await _exchange(ctx, client, parser, request, upstream)
            if keep is not True:
                if keep is None:
                    upstream = None  # upgraded: the tunnel closed it and it is recorded
                return
            next_request = await _next_request(ctx, client, parser)
            if next_request is None:
                return
            request = next_request
    finally:
        if upstream is not None:
            upstream.finish(ctx)


async def _open(
    ctx: ProxyContext, client: socket.socket, request: ForwardRequest
) -> _Upstream | None:
    """Decide and connect; None when refused or failed (answered and recorded)."""
    record = Record("http")
    record.host, record.port = request.host, request.port
    record.decision = await _decide(ctx, request)
    if record.decision.allowed:
        try:
            sock, _ = await ctx.open(record)
            return _Upstream(sock, record)
        except Refused as refused:
            record.decision = refused.decision
        except UpstreamError as exc:
            record.error = exc.reason
            record.emit(ctx)  # before answering (rule 1 of `session`)
            await _answer(client, http_error(exc.http_status, exc.reason))
            return None
    decision = record.decision
    record.emit(ctx)
    await _answer(client, http_error(403, decision.reason, rule=decision.rule))
    return None


async def _allowed_on_open_connection(
    ctx: ProxyContext, client: socket.socket, request: ForwardRequest
) -> bool:
    """A further request to the same target: its Host header is checked all the same."""
    decision = await _decide(ctx, request)
    if decision.allowed:
        return True
    record = Record("http")
    record.host, record.port, record.decision = request.host, request.port, decision
    record.emit(ctx)
    await _answer(client, http_error(403, decision.reason, rule=decision.rule))
    return False


async def _decide(ctx: ProxyContext, request: ForwardRequest) -> Decision:
    decision = await ctx.authorize(Request(request.host, request.port, "http", ctx.sandbox_id))
    if not decision.allowed:
        return decision
    mismatch = check_host_header(
        normalize_host(request.host), request.port, header_values(request.headers, "host")
    )
    return mismatch or decision


async def _answer(client: socket.socket, data: bytes) -> None:
    loop = asyncio.get_running_loop()
    try:
        await loop.sock_sendall(client, data)
    except OSError:
        return
    await close_gracefully(client)


async def _next_request(
    ctx: ProxyContext, client: socket.socket, parser: RequestParser
) -> ForwardRequest | None:
    parser.start_next_request()
    try:
        event = await next_event(client, parser, ctx.limits.idle_timeout)
    except TimeoutError:
        return None
    if isinstance(event, ForwardRequest):
        return event
    if isinstance(event, Rejected):
        await _answer(client, http_error(event.status, event.reason))
    elif not isinstance(event, EndOfMessage):  # a CONNECT after forwarded requests
        await _answer(client, http_error(400, "CONNECT must be the first request"))
    return None


async def _exchange(
    ctx: ProxyContext,
    client: socket.socket,
    parser: RequestParser,
    request: ForwardRequest,
    upstream: _Upstream,
) -> bool | None:
    """One request and its response. True: the client connection may carry another request;
    False: close it; None: it was upgraded, relayed and closed."""
    loop = asyncio.get_running_loop()
    head = render_forward_head(request)
    await loop.sock_sendall(upstream.sock, head)
    upstream.record.bytes_up += len(head)
    upload = asyncio.create_task(_upload(ctx, client, parser, upstream))
    try:
        reader = ResponseReader(request.method)
        finished = await _download(ctx, client, reader, upstream)
        if finished != "failed":
            await upload  # the client may still be sending a body the server answered early
    finally:
        if not upload.done():
            upload.cancel()
        elif not upload.cancelled():
            upload.exception()  # retrieved: a failed upload is reported by the response side
    if finished == "upgraded":
        await relay(
            ctx, client, upstream.sock, upstream.record,
            to_upstream=parser.take_trailing_data(), to_client=reader.trailing_data,
        )  # fmt: skip
        upstream.finish(ctx)
        return None
    return finished == "complete" and parser.keep_alive and reader.keep_alive


async def _upload(
    ctx: ProxyContext, client: socket.socket, parser: RequestParser, upstream: _Upstream
) -> None:
    loop = asyncio.get_running_loop()
    while True:
        event = await next_event(client, parser, ctx.limits.idle_timeout)
        if not isinstance(event, Data):
            return  # EndOfMessage, or a broken body: the response side ends the exchange
        await loop.sock_sendall(upstream.sock, event.data)
        upstream.record.bytes_up += len(event.data)


async def _download(
    ctx: ProxyContext, client: socket.socket, reader: ResponseReader, upstream: _Upstream
) -> str:
    """Relay one response; "complete", "upgraded" or "failed"."""
    loop = asyncio.get_running_loop()
    sent_head = False
    while True:
        try:
            event = await next_event(upstream.sock, reader, ctx.limits.idle_timeout)
        except TimeoutError:
            upstream.record.error = "the upstream server went idle mid-response"
            return "failed"
        if isinstance(event, ResponseHead):
            await loop.sock_sendall(client, event.raw)
            upstream.record.bytes_down += len(event.raw)
            sent_head = event.status >= 200 or event.status == 101
            if event.status == 101:
                return "upgraded"
        elif isinstance(event, Data):
            await loop.sock_sendall(client, event.data)
            upstream.record.bytes_down += len(event.data)
        elif isinstance(event, EndOfMessage):
            return "complete"
        else:
            reason = event.reason if isinstance(event, Rejected) else "no response"
            upstream.record.error = reason
            if not sent_head:
                await loop.sock_sendall(client, http_error(502, reason))
            return "failed"
