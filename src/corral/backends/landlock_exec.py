"""A native launcher that applies a prepared Landlock ruleset, then execs the command.

Landlock must be applied by the sandboxed process itself, after bubblewrap's mounts (Landlock
forbids mounting), so something has to run inside the sandbox before the command. A Python
launcher (corral.inner) costs a whole interpreter start, about 15 ms here, on every command;
this one is a static x86_64 ELF of about 200 bytes, generated below like the seccomp program,
that makes only system calls:

    [inherited terminal only]  rt_sigaction(SIGINT/SIGQUIT, SIG_DFL)
    prctl(PR_SET_NO_NEW_PRIVS, 1)           or exit 125
    landlock_restrict_self(RULES_FD, 0)     or exit 125
    close(RULES_FD); close(SELF_FD)
    execve(argv[1], &argv[2], envp)         or exit 127

The ruleset is built on the host (`inner.prepare`) and handed in as RULES_FD; both fd numbers
are baked into the code. The command path is resolved by the caller (no PATH search here).
Host-built rules work inside because Landlock follows a path up through mount points: a file
in the sandbox's private /tmp or /dev is beneath the host directory it is mounted on.

Other architectures, and kernels that refuse to execute memfds (vm.memfd_noexec), use
corral.inner instead.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

BASE_ADDRESS = 0x400000
HEADERS = 64 + 56  # one ELF header, one program header
EXIT_LAUNCHER = 125
EXIT_NOT_FOUND = 127

SYS_RT_SIGACTION = 13
SYS_OPENAT = 257
SYS_LANDLOCK_ADD_RULE = 445
LANDLOCK_RULE_PATH_BENEATH = 1
AT_FDCWD = -100
O_PATH = 0o10000000
O_CLOEXEC = 0o2000000
SYS_CLOSE = 3
SYS_EXECVE = 59
SYS_PRCTL = 157
SYS_EXIT_GROUP = 231
SYS_LANDLOCK_RESTRICT_SELF = 446
PR_SET_NO_NEW_PRIVS = 38


def _imm(value: int) -> bytes:
    return struct.pack("<I", value)


def _call(number: int, first: int) -> bytes:
    """mov eax, number; mov edi, first"""
    return b"\xb8" + _imm(number) + b"\xbf" + _imm(first)


SYSCALL = b"\x0f\x05"
TEST_RAX = b"\x48\x85\xc0"  # test rax, rax


def _reset_terminal_signals() -> bytes:
    """SIGINT and SIGQUIT back to SIG_DFL (bwrap was started with them ignored)."""
    zeroed_sigaction = bytes.fromhex(
        "4883ec20"  # sub rsp, 32          (a struct sigaction on the stack)
        "31c0"  # xor eax, eax
        "48890424"  # mov [rsp], rax       (sa_handler = SIG_DFL)
        "4889442408"  # mov [rsp+8], rax   (sa_flags)
        "4889442410"  # mov [rsp+16], rax  (sa_restorer)
        "4889442418"  # mov [rsp+24], rax  (sa_mask)
    )
    code = zeroed_sigaction
    for signal_number in (2, 3):
        code += _call(SYS_RT_SIGACTION, signal_number)
        code += bytes.fromhex("4889e631d2")  # mov rsi, rsp; xor edx, edx
        code += b"\x41\xba" + _imm(8) + SYSCALL  # mov r10d, 8 (sigset size); syscall
    return code + bytes.fromhex("4883c420")  # add rsp, 32


def _exit(status: int) -> bytes:
    return _call(SYS_EXIT_GROUP, status) + SYSCALL


class _Jump(NamedTuple):
    opcode: bytes  # jnz: 0f 85, js: 0f 88 (rel32 forms)
    label: str


class _LeaRsi(NamedTuple):
    label: str  # lea rsi, [rip + label]


class _Label(NamedTuple):
    name: str


_Item = bytes | _Jump | _LeaRsi | _Label


def _assemble(items: list[_Item]) -> bytes:
    """Two passes: place the labels, then emit with rip-relative displacements."""
    sizes = {_Jump: 6, _LeaRsi: 7, _Label: 0}
    labels: dict[str, int] = {}
    position = 0
    for item in items:
        if isinstance(item, _Label):
            labels[item.name] = position
        position += len(item) if isinstance(item, bytes) else sizes[type(item)]
    out = b""
    for item in items:
        if isinstance(item, bytes):
            out += item
        elif isinstance(item, _Jump):
            out += item.opcode + struct.pack("<i", labels[item.label] - (len(out) + 6))
        elif isinstance(item, _LeaRsi):
            out += b"\x48\x8d\x35" + struct.pack("<i", labels[item.label] - (len(out) + 7))
    return out


def _add_inside_rule(rules_fd: int, access: int, label: str) -> list[_Item]:
    """openat(AT_FDCWD, path, O_PATH|O_CLOEXEC) and landlock_add_rule(PATH_BENEATH) for a
    directory that exists only inside the sandbox (its private /tmp, /dev/pts, /dev/shm):
    Landlock skips the directory a mount hides, so a host-side rule cannot reach these."""
    return [
        _call(SYS_OPENAT, AT_FDCWD & 0xFFFFFFFF),
        _LeaRsi(label),
        b"\xba" + _imm(O_PATH | O_CLOEXEC) + bytes.fromhex("4531d2") + SYSCALL,  # edx; r10 = 0
        TEST_RAX,
        _Jump(b"\x0f\x88", "fail"),  # js: openat failed
        bytes.fromhex("4989c44883ec10"),  # mov r12, rax; sub rsp, 16
        b"\x48\xb8" + struct.pack("<Q", access) + bytes.fromhex("48890424"),  # [rsp] = access
        bytes.fromhex("4489642408"),  # mov [rsp+8], r12d     (the parent fd)
        _call(SYS_LANDLOCK_ADD_RULE, rules_fd) + b"\xbe" + _imm(LANDLOCK_RULE_PATH_BENEATH),
        bytes.fromhex("4889e24531d2") + SYSCALL,  # mov rdx, rsp; xor r10d, r10d
        bytes.fromhex("4883c4104989c5"),  # add rsp, 16; mov r13, rax
        b"\xb8" + _imm(SYS_CLOSE) + bytes.fromhex("4489e7") + SYSCALL,  # close(r12)
        bytes.fromhex("4d85ed"),  # test r13, r13
        _Jump(b"\x0f\x85", "fail"),
    ]


def x86_64_code(
    *,
    rules_fd: int,
    self_fd: int,
    reset_terminal_signals: bool,
    inside_paths: tuple[str, ...] = (),
    inside_access: int = 0,
) -> bytes:
    items: list[_Item] = []
    if reset_terminal_signals:
        items.append(_reset_terminal_signals())
    prctl = _call(SYS_PRCTL, PR_SET_NO_NEW_PRIVS) + b"\xbe" + _imm(1)  # mov esi, 1
    items += [prctl + bytes.fromhex("31d24531d24531c0") + SYSCALL + TEST_RAX]
    items.append(_Jump(b"\x0f\x85", "fail"))
    for index, _path in enumerate(inside_paths):
        items += _add_inside_rule(rules_fd, inside_access, f"path{index}")
    restrict = _call(SYS_LANDLOCK_RESTRICT_SELF, rules_fd) + b"\x31\xf6" + SYSCALL + TEST_RAX
    items += [restrict, _Jump(b"\x0f\x85", "fail")]
    items.append(_call(SYS_CLOSE, rules_fd) + SYSCALL + _call(SYS_CLOSE, self_fd) + SYSCALL)
    execve = bytes.fromhex(
        "488b7c2410"  # mov rdi, [rsp+16]      argv[1]: the command's path
        "488d742418"  # lea rsi, [rsp+24]      &argv[2]: its argv
        "488b0424"  # mov rax, [rsp]           argc
        "488d54c410"  # lea rdx, [rsp+rax*8+16] envp
    )
    items.append(execve + b"\xb8" + _imm(SYS_EXECVE) + SYSCALL)
    items.append(_exit(EXIT_NOT_FOUND))  # reached only when execve failed
    items += [_Label("fail"), _exit(EXIT_LAUNCHER)]
    for index, path in enumerate(inside_paths):
        items += [_Label(f"path{index}"), path.encode() + b"\0"]
    return _assemble(items)


def elf_image(code: bytes) -> bytes:
    """A static little-endian x86_64 executable: one read+execute segment, entry after the
    headers."""
    total = HEADERS + len(code)
    ident = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)  # 64-bit, little-endian, SysV
    header = ident + struct.pack(
        "<HHIQQQIHHHHHH", 2, 0x3E, 1, BASE_ADDRESS + HEADERS, 64, 0, 0, 64, 56, 1, 0, 0, 0
    )
    segment = struct.pack("<IIQQQQQQ", 1, 5, 0, BASE_ADDRESS, BASE_ADDRESS, total, total, 0x1000)
    return header + segment + code


def launcher_image(
    arch: str,
    *,
    rules_fd: int,
    self_fd: int,
    reset_terminal_signals: bool,
    inside_paths: tuple[str, ...],
    inside_access: int,
) -> bytes | None:
    """The launcher for `arch`, or None where there is none (use corral.inner there)."""
    if arch != "x86_64":
        return None
    code = x86_64_code(
        rules_fd=rules_fd,
        self_fd=self_fd,
        reset_terminal_signals=reset_terminal_signals,
        inside_paths=inside_paths,
        inside_access=inside_access,
    )
    return elf_image(code)
