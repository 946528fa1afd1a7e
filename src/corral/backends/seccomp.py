"""seccomp: a fixed deny list becomes a classic-BPF program, and a thin installer.

`build_filter` is a pure function from `SeccompOptions` to the packed `struct sock_filter`
array that bwrap's `--seccomp FD` (or `install`) loads. The program is generated here rather
than through libseccomp: for one fixed rule list, emitting the ~90 instructions ourselves is
simpler than a C binding, costs no dependency and no import time, and lets the tests read the
exact program. `seccomp_bpf.py` holds the assembler and the syscall numbers per architecture.

The model (checked in this order, first match wins):
1. The architecture comes first. A system call entering through a foreign ABI (i386 via
   `int 0x80` on x86_64, arm32 compat on aarch64) carries other numbers, so the rest of the
   program would judge the wrong calls: the process is killed. x32 calls (the 0x40000000 bit
   on x86_64) reuse the native numbers under another ABI; they fail with EPERM.
2. Everything is allowed unless a rule below names it: the sandboxed program is an arbitrary
   developer tool, and the namespaces and Landlock do the confining. This layer removes kernel
   attack surface and closes what namespaces leave open (the user's keyring, the terminal's
   input queue, vsock, nested namespaces).
3. A denial returns an errno (EPERM unless a rule says otherwise) so programs see an ordinary
   failure and can fall back; nothing but a foreign ABI is killed.
4. Arguments are compared on their low 32 bits only. Every argument checked here is an `int`
   or `unsigned int` to the kernel (or, for clone/unshare, has all its checked bits there), so
   the kernel ignores the high half and the filter must too: checking all 64 bits would let
   `socket(0x1_00000001, ...)` pass as "not AF_UNIX" and still create a unix socket.

Every rule, what it stops and what it breaks is in docs/seccomp.md; `denials` and `arg_rules`
are the same tables as data. Each syscall without argument checks depends only on the system
call number, so Linux 5.11+ caches the verdict for allowed calls and skips the filter.
"""

from __future__ import annotations

import errno
import os
from typing import NamedTuple

from corral.backends.seccomp_bpf import (
    ARCHES,
    BPF_JEQ,
    BPF_JGE,
    BPF_JSET,
    OFFSET_ARCH,
    OFFSET_NR,
    SECCOMP_RET_ALLOW,
    SECCOMP_RET_KILL_PROCESS,
    ArchTable,
    Insn,
    Label,
    assemble,
    jump,
    load,
    offset_arg_low,
    ret,
    ret_errno,
)
from corral.errors import SandboxUnavailable
from corral.policy.model import NetworkAccess

AF_UNIX = 1
AF_INET = 2
AF_INET6 = 10
AF_NETLINK = 16  # allowed: glibc and iproute query links and routes through it
AF_PACKET = 17
AF_VSOCK = 40

TIOCSTI = 0x5412
TIOCLINUX = 0x541C

CLONE_NEWTIME = 0x00000080  # in clone(2) this bit is part of the exit signal, so unshare only
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
CLONE_NAMESPACES = (
    CLONE_NEWNS
    | CLONE_NEWCGROUP
    | CLONE_NEWUTS
    | CLONE_NEWIPC
    | CLONE_NEWUSER
    | CLONE_NEWPID
    | CLONE_NEWNET
)
UNSHARE_NAMESPACES = CLONE_NAMESPACES | CLONE_NEWTIME

PERSONALITY_QUERY = 0xFFFFFFFF
ADDR_NO_RANDOMIZE = 0x0040000

PR_SET_NO_NEW_PRIVS = 38
SECCOMP_SET_MODE_FILTER = 1


class SeccompOptions(NamedTuple):
    network: NetworkAccess
    """"none" also refuses socket() for AF_INET, AF_INET6 and AF_PACKET, with EACCES."""
    allow_unix_sockets: bool = False
    """False: socket(AF_UNIX) fails with EPERM; socketpair(2) stays allowed (it has no path)."""
    allow_ptrace: bool = False


