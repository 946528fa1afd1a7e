"""The spool: lines json reads back exactly, ingest that loses nothing and repeats harmlessly,
writers that are killed or still running, and the session records `corral run` writes."""

from __future__ import annotations

import fcntl
import json
import math
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from corral.audit.events import (
    Event,
    MemorySink,
    bridge_event,
    network_event,
    policy_digest,
    session_end_event,
    session_start_event,
    violation_event,
)
from corral.audit.ingest import IngestReport, SpoolIngester, catch_up, ingest_spool, parse_line
from corral.audit.query import AuditReader
from corral.audit.record import (
    children_usage,
    record_session_end,
    record_session_start,
    usage_since,
)
from corral.audit.spool import SpoolSink, encode_line, spool_directory
from corral.audit.store import AuditLog
from corral.errors import CorralError
from corral.policy.model import HostPaths
from corral.policy.presets import preset_policy

HOST = HostPaths("/w", "/home/u", "/home/u/.config", "/home/u/.cache", "/home/u/.state")


def count(db: Path, table: str) -> int:
    conn = sqlite3.connect(db)
    try:
        return int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])
    finally:
        conn.close()


def story_events() -> list[Event]:
    """One session with every kind, and text the sandbox could have chosen."""
    return [
        session_start_event(
            "s1", argv=["sh", "-c", "echo 'a\nb'"], cwd="/w", mode="strict", backend="b",
            policy_digest="d",
        ),
        network_event("s1", host="example.com", port=443, decision="deny", rule="r", bytes_up=7),
        violation_event(
            "s1", pid=9, executable="/bin/cat", operation="read",
            path='/home/u/.ssh/"quoted"\\ \x1b[31m\udcff', ignored=True,
        ),
        bridge_event(
            "s1", request_id="q1", command="git push", params={"remote": "o", "n": [1, None]},
            decision="allow", decided_by="user",
        ),
        session_end_event("s1", exit_code=137, resource_usage={"max_rss_kb": 10}),
    ]  # fmt: skip


# -- the line format ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    ["", "plain", 'a "quote"', "back\\slash", "new\nline\r\t", "\x00\x1f\x7f", "\u2028\u2029",
     "é漢字", "😀", "\U000e0001", "\ud800", "\udcff and \\ \"", "\x1b[31mred"],
)  # fmt: skip
def test_every_string_reads_back_exactly_on_one_line(text: str) -> None:
    event = Event("network", text, {text: text}, 1.5)
    line = encode_line("id-1", event)
    assert line.endswith("\n") and line.count("\n") == 1
    line.encode()  # valid UTF-8 whatever the text: lone surrogates are escaped
    record = json.loads(line)
    assert (record["sandbox_id"], record["fields"]) == (text, {text: text})


@pytest.mark.parametrize(
    ("value", "read_back"),
    [
        (None, None), (True, True), (False, False), (0, 0), (-12, -12), (2**70, 2**70),
        (1.5, 1.5), (1e-5, 1e-5), (1e300, 1e300), (math.nan, None), (-math.inf, None),
        ([1, "a", [None]], [1, "a", [None]]), ((1, 2), [1, 2]), ({"k": {"n": 1}}, {"k": {"n": 1}}),
        ({3: "int key"}, {"3": "int key"}), (signal.SIGKILL, 9), (Path("/x"), "/x"),
    ],
)  # fmt: skip
def test_values_read_back_as_json_dumps_would_write_them(value: object, read_back: object) -> None:
    line = encode_line("id", Event("network", "s", {"v": value}, 0.0))
    assert json.loads(line)["fields"]["v"] == read_back


def test_a_line_names_its_version_id_and_event() -> None:
    line = encode_line("abc-7", Event("violation", "s9", {"path": "/x"}, 12.25))
    assert json.loads(line) == {
        "v": 1, "id": "abc-7", "kind": "violation", "sandbox_id": "s9", "time": 12.25,
        "fields": {"path": "/x"},
    }  # fmt: skip


