"""Reading the audit log: recent sessions, filtered events, one session's story, `--follow`.

Filters combine with AND. A filter that only makes sense for some kinds leaves out the other
kinds: `domain` keeps network events only, `path` violations only, `decision` network events
and bridge requests. Events come back oldest first; `limit` keeps the newest N of them.
Sessions come back newest first, as `git log` lists commits. `blocked` is what `corral
violations` lists: every refused attempt, filesystem violations and network denials together.

Opening a reader never creates a log; it upgrades an older schema (a write, in the
migration's own transaction) and then sets `query_only`, so nothing else it does can write.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Literal, NamedTuple

from corral.audit import migrations
from corral.audit.db import audit_error, connect
from corral.audit.events import Decision
from corral.audit.rows import (
    BLOCKED_KINDS,
    EVENT_KINDS,
    SESSION_COLUMNS,
    TABLES,
    BlockedRow,
    EventKind,
    EventRow,
    NetworkRow,
    SessionRow,
    SessionStory,
    ViolationRow,
    event_from_db,
    session_from_db,
)
from corral.errors import CorralError, UsageError

IgnoredFilter = Literal["include", "exclude", "only"]

# `follow` polls this often by default: new rows show up within half a second, and an idle
# poll is three indexed lookups.
DEFAULT_POLL_INTERVAL_S = 0.5

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class EventFilter(NamedTuple):
    session: str | None = None
    """An exact session id (`AuditReader.session` resolves a prefix)."""
    kinds: tuple[EventKind, ...] = ()
    """Empty: every kind."""
    domain: str | None = None
    """Network events to this host or any of its subdomains."""
    path: str | None = None
    """Violations on this path or anything under it."""
    since: float | None = None
    """Inclusive, seconds since the epoch."""
    until: float | None = None
    """Exclusive, seconds since the epoch."""
    decision: Decision | None = None
    ignored: IgnoredFilter = "include"
    """Violations and network denials that matched an ignoreViolations rule: kept, left out,
    or the only ones kept (allowed connections are never ignored ones)."""
    limit: int | None = None


class Cursor(NamedTuple):
    """The last row id seen in each event table: where `follow` resumes."""

    network: int = 0
    violation: int = 0
    bridge: int = 0


class AuditReader:
    """The audit database, open for reading. Use as a context manager."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._conn = connect(path, access="read")
        try:
            with self._translated("upgrading the schema"):
                migrations.apply_pending(self._conn)
                self._conn.execute("PRAGMA query_only = ON")
        except CorralError:
            self._conn.close()
            raise

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> AuditReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- sessions ------------------------------------------------------------------------

    def recent_sessions(self, *, limit: int = 20) -> list[SessionRow]:
        """The newest sessions first."""
        with self._translated("listing sessions"):
            rows = self._conn.execute(
                f"SELECT {SESSION_COLUMNS} FROM sessions "  # noqa: S608 - constant columns
                "ORDER BY coalesce(started_at, ended_at) DESC, rowid DESC LIMIT ?",
                (limit,),
            ).fetchall()
        return [session_from_db(row) for row in rows]

    def session(self, id_or_prefix: str) -> SessionRow:
        """The session with this id, or the only one whose id starts with it."""
        query = f"SELECT {SESSION_COLUMNS} FROM sessions WHERE "  # noqa: S608
        with self._translated("looking up a session"):
            rows = self._conn.execute(query + "id = ?", (id_or_prefix,)).fetchall()
            if not rows and id_or_prefix:
                # substr, not LIKE: LIKE is case-insensitive and treats % and _ as wildcards.
                rows = self._conn.execute(
                    query + "substr(id, 1, ?) = ? ORDER BY id LIMIT 6",
                    (len(id_or_prefix), id_or_prefix),
                ).fetchall()
        if len(rows) == 1:
            return session_from_db(rows[0])
        if not rows:
            raise UsageError(
                f"no session {id_or_prefix!r} in {self.path}", hint="`corral log` lists sessions"
            )
        names = ", ".join(str(row[1]) for row in rows[:5])
        raise UsageError(
            f"{id_or_prefix!r} matches several sessions: {names}", hint="give more of the id"
        )

    def story(self, id_or_prefix: str) -> SessionStory:
        """One session and all its events in time order."""
        session = self.session(id_or_prefix)
        return SessionStory(session, self.events(EventFilter(session=session.id)))

    # -- events --------------------------------------------------------------------------

    def events(self, flt: EventFilter = EventFilter()) -> list[EventRow]:  # noqa: B008
        return self._read([(kind, flt) for kind in _kinds(flt)], limit=flt.limit)

    def violations(self, flt: EventFilter = EventFilter()) -> list[ViolationRow]:  # noqa: B008
        """Violations only; the other fields of `flt` apply as in `events`."""
        rows = self.events(flt._replace(kinds=("violation",)))
        return [row for row in rows if isinstance(row, ViolationRow)]

    def blocked(self, flt: EventFilter = EventFilter()) -> list[BlockedRow]:  # noqa: B008
        """Every refused attempt, oldest first: filesystem violations and network denials.

        `kinds` may narrow it to one of the two; `decision` plays no part (all are denials);
        the other fields of `flt` apply as in `events`, `limit` to the merged list.
        """
        wanted = [
            (kind, flt._replace(decision="deny" if kind == "network" else None))
            for kind in _kinds(flt)
            if kind in BLOCKED_KINDS
        ]
        rows = self._read(wanted, limit=flt.limit)
        return [row for row in rows if isinstance(row, NetworkRow | ViolationRow)]

    def _read(
        self, wanted: list[tuple[EventKind, EventFilter]], *, limit: int | None
    ) -> list[EventRow]:
        """Rows of each (kind, filter) pair merged in time order; `limit`: the newest N."""
        rows: list[EventRow] = []
        with self._translated("reading events"):
            for kind, flt in wanted:
                built = _select(kind, flt)
                if built is None:
                    continue
                sql, params = built
                if limit is not None:
                    sql += " ORDER BY time DESC, id DESC LIMIT ?"
                    params.append(limit)
                for row in self._conn.execute(sql, params):
                    rows.append(event_from_db(kind, row))
        rows.sort(key=_order)
        if limit is not None:
            rows = rows[len(rows) - limit :] if limit > 0 else []
        return rows

    def cursor(self) -> Cursor:
        """The current end of every event table: `follow(after=reader.cursor())` shows only
        what is written from now on."""
        with self._translated("reading the end of the log"):
            ends = [
                self._conn.execute(f"SELECT coalesce(max(id), 0) FROM {TABLES[k][0]}").fetchone()[0]  # noqa: S608
                for k in EVENT_KINDS
            ]
        return Cursor(*ends)

    def follow(
        self,
        flt: EventFilter = EventFilter(),  # noqa: B008
        *,
        after: Cursor | None = None,
        poll_interval: float = DEFAULT_POLL_INTERVAL_S,
        sleep: Callable[[float], object] = time.sleep,
    ) -> Iterator[EventRow]:
        """New events matching `flt` as they are committed, forever (the caller stops).

        Row ids only grow and a transaction commits whole, so polling each table for ids past
        the last one seen misses nothing, whichever process wrote the rows.
        """
        position = (after or self.cursor())._asdict()
        while True:
            rows: list[EventRow] = []
            with self._translated("following events"):
                for kind in _kinds(flt):
                    built = _select(kind, flt._replace(limit=None))
                    if built is None:
                        continue
                    sql, params = built
                    sql += " AND id > ? ORDER BY id"
                    fetched = self._conn.execute(sql, [*params, position[kind]]).fetchall()
                    if fetched:
                        position[kind] = fetched[-1][0]
                    rows.extend(event_from_db(kind, row) for row in fetched)
            rows.sort(key=_order)
            yield from rows
            if not rows:
                sleep(poll_interval)

    def _translated(self, action: str) -> _Translated:
        return _Translated(self.path, action)