class Denial(NamedTuple):
    """A system call refused whatever its arguments."""

    syscall: str
    errno: int
    why: str


class ArgRule(NamedTuple):
    """A system call refused (or, with errno None, allowed early) when an argument matches.

    `test` is "equals" (the low 32 bits equal `value`) or "any-bit" (they share a bit with it).
    Rules for one syscall run in order and must all look at the same argument.
    """

    syscall: str
    arg: int
    test: str
    value: int
    errno: int | None
    why: str


# Refused in every mode. Reasons are one line each; docs/seccomp.md has the long form.
ALWAYS_DENIED: tuple[Denial, ...] = (
    Denial("keyctl", errno.EPERM, "the keyring is per user, not per namespace: host secrets"),
    Denial("add_key", errno.EPERM, "would plant keys in the host user's keyring"),
    Denial("request_key", errno.EPERM, "reads the host user's keyring and can run upcalls"),
    Denial("bpf", errno.EPERM, "eBPF verifier and maps: a large source of kernel exploits"),
    Denial("perf_event_open", errno.EPERM, "perf events leak kernel addresses, many CVEs"),
    Denial("userfaultfd", errno.EPERM, "pauses kernel copies at will: turns races into exploits"),
    Denial("kexec_load", errno.EPERM, "replaces the running kernel"),
    Denial("kexec_file_load", errno.EPERM, "replaces the running kernel"),
    Denial("init_module", errno.EPERM, "loads kernel code"),
    Denial("finit_module", errno.EPERM, "loads kernel code"),
    Denial("delete_module", errno.EPERM, "unloads kernel code"),
    Denial("mount", errno.EPERM, "the mount table is bwrap's plan; nothing may change it"),
    Denial("umount2", errno.EPERM, "unmounting would uncover what a mount hides"),
    Denial("pivot_root", errno.EPERM, "changes the root bwrap set up"),
    Denial("move_mount", errno.EPERM, "new mount API: same as mount"),
    Denial("open_tree", errno.EPERM, "new mount API: clones mounts"),
    Denial("open_tree_attr", errno.EPERM, "new mount API (6.15): clones mounts, sets attributes"),
    Denial("fsopen", errno.EPERM, "new mount API: creates file systems"),
    Denial("fsconfig", errno.EPERM, "new mount API: configures file systems"),
    Denial("fsmount", errno.EPERM, "new mount API: same as mount"),
    Denial("fspick", errno.EPERM, "new mount API: reconfigures a mounted file system"),
    Denial("mount_setattr", errno.EPERM, "could make a read-only bind writable"),
    Denial("io_uring_setup", errno.EPERM, "io_uring runs syscalls seccomp never sees, many CVEs"),
    Denial("io_uring_enter", errno.EPERM, "io_uring: see io_uring_setup"),
    Denial("io_uring_register", errno.EPERM, "io_uring: see io_uring_setup"),
    Denial("swapon", errno.EPERM, "host administration"),
    Denial("swapoff", errno.EPERM, "host administration"),
    Denial("reboot", errno.EPERM, "host administration"),
    Denial("acct", errno.EPERM, "host administration: process accounting"),
    Denial("quotactl", errno.EPERM, "host administration: disk quotas"),
    Denial("quotactl_fd", errno.EPERM, "host administration: disk quotas"),
    Denial("lookup_dcookie", errno.EPERM, "profiling interface that names host paths"),
    Denial("setns", errno.EPERM, "joining a namespace is the way out of one"),
    Denial("name_to_handle_at", errno.EPERM, 'file handles: the "shocker" escape, half one'),
    Denial("open_by_handle_at", errno.EPERM, 'file handles: opens any file on the fs ("shocker")'),
    Denial("clone3", errno.ENOSYS, "flags live in memory seccomp cannot read; libc falls back"),
)

# Refused unless allow_ptrace: each reads or writes another process's memory.
PTRACE_DENIED: tuple[Denial, ...] = (
    Denial("ptrace", errno.EPERM, "controls other sandboxed processes, reads their secrets"),
    Denial("process_vm_readv", errno.EPERM, "reads another process's memory"),
    Denial("process_vm_writev", errno.EPERM, "writes another process's memory"),
)


