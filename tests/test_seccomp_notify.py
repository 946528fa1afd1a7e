"""The violation monitor's filter as data: which calls it notifies, judged by an independent
classic-BPF interpreter for both architectures without running anything, and its system call
table against the kernel headers.

The kernel runs the program in tests/test_monitor.py; here the decisions are read one call at a
time, the notified and the let-through halves of every rule side by side.
"""

from __future__ import annotations

import os
import re
import struct

import pytest

from corral.backends.seccomp_bpf import ARCHES, disassemble
from corral.backends.seccomp_notify import (
    WATCHED,
    WATCHED_NUMBERS,
    Opens,
    build_notify_filter,
    watched_calls,
)
from corral.errors import SandboxUnavailable

NOTIFY = "notify"
ALLOW = "allow"
HEADERS = {
    "x86_64": "/usr/include/x86_64-linux-gnu/asm/unistd_64.h",
    "aarch64": "/usr/include/asm-generic/unistd.h",
}
AUDIT_ARCH_I386 = 0x40000003
HIGH = 1 << 32  # the kernel drops the upper half of an int argument; so must the filter
O_RDONLY, O_WRONLY, O_RDWR, O_CREAT, O_TRUNC = 0, 0o1, 0o2, 0o100, 0o1000
O_CLOEXEC, O_DIRECTORY, O_PATH, O_EXCL = 0o2000000, 0o200000, 0o10000000, 0o200
AT_FDCWD = (1 << 64) - 100  # -100 as the kernel hands a 64-bit register to the filter
POINTER = 0x7FFF_DEAD_0000


def run_bpf(program: bytes, *, arch: int, nr: int, args: tuple[int, ...] = ()) -> str:
    """Run `program` on one seccomp_data: "allow" or "notify" (anything else fails)."""
    data = struct.pack("<iIQ6Q", nr, arch, 0, *args, *(0,) * (6 - len(args)))
    insns = disassemble(program)
    pc, a = 0, 0
    while True:
        code, jt, jf, k = insns[pc]
        if code == 0x20:  # ld [k]
            a = struct.unpack_from("<I", data, k)[0]
            pc += 1
        elif code == 0x06:  # ret k
            verdicts = {0x7FFF0000: ALLOW, 0x7FC00000: NOTIFY}
            assert k in verdicts, f"unexpected return {k:#x}"
            return verdicts[k]
        else:
            taken = {0x15: a == k, 0x35: a >= k, 0x45: a & k != 0}[code]
            pc += 1 + (jt if taken else jf)


def decide(arch: str, opens: Opens, name: str, args: tuple[int, ...]) -> str:
    program = build_notify_filter(arch=arch, opens=opens)
    number = {"read": {"x86_64": 0, "aarch64": 63}[arch], **WATCHED_NUMBERS[arch]}[name]
    return run_bpf(program, arch=ARCHES[arch].audit_arch, nr=number, args=args)


# (call, args, verdict with "all", verdict with "writes"); openat's flags are argument 2.
OPENAT = [
    ((AT_FDCWD, POINTER, O_RDONLY | O_CLOEXEC), NOTIFY, ALLOW),  # a Python import
    ((AT_FDCWD, POINTER, O_RDONLY | O_DIRECTORY), NOTIFY, ALLOW),  # listing a directory
    ((AT_FDCWD, POINTER, O_WRONLY | O_CREAT | O_TRUNC), NOTIFY, NOTIFY),  # `> file`
    ((AT_FDCWD, POINTER, O_WRONLY | O_CREAT | O_EXCL), NOTIFY, NOTIFY),  # tar, .pyc writes
    ((AT_FDCWD, POINTER, O_RDWR), NOTIFY, NOTIFY),
    ((AT_FDCWD, POINTER, O_RDONLY | O_TRUNC), NOTIFY, NOTIFY),
    ((AT_FDCWD, POINTER, O_RDONLY | O_CREAT), NOTIFY, NOTIFY),
    ((AT_FDCWD, POINTER, HIGH | O_RDONLY), NOTIFY, ALLOW),  # the high half means nothing
    ((AT_FDCWD, POINTER, O_PATH | O_CLOEXEC), ALLOW, ALLOW),  # O_PATH reads nothing
    ((AT_FDCWD, POINTER, O_PATH | O_WRONLY), ALLOW, ALLOW),  # ... and O_PATH ignores the rest
]
OTHERS = [
    ("read", (0, POINTER, 100), ALLOW, ALLOW),  # not watched at all
    ("openat2", (AT_FDCWD, POINTER, POINTER, 24), NOTIFY, NOTIFY),  # flags are in memory
    ("utimensat", (3, 0, POINTER, 0), ALLOW, ALLOW),  # NULL path: futimens on fd 3
    ("utimensat", (AT_FDCWD, POINTER, POINTER, 0), NOTIFY, NOTIFY),
    ("utimensat", (3, HIGH, 0, 0), NOTIFY, NOTIFY),  # a pointer is 64 bits: not NULL
    ("mkdirat", (AT_FDCWD, POINTER, 0o755), NOTIFY, NOTIFY),
    ("unlinkat", (AT_FDCWD, POINTER, 0), NOTIFY, NOTIFY),
    ("renameat2", (AT_FDCWD, POINTER, AT_FDCWD, POINTER, 0), NOTIFY, NOTIFY),
    ("fchmodat", (AT_FDCWD, POINTER, 0o600), NOTIFY, NOTIFY),
    ("setxattr", (POINTER, POINTER, POINTER, 4, 0), NOTIFY, NOTIFY),
    ("chdir", (POINTER,), NOTIFY, NOTIFY),  # keeps the supervisor's working directories true
]


