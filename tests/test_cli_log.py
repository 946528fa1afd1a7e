"""`corral log`, `corral log show` and `corral violations` through a parser built as cli.py builds
it, on a log of known events plus a spool the commands must move into it first."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from corral.audit.events import Event, network_event, session_start_event
from corral.audit.spool import SpoolSink
from corral.audit.store import AuditLog
from corral.cli_log import AUDIT_DB_ENV, add_log_commands, cmd_log, cmd_violations
from corral.errors import CorralError

HANDLERS = {"log": cmd_log, "violations": cmd_violations}
NOW = time.time()
OLD, RECENT = NOW - 3 * 3600, NOW - 600  # three hours and ten minutes ago


def main(argv: Sequence[str]) -> int:
    """What cli.main does with these commands registered."""
    parser = argparse.ArgumentParser(prog="corral")
    commands = parser.add_subparsers(dest="command", required=True)
    add_log_commands(commands)
    args = parser.parse_args(argv)
    try:
        return HANDLERS[args.command](args)
    except CorralError as exc:
        print(f"corral: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


def start(session: str, at: float) -> Event:
    fields: dict[str, object] = {
        "phase": "start", "argv": ["make", session], "cwd": "/w", "mode": "standard",
        "backend": "bubblewrap", "policy_digest": "d",
    }  # fmt: skip
    return Event("session", session, fields, at)


def net(session: str, at: float, host: str, decision: str) -> Event:
    fields: dict[str, object] = {"host": host, "port": 443, "decision": decision, "rule": "r"}
    return Event("network", session, fields, at)


def vio(session: str, at: float, path: str) -> Event:
    fields: dict[str, object] = {"pid": 4, "executable": "/bin/cat", "operation": "read",
                                 "path": path, "rule": "denyRead"}  # fmt: skip
    return Event("violation", session, fields, at)


class Env:
    def __init__(self, root: Path) -> None:
        self.db = root / "audit.db"
        self.spool = root / "state" / "corral" / "spool"


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Env:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.setenv(AUDIT_DB_ENV, str(tmp_path / "audit.db"))
    return Env(tmp_path)


@pytest.fixture
def filled(env: Env) -> Env:
    """Two sessions in the log; a third, still running, only in the spool."""
    with AuditLog(str(env.db)) as log:
        for event in [
            start("aaa111", OLD), net("aaa111", OLD + 1, "pypi.example", "allow"),
            vio("aaa111", OLD + 2, "/home/u/.ssh/id_rsa"),
            start("bbb222", RECENT), net("bbb222", RECENT + 1, "evil.example", "deny"),
            vio("bbb222", RECENT + 2, "/etc/shadow"),
        ]:  # fmt: skip
            log.emit(event)
    sink = SpoolSink(str(env.spool), "ccc333")
    sink.emit(start("ccc333", NOW))
    sink.emit(net("ccc333", NOW + 1, "api.github.example", "allow"))
    sink.close()
    return env


def json_lines(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines()]


def test_log_shows_sessions_then_events_including_what_was_spooled(
    filled: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["log"]) == 0
    out = capsys.readouterr().out
    sessions, events = out.split("\n\n")
    assert sessions.splitlines()[0].split()[:3] == ["SESSION", "STARTED", "DURATION"]
    assert [line.split()[0] for line in sessions.splitlines()[1:]] == [
        "ccc333", "bbb222", "aaa111",
    ]  # fmt: skip
    assert "api.github.example:443" in events and "/etc/shadow" in events
    assert os.listdir(filled.spool) == []  # moved into the log


def test_log_json_is_one_object_per_row(filled: Env, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["log", "--json"]) == 0
    rows = json_lines(capsys.readouterr().out)
    assert [r["kind"] for r in rows] == ["session"] * 3 + ["network", "violation"] * 2 + ["network"]
    assert [r["time"] for r in rows[3:]] == sorted(r["time"] for r in rows[3:])  # type: ignore[type-var]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--kind", "network"], {"pypi.example", "evil.example", "api.github.example"}),
        (["--domain", "github.example"], {"api.github.example"}),
        (["--decision", "deny"], {"evil.example"}),
        (["--path", "/home/u"], {"/home/u/.ssh/id_rsa"}),
        (["--session", "bbb"], {"evil.example", "/etc/shadow"}),
        (["--since", "1h"], {"evil.example", "/etc/shadow", "api.github.example"}),
        (["--until", "1h"], {"pypi.example", "/home/u/.ssh/id_rsa"}),
        (["--since", "1h", "--kind", "violation"], {"/etc/shadow"}),
        (["--limit", "1", "--kind", "network"], {"api.github.example"}),
    ],
)
def test_log_filters_show_only_matching_events(
    filled: Env, capsys: pytest.CaptureFixture[str], args: list[str], expected: set[str]
) -> None:
    assert main(["log", "--json", *args]) == 0
    rows = json_lines(capsys.readouterr().out)
    assert {r["kind"] for r in rows} <= {"network", "violation"}  # no sessions when filtered
    assert {str(r.get("host") or r.get("path")) for r in rows} == expected


def test_log_show_tells_one_sessions_story(filled: Env, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["log", "show", "bbb"]) == 0
    out = capsys.readouterr().out
    assert "session  bbb222" in out and "command  make bbb222" in out
    assert "evil.example:443" in out and "/etc/shadow" in out
    assert "pypi.example" not in out
    assert main(["log", "show", "ccc333", "--json"]) == 0
    rows = json_lines(capsys.readouterr().out)
    assert [(r["kind"], r.get("id") or r.get("host")) for r in rows] == [
        ("session", "ccc333"), ("network", "api.github.example"),
    ]  # fmt: skip


def test_violations_lists_file_violations_and_network_denials(
    filled: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["violations", "--json"]) == 0
    rows = json_lines(capsys.readouterr().out)
    assert [(r["kind"], r["target"]) for r in rows] == [
        ("violation", "/home/u/.ssh/id_rsa"), ("network", "evil.example:443"),
        ("violation", "/etc/shadow"),
    ]  # fmt: skip
    assert main(["violations", "--since", "1h", "--path", "/etc"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:4] == ["TIME", "SESSION", "KIND", "ACCESS"]
    assert len(lines) == 2 and "/etc/shadow" in lines[1]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["log", "--since", "yesterday-ish"], "not a time"),
        (["log", "--until", "5 minutes"], "not a time"),
        (["violations", "--since", "3x"], "not a time"),
        (["log", "--session", "zzz"], "no session 'zzz'"),
        (["log", "show", "zzz"], "no session 'zzz'"),
        (["log", "--kind", "network", "show", "bbb"], "takes no filters"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    filled: Env, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("corral: ") and message in err and err.count("\n") == 1


@pytest.mark.parametrize(
    "argv", [["log", "--limit", "-1"], ["log", "--kind", "session"], ["log", "sessions"]]
)
def test_argument_errors_exit_2(env: Env, argv: list[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(argv)
    assert caught.value.code == 2


@pytest.mark.parametrize("argv", [["log"], ["log", "show"], ["violations"]])
def test_every_command_has_help(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main([*argv, "--help"])
    assert caught.value.code == 0 and "usage: corral" in capsys.readouterr().out


def test_with_nothing_recorded_the_commands_show_nothing_and_create_nothing(
    env: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["log", "--json"]) == 0
    assert main(["violations", "--json"]) == 0
    assert capsys.readouterr().out == ""
    assert main(["log", "show", "abc"]) == 2
    assert not env.db.exists()


def test_follow_prints_recent_events_then_what_runs_spool(
    filled: Env, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    polls: list[float] = []

    def poll(seconds: float) -> None:
        polls.append(seconds)
        if len(polls) == 1:  # a run records an event while `corral log -f` waits
            sink = SpoolSink(str(filled.spool), "ddd444")
            sink.emit(session_start_event(
                "ddd444", argv=["x"], cwd="/", mode="strict", backend="b", policy_digest="d"
            ))  # fmt: skip
            sink.emit(network_event("ddd444", host="late.example", port=80, decision="deny"))
            sink.close()
        elif len(polls) == 3:
            raise KeyboardInterrupt  # Ctrl-C

    monkeypatch.setattr(time, "sleep", poll)
    assert main(["log", "--follow", "--json", "--kind", "network"]) == 130
    hosts = [r["host"] for r in json_lines(capsys.readouterr().out)]
    assert hosts == ["pypi.example", "evil.example", "api.github.example", "late.example"]


def test_follow_in_a_pipe_prints_a_header_and_one_line_per_event(
    filled: Env, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupt(seconds: float) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(time, "sleep", interrupt)
    assert main(["log", "-f", "--session", "bbb"]) == 130
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["TIME", "SESSION", "KIND", "DECISION", "TARGET", "RULE", "DETAIL"]
    assert [line.split()[2:5] for line in lines[1:]] == [
        ["bbb222", "network", "deny"], ["bbb222", "violation", "denied"],
    ]  # fmt: skip
