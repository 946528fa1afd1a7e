"""What queries return: one NamedTuple per table, decoded from SQLite, with `as_dict` for JSON.

Kept apart from query.py so that rendering and exporting need no database.
"""

from __future__ import annotations

import json
from typing import Literal, NamedTuple

EventKind = Literal["network", "violation", "bridge"]
EVENT_KINDS: tuple[EventKind, ...] = ("network", "violation", "bridge")


class SessionRow(NamedTuple):
    rowid: int
    id: str
    argv: tuple[str, ...]
    cwd: str
    policy_digest: str
    mode: str
    backend: str
    started_at: float | None
    """None when only the end was recorded (the start was never acknowledged)."""
    ended_at: float | None
    """None while the session runs, or if corral died before recording the end."""
    exit_status: int | None
    resource_usage: dict[str, object]

    @property
    def kind(self) -> Literal["session"]:
        return "session"

    @property
    def time(self) -> float:
        return self.started_at if self.started_at is not None else (self.ended_at or 0.0)

    def as_dict(self) -> dict[str, object]:
        return {"kind": self.kind, **self._asdict(), "argv": list(self.argv)}


class NetworkRow(NamedTuple):
    rowid: int
    time: float
    session_id: str
    host: str
    port: int | None
    decision: str
    rule: str
    reason: str
    bytes_up: int
    bytes_down: int
    duration: float
    ignored: bool = False
    """A denial that matched an ignoreViolations rule (schema 4; False in older rows)."""

    @property
    def kind(self) -> Literal["network"]:
        return "network"

    def as_dict(self) -> dict[str, object]:
        return {"kind": self.kind, **self._asdict()}


class ViolationRow(NamedTuple):
    rowid: int
    time: float
    session_id: str
    pid: int | None
    executable: str
    operation: str
    path: str
    rule: str
    ignored: bool

    @property
    def kind(self) -> Literal["violation"]:
        return "violation"

    def as_dict(self) -> dict[str, object]:
        return {"kind": self.kind, **self._asdict()}


class BridgeRow(NamedTuple):
    rowid: int
    time: float
    session_id: str
    request_id: str
    command: str
    params: dict[str, object]
    decision: str
    decided_by: str

    @property
    def kind(self) -> Literal["bridge"]:
        return "bridge"

    def as_dict(self) -> dict[str, object]:
        return {"kind": self.kind, **self._asdict()}


EventRow = NetworkRow | ViolationRow | BridgeRow
AnyRow = SessionRow | EventRow
BlockedRow = NetworkRow | ViolationRow
"""A refused attempt: a filesystem violation or a network denial (`corral violations`)."""
# The kinds whose rows may be refused attempts, and so may carry `ignored`.
BLOCKED_KINDS: tuple[EventKind, ...] = ("network", "violation")


class SessionStory(NamedTuple):
    """One session and everything it did, in time order."""

    session: SessionRow
    events: list[EventRow]


# Column lists in the order of the NamedTuple fields (the rowid comes first).
SESSION_COLUMNS = (
    "rowid, id, argv, cwd, policy_digest, mode, backend, started_at, ended_at, exit_status, "
    "resource_usage"
)
TABLES: dict[EventKind, tuple[str, str]] = {
    "network": (
        "network_events",
        "id, time, session_id, host, port, decision, rule, reason, bytes_up, bytes_down, duration, "
        "ignored",
    ),
    "violation": (
        "violations",
        "id, time, session_id, pid, executable, operation, path, rule, ignored",
    ),
    "bridge": (
        "bridge_requests",
        "id, time, session_id, request_id, command, params, decision, decided_by",
    ),
}


def session_from_db(row: tuple[object, ...]) -> SessionRow:
    (rowid, id_, argv, cwd, digest, mode, backend, started, ended, status, usage) = row
    return SessionRow(
        int(rowid),  # type: ignore[call-overload]
        str(id_),
        tuple(str(a) for a in json.loads(str(argv))),
        str(cwd),
        str(digest),
        str(mode),
        str(backend),
        started,  # type: ignore[arg-type]
        ended,  # type: ignore[arg-type]
        status,  # type: ignore[arg-type]
        json.loads(str(usage)),
    )


def event_from_db(kind: EventKind, row: tuple[object, ...]) -> EventRow:
    if kind in ("network", "violation"):
        *head, ignored = row  # stored as 0 or 1
        cls = NetworkRow if kind == "network" else ViolationRow
        return cls(*head, bool(ignored))  # type: ignore[arg-type, call-arg]
    rowid, at, session_id, request_id, command, params, decision, decided_by = row
    return BridgeRow(
        rowid,  # type: ignore[arg-type]
        at,  # type: ignore[arg-type]
        str(session_id),
        str(request_id),
        str(command),
        json.loads(str(params)),
        str(decision),
        str(decided_by),
    )
