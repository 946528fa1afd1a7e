"""`corral mcp`: the declared bridge commands as the tools of an MCP server, over stdio.

Claude Code, Codex and other MCP clients start `corral mcp [--workspace DIR]` and see one
tool per command declared under `bridge.commands`, exactly as `corral tools export --format
mcp` prints them (bridge/tools.py). A call goes through the same `Bridge` as `corral serve`:
the same validation, sandbox, limits, approvals and audit log. The server is the official
MCP SDK's low-level `Server`, whose list_tools/call_tool handlers suit a tool list read from
settings.

What the agent gets back from `tools/call`:
- the command ran: text with the state, exit code, whether output was truncated, stdout and
  stderr; `isError` unless it succeeded; `structuredContent` is the job as JSON;
- the bridge refused the request (unknown command, bad argument, limits...): `isError` and
  the bridge's error as JSON text, `{"error": {"code", "message", "hint"}}`;
- the command needs a human's approval: the call waits (sending progress notifications when
  the client asked for them, and a line on stderr for the human) until a human decides with
  `corral approve ID` / `corral deny ID` or the page of `corral serve`, or until the approval
  timeout, which denies it. A denial says why, how a human can make it happen after all, and
  that calling again in a loop will not help.

Approvals live in corral's state directory, shared by every process, so `corral approve`
works from any terminal while the agent's client keeps this server running. The SDK points
fd 0 and 1 away from the protocol's pipes while it serves: nothing a command prints can
corrupt the JSON-RPC stream (commands run in sandboxes with their own pipes anyway).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping
from functools import partial
from typing import TYPE_CHECKING, Any

from corral.errors import CorralError, UsageError

if TYPE_CHECKING:
    import mcp_types as types
    from mcp.server import Server, ServerRequestContext

    from corral.bridge.service import Bridge, Command, JobView

    Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]

SERVER_NAME = "corral"
FINAL_STATES = frozenset({"succeeded", "failed", "denied", "timed_out"})
# While a call waits (for a human, or for a long command), how often the client hears of it.
PROGRESS_EVERY_S = 5.0
INSTRUCTIONS = (
    "Each tool runs one command the user declared, inside a corral sandbox (by default no "
    "network and a read-only workspace). Arguments are passed as plain argv elements, never "
    "through a shell. Some calls wait for a human to approve them; a denied call says why: "
    "do not repeat it in a loop, ask the user instead."
)


# -- tool definitions ------------------------------------------------------------------------


def tool_definitions(commands: tuple[Command, ...]) -> list[types.Tool]:
    """The tools, from the one export every format shares (bridge/tools.py)."""
    import mcp_types as types

    from corral.bridge.tools import export_tools

    return [types.Tool.model_validate(tool) for tool in export_tools(commands, "mcp")]


# -- results ---------------------------------------------------------------------------------


def job_result(job: JobView) -> types.CallToolResult:
    """What the agent reads of a finished job."""
    import mcp_types as types

    if job.state == "denied":
        from corral.bridge.spool_files import denial_code

        code = denial_code(job)
        text = (
            f"DENIED ({code}): {job.reason or 'a human refused this request'}\n"
            "Do not call this tool again with the same arguments unless the user asks you to."
        )
    else:
        text = "\n".join(
            [
                f"state: {job.state}",
                f"exit code: {job.exit_code}",
                f"truncated: {'yes' if job.truncated else 'no'}",
                *([f"note: {job.reason}"] if job.reason else []),
                "--- stdout ---",
                job.stdout,
                "--- stderr ---",
                job.stderr,
            ]
        )
    return types.CallToolResult(
        content=[types.TextContent(text=text)],
        structured_content=job.as_json(),
        is_error=job.state != "succeeded",
    )


def error_result(error: Mapping[str, object]) -> types.CallToolResult:
    """A refused request: `{"error": {...}}` as text, and as structured content."""
    import mcp_types as types

    return types.CallToolResult(
        content=[types.TextContent(text=json.dumps(error, indent=2))],
        structured_content=dict(error),
        is_error=True,
    )


# -- the server ------------------------------------------------------------------------------


def build_server(bridge: Bridge, *, client: str = "mcp") -> Server[Any]:
    """An MCP server whose tools are `bridge`'s commands. Blocking bridge calls run on worker
    threads, so one long call does not hold up the others."""
    import mcp_types as types
    from mcp.server import Server

    async def list_tools(
        ctx: ServerRequestContext[Any], params: types.PaginatedRequestParams | None
    ) -> types.ListToolsResult:
        return types.ListToolsResult(tools=tool_definitions(bridge.commands))

    async def call_tool(
        ctx: ServerRequestContext[Any], params: types.CallToolRequestParams
    ) -> types.CallToolResult:
        return await run_tool(bridge, ctx, params.name, params.arguments or {}, client=client)

    return Server(
        SERVER_NAME,
        version=_version(),
        instructions=INSTRUCTIONS,
        on_list_tools=list_tools,
        on_call_tool=call_tool,
    )


async def run_tool(
    bridge: Bridge,
    ctx: ServerRequestContext[Any],
    name: str,
    arguments: Mapping[str, object],
    *,
    client: str,
) -> types.CallToolResult:
    """submit, then wait until the job ends, telling the client (progress) and the human
    (stderr) while it waits for approval. Every failure becomes an isError result."""
    from anyio import to_thread

    from corral.bridge.errors import BridgeError

    try:
        job = await to_thread.run_sync(partial(bridge.submit, name, arguments, client=client))
        announced = False
        progress = 0
        while job.state not in FINAL_STATES:
            if job.state == "awaiting_approval" and not announced:
                _say(f"{name} waits for approval: corral approve {job.approval_id}")
                announced = True
            progress += 1
            await _report(ctx, progress, job)
            wait = partial(bridge.wait, job.id, timeout_s=PROGRESS_EVERY_S)
            job = await to_thread.run_sync(wait)
    except BridgeError as exc:
        return error_result(exc.as_json())
    except Exception as exc:  # a bug in the bridge must not end the session
        _say(f"{name} failed inside corral: {exc!r}")
        return error_result({"error": {"code": "internal", "message": repr(exc), "hint": ""}})
    return job_result(job)


async def _report(ctx: ServerRequestContext[Any], progress: int, job: JobView) -> None:
    """A progress notification, if the client asked for them (a progressToken)."""
    token = (ctx.meta or {}).get("progress_token")
    if token is None:
        return
    message = job.reason if job.state == "awaiting_approval" else f"job {job.id}: {job.state}"
    await ctx.session.send_progress_notification(token, float(progress), message=message)


def _say(message: str) -> None:
    # stderr is where MCP clients put a server's log: the human may be watching it.
    print(f"corral mcp: {message}", file=sys.stderr, flush=True)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("corral")
    except PackageNotFoundError:
        return "0"


async def serve_stdio(bridge: Bridge) -> None:
    """Serve one client on stdin/stdout until it closes them."""
    from mcp.server.stdio import stdio_server

    server = build_server(bridge)
    async with stdio_server() as (read_stream, write_stream):
        await server.run(read_stream, write_stream, server.create_initialization_options())


# -- the command -----------------------------------------------------------------------------


def add_mcp_command(commands: Subparsers) -> None:
    parser = commands.add_parser(
        "mcp",
        help="serve the declared bridge commands as MCP tools over stdio",
        description="An MCP server (stdio) whose tools are the commands declared under "
        "bridge.commands, each run in a corral sandbox. Add it to an MCP client as the "
        "command `corral mcp --workspace DIR`. Calls that need approval wait for "
        "`corral approve ID`.",
    )
    parser.add_argument(
        "--workspace", metavar="DIR", help="the project whose commands to serve (default: current)"
    )
    parser.set_defaults(handler=cmd_mcp)


def cmd_mcp(args: argparse.Namespace) -> int:
    workspace = os.path.abspath(args.workspace or os.getcwd())
    if not os.path.isdir(workspace):
        raise UsageError(f"{workspace}: not a directory", hint="--workspace names the project")
    try:
        import anyio
        import mcp  # noqa: F401 - the SDK is an optional dependency: say so early
    except ImportError as exc:
        raise CorralError(
            f"corral mcp needs the MCP SDK ({exc.name} is missing)",
            hint="install corral[bridge]",
        ) from None
    from corral.audit.spool import open_audit_sink
    from corral.bridge.service import Bridge
    from corral.hostpaths import host_paths
    from corral.policy.settings import load_policy

    host = host_paths(workspace, os.environ)
    # Decisions and runs go to the spool of the workspace's audit log (and to the forwarders
    # its settings name), as `corral run`'s records do.
    audit = open_audit_sink(load_policy(host), f"mcp-{os.urandom(6).hex()}")
    try:
        with Bridge.from_settings(workspace, state_dir=host.state_dir, audit=audit) as bridge:
            anyio.run(serve_stdio, bridge)
    finally:
        audit.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m corral.bridge.mcp_server ...`, the same as `corral mcp ...`."""
    from corral.cli import main as corral_main

    return corral_main(["mcp", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
