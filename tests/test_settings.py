"""Reading settings files and merging them into a Policy."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from corral.errors import SettingsError, UsageError
from corral.policy.model import CLI, HostPaths, IgnoreRule, Limits, Origin, Policy, Rule
from corral.policy.presets import LIMITS_OF_MODE, mandatory_deny_write, preset_policy
from corral.policy.settings import (
    MANAGED_SETTINGS,
    SettingsSource,
    load_policy,
    read_settings,
    settings_sources,
)


class Files:
    """A home, a workspace and a managed file under tmp_path, and a way to write settings."""

    def __init__(self, root: Path) -> None:
        self.host = HostPaths(
            workspace=str(root / "ws"),
            home=str(root / "home"),
            config_home=str(root / "home/.config"),
            cache_home=str(root / "home/.cache"),
            state_home=str(root / "home/.local/state"),
        )
        self.user = Path(self.host.user_settings_file)
        self.project = root / "ws/.corral/settings.json"
        self.local = root / "ws/.corral/settings.local.json"
        self.managed = root / "etc/managed-settings.json"

    def write(self, path: Path, data: object) -> str:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=2) if not isinstance(data, str) else data)
        return str(path)

    def load(self, **kwargs: object) -> Policy:
        return load_policy(self.host, managed_path=str(self.managed), **kwargs)  # type: ignore[arg-type]


@pytest.fixture
def files(tmp_path: Path) -> Files:
    return Files(tmp_path)


def values(rules: tuple[Rule, ...]) -> list[str]:
    return [rule.value for rule in rules]


def test_sources_in_merge_order(files: Files) -> None:
    ws = files.host.workspace
    assert settings_sources(files.host) == (
        SettingsSource("user", f"{files.host.config_home}/corral/settings.json"),
        SettingsSource("project", f"{ws}/.corral/settings.json"),
        SettingsSource("local", f"{ws}/.corral/settings.local.json"),
        SettingsSource("managed", MANAGED_SETTINGS),
    )
    assert settings_sources(files.host, managed_path="/m.json")[-1] == ("managed", "/m.json")


def test_no_files_gives_the_standard_preset(files: Files) -> None:
    assert files.load() == preset_policy("standard", files.host)


def test_absent_file_reads_as_none(files: Files) -> None:
    assert read_settings(str(files.project)) is None


# (file text, the whole message with the file written as {f})
UNKNOWN = (
    "expected one of: $schema, allowUnsandboxedCommands, audit, backend, bridge, env,"
    " excludedCommands, filesystem"
)
BROKEN = [
    (
        '{"mode": "strict",}',
        "{f}:1:19: invalid JSON: Expecting property name enclosed in double quotes",
    ),
    ('{\n  "mode": strict\n}', "{f}:2:11: invalid JSON: Expecting value"),
    ("", "{f}:1:1: invalid JSON: Expecting value"),
    ("[1]", "{f}: expected an object, found an array"),
    ('{"mode": "strict", "mode": "permissive"}', '{f}: duplicate key "mode"'),
    ('{"network": {"hostPorts": [NaN]}}', "{f}: invalid JSON: NaN is not JSON"),
    (
        '{"filesystem": {"denyRead": [1]}}',
        "{f}: filesystem.denyRead[0]: expected a string, found the number 1",
    ),
    (
        '{"mdoe": "strict"}',
        "{f}: unknown key: mdoe; " + UNKNOWN + ", ignoreViolations, limits, mode, monitor, network",
    ),
    (
        '{"network": {"allowedDomains": ["ok.example", "x.com/path"]}}',
        "{f}: network.allowedDomains[1]: 'x.com/path' has a path; write the host name only",
    ),
]


@pytest.mark.parametrize(("text", "message"), BROKEN)
def test_broken_files_are_named_with_key_and_position(
    files: Files, text: str, message: str
) -> None:
    path = files.write(files.project, text)
    with pytest.raises(SettingsError) as info:
        files.load()
    assert str(info.value) == message.format(f=path)
    assert info.value.file == path


def test_json_error_carries_line_and_column(files: Files) -> None:
    path = files.write(files.user, '{\n  "mode": "strict"\n  "env": {}\n}')
    with pytest.raises(SettingsError) as info:
        read_settings(path)
    assert (info.value.line, info.value.column) == (3, 3)


def test_unreadable_and_non_utf8_files(files: Files) -> None:
    files.project.mkdir(parents=True)  # a directory where the file should be
    with pytest.raises(SettingsError, match="cannot read the file"):
        files.load()
    files.project.rmdir()
    files.project.write_bytes(b'{"mode": "\xff"}')
    with pytest.raises(SettingsError, match="not UTF-8 text"):
        files.load()


def test_mode_merge_order(files: Files) -> None:
    user = files.write(files.user, {"mode": "strict"})
    assert files.load().mode == "strict"
    project = files.write(files.project, {"mode": "permissive"})
    assert files.load().mode == "permissive"
    local = files.write(files.local, {"mode": "standard"})
    policy = files.load()
    assert policy.mode == "standard"
    assert policy.origin_of("mode") == Origin(local, "mode")
    assert [o for k, o in policy.origins if k == "mode"][-3:] == [
        Origin(user, "mode"),
        Origin(project, "mode"),
        Origin(local, "mode"),
    ]
    policy = files.load(mode="strict")
    assert (policy.mode, policy.origin_of("mode")) == ("strict", Origin(CLI))
    # the preset follows the chosen mode
    assert values(policy.filesystem.write) == [files.host.workspace]


def test_managed_mode_beats_the_cli(files: Files) -> None:
    managed = files.write(files.managed, {"mode": "strict"})
    files.write(files.local, {"mode": "permissive"})
    policy = files.load(mode="permissive")
    assert policy.mode == "strict"
    assert policy.origin_of("mode") == Origin(managed, "mode")


def test_scalars_later_wins_and_origins(files: Files) -> None:
    user = files.write(files.user, {"network": {"access": "filtered", "httpProxyPort": 3128}})
    project = files.write(files.project, {"network": {"access": "none"}})
    policy = files.load()
    assert policy.network.access == "none"
    assert policy.network.http_proxy_port == 3128
    assert policy.origin_of("network.access") == Origin(project, "network.access")
    assert policy.origin_of("network.httpProxyPort") == Origin(user, "network.httpProxyPort")
    assert policy.origin_of("allowUnsandboxedCommands") is None


def test_network_access_overrides_the_preset(files: Files) -> None:
    files.write(files.project, {"mode": "strict", "network": {"access": "filtered"}})
    assert files.load().network.access == "filtered"
    assert preset_policy("strict", files.host).network.access == "none"


def test_every_scalar_key_reaches_the_policy(files: Files) -> None:
    network = {
        "access": "filtered",
        "allowLocalBinding": True,
        "upstreamProxy": "http://127.0.0.1:3128",
        "httpProxyPort": 8080.0,
        "socksProxyPort": 1080,
    }
    files.write(files.project, {"network": network})
    files.write(files.user, {"allowUnsandboxedCommands": True})
    policy = files.load()
    assert policy.network.access == "filtered"
    assert policy.network.allow_local_binding is True
    assert policy.network.upstream_proxy == "http://127.0.0.1:3128"
    assert policy.network.http_proxy_port == 8080
    assert type(policy.network.http_proxy_port) is int
    assert policy.network.socks_proxy_port == 1080
    assert policy.allow_unsandboxed_commands is True


def test_lists_combine_with_origins(files: Files) -> None:
    user = files.write(files.user, {"filesystem": {"denyRead": ["~/secret", "~/other"]}})
    project = files.write(files.project, {"filesystem": {"denyRead": ["keys/*.pem"]}})
    deny_read = files.load().filesystem.deny_read
    home, ws = files.host.home, files.host.workspace
    assert deny_read[-3:] == (
        Rule(f"{home}/secret", Origin(user, "filesystem.denyRead[0]")),
        Rule(f"{home}/other", Origin(user, "filesystem.denyRead[1]")),
        Rule(f"{ws}/keys/*.pem", Origin(project, "filesystem.denyRead[0]")),
    )
    # the built-in credential list is still there
    assert f"{home}/.ssh" in values(deny_read)


def test_every_list_key_reaches_the_policy(files: Files) -> None:
    data = {
        "filesystem": {
            "denyRead": ["a"],
            "allowWrite": ["b"],
            "denyWrite": ["c"],
            "allowedPaths": ["d", {"path": "e", "mode": "read"}, {"path": "f", "mode": "write"}],
        },
        "network": {
            "allowedDomains": ["Example.COM.", "*.example.org"],
            "deniedDomains": ["bad.example.org"],
            "allowUnixSockets": ["/run/x.sock"],
            "hostPorts": [5432],
            "publishPorts": [8000.0],
        },
        "env": {"deny": ["MY_*"], "allow": ["MY_OK"]},
    }
    path = files.write(files.project, data)
    files.write(files.user, {"excludedCommands": ["docker"]})
    policy = files.load()
    ws = files.host.workspace
    fs, net = policy.filesystem, policy.network
    assert values(fs.deny_read)[-1] == f"{ws}/a"
    assert values(fs.write)[-3:] == [f"{ws}/b", f"{ws}/d", f"{ws}/f"]
    assert fs.write[-1].origin == Origin(path, "filesystem.allowedPaths[2]")
    assert values(fs.read)[-1] == f"{ws}/e"
    assert values(fs.deny_write)[-1] == f"{ws}/c"
    assert values(net.allowed_domains) == ["example.com", "*.example.org"]  # normalised
    assert values(net.denied_domains) == ["bad.example.org"]
    assert values(net.allow_unix_sockets) == ["/run/x.sock"]
    assert (net.host_ports, net.publish_ports) == ((5432,), (8000,))
    assert policy.origin_of("network.hostPorts") == Origin(path, "network.hostPorts[0]")
    assert values(policy.env.deny)[-1] == "MY_*"
    assert values(policy.env.allow) == ["MY_OK"]
    assert values(policy.excluded_commands) == ["docker"]


@pytest.mark.parametrize(
    ("written", "expected"),
    [
        ("~", "{home}"),
        ("~/x", "{home}/x"),
        (".", "{ws}"),
        ("build/../out", "{ws}/out"),
        ("../sibling", "{root}/sibling"),
        ("/abs//path/", "/abs/path"),
    ],
)
def test_paths_expand_and_resolve_against_the_workspace(
    files: Files, written: str, expected: str
) -> None:
    files.write(files.project, {"filesystem": {"allowWrite": [written]}})
    root = os.path.dirname(files.host.workspace)
    want = expected.format(home=files.host.home, ws=files.host.workspace, root=root)
    assert files.load().filesystem.write[-1].value == want


def test_tilde_user_is_refused(files: Files) -> None:
    path = files.write(files.project, {"filesystem": {"denyRead": ["~bob/.ssh"]}})
    with pytest.raises(SettingsError) as info:
        files.load()
    assert str(info.value) == (
        f'{path}: filesystem.denyRead[0]: "~bob/.ssh": only ~ and ~/ are expanded; '
        "write the full path"
    )


def test_cli_domains_add_with_cli_origin(files: Files) -> None:
    files.write(files.project, {"network": {"allowedDomains": ["a.example"]}})
    domains = files.load(allow_domains=["B.example"]).network.allowed_domains
    assert domains[-1] == Rule("b.example", Origin(CLI))
    assert values(domains) == ["a.example", "b.example"]


def test_bad_cli_domain_is_a_usage_error(files: Files) -> None:
    with pytest.raises(UsageError, match='allowed domain "\\*": a lone'):
        files.load(allow_domains=["*"])


@pytest.mark.parametrize("kind", ["project", "local"])
@pytest.mark.parametrize("key", ["allowUnsandboxedCommands", "excludedCommands"])
def test_project_files_cannot_open_escape_hatches(files: Files, kind: str, key: str) -> None:
    value: object = True if key == "allowUnsandboxedCommands" else ["docker"]
    path = files.write(getattr(files, kind), {key: value})
    with pytest.raises(SettingsError) as caught:
        files.load()
    assert (caught.value.file, caught.value.key) == (path, key)


def test_managed_scalars_cannot_be_loosened(files: Files) -> None:
    managed = files.write(
        files.managed, {"network": {"access": "none"}, "allowUnsandboxedCommands": False}
    )
    files.write(files.local, {"network": {"access": "filtered"}})
    files.write(files.user, {"allowUnsandboxedCommands": True})
    policy = files.load(mode="permissive")
    assert policy.network.access == "none"
    assert policy.allow_unsandboxed_commands is False
    assert policy.origin_of("network.access") == Origin(managed, "network.access")


def test_managed_allow_lists_replace_lower_ones(files: Files) -> None:
    managed = files.write(
        files.managed,
        {
            "network": {"allowedDomains": ["corp.example"], "allowUnixSockets": []},
            "filesystem": {"allowWrite": ["/srv/out"]},
            "env": {"allow": []},
            "excludedCommands": [],
        },
    )
    files.write(
        files.project,
        {
            "network": {"allowedDomains": ["evil.example"], "allowUnixSockets": ["/d.sock"]},
            "filesystem": {"allowWrite": ["/"], "allowedPaths": ["/etc"]},
            "env": {"allow": ["AWS_SECRET_ACCESS_KEY"]},
        },
    )
    files.write(files.user, {"excludedCommands": ["sh"]})
    policy = files.load(allow_domains=["cli.example"])
    assert policy.network.allowed_domains == (
        Rule("corp.example", Origin(managed, "network.allowedDomains[0]")),
    )
    assert policy.network.allow_unix_sockets == ()
    # the preset's writable paths stay; the project's "/" and "/etc" are gone
    preset = preset_policy("standard", files.host).filesystem.write
    assert policy.filesystem.write == (
        *preset,
        Rule("/srv/out", Origin(managed, "filesystem.allowWrite[0]")),
    )
    assert policy.env.allow == ()
    assert policy.excluded_commands == ()


def test_managed_deny_lists_add(files: Files) -> None:
    managed = files.write(files.managed, {"network": {"deniedDomains": ["m.example"]}})
    project = files.write(files.project, {"network": {"deniedDomains": ["p.example"]}})
    assert files.load().network.denied_domains == (
        Rule("p.example", Origin(project, "network.deniedDomains[0]")),
        Rule("m.example", Origin(managed, "network.deniedDomains[0]")),
    )


def test_lower_allow_lists_survive_when_managed_does_not_define_them(files: Files) -> None:
    files.write(files.managed, {"network": {"deniedDomains": ["m.example"]}})
    files.write(files.project, {"network": {"allowedDomains": ["p.example"]}})
    assert values(files.load().network.allowed_domains) == ["p.example"]


def test_mandatory_deny_write_stays(files: Files) -> None:
    files.write(files.managed, {"filesystem": {"allowWrite": ["~"], "denyWrite": []}})
    files.write(files.project, {"filesystem": {"allowWrite": ["~/.bashrc", ".git/hooks"]}})
    deny_write = files.load().filesystem.deny_write
    assert deny_write[: len(mandatory_deny_write(files.host))] == mandatory_deny_write(files.host)


def test_presets_set_limits_with_the_preset_as_origin(files: Files) -> None:
    policy = files.load()
    assert policy.limits == LIMITS_OF_MODE["standard"]
    assert policy.origin_of("limits.processes") == Origin("preset standard")
    assert policy.origin_of("limits.timeoutSeconds") is None  # no timeout by default
    assert files.load(mode="strict").limits == LIMITS_OF_MODE["strict"]


def test_every_limit_key_reaches_the_policy(files: Files) -> None:
    limits = {
        "timeoutSeconds": 30,
        "cpuSeconds": 60.0,
        "memoryBytes": 268435456,
        "processes": 64,
        "openFiles": 128,
        "fileSizeBytes": 1048576,
        "outputBytes": 4096,
    }
    project = files.write(files.project, {"limits": limits})
    policy = files.load()
    assert policy.limits == Limits(30.0, 60, 268435456, 64, 128, 1048576, 4096)
    assert type(policy.limits.cpu_seconds) is int
    assert type(policy.limits.timeout_seconds) is float
    assert policy.origin_of("limits.openFiles") == Origin(project, "limits.openFiles")


def test_limits_later_file_wins_and_may_loosen_the_preset(files: Files) -> None:
    files.write(files.user, {"limits": {"processes": 100, "openFiles": 256}})
    local = files.write(files.local, {"limits": {"processes": 100000}})
    policy = files.load()
    assert policy.limits.processes == 100000
    assert policy.limits.open_files == 256
    assert policy.origin_of("limits.processes") == Origin(local, "limits.processes")


@pytest.mark.parametrize(
    ("lower", "expected", "winner"),
    [
        (None, 512, "managed"),  # the managed value stands
        (4096, 512, "managed"),  # a lower file may not raise it
        (512, 512, "managed"),
        (100, 100, "project"),  # but may tighten it
    ],
)
def test_managed_limits_can_only_be_tightened(
    files: Files, lower: int | None, expected: int, winner: str
) -> None:
    paths = {
        "managed": files.write(files.managed, {"limits": {"processes": 512}}),
        "project": files.write(
            files.project, {"limits": {"processes": lower} if lower else {"openFiles": 64}}
        ),
    }
    policy = files.load()
    assert policy.limits.processes == expected
    assert policy.origin_of("limits.processes") == Origin(paths[winner], "limits.processes")


def test_managed_limit_may_loosen_the_preset(files: Files) -> None:
    files.write(files.managed, {"limits": {"memoryBytes": 64 << 30, "timeoutSeconds": 600}})
    files.write(files.user, {"limits": {"timeoutSeconds": 900}})
    limits = files.load().limits
    assert limits.memory_bytes == 64 << 30
    assert limits.timeout_seconds == 600


def test_ignore_violations_and_unknown_domains(files: Files) -> None:
    user = files.write(files.user, {"ignoreViolations": {"*": ["/usr/bin/*"]}})
    project = files.write(
        files.project,
        {
            "ignoreViolations": {"git push": ["github.example"]},
            "network": {"unknownDomains": "ask"},
        },
    )
    policy = files.load()
    assert policy.ignore_violations == (
        IgnoreRule("*", "/usr/bin/*", Origin(user, "ignoreViolations.*[0]")),
        IgnoreRule("git push", "github.example", Origin(project, "ignoreViolations.git push[0]")),
    )
    assert policy.network.unknown_domains == "ask"


def test_ignore_violations_entries_must_be_lists_of_text(files: Files) -> None:
    path = files.write(files.project, {"ignoreViolations": {"*": "/usr/bin"}})
    with pytest.raises(SettingsError) as caught:
        files.load()
    assert (caught.value.file, caught.value.key) == (path, "ignoreViolations.*")
