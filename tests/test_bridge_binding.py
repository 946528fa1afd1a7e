"""Binding a request to argv: every rejection path, and values that stay data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from corral.bridge.binding import bind, describe_policy, read_only_workspace, workspace_writable
from corral.bridge.declarations import Command, parse_command
from corral.bridge.errors import CODES, BridgeError
from corral.policy.model import HostPaths, Origin
from corral.policy.presets import preset_policy
from tests.conftest import Layout

FILE = "/test/settings.json"


def _command(body: dict[str, object]) -> Command:
    return parse_command("cmd", body, file=FILE)


EVERYTHING = _command(
    {
        "argv": ["tool", "--env={env}", "{name}", "-n", "{count}", "{verbose}", "{file}", "{on}"],
        "params": {
            "env": {"type": "string", "enum": ["staging", "prod"], "default": "staging"},
            "name": {"type": "string", "pattern": "[a-z]+", "maxLength": 8},
            "count": {"type": "integer", "minimum": 1, "maximum": 10, "default": 1},
            "verbose": {"type": "boolean", "flag": "--verbose", "default": False},
            "file": {"type": "path", "default": "."},
            "on": {"type": "boolean", "default": True},
        },
        "approval": {"ask": {"env": "^prod$"}},
    }
)


@pytest.fixture
def workspace(tmp_path: Path) -> str:
    ws = tmp_path / "ws"
    (ws / "sub").mkdir(parents=True)
    (ws / "sub" / "f.txt").write_text("x")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret").write_text("s")
    os.symlink(tmp_path / "outside" / "secret", ws / "link-out")
    os.symlink(tmp_path / "outside", ws / "dir-out")
    os.symlink(ws / "sub" / "f.txt", ws / "link-in")
    return str(ws)


def _bind(
    args: dict[str, object], workspace: str, command: Command = EVERYTHING
) -> tuple[str, ...]:
    policy = preset_policy("strict", _host(workspace))
    return bind(command, args, workspace=workspace, policy=policy).argv


def _host(workspace: str) -> HostPaths:
    from corral.hostpaths import host_paths

    return host_paths(workspace, {"HOME": os.path.dirname(workspace)})


def test_defaults_and_rendering(workspace: str) -> None:
    argv = _bind({"name": "abc"}, workspace)
    assert argv == ("tool", "--env=staging", "abc", "-n", "1", workspace, "true")


def test_every_parameter_given(workspace: str) -> None:
    args = {
        "env": "prod",
        "name": "x",
        "count": 10,
        "verbose": True,
        "file": "sub/f.txt",
        "on": False,
    }
    argv = _bind(args, workspace)
    assert argv == (
        "tool",
        "--env=prod",
        "x",
        "-n",
        "10",
        "--verbose",
        f"{workspace}/sub/f.txt",
        "false",
    )


# (id, args, error code, parameter named in detail or None)
REJECTED: list[tuple[str, dict[str, object], str, str | None]] = [
    ("missing", {}, "missing_parameter", "name"),
    ("extra", {"name": "a", "rm": "-rf"}, "unexpected_parameter", None),
    ("string for integer", {"name": "a", "count": "3"}, "invalid_parameter", "count"),
    ("bool for integer", {"name": "a", "count": True}, "invalid_parameter", "count"),
    ("float for integer", {"name": "a", "count": 3.0}, "invalid_parameter", "count"),
    ("below minimum", {"name": "a", "count": 0}, "invalid_parameter", "count"),
    ("above maximum", {"name": "a", "count": 11}, "invalid_parameter", "count"),
    ("integer for string", {"name": 5}, "invalid_parameter", "name"),
    ("null", {"name": None}, "missing_parameter", "name"),
    ("list", {"name": ["a"]}, "invalid_parameter", "name"),
    ("enum", {"name": "a", "env": "dev"}, "invalid_parameter", "env"),
    ("enum case", {"name": "a", "env": "PROD"}, "invalid_parameter", "env"),
    ("pattern is a full match", {"name": "abc; rm"}, "invalid_parameter", "name"),
    ("pattern newline", {"name": "abc\n"}, "invalid_parameter", "name"),
    ("maxLength", {"name": "a" * 9}, "invalid_parameter", "name"),
    ("string for boolean", {"name": "a", "verbose": "true"}, "invalid_parameter", "verbose"),
    ("int for boolean", {"name": "a", "verbose": 1}, "invalid_parameter", "verbose"),
    ("NUL in a path", {"name": "a", "file": "sub\0/x"}, "invalid_parameter", "file"),
    ("empty path", {"name": "a", "file": ""}, "invalid_parameter", "file"),
    ("dot-dot", {"name": "a", "file": "../outside/secret"}, "path_outside_workspace", "file"),
    ("deep dot-dot", {"name": "a", "file": "sub/../../outside"}, "path_outside_workspace", "file"),
    ("absolute outside", {"name": "a", "file": "/etc/passwd"}, "path_outside_workspace", "file"),
    ("symlink to a file", {"name": "a", "file": "link-out"}, "path_outside_workspace", "file"),
    ("symlink dir", {"name": "a", "file": "dir-out/secret"}, "path_outside_workspace", "file"),
]


@pytest.mark.parametrize(("case", "args", "code", "param"), REJECTED, ids=[r[0] for r in REJECTED])
def test_rejected(
    workspace: str, case: str, args: dict[str, object], code: str, param: str | None
) -> None:
    with pytest.raises(BridgeError) as caught:
        _bind(args, workspace)
    assert caught.value.code == code
    assert caught.value.status == CODES[code] == 422
    if param is not None:
        assert caught.value.detail["parameter"] == param
    assert caught.value.message and caught.value.hint


def test_not_an_object(workspace: str) -> None:
    with pytest.raises(BridgeError) as caught:
        _bind(["a"], workspace)  # type: ignore[arg-type]
    assert caught.value.code == "malformed_request"
    assert caught.value.status == 400


def test_unexpected_names_every_extra(workspace: str) -> None:
    with pytest.raises(BridgeError) as caught:
        _bind({"name": "a", "b": 1, "a": 2}, workspace)
    assert caught.value.detail == {"parameters": ["a", "b"]}


@pytest.mark.parametrize(
    "path", ["link-in", "sub/../sub/f.txt", "./sub", "sub/new-file", "."], ids=str
)
def test_paths_inside_are_accepted_resolved(workspace: str, path: str) -> None:
    argv = _bind({"name": "a", "file": path}, workspace)
    expected = os.path.realpath(os.path.join(workspace, path))
    assert argv[5] == expected
    assert expected == workspace or expected.startswith(workspace + "/")


SHELLISH = [
    "; touch /var/tmp/x",
    "$(touch /var/tmp/x)",
    "`touch /var/tmp/x`",
    "a && b || c | d > e < f",
    "'\"\\",
    "$HOME ~ * ?",
    "\n\t",
    "{name}",
]


@pytest.mark.parametrize("value", SHELLISH, ids=repr)
def test_shell_metacharacters_stay_one_literal_element(workspace: str, value: str) -> None:
    command = _command(
        {"argv": ["echo", "pre-{v}-post", "{v}"], "params": {"v": {"type": "string"}}}
    )
    argv = _bind({"v": value}, workspace, command)
    assert argv == ("echo", f"pre-{value}-post", value)


@pytest.mark.parametrize("value", ["-rf", "--output=/etc/x", "-"], ids=str)
def test_an_option_like_value_is_refused_where_it_fills_an_element(
    workspace: str, value: str
) -> None:
    command = _command({"argv": ["ls", "{v}"], "params": {"v": {"type": "string"}}})
    with pytest.raises(BridgeError) as caught:
        _bind({"v": value}, workspace, command)
    assert caught.value.code == "invalid_parameter"
    assert "option" in caught.value.message


def test_an_option_like_value_is_fine_inside_an_element_or_when_declared(workspace: str) -> None:
    inside = _command({"argv": ["x", "--name={v}"], "params": {"v": {"type": "string"}}})
    assert _bind({"v": "-a"}, workspace, inside) == ("x", "--name=-a")
    declared = _command(
        {"argv": ["x", "{v}"], "params": {"v": {"type": "string", "pattern": "-[a-z]"}}}
    )
    assert _bind({"v": "-a"}, workspace, declared) == ("x", "-a")


@pytest.mark.parametrize(
    ("args", "kind"),
    [({"name": "a"}, "auto"), ({"name": "a", "env": "prod"}, "ask")],
)
def test_approval_rule_with_a_pattern(workspace: str, args: dict[str, object], kind: str) -> None:
    policy = preset_policy("strict", _host(workspace))
    invocation = bind(EVERYTHING, args, workspace=workspace, policy=policy)
    assert invocation.approval == kind
    assert (invocation.approval_reason is None) == (kind == "auto")
    if kind == "ask":
        assert "env matched /^prod$/" in (invocation.approval_reason or "")


@pytest.mark.parametrize("kind", ["ask", "deny"])
def test_approval_rule_words(workspace: str, kind: str) -> None:
    command = _command({"argv": ["true"], "approval": kind})
    invocation = bind(
        command, {}, workspace=workspace, policy=preset_policy("strict", _host(workspace))
    )
    assert invocation.approval == kind
    assert FILE in (invocation.approval_reason or "")


def test_output_limit_is_capped_by_the_bridge(workspace: str) -> None:
    command = _command({"argv": ["true"], "outputLimitBytes": 10_000})
    policy = preset_policy("strict", _host(workspace))
    assert (
        bind(command, {}, workspace=workspace, policy=policy, output_limit=100).output_limit == 100
    )
    small = _command({"argv": ["true"], "outputLimitBytes": 10})
    assert bind(small, {}, workspace=workspace, policy=policy, output_limit=100).output_limit == 10


@pytest.mark.parametrize("mode", ["strict", "standard", "permissive"])
def test_read_only_workspace_in_every_mode(layout: Layout, mode: str) -> None:
    policy = preset_policy(mode, layout.host())  # type: ignore[arg-type]
    assert workspace_writable(policy)
    read_only = read_only_workspace(policy, Origin(FILE, "writable: false"))
    assert not workspace_writable(read_only)
    assert "read-only" in describe_policy(read_only)
    # Everything else stays: the mandatory protections, the network, the mode.
    assert set(policy.filesystem.deny_write) <= set(read_only.filesystem.deny_write)
    assert read_only.network == policy.network
