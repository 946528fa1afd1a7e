"""The violation monitor's pieces without a sandbox: the boundary's verdicts on a real layout,
the decoding of notified calls, reading another address space, and the one-source-per-kind
rule of the run's violations (audit/violations.py)."""

from __future__ import annotations

import ctypes
import mmap
import os
from collections.abc import Sequence

import pytest

from corral.audit.events import MemorySink
from corral.audit.violations import Attempt, RunViolations, attempt_recorder, is_ignored
from corral.backends.facts import gather_disk_facts
from corral.backends.fsplan import plan_filesystem
from corral.backends.seccomp_notify import AT_FDCWD, AT_REMOVEDIR, WATCHED, Watched
from corral.breadcrumbs import Breadcrumb
from corral.monitor import METADATA_OPERATIONS, Boundary, monitor_unavailable
from corral.monitor.boundary import Intent
from corral.monitor.process import PAGE, ProcessReader
from corral.monitor.supervisor import Access, decode
from corral.policy.model import IgnoreRule, Mode, MonitorViolations, Origin
from corral.sandbox import Sandbox
from tests.conftest import Layout

BY_NAME = {call.name: call for call in WATCHED}


def boundary(layout: Layout, mode: Mode = "standard", **options: object) -> Boundary:
    policy = layout.sandbox(mode).policy
    plan = plan_filesystem(policy, gather_disk_facts(policy))
    inside = ("/tmp",) if policy.filesystem.private_tmp else ()
    return Boundary(plan, policy, inside_only=inside, **options)  # type: ignore[arg-type]


# --- Boundary: rules 1-4 on a real layout ----------------------------------------------------

# (intent, path relative to the layout root or absolute, the reason it is refused or None)
STANDARD = [
    ("write", "home/project/out.txt", None),
    ("write", "home/project/src/deep/new", None),
    ("write", "outside/loot", "outside the writable paths"),
    ("write", "home/.bashrc", "read-only by built-in"),
    ("write", "home/.ssh/authorized_keys", "hidden by built-in"),
    ("write", "home/project/.git/hooks/pre-commit", "read-only by built-in"),
    ("write", "/etc/passwd", "outside the writable paths"),
    ("write", "/tmp/scratch", None),  # the sandbox's own /tmp
    ("write", "/dev/null", None),  # rule 1: made by the kernel inside
    ("write", "/proc/self/attr/current", None),
    ("read", "home/.ssh/id_rsa", "hidden by built-in"),
    ("read", "home/.ssh", "hidden by built-in"),
    ("read", "home/.bashrc", None),  # protected from writes, not hidden
    ("read", "/usr/lib/os-release", None),
    ("read", "outside/anything", None),  # standard mode reads everything but the deny list
]


@pytest.mark.parametrize(("intent", "path", "reason"), STANDARD)
def test_standard_mode_verdicts(
    layout: Layout, intent: Intent, path: str, reason: str | None
) -> None:
    os.makedirs(f"{layout.workspace}/.git/hooks")
    full = path if path.startswith("/") else f"{layout.root}/{path}"
    verdict = boundary(layout).judge(intent, full)
    if reason is None:
        assert verdict is None
    else:
        assert verdict is not None and verdict.because.startswith(reason)
        assert verdict.path == full


def test_the_fix_is_the_settings_line_or_why_there_is_none(layout: Layout) -> None:
    judge = boundary(layout).judge
    outside = judge("write", f"{layout.outside}/loot")
    assert outside is not None and outside.fix == (
        f'add "filesystem": {{"allowWrite": ["{layout.outside}"]}} to '
        f"{layout.workspace}/.corral/settings.local.json"
    )
    hidden = judge("read", f"{layout.home}/.ssh/id_rsa")
    assert hidden is not None and hidden.fix == "built-in protection, not removable by settings"


