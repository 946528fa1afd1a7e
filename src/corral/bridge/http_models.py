"""The HTTP API's request and response bodies, as pydantic models so that the OpenAPI document
at /openapi.json describes every body exactly (and schemathesis can fuzz against it).

Request models forbid unknown fields and are strict (no "true" for true): an agent that sends
something else learns at once, with a 400/422 and a stable code, instead of being guessed at.
Command arguments (`RunRequest.args`) are passed through untouched: validating them is the core
Bridge's job, and its errors keep their own codes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from corral.bridge.declarations import Command
    from corral.bridge.service import JobView, PendingApproval

# A ceiling on what a client may ask to wait for in one request; the server's own limit
# (HttpLimits.sync_wait_s) applies on top, and the shorter wins.
MAX_REQUESTED_WAIT_S = 3600.0
MAX_REASON_CHARS = 1000

JobState = Literal[
    "awaiting_approval", "queued", "running", "succeeded", "failed", "denied", "timed_out"
]
FINISHED_STATES: frozenset[str] = frozenset({"succeeded", "failed", "denied", "timed_out"})


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class ErrorDetail(BaseModel):
    code: str = Field(description="stable snake_case code to match on, e.g. unknown_command")
    message: str = Field(description="what went wrong, for a human or an agent to read")
    hint: str = Field(description="what to do about it (may be empty)")
    detail: dict[str, Any] | None = Field(
        default=None, description="machine-readable context: the parameter, the job id..."
    )


class ErrorBody(BaseModel):
    """Every error response, whatever its status."""

    error: ErrorDetail


class Health(BaseModel):
    status: Literal["ok"]


class CommandInfo(BaseModel):
    name: str
    description: str
    parameters: dict[str, Any] = Field(
        description="JSON Schema (type object) of the command's arguments"
    )
    approval: str = Field(description="auto, ask, deny, or ask when a parameter matches")


class CommandList(BaseModel):
    commands: list[CommandInfo]


class RunRequest(_Request):
    args: dict[str, Any] = Field(
        default_factory=dict, description="the command's arguments, by parameter name"
    )
    wait: bool = Field(
        default=True,
        description="true: wait (up to timeout_s and the server's limit) and answer 200 when "
        "finished, 202 if not yet; false: answer 202 at once with the queued job",
    )
    timeout_s: float | None = Field(
        default=None,
        gt=0,
        le=MAX_REQUESTED_WAIT_S,
        description="how long to wait for the result; the server's own limit may be shorter",
    )


class Job(BaseModel):
    id: str
    command: str
    argv: list[str]
    cwd: str
    state: JobState
    exit_code: int | None
    stdout: str
    stderr: str
    truncated: bool = Field(description="true if the output exceeded the command's limit")
    reason: str = Field(description="why it was denied or failed, and how to re-trigger it")
    approval_id: str | None
    created: float
    finished: float | None


class Approval(BaseModel):
    id: str
    job_id: str
    command: str
    argv: list[str]
    cwd: str
    policy_summary: str = Field(description="mode, writable paths, network: where it would run")
    reason: str = Field(description="why a human has to decide")
    client: str
    created: float
    expires: float


class ApprovalList(BaseModel):
    approvals: list[Approval]


class DecisionRequest(_Request):
    reason: str = Field(default="", max_length=MAX_REASON_CHARS)


class Decision(BaseModel):
    id: str
    decision: Literal["approved", "denied"]


# -- the core's records as bodies ---------------------------------------------------------


def job_body(view: JobView) -> Job:
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


def approval_body(p: PendingApproval) -> Approval:
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


def command_list(commands: Sequence[Command]) -> CommandList:
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
