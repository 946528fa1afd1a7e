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
4. Past MAX_QUEUED_EVENTS waiting rows, `emit` waits for the writer to commit one batch: an
   audit log slows its producer down rather than dropping records.
5. A batch that cannot be written (disk full, lock held past the busy timeout and the retries)
   is reported as a CorralError by the next `flush()` or `close()`, never silently.

Several processes may each hold an `AuditLog` on the same file: SQLite's lock serialises the
batches, BEGIN IMMEDIATE takes the lock before writing (so a writer never has to abort a
transaction it started), and SQLITE_BUSY after the busy timeout is retried.
"""

from __future__ import annotations

import atexit
import contextlib
import queue
import sqlite3
import threading
from collections.abc import Callable
from itertools import chain
from types import TracebackType
from typing import Final

from corral.audit import migrations
from corral.audit.db import Durability, audit_error, connect
from corral.audit.encode import Insert, Params, Row, row_of
from corral.audit.events import Event
from corral.audit.spool import default_audit_path as default_audit_path  # its old home
from corral.errors import CorralError

# Rows per transaction: large enough that the commit (a WAL append) is noise next to the
# inserts, small enough that one batch holds the write lock for milliseconds, so writers in
# other processes are not starved.
MAX_BATCH_EVENTS: Final = 4096
# Rows per multi-row INSERT: 12 columns x 1,024 rows stays well under SQLite's limit of
# 32,766 parameters per statement (SQLITE_MAX_VARIABLE_NUMBER since 3.32). The rest of a
# batch goes in power-of-two statements, so only 11 statement texts ever exist per table and
# sqlite3's statement cache keeps them all prepared.
CHUNK_ROWS: Final = 1024
# Backlog at which `emit` waits for the writer: about 20 MB of rows, two seconds of work.
MAX_QUEUED_EVENTS: Final = 100_000
# On top of the busy timeout (db.BUSY_TIMEOUT_S each): a lock held longer than this many
# timeouts is a stuck process, and the batch is reported as lost.
WRITE_ATTEMPTS: Final = 3
# How often a waiting flush() checks that the writer thread is still alive.
FLUSH_LIVENESS_CHECK_S: Final = 1.0


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
        self._drained = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="corral-audit-writer", daemon=True)
        self._thread.start()
        # The writer is a daemon thread (it must never keep a process alive); commit what is
        # queued when the interpreter exits without close().
        self._at_exit: Callable[[], None] = lambda: self._close_quietly()
        atexit.register(self._at_exit)

    # -- Sink ----------------------------------------------------------------------------

    def emit(self, event: Event, *, event_id: str | None = None) -> None:
        """`event_id`: the id a spool gave the event; an event already stored under the same
        id is not stored again (see spool.py)."""
        if self._closed:
            raise CorralError(f"audit log {self.path} is closed", hint="open a new AuditLog")
        self._queue.put(row_of(event, event_id=event_id))
        if self._queue.qsize() > MAX_QUEUED_EVENTS:
            self._wait_for_room()

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

    def _wait_for_room(self) -> None:
        # Wait for the writer to take about one batch, not for the whole backlog: the
        # producer is held up for one commit at a time.
        room = MAX_QUEUED_EVENTS - MAX_BATCH_EVENTS
        with self._drained:
            while self._queue.qsize() > room and self._thread.is_alive():
                self._drained.wait(FLUSH_LIVENESS_CHECK_S)

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
                with self._drained:
                    self._drained.notify_all()
            for marker in markers:
                marker.done.set()
            if stop:
                return

    def _write(self, batch: list[Row]) -> None:
        grouped: dict[Insert, list[Params]] = {}
        for insert, params in batch:
            grouped.setdefault(insert, []).append(params)
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

    def _commit(self, grouped: dict[Insert, list[Params]]) -> None:
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            for insert, rows in grouped.items():
                at = 0
                for size in _chunk_sizes(len(rows)):
                    params = list(chain.from_iterable(rows[at : at + size]))
                    conn.execute(insert.sql(size), params)
                    at += size
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


def _chunk_sizes(count: int) -> list[int]:
    """Row counts per statement: whole chunks, then the binary digits of the remainder."""
    sizes = [CHUNK_ROWS] * (count // CHUNK_ROWS)
    rest = count % CHUNK_ROWS
    sizes += [1 << bit for bit in reversed(range(rest.bit_length())) if rest >> bit & 1]
    return sizes