@pytest.mark.parametrize(
    "line",
    [b"\n", b"not json\n", b"[1, 2]\n", b'{"v": 2, "id": "x"}\n', b'{"v": 1, "id": "x"}\n',
     b'{"v":1,"id":"x","kind":"telemetry","sandbox_id":"s","time":1,"fields":{}}\n',
     b'{"v":1,"id":"x","kind":"network","sandbox_id":"s","time":1,"fields":{"port":1}}\n',
     b'{"v":1,"id":"x","kind":"network","sandbox_id":"s","time":"now","fields":{}}\n',
     b'\xff\xfe{"v":1}\n'],
)  # fmt: skip
def test_lines_that_are_not_records_are_refused(line: bytes) -> None:
    with pytest.raises(ValueError):
        parse_line(line)


# -- round trip ----------------------------------------------------------------------------------


def test_spooled_events_reach_the_log_whole(tmp_path: Path) -> None:
    spool, db = str(tmp_path / "spool"), str(tmp_path / "audit.db")
    sink = SpoolSink(spool, "s1")
    for event in story_events():
        sink.emit(event)
    sink.close()
    assert os.stat(sink.path).st_mode & 0o777 == 0o600
    assert os.stat(spool).st_mode & 0o777 == 0o700

    assert catch_up(db, spool) == IngestReport(files=1, events=5, removed=1, damaged=0)
    assert os.listdir(spool) == []
    with AuditReader(db) as reader:
        story = reader.story("s1")
    s = story.session
    assert (s.argv, s.mode, s.exit_status, s.resource_usage) == (
        ("sh", "-c", "echo 'a\nb'"), "strict", 137, {"max_rss_kb": 10},
    )  # fmt: skip
    network, violation, bridge = story.events
    assert network.kind == "network" and (network.host, network.bytes_up) == ("example.com", 7)
    # The lone surrogate is kept visible as text; everything else is exact.
    assert violation.kind == "violation"
    assert violation.path == '/home/u/.ssh/"quoted"\\ \x1b[31m\\udcff'
    assert violation.ignored is True
    assert bridge.kind == "bridge" and bridge.params == {"remote": "o", "n": [1, None]}


def test_nothing_spooled_opens_no_log(tmp_path: Path) -> None:
    db = tmp_path / "audit.db"
    assert catch_up(str(db), str(tmp_path / "missing")) == IngestReport()
    os.mkdir(tmp_path / "spool")
    assert catch_up(str(db), str(tmp_path / "spool")) == IngestReport()
    assert not db.exists()


def test_the_spool_directory_is_in_the_state_dir() -> None:
    assert spool_directory(HOST) == "/home/u/.state/corral/spool"


# -- idempotence and crashes ---------------------------------------------------------------------


def test_ingesting_the_same_file_again_adds_nothing(tmp_path: Path) -> None:
    """As after a crash between the commit and the file's removal."""
    spool, db = tmp_path / "spool", tmp_path / "audit.db"
    sink = SpoolSink(str(spool), "s1")
    for event in story_events():
        sink.emit(event)
    sink.close()
    kept = shutil.copy(sink.path, tmp_path / "kept.jsonl")
    catch_up(str(db), str(spool))
    shutil.copy(kept, sink.path)  # the file survived its ingest
    assert catch_up(str(db), str(spool)).events == 5
    tables = ("sessions", "network_events", "violations", "bridge_requests")
    assert [count(db, t) for t in tables] == [1, 1, 1, 1]
    assert not os.path.exists(sink.path)


# Emits forever; prints each sequence number only after its emit returned.
KILLED_WRITER = """
import sys
from corral.audit.events import network_event
from corral.audit.spool import SpoolSink

sink = SpoolSink(sys.argv[1], "killed")
seq = 0
while True:
    sink.emit(network_event("killed", host="h", port=1, decision="allow", bytes_up=seq))
    sys.stdout.write(f"{seq}\\n")
    sys.stdout.flush()
    seq += 1
"""
EMITTED_BEFORE_KILL = 2000


