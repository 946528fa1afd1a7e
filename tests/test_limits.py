"""Resource limits: the pure translation of `Limits` into rlimits and what holds each limit.

The real sandboxes that hit each limit are in test_limits_kernel.py.
"""

from __future__ import annotations

import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from corral.backends.limits import (
    CPU_GRACE_SECONDS,
    NOT_ENFORCED,
    UNLIMITED,
    apply_point,
    count_user_processes,
    kernel_version,
    limits_in_force,
    make_preexec,
    nproc_scope,
    rlimits_for,
)
from corral.policy.model import Limits
from corral.probe import MachineFacts

CPU, DATA, NPROC = resource.RLIMIT_CPU, resource.RLIMIT_DATA, resource.RLIMIT_NPROC
NOFILE, FSIZE = resource.RLIMIT_NOFILE, resource.RLIMIT_FSIZE
MiB = 1 << 20
UNLIMITED_NOW = {res: (UNLIMITED, UNLIMITED) for res in (CPU, DATA, NPROC, NOFILE, FSIZE)}


def facts_of(**changes: Any) -> MachineFacts:
    base = MachineFacts(
        kernel="6.8.0-45-generic",
        arch="x86_64",
        is_root=False,
        bwrap_path="/usr/bin/bwrap",
        bwrap_version=(0, 8, 0),
        bwrap_setuid=False,
        max_user_namespaces=1000,
        unprivileged_userns_clone=None,
        apparmor_restrict_userns=None,
        landlock_abi=4,
        seccomp=True,
        container=None,
        legacy_tiocsti=0,
        cgroup_v2_writable=None,
    )
    return base._replace(**changes)


# ---------------------------------------------------------------------------------------------
# The pure part


@pytest.mark.parametrize(
    ("limits", "expected"),
    [
        (Limits(), []),
        (Limits(timeout_seconds=5, output_bytes=10), []),  # not rlimits
        (Limits(cpu_seconds=10), [(CPU, 10, 10 + CPU_GRACE_SECONDS)]),
        (Limits(memory_bytes=256 * MiB), [(DATA, 256 * MiB, 256 * MiB)]),
        (Limits(processes=64), [(NPROC, 64, 64)]),
        (Limits(open_files=64, file_size_bytes=MiB), [(NOFILE, 64, 64), (FSIZE, MiB, MiB)]),
    ],
)
def test_rlimits_for(limits: Limits, expected: list[tuple[int, int, int]]) -> None:
    assert rlimits_for(limits, scope="namespace", current=UNLIMITED_NOW) == expected


def test_processes_in_the_user_scope_add_the_users_tasks() -> None:
    limits = Limits(processes=64)
    got = rlimits_for(limits, scope="user", user_processes_now=100, current=UNLIMITED_NOW)
    assert got == [(NPROC, 164, 164)]
    got = rlimits_for(limits, scope="namespace", user_processes_now=100, current=UNLIMITED_NOW)
    assert got == [(NPROC, 64, 64)]


@pytest.mark.parametrize(
    ("current", "expected"),
    [
        ((UNLIMITED, UNLIMITED), (NOFILE, 4096, 4096)),
        ((1024, 524288), (NOFILE, 1024, 4096)),  # the usual soft limit is kept
        ((1024, 2048), (NOFILE, 1024, 2048)),  # a lower ulimit stands
        ((8192, UNLIMITED), (NOFILE, 4096, 4096)),
    ],
)
def test_limits_only_tighten(current: tuple[int, int], expected: tuple[int, int, int]) -> None:
    got = rlimits_for(Limits(open_files=4096), scope="namespace", current={NOFILE: current})
    assert got == [expected]


@pytest.mark.parametrize(
    ("release", "version"),
    [("6.8.0-45-generic", (6, 8)), ("5.14", (5, 14)), ("4.19.0-rc1", (4, 19)), ("junk", (0, 0))],
)
def test_kernel_version(release: str, version: tuple[int, int]) -> None:
    assert kernel_version(release) == version


