"""The audit settings at work: `corral run`, `corral serve` and `corral mcp` forward every event
to the syslog and OTLP sinks the user settings name, write a per-project log where the local
settings put it, and keep the spool as the record of truth when a sink is unreachable.

The sinks are stand-ins on loopback that the test opens: a UDP socket for syslog and an
http.server for OTLP/HTTP. Nothing but loopback is contacted.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from corral.audit.events import Event, MemorySink, session_start_event
from corral.audit.sinks import BestEffort
from corral.errors import CorralError
from tests.conftest import Layout
from tests.helpers_bridge_http import write_declarations
from tests.helpers_cli import DEADLINE, run_cli, write_settings
from tests.test_audit_otlp import Collector


class Syslog:
    """A UDP socket on loopback standing in for a syslog collector."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"

    def received(self) -> list[tuple[int, dict[str, Any]]]:
        """(priority, event) of every datagram already delivered. Senders write synchronously,
        so once the sender is done, everything it sent is in the socket's buffer."""
        found = []
        while select.select([self.sock], [], [], 0)[0]:
            data = self.sock.recv(65536).rstrip(b"\0").decode()
            head, _, body = data.partition(": ")  # "<158>corral[PID]: {json}"
            found.append((int(head[1 : head.index(">")]), json.loads(body)))
        return found


@pytest.fixture
def syslog() -> Iterator[Syslog]:
    s = Syslog()
    yield s
    s.sock.close()


@pytest.fixture
def collector() -> Iterator[Collector]:
    c = Collector()
    yield c
    c.server.shutdown()
    c.server.server_close()


def corral(layout: Layout, *args: str, cwd: str | None = None) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "corral", *args],
        cwd=cwd or layout.workspace,
        env=layout.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def logged(layout: Layout, *, cwd: str | None = None) -> list[dict[str, Any]]:
    """Every row `corral log --json` prints (sessions, then events)."""
    out = corral(layout, "log", "--json", "--limit", "0", cwd=cwd)
    return [json.loads(line) for line in out.splitlines()]


def session_of(rows: list[dict[str, Any]], marker: str) -> str:
    (found,) = [r["id"] for r in rows if r["kind"] == "session" and marker in " ".join(r["argv"])]
    return str(found)


def write_local_settings(layout: Layout, data: dict[str, object]) -> str:
    path = f"{layout.workspace}/.corral/settings.local.json"
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f)
    return path


# -- corral run ------------------------------------------------------------------------------


@pytest.mark.usefixtures("sandbox_available")
def test_a_run_reaches_syslog_and_otlp_and_the_log(
    layout: Layout, syslog: Syslog, collector: Collector
) -> None:
    audit = {
        "syslog": {"address": syslog.address, "facility": "local3"},
        "otlp": {"endpoint": collector.url, "headers": {"Authorization": "Bearer t0ken"}},
    }
    write_settings(layout, {"audit": audit}, where="user")
    target = f"{layout.outside}/loot"
    done = run_cli(layout, "--", "sh", "-c", f"echo x > {target}; exit 3 # forwarded")
    assert done.returncode == 3, done.stderr
    assert b"corral: warning" not in done.stderr, done.stderr

    sid = session_of(logged(layout), "forwarded")
    expected = [("session", "start"), ("violation", target), ("session", "end")]

    def story(events: list[dict[str, Any]]) -> list[tuple[str, Any]]:
        ours = [e for e in events if e["sandbox_id"] == sid]
        return [(e["kind"], e.get("phase") or e.get("path")) for e in ours]

    sent = syslog.received()
    assert story([event for _prio, event in sent]) == expected
    # local3 is facility 19: <19*8 + severity>, INFO (6) for the session, WARNING (4) for
    # the refused write.
    assert sorted({prio for prio, _event in sent}) == [19 * 8 + 4, 19 * 8 + 6]
    assert story(collector.events()) == expected
    assert {h["Authorization"] for h in collector.headers} == {"Bearer t0ken"}
    violations = json.loads(corral(layout, "violations", "--json"))
    assert (violations["session_id"], violations["path"]) == (sid, target)