def test_a_symlink_is_judged_where_it_leads(layout: Layout) -> None:
    # Rule 4: a link planted in the workspace leads to the secret; one from a read-only
    # place into the workspace leads to a writable file.
    os.symlink(f"{layout.home}/.ssh/id_rsa", f"{layout.workspace}/k")
    os.symlink(layout.workspace, f"{layout.outside}/to-project")
    judge = boundary(layout).judge
    planted = judge("read", f"{layout.workspace}/k")
    assert planted is not None and planted.path == f"{layout.home}/.ssh/id_rsa"
    assert judge("read", f"{layout.workspace}/k", follows=False) is None  # lstat, unlink
    assert judge("write", f"{layout.outside}/to-project/ok") is None


def test_strict_mode_reads_outside_the_read_roots_that_exist(layout: Layout) -> None:
    with open(f"{layout.outside}/notes", "w") as f:
        f.write("x")
    judge = boundary(layout, "strict").judge
    found = judge("read", f"{layout.outside}/notes")
    assert found is not None and found.because == "outside the readable paths"
    assert '"mode": "read"' in found.fix
    assert judge("read", f"{layout.outside}/missing") is None  # nothing was kept from it
    assert judge("read", f"{layout.workspace}/x") is None


def test_metadata_operations_can_be_left_unjudged(layout: Layout) -> None:
    # The Landlock-only backend: chmod of a protected file is let through by Landlock.
    assert boundary(layout).unrefused == frozenset()
    assert boundary(layout, unrefused=METADATA_OPERATIONS).unrefused >= {"chmod", "utimes"}


# --- decoding a notified call ----------------------------------------------------------------


class FakeReader(ProcessReader):
    """Strings by address, directories by fd, a u64 at one address."""

    def __init__(self, strings: dict[int, str], dirs: dict[int, str], u64: int = 0) -> None:
        super().__init__()
        self.strings, self.dirs, self.flags = strings, dirs, u64

    def string(self, pid: int, address: int) -> str | None:
        return self.strings.get(address)

    def u64(self, pid: int, address: int) -> int | None:
        return self.flags if address else None

    def directory(self, pid: int, dirfd: int) -> str | None:
        return self.dirs.get(dirfd)


CWD = "/w/proj"
READER = FakeReader(
    {1: "a/../b.txt", 2: "/abs//x/", 3: "", 4: "t"}, {AT_FDCWD: CWD, 7: "/d"}, 0o101
)
FD = AT_FDCWD & 0xFFFFFFFF  # as a register holds an int: the low half matters


def accesses(call: Watched, args: Sequence[int]) -> list[Access]:
    return decode(call, 99, (*args, *(0,) * (6 - len(args))), READER)


DECODED = [
    ("openat", (FD, 1, 0o2000000), [("read", "read", f"{CWD}/b.txt", True)]),
    ("openat", (7, 4, 0o1101), [("write", "write", "/d/t", True)]),  # O_WRONLY|O_CREAT|O_TRUNC
    ("openat", (FD, 4, 0o301), [("write", "write", f"{CWD}/t", False)]),  # O_EXCL: no follow
    ("open", (2, 0o2), [("write", "write", "/abs/x", True)]),
    ("openat2", (FD, 4, 5, 24), [("write", "write", f"{CWD}/t", True)]),  # flags in memory
    ("openat", (FD, 3, 0), []),  # "" with AT_EMPTY_PATH: an fd, no path
    ("openat", (FD, 0, 0), []),  # NULL
    ("unlinkat", (FD, 4, AT_REMOVEDIR), [("rmdir", "write", f"{CWD}/t", False)]),
    ("unlinkat", (FD, 4, 0), [("unlink", "write", f"{CWD}/t", False)]),
    ("unlink", (4, AT_REMOVEDIR), [("unlink", "write", f"{CWD}/t", False)]),  # no flags arg
    ("renameat2", (FD, 4, 7, 4, 0), [("rename", "write", f"{CWD}/t", False),
                                    ("rename", "write", "/d/t", False)]),
    ("linkat", (7, 4, FD, 1, 0), [("link", "read", "/d/t", False),
                                  ("link", "write", f"{CWD}/b.txt", False)]),
    ("symlinkat", (1, 7, 4), [("symlink", "write", "/d/t", False)]),  # arg 0 is the text
    ("fchmodat", (FD, 4, 0o600), [("chmod", "write", f"{CWD}/t", True)]),
    ("openat", (12, 4, 0), []),  # a directory fd that cannot be read: nothing to judge
]  # fmt: skip


