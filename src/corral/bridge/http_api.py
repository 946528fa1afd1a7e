"""The bridge's HTTP JSON API: a thin FastAPI edge over `Bridge`, which does all the checking.

    GET  /healthz                            no token: {"status": "ok"}
    GET  /openapi.json                       no token: this API's OpenAPI document
    GET  /v1/commands                        the declared commands and their parameter schemas
    POST /v1/commands/{name}/run             {"args": {...}, "wait": true, "timeout_s": 30}
                                             200 finished, 202 still queued/running/awaiting
                                             approval (Location: /v1/jobs/{id})
    GET  /v1/jobs/{id}[?wait_s=N]            the job (waiting up to N s for it to finish)
    GET  /v1/jobs/{id}/output[?offset=N]     stdout, streamed (chunked) until the job finishes
    GET  /v1/approvals                       requests waiting for a human
    POST /v1/approvals/{id}/approve|deny     {"reason": "..."}: a decision by the token holder
    /approvals...                            the approvals web page (bridge/web.py), if present

Rules:
1. Every error is `{"error": {"code", "message", "hint"}}` with a stable code: the Bridge's own
   (BridgeError), and for what FastAPI decides itself: malformed_request (400: not JSON, not an
   object, unknown or ill-typed envelope field), invalid_parameter (422: a value out of range),
   not_found (404), method_not_allowed (405), internal (500, the traceback only in the log);
   see http_errors.py.
2. The gate (http_gate.py) checks Host, token, rate and body size before any route runs.
3. The event loop never blocks: quick Bridge calls run in Starlette's thread pool; waiting for a
   job runs on a pool of its own (`HttpLimits.max_waiters` threads), so requests that wait can
   never starve the ones that decide an approval or read a job. A run that waits makes one
   trip to a thread: with the real Bridge, the submit, then the loop itself waits (the thread
   that finishes the job hands it over: `Bridge.when_finished`), so it holds no thread; with
   a Bridge without it, submit and wait on one waiter thread while a waiter is free.
4. The hot path is lean (issue 8: the bridge adds < 3 ms to a launch): no per-request
   dependency (the bearer scheme is documented by a twin app, see `_documenting_twin`), and a
   job goes out as a Response serialised here from the `Job` model the route declares.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Annotated, Any, NamedTuple, Protocol

from fastapi import APIRouter, Depends, FastAPI, Path, Query, Request, Response, Security
from fastapi.responses import StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool

from corral.bridge.errors import BridgeError
from corral.bridge.http_errors import install_error_handlers
from corral.bridge.http_gate import Gate, GateLimits
from corral.bridge.http_models import (
    FINISHED_STATES,
    MAX_REQUESTED_WAIT_S,
    ApprovalList,
    CommandList,
    Decision,
    DecisionRequest,
    ErrorBody,
    Health,
    Job,
    RunRequest,
    approval_body,
    command_list,
    job_body,
)
from corral.bridge.http_waits import Waits

if TYPE_CHECKING:
    from corral.bridge.declarations import Command
    from corral.bridge.service import BridgeLimits, JobView, PendingApproval


JSON = "application/json"
MAX_ID_CHARS = 200  # ids are short tokens; a longer one is refused before the Bridge sees it


class HttpLimits(NamedTuple):
    """What only the HTTP edge bounds. The body size comes from BridgeLimits (shared with the
    other front ends); jobs, queue, output and the rate of submissions are the Bridge's."""

    rate_per_s: float = 20.0  # every /v1 request per token: polling included, so generous
    burst: int = 60
    sync_wait_s: float = 60.0  # the longest a request may hold its connection waiting
    max_waiters: int = 64  # threads that wait for jobs; more waiting requests queue for one
    output_poll_s: float = 0.05  # how often a streamed output re-reads the job's stdout


class BridgeApi(Protocol):
    """The part of `corral.bridge.service.Bridge` this edge calls (tests pass a fake)."""

    @property
    def commands(self) -> Sequence[Command]: ...

    @property
    def limits(self) -> BridgeLimits: ...

    def submit(self, name: str, args: Mapping[str, object], *, client: str) -> JobView: ...

    def wait(self, job_id: str, *, timeout_s: float | None) -> JobView: ...

    def job(self, job_id: str) -> JobView: ...

    def output(self, job_id: str, *, offset: int = 0) -> tuple[bytes, bool]: ...

    def pending(self) -> Sequence[PendingApproval]: ...

    def decide(self, approval_id: str, *, approve: bool, by: str, reason: str = "") -> None: ...