def denials(options: SeccompOptions) -> tuple[Denial, ...]:
    return ALWAYS_DENIED if options.allow_ptrace else PTRACE_DENIED + ALWAYS_DENIED


def arg_rules(options: SeccompOptions) -> tuple[ArgRule, ...]:
    rules: list[ArgRule] = []
    if not options.allow_unix_sockets:
        rules.append(
            ArgRule("socket", 0, "equals", AF_UNIX, errno.EPERM, "unix sockets reach host daemons")
        )
    if options.network == "none":
        for family in (AF_INET, AF_INET6, AF_PACKET):
            rules.append(ArgRule("socket", 0, "equals", family, errno.EACCES, "no network at all"))
    # vsock is not confined by network namespaces: in a VM it reaches the hypervisor's host.
    rules.append(ArgRule("socket", 0, "equals", AF_VSOCK, errno.EACCES, "bypasses the netns"))
    rules += [
        ArgRule("ioctl", 1, "equals", TIOCSTI, errno.EPERM, "types into the user's terminal"),
        ArgRule("ioctl", 1, "equals", TIOCLINUX, errno.EPERM, "reads/pastes the console"),
        ArgRule("clone", 0, "any-bit", CLONE_NAMESPACES, errno.EPERM, "no nested namespaces"),
        ArgRule("unshare", 0, "any-bit", UNSHARE_NAMESPACES, errno.EPERM, "no nested namespaces"),
        ArgRule("personality", 0, "equals", PERSONALITY_QUERY, None, "a query changes nothing"),
        ArgRule("personality", 0, "any-bit", ADDR_NO_RANDOMIZE, errno.EPERM, "keeps ASLR on"),
    ]
    return tuple(rules)


def arch_table(arch: str) -> ArchTable:
    try:
        return ARCHES[arch]
    except KeyError:
        raise SandboxUnavailable(
            f"seccomp: no system call table for the {arch} architecture",
            hint=f"corral's seccomp layer supports {', '.join(ARCHES)}",
        ) from None


def host_arch() -> str:
    """The running machine's architecture as build_filter spells it."""
    machine = os.uname().machine
    return "aarch64" if machine == "arm64" else machine


def build_filter(options: SeccompOptions, *, arch: str = "x86_64") -> bytes:
    """The packed `struct sock_filter` array for `options` on `arch` (x86_64 or aarch64)."""
    table = arch_table(arch)
    rules = arg_rules(options)
    return assemble(
        [
            *check_arch(table),
            *dispatch(table, denials(options), rules),
            *argument_blocks(rules),
            *verdicts(denials(options), rules),
        ]
    )


def errno_label(number: int) -> str:
    return f"errno_{number}"


def check_arch(table: ArchTable) -> list[Insn | Label]:
    items: list[Insn | Label] = [
        load(OFFSET_ARCH),
        # A foreign ABI numbers its calls differently: nothing below would mean anything.
        jump(BPF_JEQ, table.audit_arch, then=1),
        ret(SECCOMP_RET_KILL_PROCESS),
        load(OFFSET_NR),
    ]
    if table.x32_bit:
        items += [
            # x32 reuses the native numbers with this bit set: refuse the whole ABI...
            jump(BPF_JGE, table.x32_bit, otherwise="dispatch"),
            # ...except nr -1, which is how a tracer skips a call: its result is the tracer's.
            jump(BPF_JEQ, 0xFFFFFFFF, then="dispatch", otherwise=errno_label(errno.EPERM)),
            Label("dispatch"),
        ]
    return items


def dispatch(
    table: ArchTable, denied: tuple[Denial, ...], rules: tuple[ArgRule, ...]
) -> list[Insn | Label]:
    """One comparison per named syscall, then allow: the default."""
    items: list[Insn | Label] = []
    for name in dict.fromkeys(rule.syscall for rule in rules):
        items.append(jump(BPF_JEQ, table.syscalls[name], then=f"args_{name}"))
    for denial in denied:
        items.append(jump(BPF_JEQ, table.syscalls[denial.syscall], then=errno_label(denial.errno)))
    items.append(ret(SECCOMP_RET_ALLOW))
    return items