@pytest.mark.parametrize(("name", "args", "expected"), DECODED)
def test_decode(name: str, args: tuple[int, ...], expected: list[tuple[object, ...]]) -> None:
    assert [tuple(access) for access in accesses(BY_NAME[name], args)] == expected


# --- reading another address space (here our own, through /proc/PID/mem) ---------------------


def test_strings_are_read_up_to_the_nul_across_pages() -> None:
    reader = ProcessReader()
    try:
        # Two mapped pages; the string starts 5 bytes before the boundary.
        area = mmap.mmap(-1, 2 * PAGE)
        text = b"/a/path/that/crosses/a/page/boundary"
        start = PAGE - 5
        area[start : start + len(text) + 1] = text + b"\0"
        address = ctypes.addressof(ctypes.c_char.from_buffer(area))
        assert reader.string(os.getpid(), address + start) == text.decode()
        assert reader.string(os.getpid(), 0) is None
        assert reader.string(os.getpid(), 8) is None  # unmapped
        assert reader.string(1 << 30, address) is None  # no such process
        del address
        area.close()
    finally:
        reader.close()


def test_the_working_directory_is_remembered_until_a_chdir() -> None:
    reader = ProcessReader()
    try:
        pid = os.getpid()
        assert reader.directory(pid, AT_FDCWD) == os.getcwd()
        reader._cwd[pid] = "/remembered"
        assert reader.directory(pid, AT_FDCWD) == "/remembered"
        reader.forget_directories()
        assert reader.directory(pid, AT_FDCWD) == os.getcwd()
        fd = os.open("/usr", os.O_RDONLY)
        try:
            assert reader.directory(pid, fd) == "/usr"
        finally:
            os.close(fd)
        r, w = os.pipe()
        assert reader.directory(pid, r) is None  # "pipe:[...]"
        os.close(r)
        os.close(w)
    finally:
        reader.close()


# --- one source per kind of attempt, ignore rules by executable -------------------------------

ATTEMPT = Attempt(42, "/usr/bin/cat", "read", "/h/.ssh/k", "hidden by built-in", "no fix")
WRITE_CRUMB = Breadcrumb("/etc/x", "write", "outside the writable paths", "add it")
READ_CRUMB = Breadcrumb("/h/.ssh/k", "read", "hidden by built-in", "no fix")


@pytest.mark.parametrize(
    ("opens", "kept"),
    [(None, ["/etc/x", "/h/.ssh/k"]), ("writes", ["/h/.ssh/k"]), ("all", [])],
)
def test_breadcrumbs_of_what_the_monitor_covers_are_dropped(
    layout: Layout, opens: str | None, kept: list[str]
) -> None:
    sink = MemorySink()
    violations = RunViolations(sink, layout.sandbox().policy, ["make"])
    if opens is not None:
        attempt_recorder(violations, "s1", opens=opens)  # type: ignore[arg-type]
    violations.record_breadcrumbs("s1", [WRITE_CRUMB, READ_CRUMB])
    violations.record_breadcrumbs("other-run", [WRITE_CRUMB])  # not watched: kept
    assert [e.fields["path"] for e in sink.events if e.sandbox_id == "s1"] == kept
    assert len([e for e in sink.events if e.sandbox_id == "other-run"]) == 1


def test_a_monitored_attempt_carries_its_process_and_the_settings_line(layout: Layout) -> None:
    sink = MemorySink()
    violations = RunViolations(sink, layout.sandbox().policy, ["bash", "-c", "cat ~/.ssh/k"])
    attempt_recorder(violations, "s1", opens="all")(ATTEMPT)
    assert sink.events[0].fields == {
        "pid": 42, "executable": "/usr/bin/cat", "operation": "read", "path": "/h/.ssh/k",
        "rule": "hidden by built-in", "ignored": False,
    }  # fmt: skip
    assert violations.summary("s1") == [
        "corral: blocked read /h/.ssh/k: hidden by built-in; no fix"
    ]
    plain = MemorySink()
    attempt_recorder(plain, "s2", opens="writes")(ATTEMPT)  # any other sink: the record
    assert plain.events[0].fields["executable"] == "/usr/bin/cat"