TokenSource = Callable[[], "str | None"]
_BEARER = HTTPBearer(auto_error=False, description="`corral token` prints it")

# Documented on every /v1 route, so the OpenAPI document lists each error a client can get.
_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": description}
    for status, description in {
        400: "malformed_request",
        401: "unauthorized (WWW-Authenticate says why)",
        403: "forbidden (Host header), denied",
        404: "not_found, unknown_command, unknown_job, unknown_approval",
        405: "method_not_allowed",
        409: "not_pending",
        413: "request_too_large",
        422: "missing_parameter, unexpected_parameter, invalid_parameter, path_outside_workspace",
        429: "rate_limited (Retry-After)",
        500: "internal",
        503: "too_many_jobs (Retry-After)",
    }.items()
}


def create_app(
    bridge: BridgeApi,
    *,
    token: str | TokenSource,
    limits: BridgeLimits | None = None,
    http: HttpLimits | None = None,
) -> FastAPI:
    """The API over `bridge`. `token` is the bearer token, or a callable returning the current
    one (token.TokenFile.current: a rotation takes effect at once; None refuses everyone).
    `limits` defaults to the bridge's own; `http` to HttpLimits()."""
    max_body_bytes = (limits or bridge.limits).max_body_bytes
    http = http or HttpLimits()
    waiters = ThreadPoolExecutor(max_workers=http.max_waiters, thread_name_prefix="bridge-wait")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        waiters.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(**_APP_SETTINGS, lifespan=lifespan)
    app.openapi = _documenting_twin().openapi  # type: ignore[method-assign]
    app.state.corral_bridge = Waits(bridge, http, waiters)
    install_error_handlers(app)
    app.include_router(health)
    app.include_router(api)
    _include_web(app, bridge, token)
    app.add_middleware(
        Gate,
        token=token if callable(token) else (lambda: token),
        limits=GateLimits(max_body_bytes, http.rate_per_s, http.burst),
    )
    return app


_APP_SETTINGS: dict[str, Any] = {
    "title": "corral bridge",
    "version": "1",
    "description": "Run pre-declared commands in corral sandboxes, with human approvals.",
    "docs_url": None,  # the interactive pages load scripts from elsewhere; the JSON is enough
    "redoc_url": None,
    "openapi_url": "/openapi.json",
}


def _documenting_twin() -> FastAPI:
    """An app with the same routes whose /v1 routes also depend on the bearer scheme, so that
    its document says every /v1 operation needs the token. FastAPI learns of a security scheme
    only from a dependency, and the served routes go without it: the gate has checked the
    token already, and resolving the dependency would cost every request for nothing. The
    approvals page is left out: its routes are not in the document either way."""
    twin = FastAPI(**_APP_SETTINGS)
    twin.include_router(health)
    twin.include_router(api, dependencies=[Depends(_documented_bearer)])
    return twin


def _include_web(app: FastAPI, bridge: BridgeApi, token: str | TokenSource) -> None:
    # HOOK: the approvals web page (bridge/web.py, owned by the web helper). Mounted when the
    # module is importable; the API works without it. It authenticates on its own (session
    # cookie opened by the token), so the gate applies only Host and body limits to it.
    try:
        from corral.bridge.web import web_router
    except ImportError:
        return
    current = token() if callable(token) else token
    if current:
        app.include_router(web_router(bridge, token=current))


# -- routes: module-level endpoints; each app's own state is `_context(http)` ----------------


def _context(request: Request) -> Waits:
    # A plain call rather than a dependency: FastAPI resolves dependencies on every request,
    # and runs a `def` one on a worker thread (a hop).
    context: Waits = request.app.state.corral_bridge
    return context


async def _documented_bearer(
    _: Annotated[HTTPAuthorizationCredentials | None, Security(_BEARER)],
) -> None:
    """The gate checks the token; this dependency only puts the scheme into the document
    (it is on the routes of `_documenting_twin`, never on the served ones)."""


Id = Annotated[str, Path(max_length=MAX_ID_CHARS)]
WaitSeconds = Annotated[
    float,
    Query(
        ge=0, le=MAX_REQUESTED_WAIT_S, description="wait up to this long (and the server's limit)"
    ),
]
Offset = Annotated[int, Query(ge=0, description="the first byte of stdout to send")]

