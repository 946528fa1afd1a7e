"""`policy show` (JSON and table) and `policy check` (risky rules)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from corral.policy.model import CLI, HostPaths, Mode, Origin, Policy, Rule
from corral.policy.presets import preset_policy
from corral.policy.report import check_policy, format_policy, policy_as_json
from corral.policy.settings import load_policy

HOST = HostPaths(
    workspace="/home/u/ws",
    home="/home/u",
    config_home="/home/u/.config",
    cache_home="/home/u/.cache",
    state_home="/home/u/.local/state",
)
PATH_DIRS = ["/home/u/tools", "/home/u/bin", "/usr/local/bin", "/usr/bin", "/bin"]
SETTINGS = Origin("/home/u/ws/.corral/settings.json", "x")


def standard() -> Policy:
    return preset_policy("standard", HOST)


def with_writes(policy: Policy, *paths: str) -> Policy:
    rules = tuple(Rule(path, SETTINGS) for path in paths)
    fs = policy.filesystem
    return policy._replace(filesystem=fs._replace(write=fs.write + rules))


def with_network(policy: Policy, **changes: Any) -> Policy:
    return policy._replace(network=policy.network._replace(**changes))


def domains(*patterns: str) -> tuple[Rule, ...]:
    return tuple(Rule(pattern, SETTINGS) for pattern in patterns)


@pytest.mark.parametrize("mode", ["strict", "standard"])
def test_clean_presets_have_no_findings(mode: Mode) -> None:
    assert check_policy(preset_policy(mode, HOST), path_dirs=PATH_DIRS) == []


@pytest.mark.parametrize(
    ("write", "path_dirs"),
    [
        ("/home/u/tools", PATH_DIRS),  # the PATH directory itself
        ("/usr/local", PATH_DIRS),  # a parent of it
        ("/usr/local/bin/tool", PATH_DIRS),  # a program inside it
        ("/opt/tools/bin", ["/opt/tools/bin/"]),  # PATH entries are normalised
    ],
)
def test_writable_directory_on_path_is_an_error(write: str, path_dirs: list[str]) -> None:
    findings = check_policy(with_writes(standard(), write), path_dirs=path_dirs)
    assert [(f.level, f.key, f.origin) for f in findings] == [
        ("error", "filesystem.allowWrite", str(SETTINGS))
    ]
    assert "on $PATH" in findings[0].message


def test_writable_directory_off_path_is_fine() -> None:
    policy = with_writes(standard(), "/home/u/tools")
    assert check_policy(policy, path_dirs=["/usr/bin"]) == []


@pytest.mark.parametrize("entry", ["", ".", "bin"])
def test_relative_path_entries_resolve_against_the_workspace(entry: str) -> None:
    # "" and "." on PATH mean the current directory, usually the (writable) workspace.
    findings = check_policy(standard(), path_dirs=[entry, "/usr/bin"])
    assert [f.level for f in findings] == ["error"]
    assert findings[0].origin == "preset standard"


def test_path_directory_protected_by_deny_write_is_fine() -> None:
    policy = with_writes(standard(), "/home/u/tools")
    fs = policy.filesystem
    deny = (*fs.deny_write, Rule("/home/u/tools/bin", SETTINGS))
    policy = policy._replace(filesystem=fs._replace(deny_write=deny))
    assert check_policy(policy, path_dirs=["/home/u/tools/bin"]) == []


@pytest.mark.parametrize("write", ["/home/u", "/home", "/"])
def test_writable_home_is_a_warning(write: str) -> None:
    findings = check_policy(with_writes(standard(), write), path_dirs=["/usr/bin"])
    levels = {(f.level, f.key) for f in findings}
    assert ("warning", "filesystem.allowWrite") in levels
    assert any("home directory" in f.message for f in findings)


def test_permissive_preset_protects_home_bin_but_flags_other_path_dirs_in_home() -> None:
    findings = check_policy(preset_policy("permissive", HOST), path_dirs=PATH_DIRS)
    messages = [(f.level, f.message.split(":")[0]) for f in findings]
    # ~/bin and ~/.local/bin are mandatory read-only; a custom ~/tools on $PATH is not.
    assert messages[:1] == [("error", "/home/u is writable and /home/u/tools is on $PATH")]
    assert ("warning", "/home/u is writable and holds your home directory") in messages


@pytest.mark.parametrize(
    ("socket", "level"),
    [
        ("/var/run/docker.sock", "error"),
        ("/run/user/1000/podman/podman.sock", "error"),
        ("/run/user/1000/bus", "warning"),
        ("/tmp/.X11-unix/X0", "warning"),
    ],
)
def test_allowed_unix_sockets(socket: str, level: str) -> None:
    policy = with_network(standard(), allow_unix_sockets=(Rule(socket, SETTINGS),))
    findings = check_policy(policy, path_dirs=[])
    assert [(f.level, f.key, f.origin) for f in findings] == [
        (level, "network.allowUnixSockets", str(SETTINGS))
    ]
    assert socket in findings[0].message


def test_unsandboxed_commands_are_warnings() -> None:
    origin = Origin("/etc/corral/managed-settings.json", "allowUnsandboxedCommands")
    policy = standard()._replace(
        allow_unsandboxed_commands=True,
        excluded_commands=(Rule("docker", SETTINGS), Rule("make", SETTINGS)),
        origins=(*standard().origins, ("allowUnsandboxedCommands", origin)),
    )
    findings = check_policy(policy, path_dirs=[])
    assert [(f.level, f.key, f.origin) for f in findings] == [
        ("warning", "allowUnsandboxedCommands", str(origin)),
        ("warning", "excludedCommands", str(SETTINGS)),
        ("warning", "excludedCommands", str(SETTINGS)),
    ]
    assert "docker always runs outside the sandbox" in findings[1].message


DOMAIN_CASES = [
    ("github.com", "warning"),
    ("*.github.com", "warning"),
    ("gist.github.com", "warning"),
    ("raw.githubusercontent.com", "warning"),
    ("*.githubusercontent.com", "warning"),
    ("pastebin.com", "warning"),
    ("*.s3.amazonaws.com", "warning"),
    ("*.amazonaws.com", "warning"),
    ("transfer.sh", "warning"),
    ("*.ngrok-free.app", "error"),  # also a public suffix
    ("*.com", "error"),
    ("*.io", "error"),
    ("*.co.uk", "error"),
    ("*.github.io", "error"),
    ("example.com", None),
    ("*.example.com", None),
    ("api.example.org", None),
    ("my-tunnel.ngrok-free.app", None),  # one named tunnel, not the whole service
    ("10.0.0.0/8", None),
    ("127.0.0.1", None),
]


@pytest.mark.parametrize(("pattern", "level"), DOMAIN_CASES)
def test_broad_domains(pattern: str, level: str | None) -> None:
    policy = with_network(standard(), access="filtered", allowed_domains=domains(pattern))
    findings = check_policy(policy, path_dirs=[])
    assert [f.level for f in findings] == ([level] if level else [])
    for finding in findings:
        assert (finding.key, finding.origin) == ("network.allowedDomains", str(SETTINGS))
        assert pattern in finding.message


def test_filtered_network_without_domains_is_a_warning() -> None:
    policy = with_network(standard(), access="filtered")
    findings = check_policy(policy, path_dirs=[])
    assert [(f.level, f.key) for f in findings] == [("warning", "network.allowedDomains")]
    assert "no domain is allowed" in findings[0].message
    allowed = with_network(policy, allowed_domains=domains("example.com"))
    assert check_policy(allowed, path_dirs=[]) == []


def test_errors_come_first() -> None:
    policy = with_network(
        standard()._replace(allow_unsandboxed_commands=True),
        allow_unix_sockets=(Rule("/var/run/docker.sock", SETTINGS),),
    )
    assert [f.level for f in check_policy(policy, path_dirs=[])] == ["error", "warning"]


def test_policy_as_json_carries_every_origin(tmp_path: Path) -> None:
    host = HOST._replace(workspace=str(tmp_path))
    settings = tmp_path / ".corral/settings.json"
    settings.parent.mkdir()
    settings.write_text(json.dumps({"network": {"access": "filtered", "hostPorts": [5432, 6379]}}))
    policy = load_policy(host, allow_domains=["example.com"], managed_path=str(tmp_path / "m"))
    data = policy_as_json(policy)
    json.dumps(data)  # serialisable as it is
    network = data["network"]
    assert isinstance(network, dict)
    assert network["access"] == {"value": "filtered", "origin": f"{settings} (network.access)"}
    assert network["hostPorts"] == [
        {"value": 5432, "origin": f"{settings} (network.hostPorts[0])"},
        {"value": 6379, "origin": f"{settings} (network.hostPorts[1])"},
    ]
    assert network["allowedDomains"] == [{"value": "example.com", "origin": CLI}]
    assert network["upstreamProxy"] == {"value": None, "origin": "built-in"}
    assert data["mode"] == {"value": "standard", "origin": "preset standard"}
    filesystem = data["filesystem"]
    assert isinstance(filesystem, dict)
    assert filesystem["write"][0] == {"value": str(tmp_path), "origin": "preset standard"}


def test_format_policy_is_an_aligned_table() -> None:
    policy = with_network(standard(), allowed_domains=domains("example.com"))
    text = format_policy(policy)
    lines = text.splitlines()
    assert lines[0] == "workspace: /home/u/ws"
    header = lines[2]
    assert header.split() == ["SECTION", "RULE", "ORIGIN"]
    rule_col, origin_col = header.index("RULE"), header.index("ORIGIN")
    row = next(line for line in lines if "allowedDomains example.com" in line)
    assert row.startswith("network")
    assert row.index("allowedDomains") == rule_col
    assert row[origin_col:] == str(SETTINGS)
    assert "general     mode = standard" in text
    assert any(line.startswith("network") and "access = local" in line for line in lines)
    assert text.endswith("\n")


def test_a_protected_path_directory_is_not_flagged() -> None:
    # ~/bin is in the mandatory deny-write list: writable on paper, read-only in the sandbox.
    policy = with_writes(standard(), "/home/u/bin")
    assert check_policy(policy, path_dirs=PATH_DIRS) == []
