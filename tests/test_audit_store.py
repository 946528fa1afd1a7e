"""The SQLite sink: what each kind of event becomes, acknowledgement, and errors at the edge."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from corral.audit import db, store
from corral.audit.encode import row_of
from corral.audit.events import (
    Event,
    FanOutSink,
    MemorySink,
    bridge_event,
    network_event,
    session_end_event,
    session_start_event,
    violation_event,
)
from corral.audit.query import AuditReader
from corral.audit.store import AuditLog, default_audit_path
from corral.errors import CorralError
from corral.policy.model import HostPaths


def rows(path: Path, sql: str) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def test_default_path_is_under_the_state_dir() -> None:
    host = HostPaths("/w", "/home/u", "/home/u/.config", "/home/u/.cache", "/home/u/.state")
    assert default_audit_path(host) == "/home/u/.state/corral/audit.db"


def test_every_kind_lands_in_its_table(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    with AuditLog(str(path)) as log:
        log.emit(
            session_start_event(
                "s1",
                argv=["python", "-c", "pass"],
                cwd="/w",
                mode="standard",
                backend="bubblewrap",
                policy_digest="d1",
            )
        )
        log.emit(network_event("s1", host="example.com", port=443, decision="deny", rule="r1"))
        log.emit(violation_event("s1", pid=7, executable="/bin/cat", operation="read", path="/x"))
        log.emit(
            bridge_event(
                "s1",
                request_id="q1",
                command="git push",
                params={"remote": "origin"},
                decision="allow",
                decided_by="user",
            )
        )
        log.emit(session_end_event("s1", exit_code=-9, resource_usage={"max_rss_kb": 1024}))
        log.flush()
        with AuditReader(str(path)) as reader:
            story = reader.story("s1")
    s = story.session
    assert (s.argv, s.cwd, s.mode, s.backend, s.policy_digest) == (
        ("python", "-c", "pass"),
        "/w",
        "standard",
        "bubblewrap",
        "d1",
    )
    assert s.exit_status == -9
    assert s.resource_usage == {"max_rss_kb": 1024}
    assert s.started_at is not None and s.ended_at is not None
    assert [e.kind for e in story.events] == ["network", "violation", "bridge"]
    bridge = story.events[2]
    assert bridge.kind == "bridge" and bridge.params == {"remote": "origin"}


def test_a_session_end_written_before_its_start_still_makes_one_row(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    with AuditLog(str(path)) as log:
        log.emit_sync(session_end_event("s1", exit_code=0))
        log.emit_sync(
            session_start_event(
                "s1", argv=["true"], cwd="/w", mode="strict", backend="b", policy_digest="d"
            )
        )
    assert rows(path, "SELECT id, argv, exit_status FROM sessions") == [("s1", '["true"]', 0)]


def test_flush_makes_events_visible_to_another_connection(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    log = AuditLog(str(path))
    for i in range(500):
        log.emit(network_event("s", host="h", port=1, decision="allow", bytes_up=i))
    log.flush()
    assert rows(path, "SELECT count(*), sum(bytes_up) FROM network_events") == [
        (500, sum(range(500)))
    ]
    log.close()


def test_close_commits_what_was_emitted_and_is_idempotent(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    log = AuditLog(str(path))
    log.emit(network_event("s", host="h", port=1, decision="allow"))
    log.close()
    log.close()
    assert rows(path, "SELECT count(*) FROM network_events") == [(1,)]
    with pytest.raises(CorralError, match="is closed"):
        log.emit(network_event("s", host="h", port=1, decision="allow"))


@pytest.mark.parametrize(
    ("event", "message"),
    [
        (Event.now("telemetry", "s"), "unknown kind 'telemetry'"),
        (Event.now("network", "s", port=1, decision="allow"), "malformed network"),
        (Event.now("network", "s", host="h", port="https", decision="deny"), "malformed"),
        (Event.now("session", "s", phase="middle"), "phase must be"),
        (Event.now("session", "s", phase="start", argv="ls -l"), "argv must be a list"),
        (Event.now("violation", "s", operation="read"), "malformed violation"),
    ],
)
def test_a_malformed_event_fails_at_its_producer(event: Event, message: str) -> None:
    with pytest.raises(CorralError, match=message):
        row_of(event)


def test_a_file_that_is_not_a_database_is_refused_with_a_hint(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    path.write_bytes(b"this is not sqlite\n" * 100)
    with pytest.raises(CorralError) as caught:
        AuditLog(str(path))
    assert str(path) in caught.value.message
    assert "not an audit log" in caught.value.hint


def test_a_directory_that_cannot_exist_is_reported(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(CorralError, match="opening failed") as caught:
        AuditLog(str(blocker / "audit.db"))
    assert "directory" in caught.value.hint


def test_a_reader_never_creates_a_log(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    with pytest.raises(CorralError, match="no audit log at"):
        AuditReader(str(path))
    assert not path.exists()


def test_a_batch_that_cannot_be_written_is_reported_by_flush(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(db, "BUSY_TIMEOUT_S", 0.01)
    path = tmp_path / "audit.db"
    log = AuditLog(str(path))
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # hold the write lock through every retry
    log.emit(network_event("s", host="h", port=1, decision="allow"))
    with pytest.raises(CorralError, match=r"writing events failed.*1 events not recorded") as e:
        log.flush()
    assert "locked" in e.value.hint
    holder.execute("ROLLBACK")
    holder.close()
    log.emit_sync(network_event("s", host="h2", port=1, decision="allow"))  # recovered
    log.close()
    assert rows(path, "SELECT host FROM network_events") == [("h2",)]


def test_fan_out_sends_to_every_sink() -> None:
    a, b = MemorySink(), MemorySink()
    sink = FanOutSink(a, b)
    sink.emit(network_event("s", host="h", port=1, decision="allow"))
    sink.close()
    assert len(a.events) == len(b.events) == 1


@pytest.mark.parametrize(
    ("count", "sizes"),
    [(0, []), (1, [1]), (5, [4, 1]), (1024, [1024]), (1027, [1024, 2, 1]),
     (3000, [1024, 1024, 512, 256, 128, 32, 16, 8])],
)  # fmt: skip
def test_batches_are_written_as_few_multi_row_statements(count: int, sizes: list[int]) -> None:
    assert store._chunk_sizes(count) == sizes
    assert sum(sizes) == count


def test_a_large_burst_is_stored_whole_and_in_order(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    count = store.MAX_BATCH_EVENTS * 2 + store.CHUNK_ROWS + 7
    with AuditLog(str(path)) as log:
        for i in range(count):
            log.emit(network_event("s", host="h", port=1, decision="allow", bytes_up=i))
    stored = [n for (n,) in rows(path, "SELECT bytes_up FROM network_events ORDER BY id")]
    assert stored == list(range(count))


def test_the_queue_stays_bounded_and_nothing_is_dropped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store, "MAX_QUEUED_EVENTS", 40)
    monkeypatch.setattr(store, "MAX_BATCH_EVENTS", 8)
    path = tmp_path / "audit.db"
    with AuditLog(str(path)) as log:
        for i in range(2000):
            log.emit(network_event("s", host="h", port=1, decision="allow", bytes_up=i))
            assert log._queue.qsize() <= 40
    assert rows(path, "SELECT count(*) FROM network_events") == [(2000,)]
