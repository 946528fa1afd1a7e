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
   never starve the ones that decide an approval or read a job.
"""

from __future__ import annotations

import asyncio
import functools
import time
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
    Approval,
    ApprovalList,
    CommandInfo,
    CommandList,
    Decision,
    DecisionRequest,
    ErrorBody,
    Health,
    Job,
    RunRequest,
)

if TYPE_CHECKING:
    from corral.bridge.declarations import Command
    from corral.bridge.service import BridgeLimits, JobView, PendingApproval


CLIENT = "http"
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

    app = FastAPI(
        title="corral bridge",
        version="1",
        description="Run pre-declared commands in corral sandboxes, with human approvals.",
        docs_url=None,  # the interactive pages load scripts from elsewhere; the JSON is enough
        redoc_url=None,
        openapi_url="/openapi.json",
        lifespan=lifespan,
    )
    app.state.corral_bridge = _Context(bridge, http, waiters)
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


# -- routes: module-level endpoints; each app's own state comes in through `Ctx` --------------


class _Context(NamedTuple):
    bridge: BridgeApi
    http: HttpLimits
    waiters: ThreadPoolExecutor

    async def wait_for(self, job_id: str, seconds: float) -> JobView:
        deadline = time.monotonic() + seconds

        def wait() -> JobView:
            # Measured when a waiter thread is free, so time spent queueing counts.
            return self.bridge.wait(job_id, timeout_s=max(0.0, deadline - time.monotonic()))

        return await asyncio.get_running_loop().run_in_executor(self.waiters, wait)


def _context(request: Request) -> _Context:
    context: _Context = request.app.state.corral_bridge
    return context


async def _documented_bearer(
    _: Annotated[HTTPAuthorizationCredentials | None, Security(_BEARER)],
) -> None:
    """The gate checks the token; this dependency only puts the scheme into the document."""


Ctx = Annotated[_Context, Depends(_context)]
Id = Annotated[str, Path(max_length=MAX_ID_CHARS)]
WaitSeconds = Annotated[
    float,
    Query(
        ge=0, le=MAX_REQUESTED_WAIT_S, description="wait up to this long (and the server's limit)"
    ),
]
Offset = Annotated[int, Query(ge=0, description="the first byte of stdout to send")]

health = APIRouter(tags=["health"])
api = APIRouter(prefix="/v1", responses=_ERRORS, dependencies=[Depends(_documented_bearer)])
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
async def list_commands(ctx: Ctx) -> CommandList:
    return _command_list(ctx.bridge.commands)


@api.post("/commands/{name}/run", response_model=Job, tags=["commands"], responses=_NOT_FINISHED)
async def run_command(ctx: Ctx, name: Id, request: RunRequest, response: Response) -> Job:
    submit = functools.partial(ctx.bridge.submit, name, request.args, client=CLIENT)
    view = await run_in_threadpool(submit)
    if request.wait and view.state not in FINISHED_STATES:
        seconds = min(request.timeout_s or MAX_REQUESTED_WAIT_S, ctx.http.sync_wait_s)
        view = await ctx.wait_for(view.id, seconds)
    return _job_response(view, response)


@api.get("/jobs/{job_id}", response_model=Job, tags=["jobs"], responses=_NOT_FINISHED)
async def get_job(ctx: Ctx, job_id: Id, response: Response, wait_s: WaitSeconds = 0.0) -> Job:
    view = await run_in_threadpool(ctx.bridge.job, job_id)
    if wait_s > 0 and view.state not in FINISHED_STATES:
        view = await ctx.wait_for(job_id, min(wait_s, ctx.http.sync_wait_s))
    return _job_response(view, response)


@api.get(
    "/jobs/{job_id}/output", tags=["jobs"], response_class=StreamingResponse, responses=_OUTPUT
)
async def get_output(ctx: Ctx, job_id: Id, offset: Offset = 0) -> StreamingResponse:
    # The first read happens before the response starts, so an unknown job is a JSON 404.
    first = await run_in_threadpool(functools.partial(ctx.bridge.output, job_id, offset=offset))
    stream = _stream_output(ctx.bridge, job_id, offset, first, poll_s=ctx.http.output_poll_s)
    return StreamingResponse(
        stream,
        media_type="application/octet-stream",
        headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"},
    )


@api.get("/approvals", response_model=ApprovalList, tags=["approvals"])
async def list_approvals(ctx: Ctx) -> ApprovalList:
    pending = await run_in_threadpool(ctx.bridge.pending)
    return ApprovalList(approvals=[_approval(p) for p in pending])


@api.post("/approvals/{approval_id}/approve", response_model=Decision, tags=["approvals"])
async def approve(ctx: Ctx, approval_id: Id, body: DecisionRequest | None = None) -> Decision:
    return await _decide(ctx, approval_id, body, approve=True)


@api.post("/approvals/{approval_id}/deny", response_model=Decision, tags=["approvals"])
async def deny(ctx: Ctx, approval_id: Id, body: DecisionRequest | None = None) -> Decision:
    return await _decide(ctx, approval_id, body, approve=False)


async def _decide(
    ctx: Ctx, approval_id: str, body: DecisionRequest | None, *, approve: bool
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


def _job_response(view: JobView, response: Response) -> Job:
    if view.state not in FINISHED_STATES:
        response.status_code = 202
        response.headers["Location"] = f"/v1/jobs/{view.id}"
    return Job(
        id=view.id,
        command=view.command,
        argv=list(view.argv),
        cwd=view.cwd,
        state=view.state,
        exit_code=view.exit_code,
        stdout=view.stdout,
        stderr=view.stderr,
        truncated=view.truncated,
        reason=view.reason,
        approval_id=view.approval_id,
        created=view.created,
        finished=view.finished,
    )


def _approval(p: PendingApproval) -> Approval:
    return Approval(
        id=p.id,
        job_id=p.job_id,
        command=p.command,
        argv=list(p.argv),
        cwd=p.cwd,
        policy_summary=p.policy_summary,
        reason=p.reason,
        client=p.client,
        created=p.created,
        expires=p.expires,
    )


def _command_list(commands: Sequence[Command]) -> CommandList:
    # The same parameter schemas as the exported tools: one source for every front end.
    from corral.bridge.tools import input_schema

    return CommandList(
        commands=[
            CommandInfo(
                name=command.name,
                description=command.description,
                parameters=input_schema(command, strict=False),
                approval=_approval_rule(command),
            )
            for command in commands
        ]
    )


def _approval_rule(command: Command) -> str:
    rule = command.approval
    if not rule.ask_when:
        return rule.kind
    return "ask when " + " or ".join(
        f"{name} matches /{pattern.pattern}/" for name, pattern in rule.ask_when
    )
