"""The two client protocols, driven over a socket: HTTP proxy (CONNECT and plain forwarding)
and SOCKS5. Each handler owns its client socket and closes it; see `session` for the rules
they share (one audit event per target, deadlines, decide-resolve-connect)."""

from __future__ import annotations

import asyncio
import socket

from corral.proxy import socks5
from corral.proxy.decision import Decision, Request
from corral.proxy.http1 import ConnectionClosed, ConnectRequest, ForwardRequest, RequestParser
from corral.proxy.http1_body import Rejected
from corral.proxy.session import (
    ProxyContext,
    Record,
    Refused,
    check_tls,
    close_gracefully,
    http_error,
    next_event,
    relay,
)
from corral.proxy.upstream import UpstreamError

CONNECT_ESTABLISHED = b"HTTP/1.1 200 Connection established\r\n\r\n"


async def serve_http(ctx: ProxyContext, client: socket.socket) -> None:
    from corral.proxy.http_forward import forward_http

    record = Record("http")
    forwarding = False
    try:
        try:
            event = await next_event(
                client, parser := RequestParser(), ctx.limits.handshake_timeout
            )
        except TimeoutError:
            record.decision = Decision(False, "timeout", "no complete request head in time")
            record.emit(ctx)
            await _reply_and_close(client, http_error(408, record.decision.reason))
            return
        if isinstance(event, ForwardRequest):
            forwarding = True  # one record per target, emitted by forward_http
            await forward_http(ctx, client, parser, event)
        elif isinstance(event, ConnectRequest):
            record.protocol = "connect"
            await _tunnel_connect(ctx, client, parser, event, record)
        elif isinstance(event, Rejected):
            record.decision = Decision(False, "malformed", event.reason)
            record.emit(ctx)
            await _reply_and_close(client, http_error(event.status, event.reason))
        elif isinstance(event, ConnectionClosed):
            record.decision = Decision(False, "malformed", "closed before sending a request")
    except OSError as exc:
        record.error = f"client: {exc.strerror or exc}"
    finally:
        client.close()
        if not forwarding:
            record.emit(ctx)


async def _reply_and_close(client: socket.socket, data: bytes) -> None:
    loop = asyncio.get_running_loop()
    try:
        await loop.sock_sendall(client, data)
    except OSError:
        client.close()
        return
    await close_gracefully(client)


async def _tunnel_connect(
    ctx: ProxyContext,
    client: socket.socket,
    parser: RequestParser,
    event: ConnectRequest,
    record: Record,
) -> None:
    loop = asyncio.get_running_loop()
    record.host, record.port = event.host, event.port
    record.decision = await ctx.authorize(
        Request(event.host, event.port, "connect", ctx.sandbox_id)
    )
    if not record.decision.allowed:
        record.emit(ctx)
        await _reply_and_close(
            client, http_error(403, record.decision.reason, rule=record.decision.rule)
        )
        return
    try:
        upstream, early_down = await ctx.open(record)
    except Refused as refused:
        record.decision = refused.decision
        record.emit(ctx)
        await _reply_and_close(
            client, http_error(403, refused.decision.reason, rule=refused.decision.rule)
        )
        return
    except UpstreamError as exc:
        record.error = exc.reason
        record.emit(ctx)
        await _reply_and_close(client, http_error(exc.http_status, exc.reason))
        return
    try:
        await loop.sock_sendall(client, CONNECT_ESTABLISHED)
        early_up = await _checked_tls(ctx, client, record, parser.take_trailing_data())
        if early_up is None:
            return
        await relay(ctx, client, upstream, record, to_upstream=early_up, to_client=early_down)
    finally:
        upstream.close()


async def _checked_tls(
    ctx: ProxyContext, client: socket.socket, record: Record, early: bytes
) -> bytes | None:
    """The client's first bytes when the TLS check passes; None (recorded) when it does not."""
    try:
        return await check_tls(ctx, client, record.host, record.port, early)
    except Refused as refused:
        record.decision = refused.decision
    except TimeoutError:
        record.decision = Decision(False, "timeout", "no complete TLS ClientHello in time")
    record.emit(ctx)
    return None


async def serve_socks(ctx: ProxyContext, client: socket.socket) -> None:
    record = Record("socks5")
    core = socks5.Socks5Server()
    loop = asyncio.get_running_loop()
    try:
        request = await _socks_handshake(ctx, client, core, record)
        if request is None:
            return
        record.host, record.port = request.host, request.port
        record.decision = await ctx.authorize(
            Request(request.host, request.port, "socks5", ctx.sandbox_id)
        )
        if not record.decision.allowed:
            record.emit(ctx)
            await _socks_reply(client, core, socks5.NOT_ALLOWED_BY_RULESET)
            return
        try:
            upstream, early_down = await ctx.open(record)
        except Refused as refused:
            record.decision = refused.decision
            record.emit(ctx)
            await _socks_reply(client, core, socks5.NOT_ALLOWED_BY_RULESET)
            return
        except UpstreamError as exc:
            record.error = exc.reason
            record.emit(ctx)
            await _socks_reply(client, core, exc.socks_reply)
            return
        try:
            await loop.sock_sendall(client, core.send(socks5.Reply(socks5.SUCCEEDED)))
            early_up = await _checked_tls(ctx, client, record, core.take_trailing_data())
            if early_up is not None:
                await relay(
                    ctx, client, upstream, record, to_upstream=early_up, to_client=early_down
                )
        finally:
            upstream.close()
    except OSError as exc:
        record.error = f"client: {exc.strerror or exc}"
    finally:
        client.close()
        record.emit(ctx)


async def _socks_handshake(
    ctx: ProxyContext, client: socket.socket, core: socks5.Socks5Server, record: Record
) -> socks5.ConnectRequest | None:
    """Greeting, method and request; None (recorded, answered) when it goes no further."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(ctx.limits.handshake_timeout):
            event = await next_event(client, core)
            if isinstance(event, socks5.Greeting):
                ok = event.offers_no_auth
                method = socks5.NO_AUTH if ok else socks5.NO_ACCEPTABLE_METHODS
                await loop.sock_sendall(client, core.send(socks5.MethodSelection(method)))
                if not ok:
                    record.decision = Decision(False, "malformed", "no method without a password")
                    return None
                event = await next_event(client, core)
    except TimeoutError:
        record.decision = Decision(False, "timeout", "no complete SOCKS5 handshake in time")
        return None
    if isinstance(event, socks5.ConnectRequest):
        return event
    if isinstance(event, socks5.Unsupported):
        record.decision = Decision(False, "unsupported", event.reason)
        record.emit(ctx)
        await _socks_reply(client, core, event.reply)
    elif isinstance(event, socks5.ProtocolError):
        record.decision = Decision(False, "malformed", event.reason)
    return None


async def _socks_reply(client: socket.socket, core: socks5.Socks5Server, code: int) -> None:
    await _reply_and_close(client, core.send(socks5.Reply(code)))
