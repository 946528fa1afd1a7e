"""Refused attempts: which ones ignoreViolations covers, the lines `corral run` prints at exit,
`corral violations` listing files and network together, and the issue's end-to-end case: a
script that writes outside its workspace, reads ~/.ssh/id_rsa and connects to a denied domain
leaves exactly those three violations in the log."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import pytest

from corral.audit.events import Event, MemorySink, network_event, violation_event
from corral.audit.ingest import ingest_spool
from corral.audit.query import AuditReader, EventFilter
from corral.audit.rows import BlockedRow, NetworkRow, ViolationRow
from corral.audit.spool import SpoolSink
from corral.audit.store import AuditLog
from corral.audit.violations import MAX_SUMMARY_LINES, RunViolations, is_ignored
from corral.breadcrumbs import Breadcrumb, breadcrumbs_for_line
from corral.cli_log import AUDIT_DB_ENV, add_log_commands, cmd_violations
from corral.errors import CorralError
from corral.policy.model import HostPaths, IgnoreRule, Origin, Policy
from corral.policy.presets import preset_policy
from corral.proxy.notice import DenialNotices
from corral.sandbox import Sandbox
from tests.conftest import SECRET, Layout
from tests.helpers_cli import run_cli, write_settings
from tests.test_network_support import Servers, filtered_policy, loopback_servers, resolve

ORIGIN = Origin("test")
HOME = "/home/u"


def rule(command: str, pattern: str) -> IgnoreRule:
    return IgnoreRule(command, pattern, ORIGIN)


# --- is_ignored ----------------------------------------------------------------------------

COVERED = [
    # (command, pattern, argv, target)
    ("*", "/usr/bin/*", ["make"], "/usr/bin/python3"),
    ("*", "/usr/bin", ["make"], "/usr/bin/python3"),  # a directory covers what is inside
    ("*", "/usr/bin", ["make"], "/usr/bin"),
    ("*", "*.pyc", ["make"], "/w/pkg/mod.cpython-311.pyc"),  # `*` crosses "/"
    ("*", "~/.cache/*", ["make"], "/home/u/.cache/pip/http/x"),
    ("*", "/w/build/[ab]*", ["make"], "/w/build/a.o"),
    ("npm", "/w/node_modules", ["/usr/bin/npm", "install"], "/w/node_modules/x"),
    ("npm install", "/x", ["npm", "install", "left-pad"], "/x"),
    ("/usr/bin/npm", "/x", ["/usr/bin/npm", "ci"], "/x"),  # a path is compared whole
    ("  git   push ", "github.example", ["git", "push", "origin"], "github.example"),
    ("*", "*.example.com", ["curl"], "a.b.example.com"),
    ("*", "Example.COM.", ["curl"], "example.com"),  # case and trailing dot, as domains
    ("*", "example.com", ["curl"], "EXAMPLE.com."),
    ("*", "10.0.0.*", ["curl"], "10.0.0.7"),
]
NOT_COVERED = [
    ("*", "/usr/bin/*", ["make"], "/usr/lib/x"),
    ("*", "/usr/bin", ["make"], "/usr/binary"),  # a prefix of a name is not its parent
    ("*", "/W/x", ["make"], "/w/x"),  # paths are case-sensitive
    ("*", "~/.cache/*", ["make"], "/other/.cache/x"),
    ("*", "*.example.com", ["curl"], "example.com"),  # not the apex, as allowedDomains
    ("*", "example.com", ["curl"], "api.example.com"),
    ("*", "example.com", ["curl"], "/example.com"),  # a domain pattern is no path
    ("npm", "/x", ["npx"], "/x"),
    ("npm", "/x", ["bash", "-c", "npm test"], "/x"),  # the command asked for, not a child
    ("npm install", "/x", ["npm"], "/x"),
    ("npm install", "/x", ["npm", "ci"], "/x"),
    ("/usr/bin/npm", "/x", ["npm"], "/x"),
    ("", "/x", ["x"], "/x"),  # an empty command covers nothing
    ("npm", "/x", [], "/x"),
]


@pytest.mark.parametrize(("command", "pattern", "argv", "target"), COVERED)
def test_a_rule_covers(command: str, pattern: str, argv: list[str], target: str) -> None:
    covering = rule(command, pattern)
    assert is_ignored([rule("nothing", "*"), covering], argv, target, home=HOME) == covering


@pytest.mark.parametrize(("command", "pattern", "argv", "target"), NOT_COVERED)
def test_a_rule_does_not_cover(command: str, pattern: str, argv: list[str], target: str) -> None:
    assert is_ignored([rule(command, pattern)], argv, target, home=HOME) is None


def test_the_first_covering_rule_is_named_and_no_rules_cover_nothing() -> None:
    first, second = rule("*", "/a/*"), rule("*", "/a/b")
    assert is_ignored([first, second], ["x"], "/a/b") == first
    assert is_ignored([], ["x"], "/a/b") is None


# --- RunViolations: marking, passing on, the summary ---------------------------------------

HOST = HostPaths("/w", HOME, f"{HOME}/.config", f"{HOME}/.cache", f"{HOME}/.local/state")
SETTINGS_LOCAL = "/w/.corral/settings.local.json"


def recorder(*rules: IgnoreRule) -> tuple[RunViolations, MemorySink]:
    """A recorder for the command `make` under the standard preset with these rules."""
    policy = preset_policy("standard", HOST)._replace(ignore_violations=rules)
    sink = MemorySink()
    return RunViolations(sink, policy, ["make"]), sink


def deny(host: str, port: int = 443) -> Event:
    return network_event("s1", host=host, port=port, decision="deny", rule="default-deny")


CRUMB = Breadcrumb("/etc/x", "write", "outside the writable paths", "add it somewhere")


def test_covered_attempts_are_recorded_marked_and_left_out_of_the_summary() -> None:
    violations, sink = recorder(rule("*", "*.example.org"), rule("make", "/etc/x"))
    events = [
        deny("a.example.org"),
        network_event("s1", host="b.example.org", port=443, decision="allow"),
        violation_event("s1", pid=7, executable="/bin/sh", operation="read", path="/etc/x"),
    ]
    for event in events:
        violations.emit(event)
    violations.record_breadcrumbs("s1", [CRUMB])
    assert [e.fields.get("ignored", False) for e in sink.events] == [True, False, True, True]
    assert sink.events[:3] == events  # passed on, the mark made on the event itself
    assert violations.summary("s1") == []


def test_the_summary_names_each_distinct_attempt_and_its_setting() -> None:
    violations, sink = recorder(rule("other-command", "*"))
    violations.emit(deny("Evil.Example"))
    violations.emit(deny("Evil.Example"))  # a retry: recorded again, shown once
    violations.emit(violation_event("s1", pid=3, executable="/bin/cat", operation="read",
                                    path="/h/.ssh/k\x1b[2J", rule="denyRead"))  # fmt: skip
    violations.record_breadcrumbs("s1", [CRUMB])
    assert len(sink.events) == 4
    assert [e.fields.get("ignored", False) for e in sink.events] == [False] * 4
    assert sink.events[3].fields == {
        "pid": 0, "executable": "", "operation": "write", "path": "/etc/x",
        "rule": "outside the writable paths", "ignored": False,
    }  # fmt: skip
    assert violations.summary("s1") == [
        "corral: blocked connection to Evil.Example:443 (not in network.allowedDomains); to "
        'allow it add "network": {"allowedDomains": ["evil.example"]} to ' + SETTINGS_LOCAL,
        "corral: blocked read /h/.ssh/k\\x1b[2J: denyRead",
        "corral: blocked write /etc/x: outside the writable paths; add it somewhere",
    ]


def test_a_long_summary_is_cut_and_says_where_the_rest_is() -> None:
    violations, _ = recorder()
    for index in range(MAX_SUMMARY_LINES + 2):
        violations.emit(deny(f"h{index}.test"))
    lines = violations.summary("abc123")
    assert len(lines) == MAX_SUMMARY_LINES + 1
    assert lines[-1] == "corral: and 2 more blocked: corral violations --session abc123"


def test_the_proxys_notices_in_front_see_the_mark() -> None:
    # DenialNotices passes each event on first, then reads its fields: the mark is there.
    violations, _ = recorder(rule("*", "evil.example"))
    event = deny("evil.example")
    DenialNotices(violations, lambda line: None, settings_file=SETTINGS_LOCAL).emit(event)
    assert event.fields["ignored"] is True


# --- the log: both kinds together, ignored ones kept apart ---------------------------------


def stored(path: Path, events: Sequence[Event]) -> None:
    with AuditLog(str(path)) as log:
        for event in events:
            log.emit(event)


def at(event: Event, time: float) -> Event:
    return event._replace(time=time)


LOGGED = [
    at(violation_event("s1", pid=4, executable="/bin/cat", operation="read", path="/h/.ssh/k"), 1),
    at(network_event("s1", host="ok.test", port=443, decision="allow"), 2),
    at(deny("evil.test"), 3),
    at(
        violation_event(
            "s1", pid=5, executable="/bin/sh", operation="write", path="/etc/y", ignored=True
        ),
        4,
    ),
    at(deny("noise.test")._replace(fields={**deny("noise.test").fields, "ignored": True}), 5),
    at(violation_event("s2", pid=6, executable="/bin/sh", operation="write", path="/etc/z"), 6),
]


def target(row: BlockedRow) -> str:
    return row.host if isinstance(row, NetworkRow) else row.path


@pytest.mark.parametrize(
    ("flt", "expected"),
    [
        (EventFilter(), ["/h/.ssh/k", "evil.test", "/etc/y", "noise.test", "/etc/z"]),
        (EventFilter(ignored="exclude"), ["/h/.ssh/k", "evil.test", "/etc/z"]),
        (EventFilter(ignored="only"), ["/etc/y", "noise.test"]),
        (EventFilter(kinds=("network",)), ["evil.test", "noise.test"]),
        (EventFilter(domain="test", ignored="exclude"), ["evil.test"]),
        (EventFilter(path="/etc"), ["/etc/y", "/etc/z"]),
        (EventFilter(session="s2"), ["/etc/z"]),
        (
            EventFilter(decision="allow"),
            ["/h/.ssh/k", "evil.test", "/etc/y", "noise.test", "/etc/z"],
        ),
        (EventFilter(limit=2), ["noise.test", "/etc/z"]),
    ],
)
def test_blocked_merges_files_and_denials_in_time_order(
    tmp_path: Path, flt: EventFilter, expected: list[str]
) -> None:
    stored(tmp_path / "audit.db", LOGGED)
    with AuditReader(str(tmp_path / "audit.db")) as reader:
        rows = reader.blocked(flt)
    assert [target(row) for row in rows] == expected
    assert all(row.ignored == (target(row) in ("/etc/y", "noise.test")) for row in rows)


def violations_cli(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="corral")
    add_log_commands(parser.add_subparsers(dest="command", required=True))
    try:
        return cmd_violations(parser.parse_args(["violations", *argv]))
    except CorralError as exc:
        print(f"corral: {exc.message}", file=sys.stderr)
        return exc.exit_code


@pytest.fixture
def logged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.setenv(AUDIT_DB_ENV, str(tmp_path / "audit.db"))
    stored(tmp_path / "audit.db", LOGGED)


@pytest.mark.usefixtures("logged")
@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ([], ["/h/.ssh/k", "evil.test:443", "/etc/z"]),
        (["--all"], ["/h/.ssh/k", "evil.test:443", "/etc/y", "noise.test:443", "/etc/z"]),
        (["--ignored"], ["/etc/y", "noise.test:443"]),
        (["--domain", "evil.test"], ["evil.test:443"]),
    ],
)
def test_violations_command_hides_ignored_ones_unless_asked(
    capsys: pytest.CaptureFixture[str], flags: list[str], expected: list[str]
) -> None:
    assert violations_cli(["--json", *flags]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["target"] for r in rows] == expected
    assert {r["kind"] for r in rows} <= {"violation", "network"}


@pytest.mark.usefixtures("logged")
def test_violations_table_has_kind_target_and_rule(capsys: pytest.CaptureFixture[str]) -> None:
    assert violations_cli(["--all"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["TIME", "SESSION", "KIND", "ACCESS", "TARGET", "RULE", "DETAIL"]
    cells = [line.split()[3:7] for line in lines[1:]]
    assert cells[:2] == [
        ["file", "read", "/h/.ssh/k", "by"],  # no rule recorded: DETAIL follows
        ["network", "connect", "evil.test:443", "default-deny"],
    ]
    assert "default-deny (ignored)" in lines[4]


@pytest.mark.usefixtures("logged")
def test_all_and_ignored_cannot_be_combined() -> None:
    with pytest.raises(SystemExit) as caught:
        violations_cli(["--all", "--ignored"])
    assert caught.value.code == 2


# --- end to end: the three violations the issue asks for -----------------------------------

# Writes outside the workspace, reads the SSH key, connects to a denied domain; exits 0 so
# that nothing but the records tells what happened.
SCRIPT = "echo loot > {outside}/loot; cat ~/.ssh/id_rsa; curl -sS -m 20 {url}; exit 0"


class Recorded(NamedTuple):
    sandbox_id: str
    summary: list[str]
    rows: list[BlockedRow]
    """Every refused attempt in the log, ignored ones included."""
    output: bytes


def run_recorded(layout: Layout, policy: Policy, servers: Servers, tmp: Path) -> Recorded:
    """The script under `policy` through the API, recorded as `corral run` records: a spool
    behind RunViolations, breadcrumbs from its error output; then the spool into a log."""
    url = f"https://denied.test:{servers.denied.port}/"
    argv = ["bash", "-c", SCRIPT.format(outside=layout.outside, url=url)]
    spool = SpoolSink(str(tmp / "spool"), "run")
    violations = RunViolations(spool, policy, argv)
    with Sandbox(policy, sink=violations, resolver=resolve) as sandbox:
        proc = sandbox.spawn(argv, env=layout.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = proc.communicate(timeout=60)
        assert out is not None and err is not None
        for line in err.decode(errors="replace").splitlines():
            crumbs = breadcrumbs_for_line(line, cwd=layout.workspace, plan=proc.plan, policy=policy)
            violations.record_breadcrumbs(proc.sandbox_id, crumbs)
    spool.close()
    with AuditLog(str(tmp / "audit.db")) as log:
        ingest_spool(str(tmp / "spool"), log)
    with AuditReader(str(tmp / "audit.db")) as reader:
        rows = reader.blocked()
    return Recorded(proc.sandbox_id, violations.summary(proc.sandbox_id), rows, out + err)


@pytest.fixture
def servers() -> Iterator[Servers]:
    with loopback_servers() as pair:
        yield pair


def assert_the_three(layout: Layout, recorded: Recorded, port: int) -> None:
    """Exactly the three attempts, with the fields the log must carry; nothing got through."""
    key = f"{layout.home}/.ssh/id_rsa"
    files = {row.operation: row for row in recorded.rows if isinstance(row, ViolationRow)}
    network = [row for row in recorded.rows if isinstance(row, NetworkRow)]
    assert len(recorded.rows) == 3 and sorted(files) == ["read", "write"] and len(network) == 1
    write, read, connect = files["write"], files["read"], network[0]
    assert (write.operation, write.path, write.rule) == (
        "write", f"{layout.outside}/loot", "outside the writable paths"
    )  # fmt: skip
    assert (read.operation, read.path) == ("read", key)
    assert read.rule.startswith("hidden by built-in")
    assert (connect.host, connect.port, connect.decision) == ("denied.test", port, "deny")
    assert connect.rule == "deniedDomains: denied.test"
    assert {row.session_id for row in recorded.rows} == {recorded.sandbox_id}
    # Host-side evidence that each attempt failed.
    assert not os.path.exists(f"{layout.outside}/loot")
    assert SECRET.encode() not in recorded.output


@pytest.mark.usefixtures("sandbox_available")
def test_three_attempts_leave_exactly_three_violations(
    layout: Layout, servers: Servers, tmp_path: Path
) -> None:
    before = servers.denied.connections
    recorded = run_recorded(layout, filtered_policy(layout), servers, tmp_path)
    assert_the_three(layout, recorded, servers.denied.port)
    assert servers.denied.connections == before
    assert [row.ignored for row in recorded.rows] == [False] * 3
    assert sorted(line.split()[2] for line in recorded.summary) == ["connection", "read", "write"]


@pytest.mark.usefixtures("sandbox_available")
def test_an_ignored_attempt_is_recorded_but_not_shown(
    layout: Layout, servers: Servers, tmp_path: Path
) -> None:
    rules = (rule("bash", "~/.ssh"), rule("*", "DENIED.test"), rule("make", "/"))
    policy = filtered_policy(layout)._replace(ignore_violations=rules)
    recorded = run_recorded(layout, policy, servers, tmp_path)
    assert_the_three(layout, recorded, servers.denied.port)
    assert {target(row): row.ignored for row in recorded.rows} == {
        f"{layout.outside}/loot": False, f"{layout.home}/.ssh/id_rsa": True, "denied.test": True,
    }  # fmt: skip
    assert recorded.summary == [
        f"corral: blocked write {layout.outside}/loot: outside the writable paths; add "
        f'"filesystem": {{"allowWrite": ["{layout.outside}"]}} to '
        f"{layout.workspace}/.corral/settings.local.json"
    ]
    with AuditReader(str(tmp_path / "audit.db")) as reader:
        shown = reader.blocked(EventFilter(ignored="exclude"))
    assert [row.path for row in shown if isinstance(row, ViolationRow)] == [
        f"{layout.outside}/loot"
    ]
    assert len(shown) == 1


def corral(layout: Layout, *args: str) -> list[dict[str, object]]:
    done = subprocess.run(
        [sys.executable, "-m", "corral", *args],
        cwd=layout.workspace,
        env=layout.env,
        capture_output=True,
        text=True,
        check=True,
    )
    return [json.loads(line) for line in done.stdout.splitlines()]


def summary_lines(stderr: bytes) -> list[str]:
    """corral's end-of-run lines (the proxy's own notice is printed as the refusal happens,
    before curl's error line; the summary comes after everything the command printed)."""
    lines = stderr.decode(errors="replace").splitlines()
    last_own = max(i for i, line in enumerate(lines) if not line.startswith("corral: "))
    return lines[last_own + 1 :]


