"""The seccomp program as data: golden instructions, decisions read by an independent BPF
interpreter for both architectures, the syscall tables against the kernel headers, the docs.

The kernel itself runs the program in test_seccomp_kernel.py; here the aarch64 output, which
this machine cannot run, is judged by `run_bpf`, a 20-line interpreter written from the
classic-BPF definition rather than from the assembler.
"""

from __future__ import annotations

import errno
import os
import re
import struct

import pytest

from corral.backends.seccomp import (
    ALWAYS_DENIED,
    PTRACE_DENIED,
    SeccompOptions,
    arg_rules,
    build_filter,
    install,
)
from corral.backends.seccomp_bpf import (
    ARCHES,
    BPF_JEQ,
    Insn,
    Label,
    assemble,
    disassemble,
    jump,
    ret,
)
from corral.errors import SandboxUnavailable

DOCS = os.path.join(os.path.dirname(__file__), "..", "docs", "seccomp.md")
HEADERS = {
    "x86_64": "/usr/include/x86_64-linux-gnu/asm/unistd_64.h",
    "aarch64": "/usr/include/asm-generic/unistd.h",
}
AUDIT_ARCH_I386 = 0x40000003
AUDIT_ARCH_ARM = 0x40000028

ALLOW = "allow"
KILL = "kill"


def run_bpf(program: bytes, *, arch: int, nr: int, args: tuple[int, ...] = ()) -> str | int:
    """Run `program` on one seccomp_data: "allow", "kill", or the errno it returns."""
    data = struct.pack("<iIQ6Q", nr, arch, 0, *args, *(0,) * (6 - len(args)))
    insns = disassemble(program)
    pc, a = 0, 0
    while True:
        code, jt, jf, k = insns[pc]
        if code == 0x20:  # ld [k]
            a = struct.unpack_from("<I", data, k)[0]
            pc += 1
        elif code == 0x06:  # ret k
            if k == 0x7FFF0000:
                return ALLOW
            if k == 0x80000000:
                return KILL
            assert k & 0xFFFF0000 == 0x00050000, hex(k)
            return k & 0xFFFF
        else:
            taken = {0x15: a == k, 0x35: a >= k, 0x45: a & k != 0}[code]
            pc += 1 + (jt if taken else jf)


NONE = SeccompOptions("none")
LOCAL = SeccompOptions("local")
OPEN = SeccompOptions("filtered", allow_unix_sockets=True, allow_ptrace=True)
HIGH = 1 << 32  # the kernel drops the upper half of int arguments; the filter must too

# (options, syscall, args, verdict): the accepted and the refused halves of every rule.
DECISIONS = [
    (NONE, "read", (), ALLOW),
    (NONE, "seccomp", (), ALLOW),
    (NONE, "socket", (1, 1, 0), errno.EPERM),
    (NONE, "socket", (HIGH | 1, 1, 0), errno.EPERM),
    (OPEN, "socket", (1, 1, 0), ALLOW),
    (NONE, "socket", (2, 1, 0), errno.EACCES),
    (NONE, "socket", (10, 1, 0), errno.EACCES),
    (NONE, "socket", (17, 3, 0), errno.EACCES),
    (LOCAL, "socket", (2, 1, 0), ALLOW),
    (LOCAL, "socket", (10, 1, 0), ALLOW),
    (OPEN, "socket", (17, 3, 0), ALLOW),
    (NONE, "socket", (16, 3, 0), ALLOW),
    (OPEN, "socket", (40, 1, 0), errno.EACCES),
    (NONE, "ioctl", (0, 0x5412, 0), errno.EPERM),
    (NONE, "ioctl", (0, HIGH | 0x5412, 0), errno.EPERM),
    (OPEN, "ioctl", (0, 0x541C, 0), errno.EPERM),
    (NONE, "ioctl", (0x5412, 0x5413, 0), ALLOW),  # TIOCGWINSZ; fd equal to TIOCSTI is fine
    (NONE, "clone", (0x10000000 | 17,), errno.EPERM),
    (NONE, "clone", (0x00020000 | 17,), errno.EPERM),
    (NONE, "clone", (0x003D0F00,), ALLOW),  # what glibc passes for a thread
    (NONE, "clone", (0x01200011,), ALLOW),  # what glibc passes for fork
    (NONE, "clone", (0x80 | 17,), ALLOW),  # 0x80 is part of the exit signal in clone(2)
    (NONE, "unshare", (0x10000000,), errno.EPERM),
    (NONE, "unshare", (0x80,), errno.EPERM),  # CLONE_NEWTIME
    (NONE, "unshare", (0x400,), ALLOW),  # CLONE_FILES
    (NONE, "clone3", (0, 88), errno.ENOSYS),
    (NONE, "personality", (0xFFFFFFFF,), ALLOW),
    (NONE, "personality", (0,), ALLOW),
    (NONE, "personality", (0x0040000,), errno.EPERM),
    (NONE, "personality", (HIGH | 0x0040000,), errno.EPERM),
    (NONE, "personality", (0x0400000,), ALLOW),  # READ_IMPLIES_EXEC: not this rule's business
    (NONE, "ptrace", (), errno.EPERM),
    (OPEN, "ptrace", (), ALLOW),
    (OPEN, "process_vm_writev", (), ALLOW),
    *((NONE, d.syscall, (), d.errno) for d in ALWAYS_DENIED + PTRACE_DENIED),
    *((OPEN, d.syscall, (), d.errno) for d in ALWAYS_DENIED),
]