def test_a_writer_killed_while_emitting_loses_no_emitted_event(tmp_path: Path) -> None:
    spool, db = tmp_path / "spool", tmp_path / "audit.db"
    child = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, str(spool)], stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None
    emitted: list[int] = []
    for line in child.stdout:
        emitted.append(int(line))
        if len(emitted) >= EMITTED_BEFORE_KILL:
            break
    child.send_signal(signal.SIGKILL)
    emitted += [int(line) for line in child.stdout]  # printed before it died: emitted too
    assert child.wait() == -signal.SIGKILL

    with AuditLog(str(db)) as log:
        report = ingest_spool(str(spool), log)
    assert report.removed == 1  # the kernel dropped the dead writer's lock
    assert report.damaged <= 1  # at most the line it was writing when killed
    conn = sqlite3.connect(db)
    stored = [n for (n,) in conn.execute("SELECT bytes_up FROM network_events")]
    conn.close()
    assert sorted(set(emitted) - set(stored)) == []
    assert len(stored) == len(set(stored))


def test_a_live_writers_file_is_read_but_kept(tmp_path: Path) -> None:
    spool, db = tmp_path / "spool", tmp_path / "audit.db"
    sink = SpoolSink(str(spool), "live")

    def emit(n: int) -> None:
        sink.emit(network_event("live", host="h", port=1, decision="allow", bytes_up=n))

    for n in range(3):
        emit(n)
    with AuditLog(str(db)) as log:
        ingester = SpoolIngester(str(spool), log)
        assert ingester.ingest() == IngestReport(files=1, events=3, removed=0, damaged=0)
        for n in range(3, 5):
            emit(n)
        # It remembers how far it committed: only the new lines are read.
        assert ingester.ingest().events == 2
    assert os.path.exists(sink.path)
    # A new reader starts over; the ids keep what it re-reads from being stored twice.
    assert catch_up(str(db), str(spool)).events == 5
    sink.close()
    assert catch_up(str(db), str(spool)).removed == 1
    assert count(db, "network_events") == 5
    assert not os.path.exists(sink.path)


def test_a_line_being_written_waits_for_its_end(tmp_path: Path) -> None:
    spool, db = tmp_path / "spool", tmp_path / "audit.db"
    sink = SpoolSink(str(spool), "live")  # holds the writer's lock
    line = encode_line("x-1", network_event("live", host="h", port=1, decision="allow"))
    half = len(line) // 2
    with open(sink.path, "a") as f:
        f.write(line[:half])
        f.flush()
        with AuditLog(str(db)) as log:
            ingester = SpoolIngester(str(spool), log)
            assert ingester.ingest() == IngestReport(files=1, events=0, removed=0, damaged=0)
            f.write(line[half:])
            f.flush()
            assert ingester.ingest().events == 1
    sink.close()
    assert count(db, "network_events") == 1


def test_a_dead_writers_cut_line_and_garbage_are_counted_and_skipped(tmp_path: Path) -> None:
    spool, db = tmp_path / "spool", tmp_path / "audit.db"
    good = encode_line("x-1", network_event("s", host="h", port=1, decision="allow"))
    os.makedirs(spool)
    (spool / "dead.jsonl").write_text("garbage\n" + good + good[:20])
    assert catch_up(str(db), str(spool)) == IngestReport(files=1, events=1, removed=1, damaged=2)
    assert count(db, "network_events") == 1


def test_a_log_that_cannot_take_events_keeps_the_file(tmp_path: Path) -> None:
    spool, db = tmp_path / "spool", tmp_path / "audit.db"
    sink = SpoolSink(str(spool), "s")
    sink.emit(network_event("s", host="h", port=1, decision="allow"))
    sink.close()
    log = AuditLog(str(db))
    log.close()
    with pytest.raises(CorralError, match="closed"):
        ingest_spool(str(spool), log)
    assert os.path.exists(sink.path)


