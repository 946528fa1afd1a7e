"""The violation monitor in real sandboxes: what it records, about which process, and that it
only ever observes. Every block is also judged on the host side (the canary outside was not
written, the secret did not come out), so a monitor that recorded without the sandbox blocking
would fail here; tests/test_blocks.py runs the same attacks unsandboxed, where they succeed.

Processes are found while they wait on their stdin, after they said "ready" on stdout: the
monitor records an attempt before the call returns, so at that point the record exists, and
nothing here waits for time to pass.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest

from corral.audit.events import Event, MemorySink
from corral.audit.rows import NetworkRow, ViolationRow
from corral.audit.violations import RunViolations
from corral.policy.model import IgnoreRule, MonitorViolations, Origin
from corral.process import SandboxProcess
from corral.sandbox import Sandbox
from tests.conftest import SECRET, Layout
from tests.helpers_cli import CORRAL, run_cli, write_settings
from tests.test_audit_violations import run_recorded
from tests.test_network_support import Servers, filtered_policy, loopback_servers
from tests.test_unprivileged import STARTED, User, run_as, user, user_layout  # noqa: F401

pytestmark = pytest.mark.usefixtures("sandbox_available")

SANDBOX_PATH = "/usr/local/bin:/usr/bin:/bin"  # the layouts' PATH (conftest.make_layout)


def found_on_path(name: str) -> str:
    """The real path of the executable the sandbox runs for `name`."""
    return os.path.realpath(shutil.which(name, path=SANDBOX_PATH) or name)


BASH, CAT, PYTHON3 = (found_on_path(name) for name in ("bash", "cat", "python3"))


# The three attempts of the issue; exits 0 so that only the records tell what happened.
def violations_of(events: list[Event]) -> list[dict[str, object]]:
    return [e.fields for e in events if e.kind == "violation"]


def process_tree(root: int) -> list[int]:
    """`root` and every process below it (read from /proc on the host)."""
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        for task in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{task}/children") as f:
                    todo += [int(child) for child in f.read().split()]
            except OSError:
                continue
    return found


def running_executable(root: int, executable: str) -> int:
    """The one process under `root` running `executable`."""
    matches = []
    for pid in process_tree(root):
        try:
            if os.readlink(f"/proc/{pid}/exe") == executable:
                matches.append(pid)
        except OSError:
            continue
    assert len(matches) == 1, (executable, matches)
    return matches[0]


def wait_ready(proc: SandboxProcess) -> None:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line == b"ready\n", line


def monitored(layout: Layout, opens: MonitorViolations, sink: object = None) -> Sandbox:
    policy = layout.sandbox().policy._replace(monitor_violations=opens)
    return Sandbox(policy, sink=sink or MemorySink())  # type: ignore[arg-type]


# --- the case, kernel-side: exactly three records, with the process -----------------


@pytest.fixture
def servers() -> Iterator[Servers]:
    with loopback_servers() as pair:
        yield pair


def test_three_attempts_are_recorded_with_their_processes(
    layout: Layout, servers: Servers, tmp_path: Path
) -> None:
    policy = filtered_policy(layout)._replace(monitor_violations="all")
    before = servers.denied.connections
    sandbox_id, _, rows, output = run_recorded(layout, policy, servers, tmp_path)
    files = {row.operation: row for row in rows if isinstance(row, ViolationRow)}
    network = [row for row in rows if isinstance(row, NetworkRow)]
    # Exactly three: the error output named the same two files, and those breadcrumbs are
    # not counted again.
    assert len(rows) == 3 and sorted(files) == ["read", "write"] and len(network) == 1, rows
    write, read = files["write"], files["read"]
    assert (write.path, write.executable, write.rule) == (
        f"{layout.outside}/loot", BASH, "outside the writable paths"
    )  # fmt: skip
    assert (read.path, read.executable) == (f"{layout.home}/.ssh/id_rsa", CAT)
    assert read.rule.startswith("hidden by built-in")
    # Two processes (the shell wrote, cat read), both real pids, not the breadcrumbs' 0.
    assert write.pid and read.pid and write.pid != read.pid
    assert (network[0].host, network[0].decision) == ("denied.test", "deny")
    assert {row.session_id for row in rows} == {sandbox_id}
    # Host-side evidence that each attempt failed.
    assert not os.path.exists(f"{layout.outside}/loot")
    assert SECRET.encode() not in output
    assert servers.denied.connections == before


def test_the_recorded_pid_is_the_host_pid_of_the_process_that_tried(layout: Layout) -> None:
    sink = MemorySink()
    code = (
        f"import sys\ntry:\n    open({layout.outside + '/loot'!r}, 'w')\nexcept OSError:\n"
        "    pass\nprint('ready', flush=True)\nsys.stdin.read()\n"
    )
    box = monitored(layout, "writes", sink)
    proc = box.spawn(["python3", "-c", code], env=layout.env,
                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)  # fmt: skip
    try:
        wait_ready(proc)
        pid = running_executable(proc.pid, PYTHON3)
        [record] = violations_of(sink.events)
        assert (record["pid"], record["executable"], record["operation"]) == (
            pid, PYTHON3, "write"
        )  # fmt: skip
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(timeout=60)
    assert not os.path.exists(f"{layout.outside}/loot")


# --- through `corral run`: with "writes", the breadcrumbs still name the reads ---------------


def corral_json(layout: Layout, *args: str) -> list[dict[str, object]]:
    done = subprocess.run([*CORRAL, *args], cwd=layout.workspace, env=layout.env,
                          capture_output=True, text=True, check=True)  # fmt: skip
    return [json.loads(line) for line in done.stdout.splitlines()]


@pytest.mark.parametrize("opens", ["writes", "all"])
def test_corral_run_counts_each_attempt_once(layout: Layout, opens: str) -> None:
    write_settings(layout, {"monitor": {"violations": opens}})
    script = f"echo loot > {layout.outside}/loot; echo x >> ~/.bashrc; cat ~/.ssh/id_rsa; exit 0"
    done = run_cli(layout, "--", "bash", "-c", script)
    assert done.returncode == 0, done.stderr
    # The error output names all three (and corral relays it with "writes").
    assert b"Read-only file system" in done.stderr and b"No such file" in done.stderr
    rows = {str(r["target"]): r for r in corral_json(layout, "violations", "--json")}
    assert sorted(rows) == sorted(
        [f"{layout.outside}/loot", f"{layout.home}/.bashrc", f"{layout.home}/.ssh/id_rsa"]
    )
    assert rows[f"{layout.outside}/loot"]["executable"] == BASH
    assert rows[f"{layout.home}/.bashrc"]["rule"] == "read-only by built-in (mandatory)"
    read = rows[f"{layout.home}/.ssh/id_rsa"]
    # With "writes" the read comes from the error output, which cannot say who read.
    assert read["executable"] == (CAT if opens == "all" else "")
    summary = [line for line in done.stderr.decode().splitlines() if "blocked" in line]
    assert len(summary) == 3, summary
    assert not os.path.exists(f"{layout.outside}/loot")
    assert SECRET.encode() not in done.stdout


def test_a_retrying_loop_is_recorded_once(layout: Layout) -> None:
    sink = MemorySink()
    script = f"for i in $(seq 50); do echo x 2>/dev/null > {layout.outside}/loot; done; exit 0"
    result = monitored(layout, "writes", sink).run(["bash", "-c", script], env=layout.env,
                                                   capture_output=True, timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert [r["path"] for r in violations_of(sink.events)] == [f"{layout.outside}/loot"]
    assert not os.path.exists(f"{layout.outside}/loot")


def test_ignore_rules_match_the_real_executable(layout: Layout) -> None:
    # argv[0] is bash; the rule names cat, the program that read.
    policy = layout.sandbox().policy._replace(
        monitor_violations="all",
        ignore_violations=(IgnoreRule("cat", "~/.ssh/*", Origin("test")),),
    )
    sink = MemorySink()
    argv = ["bash", "-c", f"cat ~/.ssh/id_rsa; echo x > {layout.outside}/loot; exit 0"]
    violations = RunViolations(sink, policy, argv)
    result = Sandbox(policy, sink=violations).run(argv, env=layout.env, capture_output=True)
    marks = {r["path"]: r["ignored"] for r in violations_of(sink.events)}
    assert marks == {f"{layout.home}/.ssh/id_rsa": True, f"{layout.outside}/loot": False}
    assert [line.split()[3] for line in violations.summary(result.sandbox_id)] == [
        f"{layout.outside}/loot:"
    ]


# --- it only observes: nothing inside holds the listener; off means no filter at all ----------

WAIT = "echo ready; read line"


def filters_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Seccomp_filters:"):
                return int(line.split()[1])
    raise AssertionError("no Seccomp_filters line")


def monitor_threads() -> int:
    return sum(thread.name == "corral-monitor" for thread in threading.enumerate())


@pytest.mark.parametrize("opens", ["off", "writes", "all"])
def test_off_means_no_filter_and_no_supervisor(layout: Layout, opens: MonitorViolations) -> None:
    box = monitored(layout, opens)
    before = monitor_threads()
    proc = box.spawn(["bash", "-c", WAIT], env=layout.env,
                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)  # fmt: skip
    try:
        wait_ready(proc)
        shell = running_executable(proc.pid, BASH)
        supervisors = monitor_threads() - before
        filters = filters_of(shell)
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(timeout=60)
    # bwrap's --seccomp filter is always there; the monitor's is one more.
    assert (filters, supervisors) == ((1, 0) if opens == "off" else (2, 1))
    assert box.monitored_calls == 0 if opens == "off" else box.monitored_calls > 0


def fd_targets(pid: int) -> list[str]:
    found = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            found.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            continue
    return found


LIST_EVERY_FD = "for f in /proc/[0-9]*/fd/*; do readlink $f; done; echo ready; read line"


def test_no_process_of_the_sandbox_holds_the_listener(layout: Layout) -> None:
    box = monitored(layout, "all")
    proc = box.spawn(["bash", "-c", LIST_EVERY_FD], env=layout.env,
                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)  # fmt: skip
    try:
        inside = read_until_ready(proc.stdout)
        # The host side has it (so the check below could fail), bwrap does not.
        assert any("seccomp" in target for target in fd_targets(os.getpid()))
        outside = [t for pid in process_tree(proc.pid) for t in fd_targets(pid)]
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(timeout=60)
    assert "/dev/null" in inside or "pipe:" in " ".join(inside)  # the listing worked
    assert not [t for t in inside if "seccomp" in t]
    assert not [t for t in outside if "seccomp" in t]


def read_until_ready(stream: IO[bytes] | None) -> list[str]:
    assert stream is not None
    lines = []
    while (line := stream.readline()) not in (b"ready\n", b""):
        lines.append(line.decode().strip())
    assert line == b"ready\n", lines
    return lines


# --- the Landlock-only backend ----------------------------------------------------------------


def test_landlock_only_backend_records_refused_writes_only(layout: Layout) -> None:
    sink = MemorySink()
    policy = layout.sandbox().policy._replace(backend="landlock", monitor_violations="writes")
    box = Sandbox(policy, sink=sink)
    os.mkdir(f"{layout.workspace}/src")
    # chmod of a protected file is let through by Landlock: no refused attempt to record. A
    # new file directly in the workspace root is refused (the root holds protected paths).
    script = (
        f"echo loot > {layout.outside}/loot; chmod 644 ~/.bashrc; echo ok > src/ok; "
        "echo no > root-file; exit 0"
    )
    result = box.run(["bash", "-c", script], env=layout.env, capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert box.backend == "landlock"
    records = {str(r["path"]): r for r in violations_of(sink.events)}
    assert sorted(records) == sorted([f"{layout.outside}/loot", f"{layout.workspace}/root-file"])
    assert {r["executable"] for r in records.values()} == {BASH}
    assert str(records[f"{layout.workspace}/root-file"]["rule"]).startswith(
        "in a directory Landlock freezes"
    )
    assert not os.path.exists(f"{layout.outside}/loot")
    assert not os.path.exists(f"{layout.workspace}/root-file")
    assert os.path.exists(f"{layout.workspace}/src/ok")


# --- as an ordinary user (the monitor needs no privilege) -------------------------------------


@pytest.mark.unprivileged
@pytest.mark.parametrize("sandboxed", [False, True], ids=["unsandboxed", "sandboxed"])
def test_an_unprivileged_users_refused_write_is_recorded(
    user: User,  # noqa: F811 - the fixture, imported from test_unprivileged
    user_layout: Layout,  # noqa: F811
    sandboxed: bool,
) -> None:
    settings = write_settings(user_layout, {"monitor": {"violations": "writes"}})
    os.chown(os.path.dirname(settings), user.uid, user.gid)
    os.chown(settings, user.uid, user.gid)
    script = f"echo loot > {user_layout.outside}/loot"
    result = run_as(user, user_layout, script, sandboxed=sandboxed)
    assert f"{STARTED}{user.uid}\n" in result.stdout, result
    # The attack works unsandboxed (the control), and is refused in the sandbox.
    assert os.path.exists(f"{user_layout.outside}/loot") != sandboxed, result
    if not sandboxed:
        return
    listed = subprocess.run(
        [*user.prefix, "env", "-i", *(f"{k}={v}" for k, v in user_layout.env.items()),
         *CORRAL, "violations", "--json"],
        cwd=user_layout.workspace, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    [row] = [json.loads(line) for line in listed.stdout.splitlines()]
    assert (row["target"], row["operation"], row["executable"]) == (
        f"{user_layout.outside}/loot",
        "write",
        BASH,
    )  # fmt: skip: with the monitor off, a breadcrumb would say "" here
    assert isinstance(row["pid"], int) and row["pid"] > 0


class BrokenSink(MemorySink):
    """A sink whose every write fails, like a full disk under the audit spool."""

    def emit(self, event: Event) -> None:
        raise OSError(28, "No space left on device")


def test_a_failing_sink_never_leaves_a_call_waiting(layout: Layout) -> None:
    box = monitored(layout, "writes", BrokenSink())
    script = f"echo loot > {layout.outside}/loot; echo done"
    result = box.run(["bash", "-c", script], env=layout.env, capture_output=True, timeout=60)
    # The call was answered (the script went on) and refused as ever.
    assert (result.timed_out, result.stdout) == (False, b"done\n"), result
    assert not os.path.exists(f"{layout.outside}/loot")


@pytest.mark.parametrize(("setting", "flag"), [("off", "writes"), ("writes", "off")])
def test_the_run_flag_chooses_the_monitor_over_the_settings(
    layout: Layout, setting: str, flag: str
) -> None:
    write_settings(layout, {"monitor": {"violations": setting}})
    script = f"echo loot > {layout.outside}/loot; exit 0"
    done = run_cli(layout, "--monitor", flag, "--", "bash", "-c", script)
    assert done.returncode == 0, done.stderr
    [row] = corral_json(layout, "violations", "--json")
    assert row["target"] == f"{layout.outside}/loot"
    # The monitor names the process; the error output (the breadcrumbs) cannot.
    assert (row["executable"], bool(row["pid"])) == (
        (BASH, True) if flag == "writes" else ("", False)
    )
    assert not os.path.exists(f"{layout.outside}/loot")


# A supervisor above corral: a filter with a listener whose fd a parent keeps open (it only
# watches acct(2), which nothing calls), the way a sandbox that corral's own monitor watches
# looks to a corral started inside it. The kernel then refuses corral's listener (EBUSY).
UNDER_ANOTHER_SUPERVISOR = """
import ctypes, os, struct, sys
libc = ctypes.CDLL(None, use_errno=True)
code = [(0x20, 0, 0, 0), (0x15, 0, 1, 163), (0x06, 0, 0, 0x7FC00000), (0x06, 0, 0, 0x7FFF0000)]
program = b"".join(struct.pack("<HBBI", *insn) for insn in code)
buffer = ctypes.create_string_buffer(program, len(program))
class Fprog(ctypes.Structure):
    _fields_ = (("len", ctypes.c_ushort), ("filter", ctypes.c_void_p))