health = APIRouter(tags=["health"])
api = APIRouter(prefix="/v1", responses=_ERRORS)
_NOT_FINISHED: dict[int | str, dict[str, Any]] = {
    202: {"model": Job, "description": "not finished yet: poll /v1/jobs/{id}"}
}
_OUTPUT: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "stdout bytes, streamed until the job finishes",
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}


@health.get("/healthz", response_model=Health)
async def healthz() -> Health:
    return Health(status="ok")


@api.get("/commands", response_model=CommandList, tags=["commands"])
async def list_commands(http: Request) -> CommandList:
    return command_list(_context(http).bridge.commands)


@api.post("/commands/{name}/run", response_model=Job, tags=["commands"], responses=_NOT_FINISHED)
async def run_command(http: Request, name: Id, request: RunRequest) -> Response:
    ctx = _context(http)
    wait_s = None
    if request.wait:
        wait_s = min(request.timeout_s or MAX_REQUESTED_WAIT_S, ctx.http.sync_wait_s)
    return _job_response(await ctx.run(name, request.args, wait_s=wait_s))


@api.get("/jobs/{job_id}", response_model=Job, tags=["jobs"], responses=_NOT_FINISHED)
async def get_job(http: Request, job_id: Id, wait_s: WaitSeconds = 0.0) -> Response:
    ctx = _context(http)
    view = await run_in_threadpool(ctx.bridge.job, job_id)
    if wait_s > 0 and view.state not in FINISHED_STATES:
        view = await ctx.wait_for(job_id, min(wait_s, ctx.http.sync_wait_s))
    return _job_response(view)


@api.get(
    "/jobs/{job_id}/output", tags=["jobs"], response_class=StreamingResponse, responses=_OUTPUT
)
async def get_output(http: Request, job_id: Id, offset: Offset = 0) -> StreamingResponse:
    ctx = _context(http)
    # The first read happens before the response starts, so an unknown job is a JSON 404.
    first = await run_in_threadpool(functools.partial(ctx.bridge.output, job_id, offset=offset))
    stream = _stream_output(ctx.bridge, job_id, offset, first, poll_s=ctx.http.output_poll_s)
    return StreamingResponse(
        stream,
        media_type="application/octet-stream",
        headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"},
    )


@api.get("/approvals", response_model=ApprovalList, tags=["approvals"])
async def list_approvals(http: Request) -> ApprovalList:
    pending = await run_in_threadpool(_context(http).bridge.pending)
    return ApprovalList(approvals=[approval_body(p) for p in pending])


@api.post("/approvals/{approval_id}/approve", response_model=Decision, tags=["approvals"])
async def approve(http: Request, approval_id: Id, body: DecisionRequest | None = None) -> Decision:
    return await _decide(_context(http), approval_id, body, approve=True)


@api.post("/approvals/{approval_id}/deny", response_model=Decision, tags=["approvals"])
async def deny(http: Request, approval_id: Id, body: DecisionRequest | None = None) -> Decision:
    return await _decide(_context(http), approval_id, body, approve=False)


async def _decide(
    ctx: Waits, approval_id: str, body: DecisionRequest | None, *, approve: bool
) -> Decision:
    reason = body.reason if body is not None else ""
    call = functools.partial(
        ctx.bridge.decide, approval_id, approve=approve, by="api", reason=reason
    )
    await run_in_threadpool(call)
    return Decision(id=approval_id, decision="approved" if approve else "denied")


async def _stream_output(
    bridge: BridgeApi, job_id: str, offset: int, first: tuple[bytes, bool], *, poll_s: float
) -> AsyncIterator[bytes]:
    data, finished = first
    while True:
        if data:
            yield data
            offset += len(data)
        if finished:
            return
        await asyncio.sleep(poll_s)
        try:
            read = functools.partial(bridge.output, job_id, offset=offset)
            data, finished = await run_in_threadpool(read)
        except BridgeError:  # the job went away mid-stream: the headers are sent, just stop
            return


def _job_response(view: JobView) -> Response:
    """The `Job` body as FastAPI would serialise it, in a Response of our own: the route
    declares `response_model=Job` for the document only, since FastAPI neither validates a
    returned Response again nor merges an injected `response: Response` into it, so the status
    and Location are set here (set on an injected one, they would be lost)."""
    body = job_body(view).model_dump_json()
    if view.state in FINISHED_STATES:
        return Response(body, media_type=JSON)
    # Not finished yet: 202, and where to poll.
    return Response(body, 202, {"Location": f"/v1/jobs/{view.id}"}, media_type=JSON)