@pytest.mark.usefixtures("sandbox_available")
def test_a_per_project_log_set_in_the_local_settings(layout: Layout) -> None:
    database = f"{layout.root}/logs/project.db"
    write_local_settings(layout, {"audit": {"database": database}})
    done = run_cli(layout, "--", "sh", "-c", "exit 0 # this project")
    assert done.returncode == 0, done.stderr
    assert not os.path.exists(f"{layout.home}/.local/state/corral/spool")  # not spooled there

    sid = session_of(logged(layout), "this project")
    assert os.path.isfile(database) and os.path.isdir(f"{database}.spool")
    # From a directory without those settings, the default log: the session is not in it.
    elsewhere = [r for r in logged(layout, cwd=layout.outside) if r.get("id") == sid]
    assert elsewhere == []
    assert not os.path.exists(f"{layout.home}/.local/state/corral/audit.db")
    # $CORRAL_AUDIT_DB still names the log `corral log` reads.
    env = {**layout.env, "CORRAL_AUDIT_DB": f"{layout.root}/other.db"}
    out = subprocess.run(
        [sys.executable, "-m", "corral", "log", "--json"],
        cwd=layout.workspace,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert sid not in out


@pytest.mark.usefixtures("sandbox_available")
def test_unreachable_sinks_warn_and_change_nothing_else(layout: Layout) -> None:
    # A TCP socket bound but not listening: connecting to it is refused, and the port stays
    # ours for the test, so nothing else can be listening there.
    closed = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    closed.bind(("127.0.0.1", 0))
    missing = f"{layout.root}/no-syslog-here.sock"
    audit = {
        "syslog": {"address": missing},
        "otlp": {"endpoint": f"http://127.0.0.1:{closed.getsockname()[1]}"},
    }
    try:
        write_settings(layout, {"audit": audit}, where="user")
        done = run_cli(layout, "--", "sh", "-c", "exit 7 # unreachable")
    finally:
        closed.close()
    assert done.returncode == 7
    warnings = [w for w in done.stderr.decode().splitlines() if w.startswith("corral: warning")]
    assert len(warnings) == 2, done.stderr
    assert f"cannot reach syslog at {missing}" in warnings[0]
    assert "not accepted by the OTLP collector" in warnings[1]
    assert all("the local audit log keeps every event" in w for w in warnings)
    session_of(logged(layout), "unreachable")  # recorded all the same


# -- corral serve and corral mcp -------------------------------------------------------------


def bridge_rows(layout: Layout) -> list[dict[str, Any]]:
    out = corral(layout, "log", "--json", "--kind", "bridge", "--limit", "0")
    return [json.loads(line) for line in out.splitlines()]


@pytest.mark.usefixtures("sandbox_available")
def test_corral_serve_forwards_and_writes_the_project_log(layout: Layout, syslog: Syslog) -> None:
    write_declarations(layout)
    write_settings(layout, {"audit": {"syslog": {"address": syslog.address}}}, where="user")
    write_local_settings(layout, {"audit": {"database": f"{layout.root}/logs/project.db"}})
    spool = f"{layout.root}/requests"
    proc = subprocess.Popen(
        [sys.executable, "-m", "corral.bridge.serve", "--spool", spool],
        cwd=layout.workspace,
        env=layout.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        os.makedirs(f"{spool}/requests", exist_ok=True)
        with open(f"{spool}/requests/.r1.tmp", "w") as f:
            json.dump({"command": "echo", "args": {"word": "hi"}}, f)
        os.rename(f"{spool}/requests/.r1.tmp", f"{spool}/requests/r1.json")
        result = f"{spool}/results/r1.json"
        for _ in range(int(DEADLINE / 0.05)):  # bounded: a stuck server fails the test
            if os.path.exists(result) or proc.poll() is not None:
                break
            select.select([], [], [], 0.05)
        assert os.path.exists(result), proc.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    forwarded = [e for _prio, e in syslog.received() if e["kind"] == "bridge"]
    assert [(e["command"], e["decision"]) for e in forwarded] == [("echo", "allow")]
    rows = bridge_rows(layout)
    assert [(r["command"], r["decision"]) for r in rows] == [("echo", "allow")]
    assert not os.path.exists(f"{layout.home}/.local/state/corral/spool")


@pytest.mark.usefixtures("sandbox_available")
def test_corral_mcp_forwards_and_writes_the_project_log(layout: Layout, syslog: Syslog) -> None:
    import anyio
    from mcp import ClientSession, StdioServerParameters, stdio_client

    write_declarations(layout)
    write_settings(layout, {"audit": {"syslog": {"address": syslog.address}}}, where="user")
    write_local_settings(layout, {"audit": {"database": f"{layout.root}/logs/project.db"}})
    server = StdioServerParameters(
        command=sys.executable,
        args=["-m", "corral.bridge.mcp_server"],
        env=layout.env,
        cwd=layout.workspace,
    )

    async def call() -> None:
        with anyio.fail_after(DEADLINE * 2):
            async with stdio_client(server) as (read, write), ClientSession(read, write) as s:
                await s.initialize()
                assert not (await s.call_tool("echo", {"word": "hi"})).is_error

    anyio.run(call)
    # The decision was sent (synchronously) before the call was answered.
    forwarded = [e for _prio, e in syslog.received() if e["kind"] == "bridge"]
    assert [(e["command"], e["decision"]) for e in forwarded] == [("echo", "allow")]
    assert [(r["command"], r["decision"]) for r in bridge_rows(layout)] == [("echo", "allow")]
    assert not os.path.exists(f"{layout.home}/.local/state/corral/spool")


# -- BestEffort, the forwarders' guard -------------------------------------------------------


class Failing:
    def __init__(self, *, on_emit: bool, on_close: bool) -> None:
        self.on_emit, self.on_close = on_emit, on_close

    def emit(self, event: Event) -> None:
        if self.on_emit:
            raise OSError("the wire is cut")

    def close(self) -> None:
        if self.on_close:
            raise CorralError("3 audit events were not accepted")


@pytest.mark.parametrize(
    ("on_emit", "on_close", "warning"),
    [
        (False, False, None),
        (True, False, "2 audit events could not be forwarded: the wire is cut"),
        (False, True, "3 audit events were not accepted"),
        (True, True, "2 audit events could not be forwarded: the wire is cut; 3 audit events"),
    ],
)
def test_a_forwarder_never_raises_and_warns_once(
    on_emit: bool, on_close: bool, warning: str | None
) -> None:
    warned: list[str] = []
    sink = BestEffort(Failing(on_emit=on_emit, on_close=on_close), warn=warned.append)
    event = session_start_event(
        "s", argv=["true"], cwd="/", mode="m", backend="b", policy_digest="d"
    )
    sink.emit(event)
    sink.emit(event)
    sink.close()
    if warning is None:
        assert warned == []
    else:
        assert len(warned) == 1 and warned[0].startswith(warning), warned
        assert warned[0].endswith("the local audit log keeps every event (corral log)")


def test_the_spool_comes_first_and_its_errors_stay_errors() -> None:
    from corral.audit.sinks import forward
    from corral.policy.model import AuditSettings, SyslogTarget

    class BrokenSpool(MemorySink):
        def close(self) -> None:
            raise CorralError("disk full")

    warned: list[str] = []
    spool = BrokenSpool()
    # A syslog socket that does not exist: left out with a warning, the spool alone remains.
    audit = AuditSettings(syslog=SyslogTarget("/nonexistent/corral-test.sock"))
    sink = forward(spool, audit, warn=warned.append)
    assert sink is spool
    assert len(warned) == 1 and "cannot reach syslog" in warned[0]
    with pytest.raises(CorralError, match="disk full"):
        sink.close()
