"""The SQLite audit log as a `Sink`: producers emit, one writer thread commits in batches.

Model:
1. `emit(event)` turns the event into a row in the caller's thread (so a malformed event fails
   at its producer) and puts it on an in-memory queue; it never touches the disk.
2. One writer thread per `AuditLog` drains the queue greedily: everything waiting, up to
   MAX_BATCH_EVENTS rows, goes into one transaction. A slow disk therefore means bigger
   batches, not a longer queue.
3. `flush()` puts a marker on the queue and returns once the transaction holding every row
   queued before the marker has committed. That is what "acknowledged" means: `flush()` (or
   `emit_sync()`) has returned. An emitted event that was never acknowledged may be lost if
   the process dies; an acknowledged one is not (durability: see db.py).
4. Past MAX_QUEUED_EVENTS waiting rows, `emit` waits for the writer: an audit log slows its
   producer down rather than dropping records.
5. A batch that cannot be written (disk full, lock held past the busy timeout and the retries)
   is reported as a CorralError by the next `flush()` or `close()`, never silently.

Several processes may each hold an `AuditLog` on the same file: SQLite's lock serialises the
batches, BEGIN IMMEDIATE takes the lock before writing (so a writer never has to abort a
transaction it started), and SQLITE_BUSY after the busy timeout is retried.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import queue
import sqlite3
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Final

from corral.audit import migrations
from corral.audit.db import Durability, audit_error, connect
from corral.audit.events import Event
from corral.errors import CorralError
from corral.policy.model import HostPaths

# Rows per transaction: large enough that the commit (a WAL append) is noise next to the
# inserts, small enough that one batch holds the write lock for milliseconds, so writers in
# other processes are not starved.
MAX_BATCH_EVENTS: Final = 4096
# Backlog at which `emit` waits for the writer: about 20 MB of rows, two seconds of work.
MAX_QUEUED_EVENTS: Final = 100_000
# On top of the busy timeout (db.BUSY_TIMEOUT_S each): a lock held longer than this many
# timeouts is a stuck process, and the batch is reported as lost.
WRITE_ATTEMPTS: Final = 3
# How often a waiting flush() checks that the writer thread is still alive.
FLUSH_LIVENESS_CHECK_S: Final = 1.0

_SESSION_START = """INSERT INTO sessions
    (id, argv, cwd, policy_digest, mode, backend, started_at) VALUES (?, ?, ?, ?, ?, ?, ?)
    ON CONFLICT (id) DO UPDATE SET argv = excluded.argv, cwd = excluded.cwd,
    policy_digest = excluded.policy_digest, mode = excluded.mode, backend = excluded.backend,
    started_at = excluded.started_at"""
# The end may be written before the start (two processes, two batches): both are upserts of
# disjoint columns, so the order does not matter.
_SESSION_END = """INSERT INTO sessions (id, ended_at, exit_status, resource_usage)
    VALUES (?, ?, ?, ?)
    ON CONFLICT (id) DO UPDATE SET ended_at = excluded.ended_at,
    exit_status = excluded.exit_status, resource_usage = excluded.resource_usage"""
_NETWORK = """INSERT INTO network_events
    (time, session_id, host, port, decision, rule, reason, bytes_up, bytes_down, duration)
    VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"""
_VIOLATION = """INSERT INTO violations
    (time, session_id, pid, executable, operation, path, rule, ignored)
    VALUES (?, ?, ?, ?, ?, ?, ?, ?)"""
_BRIDGE = """INSERT INTO bridge_requests
    (time, session_id, request_id, command, params, decision, decided_by)
    VALUES (?, ?, ?, ?, ?, ?, ?)"""

Params = tuple[object, ...]
Row = tuple[str, Params]


def default_audit_path(host: HostPaths) -> str:
    """$XDG_STATE_HOME/corral/audit.db; a per-project log is the caller's choice of path."""
    return f"{host.state_dir}/audit.db"