@pytest.mark.usefixtures("sandbox_available")
@pytest.mark.parametrize("quiet", [False, True], ids=["summary", "quiet"])
def test_corral_run_records_and_summarises_the_three(layout: Layout, quiet: bool) -> None:
    # The CLI has no test resolver: the denied name is one the proxy refuses by its name
    # alone (in no list), before anything would resolve it.
    write_settings(layout, {
        "network": {"allowedDomains": ["allowed.test"]},
        "ignoreViolations": {"bash": ["~/.ssh/*"]},
    })  # fmt: skip
    script = SCRIPT.format(outside=layout.outside, url="https://other.test/")
    done = run_cli(layout, *(["--quiet"] if quiet else []), "--", "bash", "-c", script)
    assert done.returncode == 0, done.stderr
    local = f"{layout.workspace}/.corral/settings.local.json"
    connection = (
        f"corral: blocked connection to other.test:443 (not in network.allowedDomains); to "
        f'allow it add "network": {{"allowedDomains": ["other.test"]}} to {local}'
    )
    write = (
        f"corral: blocked write {layout.outside}/loot: outside the writable paths; add "
        f'"filesystem": {{"allowWrite": ["{layout.outside}"]}} to {local}'
    )
    # The connection's line is printed as it happens, and not again at exit; --quiet: neither.
    said = [line for line in done.stderr.decode().splitlines() if line.startswith("corral: ")]
    assert said.count(connection) == (0 if quiet else 1), said
    assert summary_lines(done.stderr) == ([] if quiet else [write])
    assert len(said) == (0 if quiet else 2), said
    shown = corral(layout, "violations", "--json")
    assert sorted((r["kind"], r["target"], r["rule"]) for r in shown) == [
        ("network", "other.test:443", "default-deny"),
        ("violation", f"{layout.outside}/loot", "outside the writable paths"),
    ]
    ignored = corral(layout, "violations", "--json", "--ignored")
    assert [(r["kind"], r["target"], r["ignored"]) for r in ignored] == [
        ("violation", f"{layout.home}/.ssh/id_rsa", True)
    ]
    assert not os.path.exists(f"{layout.outside}/loot")
    assert SECRET.encode() not in done.stdout + done.stderr