READ = {"x86_64": 0, "aarch64": 63}  # an allowed call, not in the tables


def number(arch: str, name: str) -> int:
    return READ[arch] if name == "read" else ARCHES[arch].syscalls[name]


@pytest.mark.parametrize("arch", sorted(ARCHES))
@pytest.mark.parametrize(("options", "syscall", "args", "verdict"), DECISIONS)
def test_decision(
    arch: str, options: SeccompOptions, syscall: str, args: tuple[int, ...], verdict: str | int
) -> None:
    program = build_filter(options, arch=arch)
    audit = ARCHES[arch].audit_arch
    assert run_bpf(program, arch=audit, nr=number(arch, syscall), args=args) == verdict


@pytest.mark.parametrize(
    ("arch", "foreign"), [("x86_64", AUDIT_ARCH_I386), ("aarch64", AUDIT_ARCH_ARM)]
)
def test_foreign_abi_is_killed_even_for_harmless_calls(arch: str, foreign: int) -> None:
    program = build_filter(OPEN, arch=arch)
    assert run_bpf(program, arch=foreign, nr=20) == KILL  # getpid on i386
    assert run_bpf(program, arch=ARCHES[arch].audit_arch, nr=number(arch, "read")) == ALLOW


def test_x32_calls_are_refused_but_a_tracer_skip_is_not() -> None:
    program = build_filter(OPEN, arch="x86_64")
    x86_64 = ARCHES["x86_64"].audit_arch
    assert run_bpf(program, arch=x86_64, nr=0x40000000 | 39) == errno.EPERM
    assert run_bpf(program, arch=x86_64, nr=0x40000000 | 0) == errno.EPERM
    assert run_bpf(program, arch=x86_64, nr=-1) == ALLOW  # the kernel answers ENOSYS itself
    aarch64 = build_filter(OPEN, arch="aarch64")
    assert run_bpf(aarch64, arch=ARCHES["aarch64"].audit_arch, nr=0x40000000 | 39) == ALLOW


def test_golden_program_for_network_none_on_x86_64() -> None:
    insns = disassemble(build_filter(NONE, arch="x86_64"))
    assert len(insns) == 76
    assert insns[:8] == [
        (0x20, 0, 0, 4),  # A = arch
        (0x15, 1, 0, 0xC000003E),  # == AUDIT_ARCH_X86_64: skip the kill
        (0x06, 0, 0, 0x80000000),  # SECCOMP_RET_KILL_PROCESS
        (0x20, 0, 0, 0),  # A = nr
        (0x15 + 0x20, 0, 1, 0x40000000),  # x32 bit set?
        (0x15, 0, 67, 0xFFFFFFFF),  # -1 goes on, the rest to EPERM
        (0x15, 44, 0, 41),  # socket: its argument block
        (0x15, 50, 0, 16),  # ioctl
    ]
    assert insns[-5:] == [
        (0x06, 0, 0, 0x7FFF0000),  # the last argument block's allow
        (0x06, 0, 0, 0x7FFF0000),  # "allow"
        (0x06, 0, 0, 0x00050000 | errno.EPERM),
        (0x06, 0, 0, 0x00050000 | errno.EACCES),
        (0x06, 0, 0, 0x00050000 | errno.ENOSYS),
    ]


