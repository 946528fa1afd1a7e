"""The `audit` settings section: its checks, who may set what, where the log may live, and how
`corral policy show` tells it (policy/audit.py, settings.py, report.py, audit/spool.py)."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from corral.audit.spool import audit_locations
from corral.errors import SettingsError
from corral.policy.audit import parse_syslog_address
from corral.policy.model import AuditSettings, HostPaths, Origin, OtlpTarget, Policy, SyslogTarget
from corral.policy.report import format_policy, policy_as_json
from corral.policy.schema import SETTINGS_SCHEMA
from corral.policy.settings import load_policy


class Files:
    """A home, a workspace and a managed file under tmp_path, and a way to write settings."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.host = HostPaths(
            workspace=str(root / "ws"),
            home=str(root / "home"),
            config_home=str(root / "home/.config"),
            cache_home=str(root / "home/.cache"),
            state_home=str(root / "home/.local/state"),
        )
        self.paths = {
            "user": root / "home/.config/corral/settings.json",
            "project": root / "ws/.corral/settings.json",
            "local": root / "ws/.corral/settings.local.json",
            "managed": root / "etc/managed-settings.json",
        }

    def write(self, kind: str, data: object) -> str:
        path = self.paths[kind]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data))
        return str(path)

    def load(self, *, mode: str | None = None) -> Policy:
        managed = str(self.paths["managed"])
        return load_policy(self.host, mode=mode, managed_path=managed)  # type: ignore[arg-type]


@pytest.fixture
def files(tmp_path: Path) -> Files:
    return Files(tmp_path)


SYSLOG = {"address": "127.0.0.1:514"}
OTLP = {"endpoint": "http://127.0.0.1:4318"}


# -- the schema and the checks beyond it ---------------------------------------------------------

# (audit section, key path named, start of the reason)
BAD: list[tuple[object, str, str]] = [
    ({"databse": "/x.db"}, "audit", "unknown key: databse; expected one of: database, otlp"),
    ({"database": 3}, "audit.database", "expected a string"),
    ({"database": ""}, "audit.database", "expected a non-empty string"),
    ({"syslog": {}}, "audit.syslog", "missing required key: address"),
    ({"syslog": {**SYSLOG, "level": "info"}}, "audit.syslog", "unknown key: level"),
    ({"syslog": {**SYSLOG, "facility": "kern"}}, "audit.syslog.facility", "expected one of"),
    ({"syslog": {"address": "localhost"}}, "audit.syslog.address", '"localhost": expected'),
    ({"syslog": {"address": "dev/log"}}, "audit.syslog.address", "expected an absolute path"),
    ({"syslog": {"address": "::1:514"}}, "audit.syslog.address", '"::1:514": write an IPv6'),
    ({"syslog": {"address": "[host]:514"}}, "audit.syslog.address", '"[host]:514": brackets'),
    ({"syslog": {"address": "h:65536"}}, "audit.syslog.address", '"h:65536": the port'),
    ({"syslog": {"address": "h:0"}}, "audit.syslog.address", '"h:0": the port'),
    ({"syslog": {"address": "h:x"}}, "audit.syslog.address", '"h:x": the port'),
    ({"otlp": {}}, "audit.otlp", "missing required key: endpoint"),
    ({"otlp": {**OTLP, "token": "t"}}, "audit.otlp", "unknown key: token"),
    ({"otlp": {"endpoint": "ftp://h:21"}}, "audit.otlp.endpoint", "expected an http:// or"),
    ({"otlp": {"endpoint": "file:///etc/x"}}, "audit.otlp.endpoint", "expected an http:// or"),
    ({"otlp": {"endpoint": "127.0.0.1:4318"}}, "audit.otlp.endpoint", "expected an http:// or"),
    ({"otlp": {"endpoint": "http://"}}, "audit.otlp.endpoint", "expected http(s)://host"),
    ({"otlp": {"endpoint": "http://u:p@h"}}, "audit.otlp.endpoint", '"http://u:p@h": put'),
    ({"otlp": {"endpoint": "http://h/?a=1"}}, "audit.otlp.endpoint", '"http://h/?a=1": no'),
    ({"otlp": {"endpoint": "http://h:99999"}}, "audit.otlp.endpoint", '"h:99999": the port'),
    ({"otlp": {**OTLP, "headers": {"A B": "x"}}}, "audit.otlp.headers.A B", '"A B" is not'),
    ({"otlp": {**OTLP, "headers": {"A": "x\r\nB: y"}}}, "audit.otlp.headers.A", "a header"),
    ({"otlp": {**OTLP, "headers": {"A": 1}}}, "audit.otlp.headers.A", "expected a string"),
]


