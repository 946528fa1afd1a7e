"""Rendering: plain aligned text, one JSON object per row, rich tables; sandbox-made text is
escaped so it cannot forge lines or drive the terminal."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator

import pytest

from corral.audit.render import (
    escape,
    format_bytes,
    format_duration,
    host_port,
    render_events,
    render_sessions,
    render_story,
    render_violations,
    resolve_style,
)
from corral.audit.rows import BridgeRow, NetworkRow, SessionRow, SessionStory, ViolationRow


@pytest.fixture(autouse=True)
def utc(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


SESSION = SessionRow(
    1, "123-456", ("pip", "install", "my pkg"), "/w", "d1", "standard", "bubblewrap",
    0.0, 75.0, 0, {"max_rss_kb": 2048},
)  # fmt: skip
RUNNING = SessionRow(2, "9-9", ("sleep", "9"), "/w", "d1", "strict", "bwrap", 10.0, None, None, {})
NETWORK = NetworkRow(1, 1.0, "123-456", "::1", 8080, "deny", "deniedDomains", "", 0, 1500, 0.25)
VIOLATION = ViolationRow(1, 2.0, "123-456", 42, "/bin/cat", "read", "/home/u/.ssh/id_rsa",
                         "denyRead", False)  # fmt: skip
BRIDGE = BridgeRow(1, 3.0, "123-456", "q1", "git push", {"remote": "o"}, "allow", "user")


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_auto_is_table_on_a_terminal_and_plain_in_a_pipe() -> None:
    assert resolve_style("auto", Terminal()) == "table"
    assert resolve_style("auto", io.StringIO()) == "plain"
    assert resolve_style("json", Terminal()) == "json"


def test_plain_sessions_are_aligned_columns() -> None:
    out = io.StringIO()
    render_sessions([SESSION, RUNNING], out, style="plain")
    assert out.getvalue().splitlines() == [
        "SESSION  STARTED              DURATION  EXIT  MODE      BACKEND     COMMAND",
        "123-456  1970-01-01 00:00:00  1m15s     0     standard  bubblewrap  pip install 'my pkg'",
        "9-9      1970-01-01 00:00:10  running?  -     strict    bwrap       sleep 9",
    ]


def test_plain_events_of_every_kind_share_columns() -> None:
    out = io.StringIO()
    render_events([NETWORK, VIOLATION, BRIDGE], out, style="plain")
    lines = out.getvalue().splitlines()
    assert lines[0].split() == ["TIME", "SESSION", "KIND", "DECISION", "TARGET", "RULE", "DETAIL"]
    assert "deny      [::1]:8080" in lines[1]
    assert "up 0 B, down 1.5 kB, 0.2s" in lines[1]
    assert "denied    /home/u/.ssh/id_rsa  denyRead" in lines[2]
    assert lines[2].endswith("read by /bin/cat (pid 42)")
    assert lines[3].endswith("request q1, decided by user")
    # Aligned: every row's KIND cell starts where the header's does.
    column = lines[0].index("KIND")
    assert [line[column:].split()[0] for line in lines[1:]] == ["network", "violation", "bridge"]


def test_plain_violations() -> None:
    out = io.StringIO()
    ignored = VIOLATION._replace(ignored=True, pid=None)
    render_violations([VIOLATION, ignored], out, style="plain")
    lines = out.getvalue().splitlines()
    assert lines[1].split() == [
        "1970-01-01", "00:00:02", "123-456", "42", "/bin/cat", "read", "/home/u/.ssh/id_rsa",
        "denyRead",
    ]  # fmt: skip
    assert lines[2].endswith("denyRead (ignored)")


@pytest.mark.parametrize(
    "render", [render_sessions, render_events, render_violations], ids=lambda f: f.__name__
)
def test_nothing_to_show_prints_the_header_only(render: object) -> None:
    out = io.StringIO()
    render([], out, style="plain")  # type: ignore[operator]
    assert len(out.getvalue().splitlines()) == 1


def test_json_is_one_object_per_row_with_its_kind() -> None:
    out = io.StringIO()
    render_events([NETWORK, VIOLATION, BRIDGE], out, style="json")
    objects = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [o["kind"] for o in objects] == ["network", "violation", "bridge"]
    assert objects[0]["host"] == "::1" and objects[0]["bytes_down"] == 1500
    assert objects[1]["ignored"] is False
    assert objects[2]["params"] == {"remote": "o"}


def test_story_plain_and_json() -> None:
    story = SessionStory(SESSION, [NETWORK, VIOLATION])
    out = io.StringIO()
    render_story(story, out, style="plain")
    lines = out.getvalue().splitlines()
    assert lines[:11] == [
        "session           123-456",
        "command           pip install 'my pkg'",
        "cwd               /w",
        "mode              standard",
        "backend           bubblewrap",
        "policy            d1",
        "started           1970-01-01 00:00:00",
        "ended             1970-01-01 00:01:15",
        "exit              0",
        "usage.max_rss_kb  2048",
        "",
    ]
    assert [line.split()[3] for line in lines[12:]] == ["network", "violation"]
    out = io.StringIO()
    render_story(story, out, style="json")
    kinds = [json.loads(line)["kind"] for line in out.getvalue().splitlines()]
    assert kinds == ["session", "network", "violation"]


HOSTILE = "/tmp/x\n2025-01-01 00:00:00  fake-session\x1b[2J[bold]loud[/bold]"


def test_hostile_text_cannot_forge_a_line_or_reach_the_terminal() -> None:
    row = VIOLATION._replace(path=HOSTILE, executable="\x9bevil")
    out = io.StringIO()
    render_violations([row], out, style="plain")
    text = out.getvalue()
    assert len(text.splitlines()) == 2
    assert "\x1b" not in text and "\x9b" not in text
    assert "\\n2025-01-01" in text and "\\x1b[2J" in text and "\\x9bevil" in text


def test_rich_table_shows_markup_literally_and_escapes_controls(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("COLUMNS", "300")  # wide enough that rich folds no cell
    row = VIOLATION._replace(path=HOSTILE)
    out = Terminal()
    render_violations([row], out, style="auto")
    text = out.getvalue()
    assert "Violations" in text and "EXECUTABLE" in text
    assert "\x1b[2J" not in text and "\n2025-01-01" not in text
    assert "[bold]loud[/bold]" in text
    assert len(text.strip().splitlines()) == 5  # title, header, rule, one row... and no more


@pytest.mark.parametrize(
    ("text", "expected"),
    [("plain", "plain"), ("tab\there", "tab\\there"), ("é ünïcode", "é ünïcode"),
     ("\x00\x7f", "\\x00\\x7f"), ("\u202eevil", "\\u202eevil")],
)  # fmt: skip
def test_escape(text: str, expected: str) -> None:
    assert escape(text) == expected


@pytest.mark.parametrize(
    ("seconds", "shown"), [(0.25, "0.2s"), (59.9, "59.9s"), (75, "1m15s"), (3725, "1h02m")]
)
def test_format_duration(seconds: float, shown: str) -> None:
    assert format_duration(seconds) == shown


@pytest.mark.parametrize(
    ("count", "shown"), [(0, "0 B"), (999, "999 B"), (1500, "1.5 kB"), (2_500_000_000, "2.5 GB")]
)
def test_format_bytes(count: int, shown: str) -> None:
    assert format_bytes(count) == shown


@pytest.mark.parametrize(
    ("host", "port", "shown"),
    [("example.com", 443, "example.com:443"), ("2001:db8::1", 80, "[2001:db8::1]:80"),
     ("10.0.0.1", None, "10.0.0.1")],
)  # fmt: skip
def test_host_port(host: str, port: int | None, shown: str) -> None:
    assert host_port(host, port) == shown