def argument_blocks(rules: tuple[ArgRule, ...]) -> list[Insn | Label]:
    """Per syscall: load the argument's low half, test each rule in order, else allow."""
    items: list[Insn | Label] = []
    loaded: tuple[str, int] | None = None
    for rule in rules:
        if loaded is None or loaded[0] != rule.syscall:
            if loaded is not None:
                items.append(ret(SECCOMP_RET_ALLOW))
            items += [Label(f"args_{rule.syscall}"), load(offset_arg_low(rule.arg))]
            loaded = (rule.syscall, rule.arg)
        elif loaded[1] != rule.arg:
            raise ValueError(f"{rule.syscall}: rules must test one argument")
        target = "allow" if rule.errno is None else errno_label(rule.errno)
        items.append(jump(BPF_JEQ if rule.test == "equals" else BPF_JSET, rule.value, then=target))
    if loaded is not None:
        items.append(ret(SECCOMP_RET_ALLOW))
    return items


def verdicts(denied: tuple[Denial, ...], rules: tuple[ArgRule, ...]) -> list[Insn | Label]:
    """The shared returns every jump lands on: allow, then one per errno in use."""
    numbers = {errno.EPERM} | {d.errno for d in denied} | {r.errno for r in rules if r.errno}
    items: list[Insn | Label] = [Label("allow"), ret(SECCOMP_RET_ALLOW)]
    for number in sorted(numbers):
        items += [Label(errno_label(number)), ret_errno(number)]
    return items


def open_program_fd(program: bytes) -> int:
    """A memfd holding `program`, read position 0: pass it to bwrap with pass_fds.

    A memfd rather than a pipe: bwrap reads the program to EOF before it forks, so a pipe
    would need the whole program written and the write end closed first; a memfd has no
    capacity limit and needs no writer. The fd is close-on-exec; pass_fds clears that.
    """
    fd = os.memfd_create("corral-seccomp", os.MFD_CLOEXEC)
    try:
        os.write(fd, program)
        os.lseek(fd, 0, os.SEEK_SET)
    except OSError:
        os.close(fd)
        raise
    return fd


def install(program: bytes) -> None:
    """Load `program` into the calling thread: no_new_privs, then seccomp(2). Raises OSError.

    The filter binds this thread and every process it starts afterwards (flags 0, not TSYNC):
    call it before starting threads, as the in-sandbox launcher and the tests do.
    """
    import ctypes  # only the launcher and tests pay for ctypes

    if not program or len(program) % 8:
        raise OSError(errno.EINVAL, "seccomp: a program is a non-empty array of 8-byte entries")
    syscalls = ARCHES.get(host_arch())
    if syscalls is None:
        raise OSError(errno.ENOSYS, f"seccomp: unsupported architecture {host_arch()}")

    class SockFprog(ctypes.Structure):
        _fields_ = (("len", ctypes.c_ushort), ("filter", ctypes.c_void_p))

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4
    libc.prctl.restype = ctypes.c_int
    libc.syscall.restype = ctypes.c_long
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        failed = ctypes.get_errno()
        raise OSError(failed, f"prctl(PR_SET_NO_NEW_PRIVS): {os.strerror(failed)}")
    buffer = ctypes.create_string_buffer(program, len(program))
    fprog = SockFprog(len(program) // 8, ctypes.addressof(buffer))
    args = (SECCOMP_SET_MODE_FILTER, 0)
    nr = syscalls.syscalls["seccomp"]
    if libc.syscall(ctypes.c_long(nr), *map(ctypes.c_long, args), ctypes.byref(fprog)) != 0:
        failed = ctypes.get_errno()
        raise OSError(failed, f"seccomp(SECCOMP_SET_MODE_FILTER): {os.strerror(failed)}")
