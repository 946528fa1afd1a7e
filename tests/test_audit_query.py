"""Queries over a log of known events: each filter keeps exactly the rows it should."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from corral.audit.events import Event
from corral.audit.query import AuditReader, Cursor, EventFilter, parse_time
from corral.audit.rows import EventRow
from corral.audit.store import AuditLog
from corral.errors import CorralError, UsageError


def net(label: str, session: str, at: float, host: str, decision: str = "allow") -> Event:
    fields: dict[str, object] = {"host": host, "port": 443, "decision": decision, "rule": label}
    return Event("network", session, fields, at)


def vio(label: str, session: str, at: float, path: str, *, ignored: bool = False) -> Event:
    fields: dict[str, object] = {
        "pid": 9,
        "executable": "/bin/cat",
        "operation": "read",
        "path": path,
        "rule": label,
        "ignored": ignored,
    }
    return Event("violation", session, fields, at)


def bri(label: str, session: str, at: float, decision: str) -> Event:
    fields: dict[str, object] = {
        "request_id": label,
        "command": "git push",
        "params": {},
        "decision": decision,
        "decided_by": "user",
    }
    return Event("bridge", session, fields, at)


def start(session: str, at: float) -> Event:
    fields: dict[str, object] = {
        "phase": "start",
        "argv": ["run", session],
        "cwd": "/w",
        "mode": "standard",
        "backend": "bubblewrap",
        "policy_digest": "d",
    }
    return Event("session", session, fields, at)


EVENTS = [
    start("alpha-1", 100.0),
    start("beta-2", 200.0),
    start("alpha-3", 300.0),
    net("n-exact", "alpha-1", 101.0, "example.com"),
    net("n-sub", "alpha-1", 102.0, "api.example.com", "deny"),
    net("n-lookalike", "beta-2", 201.0, "badexample.com", "deny"),
    net("n-suffix", "beta-2", 202.0, "example.com.evil.net"),
    vio("v-ssh", "alpha-1", 103.0, "/home/u/.ssh"),
    vio("v-key", "beta-2", 203.0, "/home/u/.ssh/id_rsa"),
    vio("v-sibling", "beta-2", 204.0, "/home/u/.sshx"),
    vio("v-case", "alpha-3", 301.0, "/HOME/u/.ssh/id_rsa"),
    vio("v-ignored", "alpha-3", 302.0, "/home/u/.ssh/known_hosts", ignored=True),
    bri("b-allow", "alpha-1", 104.0, "allow"),
    bri("b-deny", "alpha-3", 303.0, "deny"),
]


def label(row: EventRow) -> str:
    return row.request_id if row.kind == "bridge" else row.rule


@pytest.fixture
def reader(tmp_path: Path) -> Iterator[AuditReader]:
    path = str(tmp_path / "audit.db")
    with AuditLog(path) as log:
        for event in EVENTS:
            log.emit(event)
    with AuditReader(path) as opened:
        yield opened


ALL = [
    "n-exact", "n-sub", "v-ssh", "b-allow", "n-lookalike", "n-suffix", "v-key", "v-sibling",
    "v-case", "v-ignored", "b-deny",
]  # fmt: skip


@pytest.mark.parametrize(
    ("flt", "expected"),
    [
        (EventFilter(), ALL),
        (EventFilter(session="alpha-1"), ["n-exact", "n-sub", "v-ssh", "b-allow"]),
        (EventFilter(kinds=("bridge",)), ["b-allow", "b-deny"]),
        (EventFilter(kinds=("network", "bridge"), session="beta-2"), ["n-lookalike", "n-suffix"]),
        (EventFilter(domain="example.com"), ["n-exact", "n-sub"]),
        (EventFilter(domain="EXAMPLE.com."), ["n-exact", "n-sub"]),
        (EventFilter(domain="api.example.com"), ["n-sub"]),
        (EventFilter(domain="com"), ["n-exact", "n-sub", "n-lookalike"]),
        (EventFilter(path="/home/u/.ssh"), ["v-ssh", "v-key", "v-ignored"]),
        (EventFilter(path="/home/u/.ssh/"), ["v-ssh", "v-key", "v-ignored"]),
        (EventFilter(path="/home/u/.ssh/id_rsa"), ["v-key"]),
        (EventFilter(path="/"), ["v-ssh", "v-key", "v-sibling", "v-case", "v-ignored"]),
        (EventFilter(path="/home/u/.ssh", ignored="exclude"), ["v-ssh", "v-key"]),
        (EventFilter(kinds=("violation",), ignored="only"), ["v-ignored"]),
        (EventFilter(since=200.0, until=300.0), ["n-lookalike", "n-suffix", "v-key", "v-sibling"]),
        (EventFilter(decision="deny"), ["n-sub", "n-lookalike", "b-deny"]),
        (EventFilter(limit=3), ["v-case", "v-ignored", "b-deny"]),
        (EventFilter(limit=0), []),
        (EventFilter(session="alpha-1", limit=2), ["v-ssh", "b-allow"]),
        (EventFilter(session="nobody"), []),
        # Filters for one kind leave out the others: no bridge row has a path.
        (EventFilter(kinds=("bridge",), path="/"), []),
    ],
)
def test_filters(reader: AuditReader, flt: EventFilter, expected: list[str]) -> None:
    assert [label(row) for row in reader.events(flt)] == expected


def test_recent_sessions_newest_first(reader: AuditReader) -> None:
    assert [s.id for s in reader.recent_sessions()] == ["alpha-3", "beta-2", "alpha-1"]
    assert [s.id for s in reader.recent_sessions(limit=1)] == ["alpha-3"]


@pytest.mark.parametrize(
    ("given", "found"), [("beta-2", "beta-2"), ("beta", "beta-2"), ("alpha-3", "alpha-3")]
)
def test_a_session_is_found_by_id_or_unique_prefix(
    reader: AuditReader, given: str, found: str
) -> None:
    assert reader.session(given).id == found


@pytest.mark.parametrize(
    ("given", "message"),
    [("alpha", "matches several sessions: alpha-1, alpha-3"), ("gamma", "no session"),
     ("ALPHA-1", "no session"), ("%", "no session"), ("", "no session")],
)  # fmt: skip
def test_a_wrong_session_is_the_users_error(reader: AuditReader, given: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        reader.session(given)


def test_a_story_is_the_session_and_its_events_in_time_order(reader: AuditReader) -> None:
    story = reader.story("alpha-3")
    assert story.session.argv == ("run", "alpha-3")
    assert story.session.ended_at is None
    assert [label(e) for e in story.events] == ["v-case", "v-ignored", "b-deny"]


def test_violations_only(reader: AuditReader) -> None:
    flt = EventFilter(session="beta-2", domain=None)
    assert [v.rule for v in reader.violations(flt)] == ["v-key", "v-sibling"]


class StopFollowing(Exception):
    pass


def test_follow_yields_rows_committed_later_by_another_writer(tmp_path: Path) -> None:
    path = str(tmp_path / "audit.db")
    log = AuditLog(path)
    log.emit_sync(net("old", "s", 1.0, "example.com"))
    reader = AuditReader(path)
    batches = [
        [net("new-1", "s", 2.0, "example.com"), vio("new-2", "s", 3.0, "/p")],
        [net("other-domain", "s", 4.0, "other.org"), net("new-3", "s", 5.0, "example.com")],
    ]
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        # Called only when a poll found nothing: write the next batch, or end the test.
        sleeps.append(seconds)
        if not batches:
            raise StopFollowing
        for event in batches.pop(0):
            log.emit(event)
        log.flush()

    seen: list[str] = []
    with pytest.raises(StopFollowing):
        for row in reader.follow(EventFilter(kinds=("network",)), poll_interval=0.25, sleep=sleep):
            seen.append(label(row))
    assert seen == ["new-1", "other-domain", "new-3"]  # "old" was there before: not shown
    assert sleeps == [0.25, 0.25, 0.25]

    from_start = reader.follow(EventFilter(domain="example.com"), after=Cursor(), sleep=sleep)
    assert [label(next(from_start)) for _ in range(3)] == ["old", "new-1", "new-3"]
    reader.close()
    log.close()


NOW = 1_000_000.0


@pytest.mark.parametrize(
    ("text", "expected"),
    [("90s", NOW - 90), ("10m", NOW - 600), ("2h", NOW - 7200), ("3d", NOW - 3 * 86400),
     ("1W", NOW - 7 * 86400), ("1970-01-02T00:00:00+00:00", 86400.0)],
)  # fmt: skip
def test_parse_time(text: str, expected: float) -> None:
    assert parse_time(text, now=NOW) == expected


@pytest.mark.parametrize("text", ["", "m", "-5m", "5 minutes", "yesterday", "1.5h"])
def test_parse_time_rejects(text: str) -> None:
    with pytest.raises(UsageError, match="not a time"):
        parse_time(text, now=NOW)


def test_a_reader_cannot_write(reader: AuditReader) -> None:
    # query_only is on after the schema check: nothing a reader does can change the log.
    import sqlite3

    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        reader._conn.execute("DELETE FROM sessions")


def test_sqlite_errors_during_queries_become_corral_errors(reader: AuditReader) -> None:
    reader._conn.execute("PRAGMA query_only = OFF")
    reader._conn.execute("DROP TABLE bridge_requests")
    with pytest.raises(CorralError, match="reading events failed: no such table"):
        reader.events()