class _Translated:
    """Turns sqlite3.Error raised inside the block into a CorralError naming the log."""

    def __init__(self, path: str, action: str) -> None:
        self.path, self.action = path, action

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if isinstance(exc, sqlite3.Error):
            raise audit_error(exc, path=self.path, action=self.action) from exc


def parse_time(text: str, *, now: float) -> float:
    """`--since`/`--until` values: "90s", "10m", "2h", "3d", "1w" ago, or an ISO 8601 time
    (local time unless it names an offset)."""
    text = text.strip()
    unit = _UNITS.get(text[-1:].lower())
    if unit is not None and text[:-1].isdigit():
        return now - int(text[:-1]) * unit
    from datetime import datetime

    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise UsageError(
            f"not a time: {text!r}",
            hint='use a duration such as "10m", "2h", "3d" or a date such as "2025-01-31T14:00"',
        ) from None


def _kinds(flt: EventFilter) -> tuple[EventKind, ...]:
    return flt.kinds or EVENT_KINDS


def _order(row: EventRow) -> tuple[float, int, int]:
    return (row.time, EVENT_KINDS.index(row.kind), row.rowid)


def _select(kind: EventKind, flt: EventFilter) -> tuple[str, list[object]] | None:
    """SELECT ... WHERE for one table, or None when the filter rules the whole kind out."""
    conditions = ["1"]
    params: list[object] = []
    if flt.domain is not None:
        if kind != "network":
            return None
        domain = flt.domain.strip().rstrip(".").lower()
        conditions.append("(host = ? OR substr(host, -?) = ?)")
        params += [domain, len(domain) + 1, "." + domain]
    if flt.path is not None:
        if kind != "violation":
            return None
        prefix = flt.path.rstrip("/")
        if prefix:  # "/" matches every path: no condition
            # A range, not LIKE: case-sensitive, no wildcards, and it can use the index.
            # Paths under `prefix` sort between prefix + "/" and prefix + "0" ("0" follows "/").
            conditions.append("(path = ? OR (path >= ? AND path < ?))")
            params += [prefix, prefix + "/", prefix + "0"]
    if flt.decision is not None:
        if kind == "violation":
            return None
        conditions.append("decision = ?")
        params.append(flt.decision)
    if kind in BLOCKED_KINDS and flt.ignored != "include":
        conditions.append("ignored = ?")
        params.append(1 if flt.ignored == "only" else 0)
    if flt.session is not None:
        conditions.append("session_id = ?")
        params.append(flt.session)
    if flt.since is not None:
        conditions.append("time >= ?")
        params.append(flt.since)
    if flt.until is not None:
        conditions.append("time < ?")
        params.append(flt.until)
    table, columns = TABLES[kind]
    sql = f"SELECT {columns} FROM {table} WHERE {' AND '.join(conditions)}"  # noqa: S608
    return sql, params