def test_aarch64_program_checks_its_own_arch_and_has_no_x32_test() -> None:
    insns = disassemble(build_filter(NONE, arch="aarch64"))
    assert insns[1] == (0x15, 1, 0, 0xC00000B7)
    assert insns[3:5] == [(0x20, 0, 0, 0), (0x15, 44, 0, 198)]  # A = nr; socket
    assert len(insns) == 74


@pytest.mark.parametrize("options", [NONE, LOCAL, OPEN, SeccompOptions("filtered")])
def test_every_option_set_builds_on_every_arch(options: SeccompOptions) -> None:
    for arch in ARCHES:
        program = build_filter(options, arch=arch)
        assert len(program) % 8 == 0
        assert 60 < len(program) // 8 < 100


def test_unknown_arch_is_a_machine_problem() -> None:
    with pytest.raises(SandboxUnavailable, match="riscv64"):
        build_filter(NONE, arch="riscv64")


@pytest.mark.parametrize("arch", sorted(ARCHES))
def test_syscall_numbers_match_the_kernel_headers(arch: str) -> None:
    header = HEADERS[arch]
    if not os.path.exists(header):
        pytest.skip(f"{header} is missing: install linux-libc-dev to check the {arch} table")
    with open(header, encoding="utf-8") as f:
        numbers = {m[0]: int(m[1]) for m in re.findall(r"#define __NR_(\w+)\s+(\d+)", f.read())}
    assert "socketcall" not in numbers  # socket(2) is a real syscall: arg 0 is the family
    checked = {name: nr for name, nr in ARCHES[arch].syscalls.items() if name in numbers}
    assert checked == {name: numbers[name] for name in checked}
    # Older headers may lack the newest calls, never more than those.
    assert set(ARCHES[arch].syscalls) - set(numbers) <= {"open_tree_attr"}


def test_docs_name_every_rule() -> None:
    with open(DOCS, encoding="utf-8") as f:
        docs = f.read()
    names = {d.syscall for d in ALWAYS_DENIED + PTRACE_DENIED}
    names |= {rule.syscall for rule in arg_rules(NONE)}
    missing = sorted(name for name in names if f"`{name}`" not in docs)
    assert missing == []
    for word in ("TIOCSTI", "TIOCLINUX", "AF_VSOCK", "ADDR_NO_RANDOMIZE", "CLONE_NEWUSER", "x32"):
        assert word in docs


BAD_PROGRAMS: list[tuple[list[Insn | Label], str]] = [
    ([jump(BPF_JEQ, 1, then="nowhere"), ret(0)], "undefined label"),
    ([Label("back"), ret(0), jump(BPF_JEQ, 1, then="back"), ret(0)], "out of range"),
    ([jump(BPF_JEQ, 1, then="far"), *[ret(0)] * 256, Label("far"), ret(0)], "out of range"),
    ([jump(BPF_JEQ, 1, then=1)], "out of range"),
    ([], "1 to 4096"),
]


@pytest.mark.parametrize(("items", "message"), BAD_PROGRAMS)
def test_assembler_refuses_what_the_kernel_would(items: list[Insn | Label], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        assemble(items)


def test_assembler_reaches_255_forward() -> None:
    program = assemble([jump(BPF_JEQ, 1, then="far"), *[ret(0)] * 255, Label("far"), ret(1)])
    assert disassemble(program)[0] == (0x15, 255, 0, 1)


@pytest.mark.parametrize("program", [b"", b"\x06\x00\x00\x00"])
def test_install_refuses_a_malformed_program_before_touching_the_process(program: bytes) -> None:
    with pytest.raises(OSError) as raised:
        install(program)
    assert raised.value.errno == errno.EINVAL
