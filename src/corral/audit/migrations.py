"""The audit schema as a list of numbered migrations, and the code that applies them.

Rules:
1. A migration, once released, never changes: a new schema is a new migration at the end.
2. Each migration runs in one transaction together with the `schema_migrations` row that
   records it (and `PRAGMA user_version`, for tools that only read the header): either both
   land or neither does, so a crash or a failing statement leaves the previous version whole.
3. Reading what is pending (`pending`, `applied_versions`) changes nothing, not even by
   creating the bookkeeping table.
4. Several processes may open a new log at once: each migration is re-checked after the
   write lock is taken, so exactly one of them applies it.
5. A database recorded at a version this code does not know is refused, not guessed at.

History:
    1  sessions, network_events, violations, bridge_requests
    2  violations.ignored (matched an ignore rule), and indexes for `corral log` filters
    3  event_id on every event table, unique: moving a spool into the log (spool.py) twice,
       or again after a crash between its commit and the spool file's removal, adds nothing
    4  network_events.ignored: a network denial that matched an ignoreViolations rule, kept
       but not shown, as violations.ignored does for filesystem violations
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence
from typing import NamedTuple

from corral.errors import CorralError

MIGRATIONS_TABLE = "schema_migrations"


class Migration(NamedTuple):
    version: int
    name: str
    statements: tuple[str, ...]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "initial tables",
        (
            """CREATE TABLE sessions (
                id TEXT PRIMARY KEY,
                argv TEXT NOT NULL DEFAULT '[]',
                cwd TEXT NOT NULL DEFAULT '',
                policy_digest TEXT NOT NULL DEFAULT '',
                mode TEXT NOT NULL DEFAULT '',
                backend TEXT NOT NULL DEFAULT '',
                started_at REAL,
                ended_at REAL,
                exit_status INTEGER,
                resource_usage TEXT NOT NULL DEFAULT '{}'
            )""",
            """CREATE TABLE network_events (
                id INTEGER PRIMARY KEY,
                time REAL NOT NULL,
                session_id TEXT NOT NULL,
                host TEXT NOT NULL,
                port INTEGER,
                decision TEXT NOT NULL,
                rule TEXT NOT NULL DEFAULT '',
                reason TEXT NOT NULL DEFAULT '',
                bytes_up INTEGER NOT NULL DEFAULT 0,
                bytes_down INTEGER NOT NULL DEFAULT 0,
                duration REAL NOT NULL DEFAULT 0
            )""",
            """CREATE TABLE violations (
                id INTEGER PRIMARY KEY,
                time REAL NOT NULL,
                session_id TEXT NOT NULL,
                pid INTEGER,
                executable TEXT NOT NULL DEFAULT '',
                operation TEXT NOT NULL,
                path TEXT NOT NULL,
                rule TEXT NOT NULL DEFAULT ''
            )""",
            """CREATE TABLE bridge_requests (
                id INTEGER PRIMARY KEY,
                time REAL NOT NULL,
                session_id TEXT NOT NULL,
                request_id TEXT NOT NULL,
                command TEXT NOT NULL,
                params TEXT NOT NULL DEFAULT '{}',
                decision TEXT NOT NULL,
                decided_by TEXT NOT NULL DEFAULT ''
            )""",
        ),
    ),
    Migration(
        2,
        "violations.ignored and query indexes",
        (
            "ALTER TABLE violations ADD COLUMN ignored INTEGER NOT NULL DEFAULT 0",
            "CREATE INDEX sessions_started ON sessions (started_at)",
            "CREATE INDEX network_session_time ON network_events (session_id, time)",
            "CREATE INDEX network_time ON network_events (time)",
            "CREATE INDEX network_host ON network_events (host)",
            "CREATE INDEX violations_session_time ON violations (session_id, time)",
            "CREATE INDEX violations_time ON violations (time)",
            "CREATE INDEX violations_path ON violations (path)",
            "CREATE INDEX bridge_session_time ON bridge_requests (session_id, time)",
            "CREATE INDEX bridge_time ON bridge_requests (time)",
        ),
    ),
    Migration(
        3,
        "unique event ids",
        (
            # NULL for rows written straight to the log (they have no id); a unique index
            # treats NULLs as distinct, so only spooled events are deduplicated.
            "ALTER TABLE network_events ADD COLUMN event_id TEXT",
            "ALTER TABLE violations ADD COLUMN event_id TEXT",
            "ALTER TABLE bridge_requests ADD COLUMN event_id TEXT",
            "CREATE UNIQUE INDEX network_event_id ON network_events (event_id)",
            "CREATE UNIQUE INDEX violations_event_id ON violations (event_id)",
            "CREATE UNIQUE INDEX bridge_event_id ON bridge_requests (event_id)",
        ),
    ),
    Migration(
        4,
        "network_events.ignored",
        ("ALTER TABLE network_events ADD COLUMN ignored INTEGER NOT NULL DEFAULT 0",),
    ),
)
SCHEMA_VERSION = MIGRATIONS[-1].version

_CREATE_TABLE = """CREATE TABLE IF NOT EXISTS schema_migrations (
    version INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    applied_at REAL NOT NULL
)"""


def applied_versions(conn: sqlite3.Connection) -> list[int]:
    """The versions recorded in the database, ascending. Reads only."""
    exists = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (MIGRATIONS_TABLE,)
    ).fetchone()
    if exists is None:
        return []
    rows = conn.execute("SELECT version FROM schema_migrations ORDER BY version")
    return [int(version) for (version,) in rows]


def pending(
    conn: sqlite3.Connection, migrations: Sequence[Migration] = MIGRATIONS
) -> list[Migration]:
    """The migrations not yet recorded, in order. Reads only; refuses a newer database."""
    done = applied_versions(conn)
    _refuse_unknown(done, migrations)
    return [m for m in migrations if m.version not in done]


def apply_pending(
    conn: sqlite3.Connection, migrations: Sequence[Migration] = MIGRATIONS
) -> list[Migration]:
    """Applies what is pending, each migration in its own transaction; returns those applied.

    `conn` must be in autocommit mode (isolation_level=None): transactions here are explicit.
    sqlite3.Error propagates with the failed migration rolled back; the caller translates it.
    """
    applied: list[Migration] = []
    for migration in pending(conn, migrations):
        # IMMEDIATE takes the write lock before reading, so the re-check below cannot race.
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute(_CREATE_TABLE)
            if migration.version not in applied_versions(conn):
                for statement in migration.statements:
                    conn.execute(statement)
                conn.execute(
                    "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                    (migration.version, migration.name, time.time()),
                )
                # PRAGMA takes no parameters; the version is an int from this module.
                conn.execute(f"PRAGMA user_version = {int(migration.version)}")
                applied.append(migration)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
    return applied


def _refuse_unknown(done: Sequence[int], migrations: Sequence[Migration]) -> None:
    known = {m.version for m in migrations}
    unknown = sorted(set(done) - known)
    if unknown:
        raise CorralError(
            f"the audit log has schema version {unknown[-1]}, newer than this corral knows "
            f"({max(known)})",
            hint="upgrade corral, or point it at another audit log",
        )
