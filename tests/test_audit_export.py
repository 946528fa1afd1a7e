"""JSON Lines export of query results, and the syslog sink checked at a real socket."""

from __future__ import annotations

import io
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral.audit.events import FanOutSink, network_event, violation_event
from corral.audit.export import SyslogSink, export_jsonl, write_jsonl
from corral.audit.query import AuditReader, EventFilter
from corral.audit.store import AuditLog
from corral.errors import CorralError

# <PRI> = facility * 8 + severity; LOG_USER is 1, warning 4, info 6 (RFC 5424, 6.2.1).
USER_WARNING = "<12>"
USER_INFO = "<14>"


def test_any_query_exports_as_json_lines(tmp_path: Path) -> None:
    path = str(tmp_path / "audit.db")
    with AuditLog(path) as log:
        log.emit(network_event("s", host="example.com", port=443, decision="allow"))
        log.emit(violation_event("s", pid=1, executable="x", operation="write", path="/etc/x"))
    target = tmp_path / "out.jsonl"
    with AuditReader(path) as reader:
        assert export_jsonl(reader.events(EventFilter(kinds=("violation",))), str(target)) == 1
        buffer = io.StringIO()
        assert write_jsonl(reader.recent_sessions(), buffer) == 0
    (line,) = target.read_text().splitlines()
    record = json.loads(line)
    assert (record["kind"], record["path"], record["session_id"]) == ("violation", "/etc/x", "s")


def test_export_to_an_unwritable_place_is_a_corral_error(tmp_path: Path) -> None:
    with pytest.raises(CorralError, match="cannot write"):
        export_jsonl([], str(tmp_path / "missing" / "out.jsonl"))


@pytest.fixture
def udp_collector() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(10)  # a safety net against hanging; the datagram is already sent
    yield sock
    sock.close()


def test_syslog_over_udp_carries_priority_ident_and_the_event(
    udp_collector: socket.socket,
) -> None:
    sink = SyslogSink(address=udp_collector.getsockname())
    sink.emit(network_event("s", host="evil.example", port=443, decision="deny", rule="r"))
    sink.emit(network_event("s", host="ok.example", port=443, decision="allow"))
    sink.close()
    first = udp_collector.recv(65536).decode()
    second = udp_collector.recv(65536).decode()
    prefix = f"{USER_WARNING}corral[{os.getpid()}]: "
    assert first.startswith(prefix)
    record = json.loads(first[len(prefix) :].rstrip("\x00"))
    assert (record["kind"], record["host"]) == ("network", "evil.example")
    assert second.startswith(USER_INFO)


def test_syslog_to_a_unix_socket_alongside_the_sqlite_log(tmp_path: Path) -> None:
    address = str(tmp_path / "log.sock")
    collector = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    collector.bind(address)
    collector.settimeout(10)
    database = str(tmp_path / "audit.db")
    sink = FanOutSink(AuditLog(database), SyslogSink(address=address))
    sink.emit(violation_event("s", pid=3, executable="cat", operation="read", path="/secret"))
    sink.close()
    message = collector.recv(65536).decode()
    collector.close()
    assert message.startswith(USER_WARNING) and '"path": "/secret"' in message
    with AuditReader(database) as reader:
        assert [v.path for v in reader.violations()] == ["/secret"]


def test_no_syslog_listener_is_reported_at_once(tmp_path: Path) -> None:
    with pytest.raises(CorralError, match="cannot reach syslog"):
        SyslogSink(address=str(tmp_path / "nobody.sock"))


def test_events_that_could_not_be_sent_are_reported_by_close(tmp_path: Path) -> None:
    address = str(tmp_path / "log.sock")
    collector = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    collector.bind(address)
    sink = SyslogSink(address=address)
    collector.close()
    os.unlink(address)  # the daemon went away
    sink.emit(network_event("s", host="h", port=1, decision="deny"))
    with pytest.raises(CorralError, match="1 audit events could not be sent"):
        sink.close()
