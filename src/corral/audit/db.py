"""Opening the audit database, and turning `sqlite3.Error` into corral errors at the edge.

Durability (`synchronous`), chosen knowingly:
- "normal" (the default): WAL with synchronous=NORMAL. A commit is a write() into the WAL file,
  with no fsync; fsyncs happen at checkpoints. Every committed transaction survives the corral
  process being killed (SIGKILL, OOM) because the data is already in the kernel's page cache;
  a power loss or kernel crash can lose the last transactions before the latest checkpoint,
  never corrupt the file.
- "full": synchronous=FULL also fsyncs the WAL on every commit, so acknowledged events survive
  power loss too, at the price of one fsync per batch.

Several processes (one per `corral run`, the proxy) write the same file: each connection waits
up to BUSY_TIMEOUT_S for the write lock before SQLite reports SQLITE_BUSY, and the writer
retries on top of that (see store.py).
"""

from __future__ import annotations

import os
import sqlite3
import time
from typing import Literal

from corral.errors import CorralError

Durability = Literal["normal", "full"]
Access = Literal["write", "read"]

# A batch holds the write lock for milliseconds; 30 s covers a checkpoint on a slow disk
# while several processes queue for the lock, and still ends a genuinely stuck wait.
BUSY_TIMEOUT_S = 30.0

_SYNCHRONOUS: dict[Durability, str] = {"normal": "NORMAL", "full": "FULL"}

# What to tell the user for each primary SQLite result code (extended codes are masked).
_HINTS: dict[int, str] = {
    sqlite3.SQLITE_BUSY: "another process kept the audit log locked; retry",
    sqlite3.SQLITE_LOCKED: "another connection kept the audit log locked; retry",
    sqlite3.SQLITE_CORRUPT: "the file is damaged: move it aside and corral starts a new log",
    sqlite3.SQLITE_NOTADB: "the file is not an audit log: move it aside or pass another path",
    sqlite3.SQLITE_FULL: "the disk holding the audit log is full",
    sqlite3.SQLITE_CANTOPEN: "check that the directory exists and that you may write to it",
    sqlite3.SQLITE_PERM: "check the permissions of the audit log and its directory",
    sqlite3.SQLITE_READONLY: "the audit log or its directory is read-only for you",
    sqlite3.SQLITE_IOERR: "the disk reported an I/O error",
}


def audit_error(exc: sqlite3.Error | OSError, *, path: str, action: str) -> CorralError:
    """One corral error naming the file, what was being done and what the user can do."""
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None)
        hint = _HINTS.get(code & 0xFF, "") if isinstance(code, int) else ""
    else:
        hint = _HINTS[sqlite3.SQLITE_CANTOPEN]
    return CorralError(f"audit log {path}: {action} failed: {exc}", hint=hint)


def connect(path: str, *, access: Access, durability: Durability = "normal") -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit), WAL, busy timeout set.

    "write" creates the file (mode 0600, in a 0700 directory: argv and paths can be private)
    and switches it to WAL; "read" refuses a missing file rather than creating an empty one.
    """
    try:
        if access == "write":
            _create_private(path)
        elif not os.path.exists(path):
            raise CorralError(
                f"no audit log at {path}", hint="corral creates it on the first `corral run`"
            )
        conn = sqlite3.connect(
            path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
        )
    except (sqlite3.Error, OSError) as exc:
        raise audit_error(exc, path=path, action="opening") from exc
    try:
        if access == "write":
            mode = _switch_to_wal(conn)
            if mode != "wal":
                # WAL needs shared memory between processes, which network filesystems lack.
                raise CorralError(
                    f"audit log {path}: cannot use write-ahead logging (journal mode {mode})",
                    hint="keep the audit log on a local filesystem",
                )
        conn.execute(f"PRAGMA synchronous={_SYNCHRONOUS[durability]}")
    except sqlite3.Error as exc:
        conn.close()
        raise audit_error(exc, path=path, action="opening") from exc
    except CorralError:
        conn.close()
        raise
    return conn


def _switch_to_wal(conn: sqlite3.Connection) -> str:
    """Sets WAL mode, retrying while another process holds the lock.

    Leaving rollback mode needs an exclusive lock, and SQLite answers SQLITE_BUSY at once,
    without calling the busy handler, when two connections race to do it on a new file (waiting
    could deadlock them). Once one has switched, the file stays in WAL mode and the others'
    retry returns "wal" without taking that lock.
    """
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    delay = 0.001
    while True:
        try:
            return str(conn.execute("PRAGMA journal_mode=WAL").fetchone()[0])
        except sqlite3.OperationalError as exc:
            code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
            if code not in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
                raise
            if time.monotonic() + delay > deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def _create_private(path: str) -> None:
    # SQLite creates the -wal and -shm files with the database file's permissions.
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, mode=0o700, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    os.close(fd)