@pytest.mark.parametrize(("section", "key", "reason"), BAD)
def test_bad_audit_settings_name_the_file_and_key(
    files: Files, section: object, key: str, reason: str
) -> None:
    path = files.write("user", {"audit": section})
    with pytest.raises(SettingsError) as info:
        files.load()
    assert (info.value.file, info.value.key) == (path, key)
    assert info.value.reason.startswith(reason), info.value.reason


GOOD_SYSLOG = [
    ("/dev/log", "/dev/log"),
    ("127.0.0.1:514", ("127.0.0.1", 514)),
    ("logs.example:5514", ("logs.example", 5514)),
    ("[::1]:514", ("::1", 514)),
]


@pytest.mark.parametrize(("address", "parsed"), GOOD_SYSLOG)
def test_syslog_addresses(files: Files, address: str, parsed: object) -> None:
    files.write("user", {"audit": {"syslog": {"address": address, "facility": "local3"}}})
    assert files.load().audit.syslog == SyslogTarget(address, "local3")
    assert parse_syslog_address(address) == parsed


@pytest.mark.parametrize(
    "endpoint",
    ["http://127.0.0.1:4318", "https://collector.example/otel/", "http://[::1]:4318", "http://h"],
)
def test_otlp_endpoints(files: Files, endpoint: str) -> None:
    section = {"otlp": {"endpoint": endpoint, "headers": {"Authorization": "Bearer x"}}}
    jsonschema.validate({"audit": section}, SETTINGS_SCHEMA)  # the published schema agrees
    files.write("user", {"audit": section})
    assert files.load().audit.otlp == OtlpTarget(endpoint, (("Authorization", "Bearer x"),))


def test_no_audit_section_leaves_the_defaults(files: Files) -> None:
    files.write("user", {"mode": "standard"})
    policy = files.load()
    assert policy.audit == AuditSettings()
    assert audit_locations(policy) == (
        f"{files.host.state_dir}/audit.db",
        f"{files.host.state_dir}/spool",
    )


# -- who may set what ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "section", "key"),
    [
        ("project", {"syslog": SYSLOG}, "audit.syslog"),
        ("local", {"syslog": SYSLOG}, "audit.syslog"),
        ("project", {"otlp": OTLP}, "audit.otlp"),
        ("local", {"otlp": OTLP}, "audit.otlp"),
        ("project", {"database": "/var/tmp/corral/p.db"}, "audit.database"),
    ],
)
def test_project_files_cannot_forward_or_move_the_log(
    files: Files, kind: str, section: dict[str, object], key: str
) -> None:
    path = files.write(kind, {"audit": section})
    with pytest.raises(SettingsError) as info:
        files.load()
    assert (info.value.file, info.value.key) == (path, key)
    assert "~/.config/corral/settings.json" in info.value.hint


@pytest.mark.parametrize("kind", ["user", "local", "managed"])
def test_the_database_may_be_set_by_user_local_and_managed(files: Files, kind: str) -> None:
    path = files.write(kind, {"audit": {"database": "/var/tmp/corral/p.db"}})
    policy = files.load()
    assert policy.audit.database == "/var/tmp/corral/p.db"
    assert policy.origin_of("audit.database") == Origin(path, "audit.database")


@pytest.mark.parametrize("kind", ["user", "managed"])
def test_forwarding_may_be_set_by_user_and_managed(files: Files, kind: str) -> None:
    path = files.write(kind, {"audit": {"syslog": SYSLOG, "otlp": OTLP}})
    policy = files.load()
    assert policy.audit.syslog == SyslogTarget("127.0.0.1:514", "user")
    assert policy.audit.otlp == OtlpTarget("http://127.0.0.1:4318")
    assert policy.origin_of("audit.otlp") == Origin(path, "audit.otlp")


def test_later_file_wins_managed_last_and_objects_replace_whole(files: Files) -> None:
    files.write(
        "user", {"audit": {"database": "/a/user.db", "syslog": {**SYSLOG, "facility": "auth"}}}
    )
    local = files.write("local", {"audit": {"database": "/a/local.db"}})
    managed = files.write("managed", {"audit": {"syslog": {"address": "/dev/log"}}})
    policy = files.load()
    assert policy.audit.database == "/a/local.db"
    assert policy.origin_of("audit.database") == Origin(local, "audit.database")
    # The managed object replaces the user's whole: its facility is the default, not "auth".
    assert policy.audit.syslog == SyslogTarget("/dev/log", "user")
    assert policy.origin_of("audit.syslog") == Origin(managed, "audit.syslog")


# -- where the log may live ------------------------------------------------------------------


def test_the_database_expands_home_and_gets_its_own_spool(files: Files) -> None:
    files.write("user", {"audit": {"database": "~/logs/../audit/web.db"}})
    policy = files.load()
    database = f"{files.host.home}/audit/web.db"
    assert policy.audit.database == database
    assert audit_locations(policy) == (database, f"{database}.spool")


