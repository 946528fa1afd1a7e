"""`corral tools export`, `corral approvals`, `corral approve` and `corral deny`, through their
parsers and handlers (as corral.cli calls them)."""

from __future__ import annotations

import json
import os

import pytest

from corral.bridge.cli import login_name
from corral.bridge.errors import BridgeError
from corral.bridge.service import Bridge
from corral.cli import build_parser
from tests.conftest import Layout

SETTINGS = {
    "bridge": {
        "commands": {
            "touch": {
                "description": "Create a file",
                "argv": ["touch", "{p}"],
                "params": {"p": {"type": "path"}},
                "writable": True,
                "approval": "ask",
            },
            "echo": {"argv": ["echo", "{m}"], "params": {"m": {"type": "string"}}},
        }
    }
}


@pytest.fixture
def project(layout: Layout, monkeypatch: pytest.MonkeyPatch) -> Layout:
    os.makedirs(f"{layout.workspace}/.corral")
    with open(f"{layout.workspace}/.corral/settings.json", "w") as f:
        json.dump(SETTINGS, f)
    monkeypatch.setenv("HOME", layout.home)
    for name in ("XDG_CONFIG_HOME", "XDG_STATE_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(layout.workspace)
    return layout


def run(argv: list[str]) -> int:
    """Through corral's own entry point, as `corral ...` runs it; BridgeError propagates."""
    parser = build_parser(only=argv[0])
    args = parser.parse_args(argv)
    result: int = args.handler(args)
    return result


def bridge_for(layout: Layout) -> Bridge:
    return Bridge.from_settings(
        layout.workspace, managed_path=f"{layout.root}/none.json", environ=layout.env
    )


@pytest.mark.parametrize("fmt", ["anthropic", "openai", "mcp"])
def test_tools_export(project: Layout, capsys: pytest.CaptureFixture[str], fmt: str) -> None:
    assert run(["tools", "export", "--format", fmt]) == 0
    tools = json.loads(capsys.readouterr().out)
    names = [t["function"]["name"] if fmt == "openai" else t["name"] for t in tools]
    assert names == ["touch", "echo"]


def test_tools_export_from_another_directory(
    project: Layout, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(project.outside)
    run(["tools", "export", "--format", "mcp", "--workspace", project.workspace])
    assert len(json.loads(capsys.readouterr().out)) == 2


def test_tools_export_needs_a_known_format(project: Layout) -> None:
    with pytest.raises(SystemExit):
        run(["tools", "export", "--format", "gemini"])


@pytest.mark.usefixtures("sandbox_available")
def test_list_then_approve(project: Layout, capsys: pytest.CaptureFixture[str]) -> None:
    with bridge_for(project) as bridge:
        assert run(["approvals"]) == 0
        assert "no bridge request" in capsys.readouterr().out
        view = bridge.submit("touch", {"p": "made"}, client="agent")
        run(["approvals"])
        listing = capsys.readouterr().out
        assert str(view.approval_id) in listing
        assert f"touch {project.workspace}/made" in listing
        run(["approvals", "--json"])
        [record] = json.loads(capsys.readouterr().out)
        assert record["job_id"] == view.id

        assert run(["approve", str(view.approval_id), "--reason", "fine"]) == 0
        assert "approved" in capsys.readouterr().out
        assert bridge.wait(view.id, timeout_s=60).state == "succeeded"
        assert os.path.exists(f"{project.workspace}/made")
        events = bridge.audit.of_kind("bridge")  # type: ignore[attr-defined]
        assert events[-1].fields["decided_by"] == f"cli:{login_name()}"


def test_deny_with_a_reason(project: Layout, capsys: pytest.CaptureFixture[str]) -> None:
    with bridge_for(project) as bridge:
        view = bridge.submit("touch", {"p": "made"}, client="agent")
        assert run(["deny", str(view.approval_id), "--reason", "not today"]) == 0
        done = bridge.wait(view.id, timeout_s=60)
        assert done.state == "denied" and "not today" in done.reason
    assert not os.path.exists(f"{project.workspace}/made")


@pytest.mark.parametrize("verb", ["approve", "deny"])
def test_unknown_and_decided_ids(project: Layout, verb: str) -> None:
    with pytest.raises(BridgeError) as caught:
        run([verb, "x" * 22])
    assert caught.value.code == "unknown_approval" and caught.value.exit_code == 2
    with bridge_for(project) as bridge:
        view = bridge.submit("touch", {"p": "made"}, client="agent")
        run(["deny", str(view.approval_id)])
        with pytest.raises(BridgeError) as caught:
            run([verb, str(view.approval_id)])
        assert caught.value.code == "not_pending"
