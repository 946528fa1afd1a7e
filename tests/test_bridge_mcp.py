"""`corral mcp`: an MCP client session with the SDK's own client (stdio_client + ClientSession)
against the server started in a subprocess, running real sandboxed commands.

Approvals are decided from the test process through the shared approval store, as
`corral approve` would from another terminal. Every wait has a deadline far above need.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import anyio
import mcp_types as types
import pytest
from mcp import ClientSession, StdioServerParameters, stdio_client

from corral.bridge.approvals import ApprovalStore, PendingApproval
from corral.bridge.declarations import parse_command
from corral.bridge.jobs import JobView
from corral.bridge.tools import export_tools
from tests.conftest import Layout
from tests.helpers_bridge_fake import FakeBridge

DEADLINE = 30.0
GREET: dict[str, Any] = {
    "description": "Say hello",
    "argv": ["echo", "hello", "{name}"],
    "params": {"name": {"type": "string", "pattern": "[a-z]+", "maxLength": 20}},
}
SETTINGS = {
    "bridge": {
        "approvalTimeoutSeconds": 60,
        "commands": {
            "greet": GREET,
            "show": {
                "description": "Print a file of the workspace",
                "argv": ["cat", "{file}"],
                "params": {"file": {"type": "path", "default": "README"}},
            },
            "mark": {"description": "Leave a marker", "argv": ["touch", "marker"]},
            "deploy": {
                "argv": ["echo", "deploying", "{env}"],
                "params": {"env": {"type": "string", "enum": ["staging", "prod"]}},
                "approval": {"ask": {"env": "^prod$"}},
            },
        },
    }
}

Session = Callable[[ClientSession], Awaitable[None]]


def prepare(layout: Layout) -> None:
    os.makedirs(f"{layout.workspace}/.corral")
    with open(f"{layout.workspace}/.corral/settings.json", "w") as f:
        json.dump(SETTINGS, f)
    with open(f"{layout.workspace}/README", "w") as f:
        f.write("read me\n")


def with_session(layout: Layout, scenario: Session) -> None:
    """Start the server as an MCP client would (a subprocess on stdio), initialize, run."""
    launcher = "import sys; from corral.bridge.mcp_server import main; sys.exit(main(sys.argv[1:]))"
    server = StdioServerParameters(
        command=sys.executable,
        args=["-c", launcher, "--workspace", layout.workspace],
        env=layout.env,
        cwd=layout.workspace,
    )

    async def run() -> None:
        with anyio.fail_after(DEADLINE * 2):
            async with stdio_client(server) as (read, write), ClientSession(read, write) as session:
                info = await session.initialize()
                assert info.server_info.name == "corral"
                await scenario(session)

    anyio.run(run)


def text(result: types.CallToolResult) -> str:
    assert len(result.content) == 1
    block = result.content[0]
    assert isinstance(block, types.TextContent)
    return block.text


def error_code(result: types.CallToolResult) -> str:
    assert result.is_error
    code: str = json.loads(text(result))["error"]["code"]
    return code


def store(layout: Layout) -> ApprovalStore:
    from corral.hostpaths import host_paths

    return ApprovalStore.in_state_dir(host_paths(layout.workspace, layout.env).state_dir)


async def pending_one(layout: Layout) -> PendingApproval:
    end = time.monotonic() + DEADLINE
    while not (found := store(layout).pending()):
        assert time.monotonic() < end, "no approval became pending"
        await anyio.sleep(0.02)
    assert len(found) == 1
    return found[0]


@pytest.mark.usefixtures("sandbox_available")
def test_a_client_lists_the_tools_and_runs_one_in_the_sandbox(layout: Layout) -> None:
    prepare(layout)

    async def scenario(session: ClientSession) -> None:
        listed = (await session.list_tools()).tools
        tools = {tool.name: tool for tool in listed}
        assert [tool.name for tool in listed] == ["greet", "show", "mark", "deploy"]
        assert (tools["greet"].description or "").startswith("Say hello")
        greet = parse_command("greet", GREET, file="settings.json")
        (exported,) = export_tools([greet], "mcp")
        assert tools["greet"].input_schema == exported["inputSchema"]
        assert tools["greet"].input_schema["required"] == ["name"]
        assert tools["greet"].annotations is not None and tools["greet"].annotations.read_only_hint
        assert tools["show"].input_schema["properties"]["file"]["default"] == "README"
        assert tools["deploy"].input_schema["properties"]["env"]["enum"] == ["staging", "prod"]

        greeted = await session.call_tool("greet", {"name": "bob"})
        assert not greeted.is_error
        assert "exit code: 0" in text(greeted) and "hello bob\n" in text(greeted)
        assert greeted.structured_content is not None
        assert greeted.structured_content["stdout"] == "hello bob\n"

        shown = await session.call_tool("show", {})
        assert not shown.is_error and "read me" in text(shown)

    with_session(layout, scenario)


BAD_CALLS: list[tuple[str, dict[str, Any], str]] = [
    ("greet", {"name": "bob; touch ../pwned"}, "invalid_parameter"),
    ("greet", {}, "missing_parameter"),
    ("greet", {"name": "bob", "extra": 1}, "unexpected_parameter"),
    ("greet", {"name": 7}, "invalid_parameter"),
    ("show", {"file": "../../.ssh/id_rsa"}, "path_outside_workspace"),
    ("rm", {"path": "/"}, "unknown_command"),
]


@pytest.mark.usefixtures("sandbox_available")
def test_bad_calls_are_errors_with_the_bridge_code(layout: Layout) -> None:
    prepare(layout)
    codes: list[str] = []

    async def scenario(session: ClientSession) -> None:
        for name, arguments, _ in BAD_CALLS:
            codes.append(error_code(await session.call_tool(name, arguments)))

    with_session(layout, scenario)
    assert codes == [code for _, _, code in BAD_CALLS]
    assert not os.path.exists(f"{layout.home}/pwned")


@pytest.mark.usefixtures("sandbox_available")
def test_a_blocked_write_is_an_error_and_leaves_nothing_on_the_host(layout: Layout) -> None:
    """`mark` runs `touch marker` in the workspace, which strict mode makes read-only."""
    prepare(layout)
    results: list[types.CallToolResult] = []

    async def scenario(session: ClientSession) -> None:
        results.append(await session.call_tool("mark", {}))

    with_session(layout, scenario)
    assert results[0].is_error and "state: failed" in text(results[0])
    assert "exit code: 1" in text(results[0])
    assert not os.path.exists(f"{layout.workspace}/marker")


@pytest.mark.usefixtures("sandbox_available")
@pytest.mark.parametrize("approve", [True, False], ids=["approved", "denied"])
def test_an_ask_command_waits_for_the_human(layout: Layout, approve: bool) -> None:
    prepare(layout)
    results: list[types.CallToolResult] = []
    heard: list[str] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        heard.append(message or "")

    async def scenario(session: ClientSession) -> None:
        async def call() -> None:
            arguments = {"env": "prod"}
            results.append(
                await session.call_tool("deploy", arguments, progress_callback=on_progress)
            )

        async with anyio.create_task_group() as group:
            group.start_soon(call)
            approval = await pending_one(layout)
            assert approval.argv == ("echo", "deploying", "prod") and approval.client == "mcp"
            with anyio.fail_after(DEADLINE):
                while not heard:  # the client hears what it waits for, and how it ends
                    await anyio.sleep(0.02)
            assert f"corral approve {approval.id}" in heard[0]
            assert results == []  # still waiting for the human
            store(layout).decide(approval.id, approve=approve, by="cli:tester", reason="not now")

    with_session(layout, scenario)
    (result,) = results
    if approve:
        assert not result.is_error and "deploying prod" in text(result)
    else:
        assert result.is_error
        assert text(result).startswith("DENIED (denied)") and "not now" in text(result)
        assert "Do not call this tool again" in text(result)


# -- in process, against a stand-in bridge: what only a misbehaving bridge can show ------------


def call_in_process(bridge: Any, name: str) -> types.CallToolResult:
    from mcp import Client

    from corral.bridge.mcp_server import build_server

    results: list[types.CallToolResult] = []

    async def run() -> None:
        with anyio.fail_after(DEADLINE):
            async with Client(build_server(bridge)) as client:
                results.append(await client.call_tool(name, {"text": "x"}))

    anyio.run(run)
    return results[0]


class BrokenBridge(FakeBridge):
    def submit(self, name: str, args: Mapping[str, object], *, client: str) -> JobView:
        raise RuntimeError("disk on fire")


def test_a_failure_inside_the_bridge_is_an_internal_error_not_a_crash() -> None:
    result = call_in_process(BrokenBridge(), "echo")
    assert error_code(result) == "internal" and "disk on fire" in text(result)


def test_an_approval_timeout_says_so_and_not_to_loop() -> None:
    bridge = FakeBridge(ask=("deploy",))
    reason = "approval_timeout: nobody approved it within 60 s. Ask the user to watch for it"

    def expire() -> None:
        while not bridge.pending():
            time.sleep(0.01)
        bridge.expire(bridge.pending()[0].id, reason=reason)

    expirer = threading.Thread(target=expire)
    expirer.start()
    result = call_in_process(bridge, "deploy")
    expirer.join()
    assert result.is_error and text(result).startswith(f"DENIED (approval_timeout): {reason}")
    assert "Do not call this tool again" in text(result)