RULE_ORIGIN = Origin("test")


@pytest.mark.parametrize(
    ("command", "executable", "covered"),
    [
        ("cat", "/usr/bin/cat", True),  # the executable's base name
        ("/usr/bin/cat", "/usr/bin/cat", True),  # or its whole path
        ("cat", "/usr/bin/concatenate", False),
        ("/bin/cat", "/usr/bin/cat", False),
        ("cat -n", "/usr/bin/cat", False),  # several words name the command asked for
        ("cat", "", False),  # unknown (a breadcrumb)
        ("bash", "/usr/bin/cat", True),  # the command asked for still matches
    ],
)
def test_ignore_rules_match_the_real_executable(
    command: str, executable: str, covered: bool
) -> None:
    rules = [IgnoreRule(command, "/h/.ssh/*", RULE_ORIGIN)]
    argv = ["bash", "-c", "cat /h/.ssh/k"]
    found = is_ignored(rules, argv, "/h/.ssh/k", executable=executable)
    assert (found is not None) == covered


@pytest.mark.parametrize(
    ("kernel", "setuid", "problem"),
    [
        ("6.18.44-fc", False, None),
        ("5.5.0", False, None),
        ("5.4.210-generic", False, "Linux 5.5"),
        ("garbage", False, "Linux 5.5"),
        ("6.8.0", True, "setuid"),
    ],
)
def test_when_the_monitor_cannot_run(kernel: str, setuid: bool, problem: str | None) -> None:
    found = monitor_unavailable(kernel, bwrap_setuid=setuid)
    assert found is None if problem is None else problem in str(found)


def test_the_monitor_watches_writes_unless_told_otherwise(layout: Layout) -> None:
    # "all" also pays a round trip for every read (docs/monitoring.md, "Costs").
    policy = layout.sandbox().policy
    assert policy.monitor_violations == "writes"
    assert Sandbox(policy).monitoring == "writes"
    assert Sandbox(policy, monitor="off").monitoring == "off"
    assert Sandbox(policy._replace(monitor_violations="all")).monitoring == "all"


# --- `corral run --monitor`: wins over the user's and project's settings, not the managed ones

MANAGED = "/etc/corral/managed-settings.json"


@pytest.mark.parametrize(
    ("set_by", "setting", "asked", "expected", "noted"),
    [
        (None, "off", None, None, False),  # no flag: the Sandbox follows the policy
        (None, "off", "writes", "writes", False),
        ("/home/me/.config/corral/settings.json", "all", "off", "off", False),
        (MANAGED, "all", "off", None, True),  # the administrator's "all" stands
        (MANAGED, "writes", "writes", None, False),  # the same: nothing to say
    ],
)
def test_the_monitor_flag_and_the_managed_settings(
    layout: Layout,
    set_by: str | None,
    setting: MonitorViolations,
    asked: MonitorViolations | None,
    expected: MonitorViolations | None,
    noted: bool,
) -> None:
    from corral.cli import monitor_for_run
    from corral.policy.settings import MANAGED_SETTINGS

    assert MANAGED == MANAGED_SETTINGS
    policy = layout.sandbox().policy._replace(monitor_violations=setting)
    if set_by is not None:
        origin = Origin(set_by, "monitor.violations")
        policy = policy._replace(origins=(*policy.origins, ("monitor.violations", origin)))
    notes: list[str] = []
    assert monitor_for_run(policy, asked, note=notes.append) == expected
    assert bool(notes) == noted, notes
    if noted:
        assert notes == [f"--monitor off ignored: {MANAGED} (monitor.violations) sets 'all'"]