fprog = Fprog(len(code), ctypes.addressof(buffer))
assert libc.prctl(38, 1, 0, 0, 0) == 0
listener = libc.syscall(317, 1, 8, ctypes.byref(fprog))  # seccomp, NEW_LISTENER
assert listener >= 0, ctypes.get_errno()
child = os.fork()
if child == 0:
    os.execv(sys.argv[1], sys.argv[1:])
_, status = os.waitpid(child, 0)
sys.exit(os.waitstatus_to_exitcode(status))
"""


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="the script's numbers are x86_64's")
def test_a_refused_filter_runs_the_command_unwatched(layout: Layout, tmp_path: Path) -> None:
    script = tmp_path / "supervised.py"
    script.write_text(UNDER_ANOTHER_SUPERVISOR)
    loot = f"{layout.outside}/loot"
    done = subprocess.run(
        [sys.executable, str(script), sys.executable, "-m", "corral", "run", "--monitor",
         "writes", "--", "bash", "-c", f"echo loot > {loot}; exit 0"],
        cwd=layout.workspace, env=layout.env, capture_output=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert b"the violation monitor cannot run here" in done.stderr
    assert b"Device or resource busy" in done.stderr
    # The refusal is still recorded, from the error output: no pid, no executable.
    [row] = corral_json(layout, "violations", "--json")
    assert (row["target"], row["executable"], row["pid"]) == (loot, "", 0)
    assert not os.path.exists(loot)