def test_a_writer_whose_file_is_taken_before_its_lock_opens_a_new_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ingest may delete a file between the writer's open(2) and its flock(2) (rule 6)."""
    spool = tmp_path / "spool"
    real_flock = fcntl.flock
    calls: list[int] = []

    def flock_after_ingest(fd: int, operation: int) -> None:
        calls.append(fd)
        if len(calls) == 1:
            os.unlink(spool / "s.jsonl")  # what ingest does to a file with no writer
        real_flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", flock_after_ingest)
    sink = SpoolSink(str(spool), "s")
    monkeypatch.undo()
    sink.emit(network_event("s", host="h", port=1, decision="allow"))
    sink.close()
    assert len(calls) == 2
    assert catch_up(str(tmp_path / "audit.db"), str(spool)).events == 1


@pytest.mark.parametrize("name", ["", "a/b", ".hidden"])
def test_a_spool_name_that_is_not_a_file_name_is_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(CorralError, match="not a spool file name"):
        SpoolSink(str(tmp_path), name)


def test_a_spool_that_cannot_be_created_is_reported(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(CorralError, match="opening failed") as caught:
        SpoolSink(str(blocker / "spool"), "s")
    assert "state directory" in caught.value.hint


# -- session records -----------------------------------------------------------------------------


def test_session_records_carry_the_policy_and_the_usage() -> None:
    policy = preset_policy("strict", HOST)
    sink = MemorySink()
    before = children_usage()
    # Fixed work, not a duration: touching 64 MiB makes the child's peak RSS at least that.
    subprocess.run([sys.executable, "-c", "b = bytearray(64 << 20)"], check=True)
    usage = usage_since(before)
    record_session_start(sink, "s1", policy=policy, argv=["make"], cwd="/w", backend="bubblewrap")
    record_session_end(sink, "s1", exit_code=2, resource_usage=usage)
    start, end = sink.events
    assert start.fields == {
        "phase": "start", "argv": ["make"], "cwd": "/w", "mode": "strict",
        "backend": "bubblewrap", "policy_digest": policy_digest(policy),
    }  # fmt: skip
    assert end.fields["exit_code"] == 2
    assert set(usage) == {"user_cpu_s", "sys_cpu_s", "max_rss_kb"}
    assert int(usage["max_rss_kb"]) >= 64 << 10  # type: ignore[call-overload]
    assert float(usage["user_cpu_s"]) >= 0 and float(usage["sys_cpu_s"]) >= 0  # type: ignore[arg-type]


# What `corral run` does to record a session, in a fresh interpreter.
RUN_PATH = """
import sys
from corral.audit.record import children_usage, record_session_end, record_session_start
from corral.audit.record import usage_since
from corral.audit.spool import SpoolSink
from corral.policy.model import HostPaths
from corral.policy.presets import preset_policy

policy = preset_policy("standard", HostPaths("/w", "/h", "/h/.config", "/h/.cache", "/h/.state"))
sink = SpoolSink(sys.argv[1], "s1")
before = children_usage()
record_session_start(sink, "s1", policy=policy, argv=["true"], cwd="/w", backend="bwrap")
record_session_end(sink, "s1", exit_code=0, resource_usage=usage_since(before))
sink.close()
print(sorted(m for m in ("json", "hashlib", "sqlite3", "corral.audit.store") if m in sys.modules))
"""


def test_recording_a_run_imports_no_json_hashlib_or_sqlite(tmp_path: Path) -> None:
    """Each costs milliseconds at every `corral run`; the spool exists to avoid them."""
    done = subprocess.run(
        [sys.executable, "-c", RUN_PATH, str(tmp_path)], capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == "[]"
    assert catch_up(str(tmp_path / "audit.db"), str(tmp_path)).events == 2
