"""Turning audit events into rows: which INSERT stores each kind, with which parameters.

Conversion runs in the producer's thread (see store.py), so a malformed event raises a
CorralError at the `emit` that produced it, not later in the writer thread.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import NamedTuple

from corral.audit.events import Event
from corral.errors import CorralError


class Insert(NamedTuple):
    """One INSERT statement, written out for any number of rows.

    Why several rows per statement: sqlite3 releases the GIL around every step of a
    statement, and getting it back while a producer thread runs Python code can take a
    whole switch interval (5 ms). executemany steps once per row, so under a busy producer
    the writer crawled; one multi-row INSERT steps once per store.CHUNK_ROWS rows.
    """

    head: str
    width: int
    tail: str = ""

    def sql(self, rows: int) -> str:
        one = "(" + ", ".join("?" * self.width) + ")"
        return f"{self.head} VALUES {', '.join([one] * rows)} {self.tail}"


_SESSION_START = Insert(
    "INSERT INTO sessions (id, argv, cwd, policy_digest, mode, backend, started_at)",
    7,
    """ON CONFLICT (id) DO UPDATE SET argv = excluded.argv, cwd = excluded.cwd,
    policy_digest = excluded.policy_digest, mode = excluded.mode, backend = excluded.backend,
    started_at = excluded.started_at""",
)
# The end may be written before the start (two processes, two batches): both are upserts of
# disjoint columns, so the order does not matter.
_SESSION_END = Insert(
    "INSERT INTO sessions (id, ended_at, exit_status, resource_usage)",
    4,
    """ON CONFLICT (id) DO UPDATE SET ended_at = excluded.ended_at,
    exit_status = excluded.exit_status, resource_usage = excluded.resource_usage""",
)
# Event rows carry the event id a spool gave them (None otherwise): storing a spooled event a
# second time, as a crash between the commit and the spool file's removal makes ingest do,
# then adds nothing.
_SKIP_STORED = "ON CONFLICT (event_id) DO NOTHING"
_NETWORK = Insert(
    "INSERT INTO network_events (time, session_id, host, port, decision, rule, reason, "
    "bytes_up, bytes_down, duration, ignored, event_id)",
    12,
    _SKIP_STORED,
)
_VIOLATION = Insert(
    "INSERT INTO violations (time, session_id, pid, executable, operation, path, rule, ignored, "
    "event_id)",
    9,
    _SKIP_STORED,
)
_BRIDGE = Insert(
    "INSERT INTO bridge_requests (time, session_id, request_id, command, params, decision, "
    "decided_by, event_id)",
    8,
    _SKIP_STORED,
)

Params = tuple[object, ...]
Row = tuple[Insert, Params]


def row_of(event: Event, *, event_id: str | None = None) -> Row:
    """The statement and parameters that store one event. Raises CorralError if malformed.

    `event_id` (from a spool) makes storing the same event again a no-op. Sessions need none:
    their rows are upserts keyed by the session id, which repeat harmlessly.
    """
    build = _BUILDERS.get(event.kind)
    if build is None:
        raise CorralError(f"audit event of unknown kind {event.kind!r}")
    try:
        return build(event, event.fields, event_id)
    except KeyError as exc:
        raise CorralError(f"malformed {event.kind} audit event: no field {exc}") from exc
    except (TypeError, ValueError) as exc:
        raise CorralError(f"malformed {event.kind} audit event: {exc}") from exc


def _session(event: Event, f: dict[str, object], _event_id: str | None) -> Row:
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


def _network(event: Event, f: dict[str, object], event_id: str | None) -> Row:
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
        1 if f.get("ignored") else 0,
        event_id,
    )


def _violation(event: Event, f: dict[str, object], event_id: str | None) -> Row:
    return _VIOLATION, (
        event.time,
        event.sandbox_id,
        _opt_int(f.get("pid")),
        _text(f.get("executable")),
        _text(f["operation"]),
        _text(f["path"]),
        _text(f.get("rule")),
        1 if f.get("ignored") else 0,
        event_id,
    )


def _bridge(event: Event, f: dict[str, object], event_id: str | None) -> Row:
    return _BRIDGE, (
        event.time,
        event.sandbox_id,
        _text(f["request_id"]),
        _text(f["command"]),
        json.dumps(f.get("params") or {}, sort_keys=True, default=str),
        _text(f["decision"]),
        _text(f.get("decided_by")),
        event_id,
    )


_BUILDERS: dict[str, Callable[[Event, dict[str, object], str | None], Row]] = {
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
