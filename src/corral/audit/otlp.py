"""An OpenTelemetry logs sink: audit events to an OTLP/HTTP collector, as JSON.

For teams that ship logs centrally: point it at a collector's OTLP/HTTP receiver
(`http://collector:4318`, the standard port) and every event becomes one log record of
`POST {endpoint}/v1/logs`, in the OTLP JSON encoding (resourceLogs > scopeLogs > logRecords).

Why no OpenTelemetry SDK: the wire format is a small, stable JSON document, and the SDK would
bring a dozen packages and their import time for a feature most users never turn on.

Model, as the SQLite log's (store.py): `emit` queues and never waits for the network; one
thread sends batches of up to MAX_BATCH_EVENTS; `flush()` waits until everything emitted
before it was accepted by the collector; `close()` flushes, and reports with a CorralError how
many events the collector never accepted (refused, unreachable, timed out), because an audit
trail that drops records quietly is worse than none. A failed batch is retried once, then
counted as lost: the SQLite log keeps the full record either way.

Record shape: body = the event's JSON (what `corral log --json` prints), severity WARN for
violations and denials, INFO otherwise, and the event's scalar fields as attributes named
`corral.<field>` (so a collector can filter on corral.kind or corral.decision without parsing
the body). The resource carries service.name = "corral" and host.name.
"""

from __future__ import annotations

import json
import queue
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import Final

from corral.audit.events import Event
from corral.errors import CorralError

MAX_BATCH_EVENTS: Final = 512
SEND_TIMEOUT_S: Final = 5.0
SEND_ATTEMPTS: Final = 2

# OTLP severity numbers (logs data model): INFO = 9, WARN = 13.
_INFO: Final = (9, "INFO")
_WARN: Final = (13, "WARN")

_STOP: Final = object()


def logs_url(endpoint: str) -> str:
    """The collector's logs path: OTLP/HTTP appends /v1/logs to a base endpoint."""
    base = endpoint.rstrip("/")
    return base if base.endswith("/v1/logs") else base + "/v1/logs"


def _attribute(key: str, value: object) -> dict[str, object] | None:
    if isinstance(value, bool):
        return {"key": key, "value": {"boolValue": value}}
    if isinstance(value, int):
        # OTLP JSON carries 64-bit integers as strings.
        return {"key": key, "value": {"intValue": str(value)}}
    if isinstance(value, float):
        return {"key": key, "value": {"doubleValue": value}}
    if isinstance(value, str):
        return {"key": key, "value": {"stringValue": value}}
    return None  # lists and dicts stay in the body only


def log_record(event: Event) -> dict[str, object]:
    """One OTLP JSON LogRecord for an event."""
    warn = event.kind == "violation" or event.fields.get("decision") == "deny"
    number, text = _WARN if warn else _INFO
    scalars: dict[str, object] = {"kind": event.kind, "sandbox_id": event.sandbox_id}
    scalars.update(event.fields)
    attributes = [
        attribute
        for key, value in scalars.items()
        if (attribute := _attribute(f"corral.{key}", value)) is not None
    ]
    nanos = str(int(event.time * 1_000_000_000))
    return {
        "timeUnixNano": nanos,
        "observedTimeUnixNano": nanos,
        "severityNumber": number,
        "severityText": text,
        "body": {"stringValue": event.as_json()},
        "attributes": attributes,
    }


def logs_document(records: list[dict[str, object]], *, host: str) -> dict[str, object]:
    """The body of one export request (ExportLogsServiceRequest, JSON encoding)."""
    resource = {
        "attributes": [
            {"key": "service.name", "value": {"stringValue": "corral"}},
            {"key": "host.name", "value": {"stringValue": host}},
        ]
    }
    scope = {"name": "corral.audit"}
    return {
        "resourceLogs": [
            {"resource": resource, "scopeLogs": [{"scope": scope, "logRecords": records}]}
        ]
    }


class _Flush:
    __slots__ = ("done",)

    def __init__(self) -> None:
        self.done = threading.Event()


class OtlpLogsSink:
    """Sends audit events to an OTLP/HTTP logs receiver. Implements `Sink`."""

    def __init__(self, endpoint: str, *, headers: Mapping[str, str] | None = None) -> None:
        if not endpoint.startswith(("http://", "https://")):
            raise CorralError(
                f"OTLP endpoint {endpoint!r} is not an http(s) URL",
                hint="e.g. http://127.0.0.1:4318 (the collector's OTLP/HTTP receiver)",
            )
        self.url = logs_url(endpoint)
        self._headers = {"Content-Type": "application/json", **(headers or {})}
        self._host = socket.gethostname()
        self._queue: queue.SimpleQueue[dict[str, object] | _Flush | object] = queue.SimpleQueue()
        self._lost = 0
        self._last_error = ""
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="corral-otlp", daemon=True)
        self._thread.start()

    def emit(self, event: Event) -> None:
        if self._closed:
            raise CorralError(f"OTLP sink for {self.url} is closed")
        self._queue.put(log_record(event))

    def flush(self) -> None:
        marker = _Flush()
        self._queue.put(marker)
        marker.done.wait()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._queue.put(_STOP)
        self._thread.join()
        if self._lost:
            raise CorralError(
                f"{self._lost} audit events were not accepted by the OTLP collector at "
                f"{self.url}: {self._last_error}",
                hint="the SQLite audit log still has them: `corral log --json` can resend",
            )

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            batch: list[dict[str, object]] = []
            markers: list[_Flush] = []
            stop = False
            while True:
                if item is _STOP:
                    stop = True
                elif isinstance(item, _Flush):
                    markers.append(item)
                elif isinstance(item, dict):
                    batch.append(item)
                if stop or len(batch) >= MAX_BATCH_EVENTS:
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            if batch:
                self._send(batch)
            for marker in markers:
                marker.done.set()
            if stop:
                return

    def _send(self, batch: list[dict[str, object]]) -> None:
        body = json.dumps(logs_document(batch, host=self._host)).encode()
        for _ in range(SEND_ATTEMPTS):
            # The scheme was checked to be http(s) in __init__: no file: or custom URLs.
            request = urllib.request.Request(  # noqa: S310
                self.url, data=body, headers=self._headers, method="POST"
            )
            try:
                with urllib.request.urlopen(request, timeout=SEND_TIMEOUT_S) as response:  # noqa: S310
                    response.read()
                return
            except urllib.error.HTTPError as exc:
                self._last_error = f"HTTP {exc.code} {exc.reason}"
                if exc.code < 500 and exc.code != 429:
                    break  # the collector refused this batch; sending it again changes nothing
            except (urllib.error.URLError, OSError) as exc:
                self._last_error = str(getattr(exc, "reason", exc))
        self._lost += len(batch)
