"""Audit events and the sink protocol every producer writes to.

Producers (the runner, the proxy, the violation monitor, the bridge) only know `Sink.emit`;
where events end up (memory, JSON Lines, SQLite, syslog) is the caller's choice.

Kinds and their fields (the constructors below spell them, so producers cannot misspell them):
- "session":   phase ("start"|"end"); at start argv, cwd, mode, backend, policy_digest;
               at end exit_code, resource_usage (a JSON-able dict)
- "network":   host, port, decision ("allow"|"deny"), rule, reason, bytes_up, bytes_down, duration;
               ignored (optional: a denial matching an ignoreViolations rule, see violations.py)
- "violation": pid, executable, operation, path, rule, ignored
- "bridge":    request_id, command, params, decision, decided_by

This module is imported on the launch path (the runner records sessions), so it keeps to
json, threading and time; anything heavier is imported inside the function that needs it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from typing import Literal, NamedTuple, Protocol

Kind = Literal["session", "network", "violation", "bridge"]
KINDS: tuple[Kind, ...] = ("session", "network", "violation", "bridge")
Decision = Literal["allow", "deny"]
# A bridge request is also recorded when it starts waiting for a human ("ask").
BridgeDecision = Literal["allow", "deny", "ask"]


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
        import json  # lazily: the launch path creates events but rarely serialises them

        return json.dumps(record, sort_keys=True, default=str)


class Sink(Protocol):
    def emit(self, event: Event) -> None: ...

    def close(self) -> None: ...


def session_start_event(
    sandbox_id: str,
    *,
    argv: Sequence[str],
    cwd: str,
    mode: str,
    backend: str,
    policy_digest: str,
) -> Event:
    """The runner emits this once the sandboxed command has been started."""
    return Event.now(
        "session",
        sandbox_id,
        phase="start",
        argv=list(argv),
        cwd=cwd,
        mode=mode,
        backend=backend,
        policy_digest=policy_digest,
    )


def session_end_event(
    sandbox_id: str, *, exit_code: int | None, resource_usage: Mapping[str, object] | None = None
) -> Event:
    """`exit_code` is the command's status (negative: killed by that signal; None: unknown)."""
    return Event.now(
        "session",
        sandbox_id,
        phase="end",
        exit_code=exit_code,
        resource_usage=dict(resource_usage or {}),
    )


def network_event(
    sandbox_id: str,
    *,
    host: str,
    port: int,
    decision: Decision,
    rule: str = "",
    reason: str = "",
    bytes_up: int = 0,
    bytes_down: int = 0,
    duration: float = 0.0,
) -> Event:
    """One proxied connection (or refused request). `host` is the name as the proxy matched it."""
    return Event.now(
        "network",
        sandbox_id,
        host=host,
        port=port,
        decision=decision,
        rule=rule,
        reason=reason,
        bytes_up=bytes_up,
        bytes_down=bytes_down,
        duration=duration,
    )


def violation_event(
    sandbox_id: str,
    *,
    pid: int,
    executable: str,
    operation: str,
    path: str,
    rule: str = "",
    ignored: bool = False,
) -> Event:
    """A filesystem access the kernel refused. `ignored`: matched an ignore-violations rule."""
    return Event.now(
        "violation",
        sandbox_id,
        pid=pid,
        executable=executable,
        operation=operation,
        path=path,
        rule=rule,
        ignored=ignored,
    )


def bridge_event(
    sandbox_id: str,
    *,
    request_id: str,
    command: str,
    params: Mapping[str, object],
    decision: BridgeDecision,
    decided_by: str,
) -> Event:
    """A request through the bridge and who decided it ("policy", "user", a rule name...)."""
    return Event.now(
        "bridge",
        sandbox_id,
        request_id=request_id,
        command=command,
        params=dict(params),
        decision=decision,
        decided_by=decided_by,
    )


def policy_digest(policy: object) -> str:
    """A short stable digest of a policy (any NamedTuple tree) for the sessions table.

    The repr of frozen NamedTuples of str/int/bool/None/tuple is deterministic, so two runs
    with the same effective policy record the same digest.
    """
    # hashlib's own blake2b, without hashlib: importing hashlib loads OpenSSL, ~3 ms that
    # every `corral run` would pay for this one digest.
    from _blake2 import blake2b

    return blake2b(repr(policy).encode(), digest_size=8).hexdigest()


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


class FanOutSink:
    """Sends every event to several sinks in order (e.g. the SQLite log and syslog)."""

    def __init__(self, *sinks: Sink) -> None:
        self.sinks = sinks

    def emit(self, event: Event) -> None:
        for sink in self.sinks:
            sink.emit(event)

    def close(self) -> None:
        # Close every sink even if one fails, then report the first failure.
        first: BaseException | None = None
        for sink in self.sinks:
            try:
                sink.close()
            except Exception as exc:  # re-raised below, once the others are closed
                first = first or exc
        if first is not None:
            raise first