class _Flush:
    __slots__ = ("done",)

    def __init__(self) -> None:
        self.done = threading.Event()


_STOP: Final = object()


class AuditLog:
    """The audit database, open for writing. Implements `Sink`; use as a context manager."""

    def __init__(self, path: str, *, durability: Durability = "normal") -> None:
        self.path = path
        self._conn = connect(path, access="write", durability=durability)
        try:
            migrations.apply_pending(self._conn)
        except sqlite3.Error as exc:
            self._conn.close()
            raise audit_error(exc, path=path, action="upgrading the schema") from exc
        except CorralError:
            self._conn.close()
            raise
        self._queue: queue.SimpleQueue[Row | _Flush | object] = queue.SimpleQueue()
        self._closed = False
        self._close_lock = threading.Lock()
        self._failure: CorralError | None = None
        self._lost = 0
        self._thread = threading.Thread(target=self._run, name="corral-audit-writer", daemon=True)
        self._thread.start()
        # The writer is a daemon thread (it must never keep a process alive); commit what is
        # queued when the interpreter exits without close().
        self._at_exit: Callable[[], None] = lambda: self._close_quietly()
        atexit.register(self._at_exit)

    # -- Sink ----------------------------------------------------------------------------

    def emit(self, event: Event) -> None:
        if self._closed:
            raise CorralError(f"audit log {self.path} is closed", hint="open a new AuditLog")
        self._queue.put(row_of(event))
        if self._queue.qsize() > MAX_QUEUED_EVENTS:
            self.flush()

    def close(self) -> None:
        """Commits everything emitted, stops the writer, closes the database. Idempotent."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
            atexit.unregister(self._at_exit)
            self._queue.put(_STOP)
            self._thread.join()
            self._conn.close()
        self._raise_failure()

    # -- acknowledgement -------------------------------------------------------------------

    def emit_sync(self, event: Event) -> None:
        """Emits and returns once the event is committed."""
        self.emit(event)
        self.flush()

    def flush(self) -> None:
        """Returns once every event emitted before this call is committed.

        Raises CorralError if a batch since the last flush could not be written.
        """
        if self._closed:
            self._raise_failure()
            return
        marker = _Flush()
        self._queue.put(marker)
        while not marker.done.wait(FLUSH_LIVENESS_CHECK_S):
            if not self._thread.is_alive():
                raise CorralError(f"audit log {self.path}: the writer thread stopped")
        self._raise_failure()

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- the writer thread -----------------------------------------------------------------

    def _run(self) -> None:
        get, get_nowait = self._queue.get, self._queue.get_nowait
        while True:
            batch: list[Row] = []
            markers: list[_Flush] = []
            stop = False
            item = get()
            while True:
                if item is _STOP:
                    stop = True
                    break
                if isinstance(item, _Flush):
                    markers.append(item)
                else:
                    batch.append(item)  # type: ignore[arg-type]
                    if len(batch) >= MAX_BATCH_EVENTS:
                        break
                try:
                    item = get_nowait()
                except queue.Empty:
                    break
            if batch:
                self._write(batch)
            for marker in markers:
                marker.done.set()
            if stop:
                return

    def _write(self, batch: list[Row]) -> None:
        grouped: dict[str, list[Params]] = {}
        for sql, params in batch:
            grouped.setdefault(sql, []).append(params)
        for attempt in range(1, WRITE_ATTEMPTS + 1):
            try:
                self._commit(grouped)
                return
            except sqlite3.Error as exc:
                busy = (getattr(exc, "sqlite_errorcode", 0) & 0xFF) in (
                    sqlite3.SQLITE_BUSY,
                    sqlite3.SQLITE_LOCKED,
                )
                if busy and attempt < WRITE_ATTEMPTS:
                    continue  # the busy timeout already waited; try to take the lock again
                self._lost += len(batch)
                error = audit_error(exc, path=self.path, action="writing events")
                self._failure = CorralError(
                    f"{error.message} ({self._lost} events not recorded)", hint=error.hint
                )
                return
            except Exception as exc:  # a bug must not kill the writer and hang flush()
                self._lost += len(batch)
                self._failure = CorralError(
                    f"audit log {self.path}: writing events failed: {exc!r} "
                    f"({self._lost} events not recorded)"
                )
                return

    def _commit(self, grouped: dict[str, list[Params]]) -> None:
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            for sql, rows in grouped.items():
                conn.executemany(sql, rows)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def _raise_failure(self) -> None:
        failure, self._failure = self._failure, None
        if failure is not None:
            self._lost = 0
            raise failure

    def _close_quietly(self) -> None:
        with contextlib.suppress(CorralError):  # at exit there is no one left to tell
            self.close()


def row_of(event: Event) -> Row:
    """The statement and parameters that store one event. Raises CorralError if malformed."""
    build = _BUILDERS.get(event.kind)
    if build is None:
        raise CorralError(f"audit event of unknown kind {event.kind!r}")
    try:
        return build(event, event.fields)
    except KeyError as exc:
        raise CorralError(f"malformed {event.kind} audit event: no field {exc}") from exc
    except (TypeError, ValueError) as exc:
        raise CorralError(f"malformed {event.kind} audit event: {exc}") from exc


def _session(event: Event, f: dict[str, object]) -> Row:
    phase = f.get("phase")
    if phase == "start":
        argv = json.dumps([str(a) for a in _seq(f.get("argv", ()))])
        return _SESSION_START, (
            event.sandbox_id,
            argv,
            _text(f.get("cwd")),
            _text(f.get("policy_digest")),
            _text(f.get("mode")),
            _text(f.get("backend")),
            event.time,
        )
    if phase == "end":
        usage = json.dumps(f.get("resource_usage") or {}, sort_keys=True, default=str)
        return _SESSION_END, (event.sandbox_id, event.time, _opt_int(f.get("exit_code")), usage)
    raise ValueError(f"phase must be 'start' or 'end', not {phase!r}")


def _network(event: Event, f: dict[str, object]) -> Row:
    return _NETWORK, (
        event.time,
        event.sandbox_id,
        _text(f["host"]),
        _opt_int(f.get("port")),
        _text(f["decision"]),
        _text(f.get("rule")),
        _text(f.get("reason")),
        _int(f.get("bytes_up", 0)),
        _int(f.get("bytes_down", 0)),
        float(f.get("duration", 0.0)),  # type: ignore[arg-type]
    )


def _violation(event: Event, f: dict[str, object]) -> Row:
    return _VIOLATION, (
        event.time,
        event.sandbox_id,
        _opt_int(f.get("pid")),
        _text(f.get("executable")),
        _text(f["operation"]),
        _text(f["path"]),
        _text(f.get("rule")),
        1 if f.get("ignored") else 0,
    )


def _bridge(event: Event, f: dict[str, object]) -> Row:
    return _BRIDGE, (
        event.time,
        event.sandbox_id,
        _text(f["request_id"]),
        _text(f["command"]),
        json.dumps(f.get("params") or {}, sort_keys=True, default=str),
        _text(f["decision"]),
        _text(f.get("decided_by")),
    )


_BUILDERS: dict[str, Callable[[Event, dict[str, object]], Row]] = {
    "session": _session,
    "network": _network,
    "violation": _violation,
    "bridge": _bridge,
}


def _text(value: object) -> str:
    return "" if value is None else str(value)


def _int(value: object) -> int:
    return int(value)  # type: ignore[call-overload, no-any-return]


def _opt_int(value: object) -> int | None:
    return None if value is None else _int(value)


def _seq(value: object) -> list[object]:
    if isinstance(value, str | bytes) or not hasattr(value, "__iter__"):
        raise TypeError(f"argv must be a list of strings, not {type(value).__name__}")
    return list(value)
