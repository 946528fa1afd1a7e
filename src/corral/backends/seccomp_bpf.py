"""Classic BPF for seccomp: the opcodes, a label-resolving assembler and the syscall tables.

A seccomp filter is an array of `struct sock_filter { u16 code; u8 jt; u8 jf; u32 k; }` run by
the kernel on every system call against `struct seccomp_data`:

    offset 0   int  nr                  the system call number
    offset 4   u32  arch                an AUDIT_ARCH_* value: which entry path was used
    offset 8   u64  instruction_pointer
    offset 16  u64  args[6]             arg i is at 16 + 8*i; its low half first (little-endian)

Only the few instructions a deny list needs are provided: load a 32-bit word, jump on
equal / greater-or-equal / any-bit-set against a constant, return a constant. Conditional jumps
go forward only and by at most 255 instructions, so the assembler works on labels and checks
every distance; the result is the packed array, ready for bwrap's `--seccomp FD` or prctl.

Both supported architectures are little-endian, so the array is always packed little-endian
and arguments' low halves sit at the lower offset, whatever machine builds the program.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from typing import NamedTuple

# Instruction classes and modes, from <linux/bpf_common.h>.
BPF_LD_W_ABS = 0x00 | 0x00 | 0x20  # BPF_LD | BPF_W | BPF_ABS: A = *(u32 *)(data + k)
BPF_JEQ = 0x05 | 0x10  # BPF_JMP | BPF_JEQ | BPF_K: A == k
BPF_JGE = 0x05 | 0x30  # BPF_JMP | BPF_JGE | BPF_K: A >= k (unsigned)
BPF_JSET = 0x05 | 0x40  # BPF_JMP | BPF_JSET | BPF_K: A & k != 0
BPF_RET = 0x06  # BPF_RET | BPF_K: return k

# Return values, from <linux/seccomp.h>. KILL_PROCESS needs Linux 4.14.
SECCOMP_RET_KILL_PROCESS = 0x80000000
SECCOMP_RET_ERRNO = 0x00050000
SECCOMP_RET_ALLOW = 0x7FFF0000

# Offsets into struct seccomp_data.
OFFSET_NR = 0
OFFSET_ARCH = 4


def offset_arg_low(index: int) -> int:
    """Where the low 32 bits of argument `index` live (little-endian: the first half)."""
    return 16 + 8 * index


# BPF_MAXINSNS: the kernel refuses longer filters.
MAX_INSTRUCTIONS = 4096
MAX_JUMP = 255  # jt and jf are u8


class Insn(NamedTuple):
    """One instruction; `jt`/`jf` are a label name or a literal skip count."""

    code: int
    k: int = 0
    jt: str | int = 0
    jf: str | int = 0


class Label(NamedTuple):
    """A jump target; takes no room in the program."""

    name: str


def load(offset: int) -> Insn:
    return Insn(BPF_LD_W_ABS, offset)


def jump(code: int, k: int, *, then: str | int = 0, otherwise: str | int = 0) -> Insn:
    return Insn(code, k, then, otherwise)


def ret(action: int) -> Insn:
    return Insn(BPF_RET, action)


def ret_errno(errno: int) -> Insn:
    return Insn(BPF_RET, SECCOMP_RET_ERRNO | errno)


def assemble(items: Sequence[Insn | Label]) -> bytes:
    """Resolve labels into relative jumps and pack the program.

    Raises ValueError for an undefined or backward label, a jump past 255 instructions or a
    program the kernel would refuse for its length: all mistakes in the caller's code.
    """
    targets: dict[str, int] = {}
    program: list[Insn] = []
    for item in items:
        if isinstance(item, Label):
            targets[item.name] = len(program)
        else:
            program.append(item)
    if not 0 < len(program) <= MAX_INSTRUCTIONS:
        raise ValueError(f"a seccomp program has 1 to {MAX_INSTRUCTIONS} instructions")

    def distance(at: int, target: str | int) -> int:
        if isinstance(target, int):
            skip = target
        elif target in targets:
            skip = targets[target] - at - 1
        else:
            raise ValueError(f"jump to undefined label {target!r}")
        if not 0 <= skip <= MAX_JUMP or at + skip + 1 >= len(program):
            raise ValueError(f"instruction {at}: jump to {target!r} out of range ({skip})")
        return skip

    packed = bytearray()
    for at, insn in enumerate(program):
        jt = distance(at, insn.jt) if insn.code & 0x07 == 0x05 else 0
        jf = distance(at, insn.jf) if insn.code & 0x07 == 0x05 else 0
        packed += struct.pack("<HBBI", insn.code, jt, jf, insn.k)
    return bytes(packed)


def disassemble(program: bytes) -> list[tuple[int, int, int, int]]:
    """The program as (code, jt, jf, k) tuples: for tests and for showing a filter."""
    return list(struct.iter_unpack("<HBBI", program))


class ArchTable(NamedTuple):
    audit_arch: int
    """AUDIT_ARCH_* of the native 64-bit entry path; any other value is a foreign entry."""
    x32_bit: int
    """Syscall-number bit that selects the x32 ABI (x86_64 only; 0 where there is none)."""
    syscalls: Mapping[str, int]


# Numbers from arch/x86/entry/syscalls/syscall_64.tbl and, for aarch64, the generic table
# (include/uapi/asm-generic/unistd.h; from 6.11 arch/arm64/tools/syscall_64.tbl). Neither
# architecture has socketcall(2): socket(2) is always a real syscall with the family in arg 0.
# Syscalls numbered 403 and up share one number on every architecture.
_X86_64 = {
    "ioctl": 16,
    "socket": 41,
    "clone": 56,
    "ptrace": 101,
    "personality": 135,
    "pivot_root": 155,
    "acct": 163,
    "mount": 165,
    "umount2": 166,
    "swapon": 167,
    "swapoff": 168,
    "reboot": 169,
    "init_module": 175,
    "delete_module": 176,
    "quotactl": 179,
    "lookup_dcookie": 212,
    "kexec_load": 246,
    "add_key": 248,
    "request_key": 249,
    "keyctl": 250,
    "unshare": 272,
    "perf_event_open": 298,
    "name_to_handle_at": 303,
    "open_by_handle_at": 304,
    "setns": 308,
    "process_vm_readv": 310,
    "process_vm_writev": 311,
    "finit_module": 313,
    "seccomp": 317,
    "kexec_file_load": 320,
    "bpf": 321,
    "userfaultfd": 323,
}
_AARCH64 = {
    "lookup_dcookie": 18,
    "ioctl": 29,
    "umount2": 39,
    "mount": 40,
    "pivot_root": 41,
    "quotactl": 60,
    "acct": 89,
    "personality": 92,
    "unshare": 97,
    "kexec_load": 104,
    "init_module": 105,
    "delete_module": 106,
    "ptrace": 117,
    "reboot": 142,
    "socket": 198,
    "add_key": 217,
    "request_key": 218,
    "keyctl": 219,
    "clone": 220,
    "swapon": 224,
    "swapoff": 225,
    "perf_event_open": 241,
    "name_to_handle_at": 264,
    "open_by_handle_at": 265,
    "setns": 268,
    "process_vm_readv": 270,
    "process_vm_writev": 271,
    "finit_module": 273,
    "seccomp": 277,
    "bpf": 280,
    "userfaultfd": 282,
    "kexec_file_load": 294,
}
_COMMON = {
    "io_uring_setup": 425,
    "io_uring_enter": 426,
    "io_uring_register": 427,
    "open_tree": 428,
    "move_mount": 429,
    "fsopen": 430,
    "fsconfig": 431,
    "fsmount": 432,
    "fspick": 433,
    "clone3": 435,
    "mount_setattr": 442,
    "quotactl_fd": 443,
    "open_tree_attr": 467,
}

ARCHES: Mapping[str, ArchTable] = {
    "x86_64": ArchTable(0xC000003E, 0x40000000, {**_X86_64, **_COMMON}),
    "aarch64": ArchTable(0xC00000B7, 0, {**_AARCH64, **_COMMON}),
}
