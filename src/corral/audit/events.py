"""Audit events and the sink protocol every producer writes to.

Producers (the runner, the proxy, the violation monitor, the bridge) only know `Sink.emit`;
where events end up (memory, JSON Lines, SQLite, syslog) is the caller's choice.

Kinds and their usual fields:
- "session":   argv, cwd, mode, backend, policy_digest, phase ("start"|"end"), exit_code
- "network":   host, port, decision ("allow"|"deny"), rule, reason, bytes_up, bytes_down, duration
- "violation": pid, executable, operation, path, rule
- "bridge":    request_id, command, decision, decided_by
"""

from __future__ import annotations

import json
import threading
import time
from typing import NamedTuple, Protocol


class Event(NamedTuple):
    kind: str
    sandbox_id: str
    fields: dict[str, object]
    time: float = 0.0

    @classmethod
    def now(cls, kind: str, sandbox_id: str, **fields: object) -> Event:
        return cls(kind=kind, sandbox_id=sandbox_id, fields=fields, time=time.time())

    def as_json(self) -> str:
        record = {"time": self.time, "kind": self.kind, "sandbox_id": self.sandbox_id}
        record.update(self.fields)
        return json.dumps(record, sort_keys=True, default=str)


class Sink(Protocol):
    def emit(self, event: Event) -> None: ...

    def close(self) -> None: ...


class MemorySink:
    """Keeps events in a list: for tests and for the Python API's callers."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self._lock = threading.Lock()

    def emit(self, event: Event) -> None:
        with self._lock:
            self.events.append(event)

    def close(self) -> None:
        pass

    def of_kind(self, kind: str) -> list[Event]:
        with self._lock:
            return [e for e in self.events if e.kind == kind]


class JsonLinesSink:
    """Appends one JSON object per line; each line is flushed so a killed process loses none."""

    def __init__(self, path: str) -> None:
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self._lock = threading.Lock()

    def emit(self, event: Event) -> None:
        line = event.as_json() + "\n"
        with self._lock:
            self._file.write(line)
            self._file.flush()

    def close(self) -> None:
        with self._lock:
            self._file.close()