@pytest.mark.parametrize(
    ("kernel", "setuid", "scope", "point"),
    [
        ("5.14.0", False, "namespace", "sandbox-init"),
        ("6.18.44-fc", False, "namespace", "sandbox-init"),
        ("5.13.19", False, "user", "sandbox-init"),
        ("6.8.0", True, "user", "bwrap"),
    ],
)
def test_nproc_scope_and_apply_point(kernel: str, setuid: bool, scope: str, point: str) -> None:
    facts = facts_of(kernel=kernel, bwrap_setuid=setuid)
    assert nproc_scope(facts) == scope
    assert apply_point(facts) == point


def mechanism_of(rows: list[tuple[str, str]], key: str) -> str:
    return next(mechanism for limit, mechanism in rows if limit.split()[0] == key)


STANDARDISH = Limits(timeout_seconds=90, memory_bytes=8 << 30, processes=2048, open_files=64)


def test_limits_in_force_rows() -> None:
    rows = limits_in_force(STANDARDISH, facts_of())
    assert [limit for limit, _ in rows] == [
        "timeoutSeconds 90 s",
        "cpuSeconds",
        "memoryBytes 8 GiB",
        "processes 2048",
        "openFiles 64",
        "fileSizeBytes",
        "outputBytes",
    ]
    assert mechanism_of(rows, "cpuSeconds") == "no limit"
    assert mechanism_of(rows, "memoryBytes").startswith("RLIMIT_DATA per process")
    assert "sandbox's tasks only" in mechanism_of(rows, "processes")
    assert mechanism_of(rows, "openFiles").startswith("RLIMIT_NOFILE")


@pytest.mark.parametrize(
    ("changes", "cgroup", "start"),
    [
        ({}, None, "RLIMIT_NPROC in the sandbox's user namespace"),
        ({"kernel": "5.10.0"}, None, "RLIMIT_NPROC over all your tasks: those at launch + 2048"),
        ({"bwrap_setuid": True}, None, "RLIMIT_NPROC over all your tasks"),
        ({"is_root": True}, None, NOT_ENFORCED + ": the kernel exempts root"),
        ({"is_root": True}, "/sys/fs/cgroup/u", "cgroup v2 pids.max over the whole sandbox"),
        ({}, "/sys/fs/cgroup/u", "cgroup v2 pids.max"),
    ],
)
def test_which_mechanism_holds_processes(
    changes: dict[str, Any], cgroup: str | None, start: str
) -> None:
    rows = limits_in_force(STANDARDISH, facts_of(**changes), cgroup_parent=cgroup)
    assert mechanism_of(rows, "processes").startswith(start)
    memory = mechanism_of(rows, "memoryBytes")
    assert memory.startswith("cgroup v2 memory.max") == (cgroup is not None)


def test_count_user_processes_sums_threads_of_the_real_uid(tmp_path: Path) -> None:
    for pid, uid, threads in (("1", 0, 1), ("20", 1000, 4), ("21", 1000, 1), ("22", 1001, 9)):
        (tmp_path / pid).mkdir()
        # Real, effective, saved, filesystem uid: only the first (real) one counts.
        status = f"Name:\tx\nUid:\t{uid}\t0\t0\t0\nThreads:\t{threads}\n"
        (tmp_path / pid / "status").write_text(status)
    (tmp_path / "self").mkdir()
    (tmp_path / "99").mkdir()  # exited meanwhile: no status
    assert count_user_processes(1000, proc=str(tmp_path)) == 5
    assert count_user_processes(0, proc=str(tmp_path)) == 1


def test_preexec_sets_the_limits_in_the_child_only() -> None:
    rlimits = [(NOFILE, 50, 60), (FSIZE, MiB, MiB)]
    before = resource.getrlimit(NOFILE)
    code = "import resource as r; print(r.getrlimit(r.RLIMIT_NOFILE), r.getrlimit(r.RLIMIT_FSIZE))"
    done = subprocess.run(
        [sys.executable, "-c", code],
        preexec_fn=make_preexec(rlimits),
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout.strip() == f"(50, 60) ({MiB}, {MiB})"
    assert resource.getrlimit(NOFILE) == before
