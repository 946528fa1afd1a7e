"""The OTLP logs sink against a local collector stand-in: what arrives, and what it reports."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jsonschema
import pytest

from corral.audit.events import network_event, session_start_event, violation_event
from corral.audit.otlp import OtlpLogsSink, logs_url
from corral.errors import CorralError

# The parts of the OTLP JSON encoding (opentelemetry-proto, logs/v1 and common/v1) a collector
# needs to accept a record; int64 fields are strings in JSON.
_ANY_VALUE = {
    "type": "object",
    "minProperties": 1,
    "maxProperties": 1,
    "properties": {
        "stringValue": {"type": "string"},
        "boolValue": {"type": "boolean"},
        "intValue": {"type": "string", "pattern": "^-?[0-9]+$"},
        "doubleValue": {"type": "number"},
    },
    "additionalProperties": False,
}
_KEY_VALUE = {
    "type": "object",
    "required": ["key", "value"],
    "properties": {"key": {"type": "string", "minLength": 1}, "value": _ANY_VALUE},
    "additionalProperties": False,
}
OTLP_LOGS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["resourceLogs"],
    "properties": {
        "resourceLogs": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["resource", "scopeLogs"],
                "properties": {
                    "resource": {
                        "type": "object",
                        "properties": {"attributes": {"type": "array", "items": _KEY_VALUE}},
                    },
                    "scopeLogs": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["logRecords"],
                            "properties": {
                                "scope": {"type": "object"},
                                "logRecords": {
                                    "type": "array",
                                    "items": {
                                        "type": "object",
                                        "required": ["timeUnixNano", "severityNumber", "body"],
                                        "properties": {
                                            "timeUnixNano": {
                                                "type": "string",
                                                "pattern": "^[0-9]+$",
                                            },
                                            "observedTimeUnixNano": {
                                                "type": "string",
                                                "pattern": "^[0-9]+$",
                                            },
                                            "severityNumber": {
                                                "type": "integer",
                                                "minimum": 1,
                                                "maximum": 24,
                                            },
                                            "severityText": {"type": "string"},
                                            "body": _ANY_VALUE,
                                            "attributes": {"type": "array", "items": _KEY_VALUE},
                                        },
                                        "additionalProperties": False,
                                    },
                                },
                            },
                        },
                    },
                },
            },
        }
    },
    "additionalProperties": False,
}


class Collector:
    """A stand-in OTLP/HTTP receiver on loopback: records bodies and headers, answers
    `status`."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.paths: list[str] = []
        self.status = 200
        self.gate = threading.Event()
        self.gate.set()
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                collector.gate.wait()
                length = int(self.headers["Content-Length"])
                body = json.loads(self.rfile.read(length))
                collector.paths.append(self.path)
                collector.headers.append(dict(self.headers))
                collector.bodies.append(body)
                self.send_response(collector.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def records(self) -> list[dict[str, Any]]:
        return [
            record
            for body in self.bodies
            for resource in body["resourceLogs"]
            for scope in resource["scopeLogs"]
            for record in scope["logRecords"]
        ]

    def events(self) -> list[dict[str, Any]]:
        """The audit events the records carry (each record's body is one event's JSON)."""
        return [json.loads(record["body"]["stringValue"]) for record in self.records()]


@pytest.fixture
def collector() -> Iterator[Collector]:
    c = Collector()
    yield c
    c.gate.set()
    c.server.shutdown()
    c.server.server_close()


def _attributes(record: dict[str, Any]) -> dict[str, object]:
    return {a["key"]: next(iter(a["value"].values())) for a in record["attributes"]}


def test_events_arrive_as_valid_otlp_log_records(collector: Collector) -> None:
    sink = OtlpLogsSink(collector.url)
    sink.emit(
        session_start_event(
            "s1", argv=["make"], cwd="/w", mode="standard", backend="bwrap", policy_digest="d"
        )
    )
    sink.emit(network_event("s1", host="evil.test", port=443, decision="deny", rule="", reason="r"))
    sink.emit(
        violation_event(
            "s1", pid=7, executable="/bin/sh", operation="write", path="/etc/x", rule="allowWrite"
        )
    )
    sink.close()

    assert collector.paths == ["/v1/logs"]
    for body in collector.bodies:
        jsonschema.validate(body, OTLP_LOGS_SCHEMA)
    records = collector.records()
    assert [r["severityText"] for r in records] == ["INFO", "WARN", "WARN"]
    assert [json.loads(r["body"]["stringValue"])["kind"] for r in records] == [
        "session",
        "network",
        "violation",
    ]
    violation = _attributes(records[2])
    assert violation["corral.path"] == "/etc/x"
    assert violation["corral.pid"] == "7"
    assert violation["corral.sandbox_id"] == "s1"
    resource = collector.bodies[0]["resourceLogs"][0]["resource"]["attributes"]
    assert {"key": "service.name", "value": {"stringValue": "corral"}} in resource


def test_emit_never_waits_for_the_collector(collector: Collector) -> None:
    collector.gate.clear()  # the collector holds every request until released
    sink = OtlpLogsSink(collector.url)
    for n in range(2000):
        sink.emit(violation_event("s", pid=n, executable="x", operation="read", path="/p"))
    collector.gate.set()
    sink.close()
    assert sorted(int(str(_attributes(r)["corral.pid"])) for r in collector.records()) == list(
        range(2000)
    )


def test_refused_batches_are_reported_at_close(collector: Collector) -> None:
    collector.status = 400
    sink = OtlpLogsSink(collector.url)
    sink.emit(violation_event("s", pid=1, executable="x", operation="read", path="/p"))
    with pytest.raises(CorralError, match=r"1 audit events were not accepted.*HTTP 400"):
        sink.close()


def test_an_unreachable_collector_is_reported_at_close() -> None:
    with socket_bound_and_closed() as port:
        sink = OtlpLogsSink(f"http://127.0.0.1:{port}")
        sink.emit(violation_event("s", pid=1, executable="x", operation="read", path="/p"))
        with pytest.raises(CorralError, match="not accepted by the OTLP collector"):
            sink.close()


class socket_bound_and_closed:  # noqa: N801 - used as a context manager, reads as one
    """A loopback port nothing listens on (bound, then closed: refused, not filtered)."""

    def __enter__(self) -> int:
        import socket

        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        self.port = int(s.getsockname()[1])
        s.close()
        return self.port

    def __exit__(self, *exc: object) -> None:
        pass


@pytest.mark.parametrize(
    ("endpoint", "url"),
    [
        ("http://c:4318", "http://c:4318/v1/logs"),
        ("http://c:4318/", "http://c:4318/v1/logs"),
        ("https://c/otlp/v1/logs", "https://c/otlp/v1/logs"),
    ],
)
def test_the_logs_path_is_appended_once(endpoint: str, url: str) -> None:
    assert logs_url(endpoint) == url


@pytest.mark.parametrize("endpoint", ["c:4318", "file:///etc/passwd", "ftp://c"])
def test_endpoints_that_are_not_http_are_refused(endpoint: str) -> None:
    with pytest.raises(CorralError, match="not an http"):
        OtlpLogsSink(endpoint)