@pytest.mark.parametrize("arch", sorted(ARCHES))
@pytest.mark.parametrize(("args", "all_opens", "writes_only"), OPENAT)
def test_opens_are_notified_by_their_flags(
    arch: str, args: tuple[int, ...], all_opens: str, writes_only: str
) -> None:
    assert decide(arch, "all", "openat", args) == all_opens
    assert decide(arch, "writes", "openat", args) == writes_only


@pytest.mark.parametrize("arch", sorted(ARCHES))
@pytest.mark.parametrize(("name", "args", "all_opens", "writes_only"), OTHERS)
def test_other_calls(
    arch: str, name: str, args: tuple[int, ...], all_opens: str, writes_only: str
) -> None:
    assert decide(arch, "all", name, args) == all_opens
    assert decide(arch, "writes", name, args) == writes_only


@pytest.mark.parametrize("opens", ["all", "writes"])
def test_x86_64_legacy_calls_are_watched_like_their_at_forms(opens: Opens) -> None:
    assert decide("x86_64", opens, "open", (POINTER, O_WRONLY)) == NOTIFY
    assert decide("x86_64", opens, "open", (POINTER, O_PATH)) == ALLOW
    expected_read = NOTIFY if opens == "all" else ALLOW
    assert decide("x86_64", opens, "open", (POINTER, O_RDONLY)) == expected_read
    for name in ("creat", "mkdir", "rmdir", "unlink", "rename", "link", "symlink", "chmod"):
        assert decide("x86_64", opens, name, (POINTER, POINTER)) == NOTIFY


@pytest.mark.parametrize("arch", sorted(ARCHES))
def test_every_watched_call_is_notified(arch: str) -> None:
    program = build_notify_filter(arch=arch)
    audit_arch = ARCHES[arch].audit_arch
    for number, call in watched_calls(arch).items():
        # Pointers everywhere but flags: O_WRONLY for open (argument 1) and openat (2).
        args = (POINTER, O_WRONLY, O_WRONLY, POINTER, POINTER, 0)
        assert run_bpf(program, arch=audit_arch, nr=number, args=args) == NOTIFY, call.name


def test_foreign_and_x32_calls_are_left_to_corrals_own_filter() -> None:
    # corral's filter kills a foreign ABI and refuses x32, and its verdict outranks this one.
    program = build_notify_filter(arch="x86_64")
    openat = WATCHED_NUMBERS["x86_64"]["openat"]
    args = (AT_FDCWD, POINTER, O_WRONLY)
    assert run_bpf(program, arch=AUDIT_ARCH_I386, nr=5, args=args) == ALLOW
    assert run_bpf(program, arch=0xC000003E, nr=0x40000000 | openat, args=args) == ALLOW
    assert run_bpf(program, arch=0xC000003E, nr=openat, args=args) == NOTIFY


def test_aarch64_has_only_the_at_forms() -> None:
    names = {call.name for call in watched_calls("aarch64").values()}
    assert "openat" in names and "mkdirat" in names
    assert not names & {"open", "creat", "mkdir", "rename", "chmod", "utimes"}
    assert {call.name for call in watched_calls("x86_64").values()} == {c.name for c in WATCHED}


def test_unknown_arch_is_a_machine_problem() -> None:
    with pytest.raises(SandboxUnavailable, match="riscv64"):
        build_notify_filter(arch="riscv64")


@pytest.mark.parametrize("arch", sorted(ARCHES))
def test_syscall_numbers_match_the_kernel_headers(arch: str) -> None:
    header = HEADERS[arch]
    if not os.path.exists(header):
        pytest.skip(f"{header} is missing: install linux-libc-dev to check the {arch} table")
    with open(header, encoding="utf-8") as f:
        text = f.read()
    # The generic table names some 64-bit calls __NR3264_x (truncate on aarch64).
    pattern = r"#define __NR(?:3264)?_(\w+)\s+(\d+)"
    numbers = {m[0]: int(m[1]) for m in re.findall(pattern, text)}
    table = WATCHED_NUMBERS[arch]
    checked = {name: nr for name, nr in table.items() if name in numbers}
    assert checked == {name: numbers[name] for name in checked}
    # Older headers may lack the newest calls, never more than those.
    assert set(table) - set(numbers) <= {"fchmodat2", "setxattrat", "removexattrat"}
