"""Acknowledged events survive SIGKILL, and concurrent writer processes lose nothing.

Both tests run real child processes against one file; neither waits on a clock. The crash test
kills the child once it has acknowledged a fixed number of events, while it is still emitting.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from corral.audit.db import Durability

# Emits forever, acknowledging alternately a batch (emit x 50, flush) and a single event
# (emit_sync); prints each sequence number only after its acknowledgement returned.
CRASH_CHILD = """
import sys
from corral.audit.events import network_event
from corral.audit.store import AuditLog

log = AuditLog(sys.argv[1], durability=sys.argv[2])
out = sys.stdout
seq = 0
def event(n):
    return network_event("crash", host="h", port=1, decision="allow", bytes_up=n)
while True:
    first = seq
    for _ in range(50):
        log.emit(event(seq))
        seq += 1
    log.flush()
    out.write("".join(f"{n}\\n" for n in range(first, seq)))
    log.emit_sync(event(seq))
    out.write(f"{seq}\\n")
    seq += 1
    out.flush()
"""

WRITER_CHILD = """
import sys
from corral.audit.events import network_event, session_end_event, session_start_event
from corral.audit.store import AuditLog

path, name, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
with AuditLog(path) as log:
    log.emit(session_start_event(name, argv=["w"], cwd="/", mode="m", backend="b",
                                 policy_digest="d"))
    for seq in range(count):
        log.emit(network_event(name, host="h", port=1, decision="allow", bytes_up=seq))
        if seq % 25 == 24:
            log.flush()  # many small transactions: the processes contend for the lock
    log.emit(session_end_event(name, exit_code=0))
print("done")
"""

ACKNOWLEDGED_BEFORE_KILL = 3000


def integrity(path: Path) -> str:
    conn = sqlite3.connect(path)
    try:
        return str(conn.execute("PRAGMA integrity_check").fetchone()[0])
    finally:
        conn.close()


@pytest.mark.parametrize("durability", ["normal", "full"])
def test_acknowledged_events_survive_sigkill(tmp_path: Path, durability: Durability) -> None:
    path = tmp_path / "audit.db"
    child = subprocess.Popen(
        [sys.executable, "-c", CRASH_CHILD, str(path), durability],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    acknowledged: list[int] = []
    for line in child.stdout:
        acknowledged.append(int(line))
        if len(acknowledged) >= ACKNOWLEDGED_BEFORE_KILL:
            break
    child.send_signal(signal.SIGKILL)
    # Whatever it printed before dying had been acknowledged too.
    acknowledged += [int(line) for line in child.stdout]
    assert child.wait() == -signal.SIGKILL
    assert len(acknowledged) >= ACKNOWLEDGED_BEFORE_KILL

    assert integrity(path) == "ok"
    conn = sqlite3.connect(path)
    stored = {n for (n,) in conn.execute("SELECT bytes_up FROM network_events")}
    conn.close()
    missing = sorted(set(acknowledged) - stored)
    assert missing == [], f"{len(missing)} acknowledged events lost, first {missing[:5]}"


def test_eight_processes_writing_at_once_lose_nothing(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    writers, count = 8, 1000
    children = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER_CHILD, str(path), f"w{i}", str(count)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(writers)
    ]
    for child in children:
        out, err = child.communicate()
        assert (child.returncode, out) == (0, "done\n"), err
    assert integrity(path) == "ok"
    conn = sqlite3.connect(path)
    per_session = conn.execute(
        "SELECT session_id, count(*), count(DISTINCT bytes_up), min(bytes_up), max(bytes_up) "
        "FROM network_events GROUP BY session_id ORDER BY session_id"
    ).fetchall()
    ended = conn.execute("SELECT count(*) FROM sessions WHERE exit_status = 0").fetchone()[0]
    conn.close()
    assert per_session == [(f"w{i}", count, count, 0, count - 1) for i in range(writers)]
    assert ended == writers
    assert not os.path.exists(f"{path}-journal")  # WAL, not a rollback journal