@pytest.mark.parametrize(
    ("database", "reason"),
    [("logs/audit.db", "expected an absolute path"), ("~bob/audit.db", "only ~/ is expanded")],
)
def test_the_database_must_be_absolute(files: Files, database: str, reason: str) -> None:
    path = files.write("user", {"audit": {"database": database}})
    with pytest.raises(SettingsError, match=reason) as info:
        files.load()
    assert (info.value.file, info.value.key) == (path, "audit.database")


@pytest.mark.parametrize(
    ("kind", "settings", "database"),
    [
        # The per-project override pointing into the workspace, which the sandbox writes.
        ("local", {}, "{ws}/logs/audit.db"),
        # The workspace itself as the file.
        ("user", {}, "{ws}"),
        # Only the spool beside it would be writable.
        ("user", {"filesystem": {"allowWrite": ["{root}/logs/p.db.spool"]}}, "{root}/logs/p.db"),
    ],
)
def test_a_database_the_sandbox_could_write_is_refused(
    files: Files, kind: str, settings: dict[str, object], database: str
) -> None:
    fill = {"ws": files.host.workspace, "root": str(files.root)}
    text = json.dumps({**settings, "audit": {"database": database}})
    for name, value in fill.items():
        text = text.replace("{" + name + "}", value)
    path = files.write(kind, json.loads(text))
    with pytest.raises(SettingsError, match="the sandbox could rewrite its own audit log") as info:
        files.load()
    assert (info.value.file, info.value.key) == (path, "audit.database")


def test_the_writable_paths_of_the_chosen_mode_count(files: Files) -> None:
    files.write("user", {"audit": {"database": "~/logs/audit.db"}})
    assert files.load().audit.database == f"{files.host.home}/logs/audit.db"
    with pytest.raises(SettingsError, match="inside the writable path"):
        files.load(mode="permissive")  # the home directory is writable there


def test_the_state_directory_is_always_protected(files: Files) -> None:
    database = f"{files.host.state_dir}/projects/web.db"
    files.write("user", {"audit": {"database": database}})
    policy = files.load(mode="permissive")  # home writable, corral's state dir read-only
    assert policy.audit.database == database
    assert any(rule.value == files.host.state_dir for rule in policy.filesystem.deny_write)


def test_a_configured_log_is_hidden_from_the_sandbox(files: Files) -> None:
    path = files.write("user", {"audit": {"database": "/srv/audit/web.db"}})
    hidden = {rule.value: rule.origin for rule in files.load().filesystem.deny_read}
    origin = Origin(path, "audit.database")
    for name in ("web.db", "web.db-wal", "web.db-shm", "web.db-journal", "web.db.spool"):
        assert hidden[f"/srv/audit/{name}"] == origin


# -- corral policy show ----------------------------------------------------------------------


def test_policy_show_prints_each_audit_setting_and_its_origin(files: Files) -> None:
    user = files.write(
        "user",
        {
            "audit": {
                "syslog": {"address": "/dev/log", "facility": "local3"},
                "otlp": {**OTLP, "headers": {"Authorization": "Bearer s3cret"}},
            },
            "monitor": {"violations": "writes"},
        },
    )
    local = files.write("local", {"audit": {"database": "/srv/audit/web.db"}})
    policy = files.load()
    lines = format_policy(policy).splitlines()

    def row(rule: str) -> list[str]:
        return next(line.split() for line in lines if rule in line)

    assert row("database =") == [
        "audit",
        "database",
        "=",
        "/srv/audit/web.db",
        local,
        "(audit.database)",
    ]
    assert row("syslog =") == [
        "audit", "syslog", "=", "address=/dev/log", "facility=local3", user, "(audit.syslog)",
    ]  # fmt: skip
    assert row("otlp =") == [
        "audit", "otlp", "=", "endpoint=http://127.0.0.1:4318", "headers=Authorization", user,
        "(audit.otlp)",
    ]  # fmt: skip
    assert row("violations =") == [
        "monitor",
        "violations",
        "=",
        "writes",
        user,
        "(monitor.violations)",
    ]
    # A collector's token is not printed, in the table or in the JSON.
    document = json.dumps(policy_as_json(policy))
    assert "s3cret" not in document and "s3cret" not in "\n".join(lines)


def test_policy_show_defaults(files: Files) -> None:
    data = policy_as_json(files.load())
    assert data["audit"] == {
        "database": {"value": f"{files.host.state_dir}/audit.db", "origin": "built-in"},
        "syslog": {"value": None, "origin": "built-in"},
        "otlp": {"value": None, "origin": "built-in"},
    }
    assert data["monitor"] == {"violations": {"value": "writes", "origin": "built-in"}}
    text = format_policy(files.load())
    assert "syslog = -" in text and "violations = writes" in text
