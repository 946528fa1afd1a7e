"""The audit schema: created fresh, upgraded from version 1 with data kept, pending is read-only,
a failing migration leaves no trace, and a newer database is refused."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

import pytest

from corral.audit import migrations
from corral.audit.migrations import SCHEMA_VERSION, Migration
from corral.audit.query import AuditReader
from corral.audit.store import AuditLog
from corral.errors import CorralError

ALL_VERSIONS = list(range(1, SCHEMA_VERSION + 1))

# The version 1 schema exactly as released, written by hand: not through the migration code.
V1_SCHEMA = [
    """CREATE TABLE sessions (id TEXT PRIMARY KEY, argv TEXT NOT NULL DEFAULT '[]',
        cwd TEXT NOT NULL DEFAULT '', policy_digest TEXT NOT NULL DEFAULT '',
        mode TEXT NOT NULL DEFAULT '', backend TEXT NOT NULL DEFAULT '', started_at REAL,
        ended_at REAL, exit_status INTEGER, resource_usage TEXT NOT NULL DEFAULT '{}')""",
    """CREATE TABLE network_events (id INTEGER PRIMARY KEY, time REAL NOT NULL,
        session_id TEXT NOT NULL, host TEXT NOT NULL, port INTEGER, decision TEXT NOT NULL,
        rule TEXT NOT NULL DEFAULT '', reason TEXT NOT NULL DEFAULT '',
        bytes_up INTEGER NOT NULL DEFAULT 0, bytes_down INTEGER NOT NULL DEFAULT 0,
        duration REAL NOT NULL DEFAULT 0)""",
    """CREATE TABLE violations (id INTEGER PRIMARY KEY, time REAL NOT NULL,
        session_id TEXT NOT NULL, pid INTEGER, executable TEXT NOT NULL DEFAULT '',
        operation TEXT NOT NULL, path TEXT NOT NULL, rule TEXT NOT NULL DEFAULT '')""",
    """CREATE TABLE bridge_requests (id INTEGER PRIMARY KEY, time REAL NOT NULL,
        session_id TEXT NOT NULL, request_id TEXT NOT NULL, command TEXT NOT NULL,
        params TEXT NOT NULL DEFAULT '{}', decision TEXT NOT NULL,
        decided_by TEXT NOT NULL DEFAULT '')""",
    """CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL,
        applied_at REAL NOT NULL)""",
    "INSERT INTO schema_migrations VALUES (1, 'initial tables', 1700000000.0)",
    "PRAGMA user_version = 1",
    """INSERT INTO sessions (id, argv, cwd, mode, backend, started_at, ended_at, exit_status)
        VALUES ('old-1', '["make"]', '/w', 'standard', 'bubblewrap', 100.0, 160.0, 2)""",
    """INSERT INTO network_events (time, session_id, host, port, decision, rule)
        VALUES (101.0, 'old-1', 'pypi.example', 443, 'allow', 'allowedDomains')""",
    """INSERT INTO violations (time, session_id, pid, executable, operation, path, rule)
        VALUES (102.0, 'old-1', 42, '/usr/bin/cat', 'read', '/home/u/.ssh/id_rsa', 'denyRead')""",
]


def write_v1(path: Path) -> None:
    conn = sqlite3.connect(path)
    for statement in V1_SCHEMA:
        conn.execute(statement)
    conn.commit()
    conn.close()


def versions(path: Path) -> tuple[list[int], int]:
    conn = sqlite3.connect(path)
    try:
        recorded = [v for (v,) in conn.execute("SELECT version FROM schema_migrations")]
        return recorded, conn.execute("PRAGMA user_version").fetchone()[0]
    finally:
        conn.close()


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_new_log_gets_every_migration_recorded(tmp_path: Path) -> None:
    path = tmp_path / "state" / "audit.db"
    AuditLog(str(path)).close()
    assert versions(path) == (list(range(1, SCHEMA_VERSION + 1)), SCHEMA_VERSION)
    conn = sqlite3.connect(path)
    tables = {n for (n,) in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"sessions", "network_events", "violations", "bridge_requests"} <= tables
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert migrations.pending(conn) == []
    conn.close()


def test_the_log_and_its_directory_are_private(tmp_path: Path) -> None:
    path = tmp_path / "state" / "audit.db"
    AuditLog(str(path)).close()
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.parent.stat().st_mode & 0o777 == 0o700


def test_pending_on_a_version_1_log_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    write_v1(path)
    before = digest(path)
    conn = sqlite3.connect(path)
    assert [m.version for m in migrations.pending(conn)] == ALL_VERSIONS[1:]
    assert migrations.applied_versions(conn) == [1]
    conn.close()
    assert digest(path) == before


def test_pending_on_an_empty_file_does_not_create_the_bookkeeping_table(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    conn = sqlite3.connect(path)
    assert len(migrations.pending(conn)) == SCHEMA_VERSION
    assert conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0
    conn.close()


def test_opening_a_version_1_log_upgrades_it_and_keeps_the_data(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    write_v1(path)
    AuditLog(str(path)).close()
    assert versions(path) == (ALL_VERSIONS, SCHEMA_VERSION)
    with AuditReader(str(path)) as reader:
        story = reader.story("old-1")
    assert story.session.argv == ("make",)
    assert story.session.exit_status == 2
    assert [e.kind for e in story.events] == ["network", "violation"]
    violation = story.events[1]
    assert violation.kind == "violation"
    assert violation.path == "/home/u/.ssh/id_rsa"
    assert violation.ignored is False  # the new column's default for old rows
    assert story.events[0].kind == "network" and story.events[0].ignored is False  # schema 4


def test_a_reader_upgrades_an_old_log_too(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    write_v1(path)
    with AuditReader(str(path)) as reader:
        assert len(reader.violations()) == 1
    assert versions(path) == (ALL_VERSIONS, SCHEMA_VERSION)


def test_a_failing_migration_rolls_back_with_its_record(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    write_v1(path)
    broken = (
        *migrations.MIGRATIONS,
        Migration(SCHEMA_VERSION + 1, "half", ("CREATE TABLE half (x)", "CREATE TABLE half (x)")),
    )
    conn = sqlite3.connect(path, isolation_level=None)
    with pytest.raises(sqlite3.OperationalError):
        migrations.apply_pending(conn, broken)
    # The real migrations committed on their own; the broken one left no table, no record.
    assert migrations.applied_versions(conn) == ALL_VERSIONS
    assert conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'half'").fetchone() is None
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert not conn.in_transaction
    conn.close()


def test_applying_twice_applies_nothing_the_second_time(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "audit.db", isolation_level=None)
    assert len(migrations.apply_pending(conn)) == SCHEMA_VERSION
    assert migrations.apply_pending(conn) == []
    conn.close()


def test_a_log_from_a_newer_corral_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    AuditLog(str(path)).close()
    conn = sqlite3.connect(path)
    conn.execute("INSERT INTO schema_migrations VALUES (99, 'future', 0)")
    conn.commit()
    conn.close()
    with pytest.raises(CorralError, match="schema version 99, newer"):
        AuditLog(str(path))
