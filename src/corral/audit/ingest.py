"""Moving spooled events into the SQLite log: idempotent, crash-safe, safe beside live writers.

The rules are spool.py's; in short, per spool file:
1. try an exclusive flock without waiting: granted means no writer is left;
2. read the complete lines past what this ingester already committed, emit each into the log
   with its event id (the log skips ids it has stored: migration 3), and flush (= committed);
3. only then, if no writer was left, delete the file; otherwise remember how far it was read.
A line that cannot be read (cut short by a writer killed in the middle of its write(2), or not
a spool record at all) is skipped and counted in the report, never silently.
"""

from __future__ import annotations

import fcntl
import json
import os
from typing import NamedTuple

from corral.audit.encode import row_of
from corral.audit.events import Event
from corral.audit.spool import FORMAT_VERSION, SUFFIX
from corral.audit.store import AuditLog
from corral.errors import CorralError


class IngestReport(NamedTuple):
    files: int = 0
    """Spool files read."""
    events: int = 0
    """Lines handed to the log (a line stored before is not stored again)."""
    removed: int = 0
    """Files whose writers had finished, deleted once their events were committed."""
    damaged: int = 0
    """Lines skipped because they could not be read."""

    def __add__(self, other: object) -> IngestReport:
        if not isinstance(other, IngestReport):
            return NotImplemented
        return IngestReport(*(a + b for a, b in zip(self, other, strict=True)))


class SpoolIngester:
    """Moves a spool directory into one open log. Call `ingest` again to pick up what live
    writers appended since: it remembers how far it has committed each file."""

    def __init__(self, directory: str, log: AuditLog) -> None:
        self.directory = directory
        self._log = log
        self._committed: dict[tuple[int, int], int] = {}  # (st_dev, st_ino) -> byte offset

    def ingest(self) -> IngestReport:
        report = IngestReport()
        for name in spooled_files(self.directory):
            report += self._ingest_file(f"{self.directory}/{name}")
        return report

    def _ingest_file(self, path: str) -> IngestReport:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            return IngestReport()  # another reader finished it first
        except OSError as exc:
            raise _spool_error(path, "opening", exc) from exc
        try:
            finished = _writers_gone(fd)
            st = os.fstat(fd)
            key = (st.st_dev, st.st_ino)
            start = self._committed.get(key, 0)
            end, events, damaged = self._emit_lines(fd, path, start, finished=finished)
            if events:
                self._commit(path)
            if finished:
                os.unlink(path)  # after the commit: a crash before this line re-ingests, harmlessly
                self._committed.pop(key, None)
            else:
                self._committed[key] = end
        except OSError as exc:
            raise _spool_error(path, "reading", exc) from exc
        finally:
            os.close(fd)
        return IngestReport(1, events, int(finished), damaged)

    def _emit_lines(
        self, fd: int, path: str, start: int, *, finished: bool
    ) -> tuple[int, int, int]:
        """Emits the complete lines from byte `start`; returns (end offset, events, damaged)."""
        end, events, damaged = start, 0, 0
        with open(fd, "rb", closefd=False) as spool:
            spool.seek(start)
            for line in spool:
                if not line.endswith(b"\n"):
                    if finished:  # no writer will ever finish this line
                        end += len(line)
                        damaged += 1
                    break  # a live writer is in the middle of it: read it next time
                end += len(line)
                try:
                    event, event_id = parse_line(line)
                except ValueError:
                    damaged += 1
                    continue
                # Outside the try: a log that cannot take events must stop the ingest, not
                # count every line as damaged and let the file be deleted.
                self._log.emit(event, event_id=event_id)
                events += 1
        return end, events, damaged

    def _commit(self, path: str) -> None:
        try:
            self._log.flush()
        except CorralError as exc:
            raise CorralError(
                f"{exc.message}, while moving the audit spool {path} into it",
                hint=exc.hint or f"move {path} aside to read the rest of the log",
            ) from exc


def ingest_spool(directory: str, log: AuditLog) -> IngestReport:
    """Moves everything spooled in `directory` into `log`; safe to repeat, and to run while
    `corral run` writes (see the module docstring)."""
    return SpoolIngester(directory, log).ingest()


def catch_up(log_path: str, directory: str) -> IngestReport:
    """Ingests into the log at `log_path`, opening (and creating) it only if anything is
    spooled: reading an up-to-date log costs no writer."""
    if not spooled_files(directory):
        return IngestReport()
    with AuditLog(log_path) as log:
        return ingest_spool(directory, log)


def spooled_files(directory: str) -> list[str]:
    """The spool files' names, sorted; none when the directory does not exist yet."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise _spool_error(directory, "listing", exc) from exc
    return sorted(n for n in names if n.endswith(SUFFIX) and not n.startswith("."))


def parse_line(line: bytes) -> tuple[Event, str]:
    """The event and its id from one spool line. Raises ValueError if it is not a record."""
    record = json.loads(line)
    if not isinstance(record, dict) or record.get("v") != FORMAT_VERSION:
        raise ValueError("not a spool record")
    event_id, kind, sandbox_id = record.get("id"), record.get("kind"), record.get("sandbox_id")
    at, fields = record.get("time"), record.get("fields")
    if not (
        isinstance(event_id, str)
        and isinstance(kind, str)
        and isinstance(sandbox_id, str)
        and isinstance(fields, dict)
        and isinstance(at, int | float)
    ):
        raise ValueError("a spool record lacks a field")
    if b"\\ud" in line:
        # A lone surrogate (an undecodable file name) cannot be stored as SQLite text, and one
        # such row would fail its whole batch; keep it visible as the text "\udcff" instead.
        sandbox_id = _storable(sandbox_id)
        fields = {_storable(k): _storable_value(v) for k, v in fields.items()}
    event = Event(kind, sandbox_id, fields, float(at))
    try:
        row_of(event, event_id=event_id)  # malformed events fail here, one line each
    except CorralError as exc:
        raise ValueError(exc.message) from exc
    return event, event_id


def _storable(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode()


def _storable_value(value: object) -> object:
    if isinstance(value, str):
        return _storable(value)
    if isinstance(value, dict):
        return {_storable(str(k)): _storable_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_storable_value(v) for v in value]
    return value


def _writers_gone(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _spool_error(path: str, action: str, exc: OSError) -> CorralError:
    return CorralError(
        f"audit spool {path}: {action} failed: {exc.strerror or exc}",
        hint="the spool is corral's: check the state directory's owner and permissions",
    )
