"""The violation monitor's seccomp filter: which system calls are reported to corral.

The monitor (corral.monitor) only observes. Its filter sends a user notification for each
system call that opens or changes a path, and corral answers every one at once with "continue":
the decision stays with the mount namespace, Landlock and corral's own seccomp filter. Because
an errno verdict outranks a user notification whatever the order of filters, a call corral's
filter refuses is never notified at all.

`build_notify_filter` is pure, like `seccomp.build_filter`: the tables below become a classic
BPF program through the same assembler. `WATCHED` is also what the supervisor uses to decode a
notification (which argument holds a path, which a directory fd), so the filter and the
decoder cannot disagree.

The model (first match wins):
1. A foreign ABI, or an x32 call, is let through: corral's own filter kills or refuses those,
   and its verdict outranks this one.
2. Calls not in `WATCHED` are let through; their verdict depends on the number alone, so
   Linux 5.11+ caches it and never runs the filter for them again.
3. Argument checks cut the notifications where the arguments alone say there is nothing to
   see: an `O_PATH` open reads nothing, and `utimensat` with a NULL path works on an open fd.
   With `Opens` "writes", opens that neither write, create nor truncate are let through too.
4. Everything else is notified. `openat2` always is: its flags are in memory, where BPF cannot
   look, so the supervisor reads them. So are chdir and fchdir, which access nothing the
   boundary forbids but tell the supervisor that a working directory it remembers changed.

Calls on file descriptors (fchmod, fchown, ftruncate, fsetxattr, futimens) are not watched:
the fd was opened by a watched call, and its open is what the monitor reports.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal, NamedTuple

from corral.backends.seccomp import arch_table
from corral.backends.seccomp_bpf import (
    BPF_JEQ,
    BPF_JGE,
    BPF_JSET,
    OFFSET_ARCH,
    OFFSET_NR,
    SECCOMP_RET_ALLOW,
    Insn,
    Label,
    assemble,
    jump,
    load,
    offset_arg_low,
    ret,
)

SECCOMP_RET_USER_NOTIF = 0x7FC00000
SECCOMP_FILTER_FLAG_NEW_LISTENER = 1 << 3
SECCOMP_USER_NOTIF_FLAG_CONTINUE = 1

# open(2) flags; the same values on x86_64 and aarch64 (asm-generic/fcntl.h).
O_WRONLY = 0o1
O_RDWR = 0o2
O_CREAT = 0o100
O_EXCL = 0o200
O_TRUNC = 0o1000
O_PATH = 0o10000000
WRITE_FLAGS = O_WRONLY | O_RDWR | O_CREAT | O_TRUNC
"""An open with any of these may change the file system (O_TMPFILE needs O_WRONLY or O_RDWR)."""
AT_FDCWD = -100
AT_REMOVEDIR = 0x200

Opens = Literal["all", "writes"]
"""Which opens are notified: every one (so reads of hidden paths are seen), or only those that
may write. "writes" is the cheaper choice for workloads made of reads."""

Operation = Literal[
    "open", "mkdir", "mknod", "unlink", "rmdir", "rename", "link", "symlink", "truncate",
    "chmod", "chown", "utimes", "setxattr", "removexattr", "chdir",
]  # fmt: skip


class PathArg(NamedTuple):
    """Where one path of a call is: its pointer argument, and the directory-fd argument a
    relative path is resolved against (None: the working directory)."""

    path: int
    dirfd: int | None = None


class Watched(NamedTuple):
    """A system call the monitor is notified of, and how to read its arguments."""

    name: str
    operation: Operation
    paths: tuple[PathArg, ...]
    """The paths it acts on, in order. For rename and link: the source, then the target."""
    flags: int | None = None
    """The argument holding open(2) flags (open, openat) or AT_ flags (unlinkat)."""
    follows: bool = False
    """Whether a symlink as the last component is followed (chmod) or acted on (unlink,
    lchown); for opens it also depends on the flags (O_CREAT|O_EXCL, O_NOFOLLOW)."""


_AT = PathArg(1, 0)  # the usual *at(dirfd, path, ...) layout

WATCHED: tuple[Watched, ...] = (
    Watched("open", "open", (PathArg(0),), flags=1, follows=True),
    Watched("openat", "open", (_AT,), flags=2, follows=True),
    # openat2: the flags are the first u64 of struct open_how (argument 2), read from memory.
    Watched("openat2", "open", (_AT,), follows=True),
    Watched("creat", "open", (PathArg(0),), follows=True),
    Watched("mkdir", "mkdir", (PathArg(0),)),
    Watched("mkdirat", "mkdir", (_AT,)),
    Watched("mknod", "mknod", (PathArg(0),)),
    Watched("mknodat", "mknod", (_AT,)),
    Watched("unlink", "unlink", (PathArg(0),)),
    Watched("unlinkat", "unlink", (_AT,), flags=2),
    Watched("rmdir", "rmdir", (PathArg(0),)),
    Watched("rename", "rename", (PathArg(0), PathArg(1))),
    Watched("renameat", "rename", (_AT, PathArg(3, 2))),
    Watched("renameat2", "rename", (_AT, PathArg(3, 2))),
    Watched("link", "link", (PathArg(0), PathArg(1))),
    Watched("linkat", "link", (_AT, PathArg(3, 2))),
    # symlink's first argument is the link's text, not a path that is looked up.
    Watched("symlink", "symlink", (PathArg(1),)),
    Watched("symlinkat", "symlink", (PathArg(2, 1),)),
    Watched("truncate", "truncate", (PathArg(0),), follows=True),
    Watched("chmod", "chmod", (PathArg(0),), follows=True),
    Watched("fchmodat", "chmod", (_AT,), follows=True),
    Watched("fchmodat2", "chmod", (_AT,), follows=True),
    Watched("chown", "chown", (PathArg(0),), follows=True),
    Watched("lchown", "chown", (PathArg(0),)),
    Watched("fchownat", "chown", (_AT,), follows=True),
    Watched("utime", "utimes", (PathArg(0),), follows=True),
    Watched("utimes", "utimes", (PathArg(0),), follows=True),
    Watched("futimesat", "utimes", (_AT,), follows=True),
    Watched("utimensat", "utimes", (_AT,), follows=True),
    Watched("setxattr", "setxattr", (PathArg(0),), follows=True),
    Watched("lsetxattr", "setxattr", (PathArg(0),)),
    Watched("setxattrat", "setxattr", (_AT,), follows=True),
    Watched("removexattr", "removexattr", (PathArg(0),), follows=True),
    Watched("lremovexattr", "removexattr", (PathArg(0),)),
    Watched("removexattrat", "removexattr", (_AT,), follows=True),
    # Not accesses: they tell the supervisor that a working directory it remembers may have
    # changed, so that it need not read /proc/PID/cwd for every relative path.
    Watched("chdir", "chdir", ()),
    Watched("fchdir", "chdir", ()),
)

# Numbers of the watched calls (corral's deny-list tables in seccomp_bpf.py hold only the calls
# that filter names). x86_64: arch/x86/entry/syscalls/syscall_64.tbl. aarch64 has only the
# *at forms (asm-generic/unistd.h). Calls numbered 437 and up are the same everywhere.
_X86_64 = {
    "open": 2, "truncate": 76, "rename": 82, "mkdir": 83, "rmdir": 84, "creat": 85,
    "link": 86, "unlink": 87, "symlink": 88, "chmod": 90, "chown": 92, "lchown": 94,
    "utime": 132, "mknod": 133, "setxattr": 188, "lsetxattr": 189, "removexattr": 197,
    "lremovexattr": 198, "utimes": 235, "openat": 257, "mkdirat": 258, "mknodat": 259,
    "fchownat": 260, "futimesat": 261, "unlinkat": 263, "renameat": 264, "linkat": 265,
    "symlinkat": 266, "fchmodat": 268, "utimensat": 280, "renameat2": 316, "chdir": 80,
    "fchdir": 81,
}  # fmt: skip
_AARCH64 = {
    "setxattr": 5, "lsetxattr": 6, "removexattr": 14, "lremovexattr": 15, "mknodat": 33,
    "mkdirat": 34, "unlinkat": 35, "symlinkat": 36, "linkat": 37, "renameat": 38,
    "truncate": 45, "fchmodat": 53, "fchownat": 54, "openat": 56, "utimensat": 88,
    "renameat2": 276, "chdir": 49, "fchdir": 50,
}  # fmt: skip
_COMMON = {"openat2": 437, "fchmodat2": 452, "setxattrat": 463, "removexattrat": 466}

WATCHED_NUMBERS: Mapping[str, Mapping[str, int]] = {
    "x86_64": {**_X86_64, **_COMMON},
    "aarch64": {**_AARCH64, **_COMMON},
}

# Calls whose arguments decide whether they are notified (rule 3).
_OPEN_FLAGS = {"open": 1, "openat": 2}
_FD_BASED_IF_NULL = {"utimensat": 1}


def watched_calls(arch: str) -> dict[int, Watched]:
    """The watched calls that exist on `arch`, by number (what the supervisor decodes with)."""
    arch_table(arch)  # SandboxUnavailable for an architecture corral has no table for
    numbers = WATCHED_NUMBERS[arch]
    return {numbers[call.name]: call for call in WATCHED if call.name in numbers}


def build_notify_filter(*, arch: str, opens: Opens = "all") -> bytes:
    """The packed `struct sock_filter` array of the monitor for `arch` (x86_64 or aarch64)."""
    table = arch_table(arch)
    calls = watched_calls(arch)
    items: list[Insn | Label] = [
        load(OFFSET_ARCH),
        jump(BPF_JEQ, table.audit_arch, otherwise="allow"),  # rule 1
        load(OFFSET_NR),
    ]
    if table.x32_bit:
        items.append(jump(BPF_JGE, table.x32_bit, then="allow"))
    for number, call in sorted(calls.items()):
        if call.name in _OPEN_FLAGS:
            target = f"flags_{call.name}"
        elif call.name in _FD_BASED_IF_NULL:
            target = f"null_{call.name}"
        else:
            target = "notify"
        items.append(jump(BPF_JEQ, number, then=target))
    items.append(ret(SECCOMP_RET_ALLOW))  # rule 2
    for name, arg in _OPEN_FLAGS.items():
        if name in WATCHED_NUMBERS[arch]:
            items += _open_flags_block(name, arg, opens)
    for name, arg in _FD_BASED_IF_NULL.items():
        items += _null_path_block(name, arg)
    # The shared verdicts come last: classic BPF jumps only forward.
    items += [Label("notify"), ret(SECCOMP_RET_USER_NOTIF), Label("allow"), ret(SECCOMP_RET_ALLOW)]
    return assemble(items)


def _open_flags_block(name: str, arg: int, opens: Opens) -> list[Insn | Label]:
    """O_PATH reads nothing: let it through. Then, with "writes", notify only writing opens.
    Flags are an int to the kernel: the low half is all there is (seccomp.py, rule 4)."""
    items: list[Insn | Label] = [
        Label(f"flags_{name}"),
        load(offset_arg_low(arg)),
        jump(BPF_JSET, O_PATH, then="allow"),
    ]
    if opens == "writes":
        items.append(jump(BPF_JSET, WRITE_FLAGS, then="notify", otherwise="allow"))
    else:
        items.append(ret(SECCOMP_RET_USER_NOTIF))
    return items


def _null_path_block(name: str, arg: int) -> list[Insn | Label]:
    """A NULL path (both halves of the pointer zero) makes the call work on its fd: let it
    through. A pointer is 64 bits, so unlike an int both halves are checked."""
    return [
        Label(f"null_{name}"),
        load(offset_arg_low(arg)),
        jump(BPF_JEQ, 0, otherwise="notify"),
        load(offset_arg_low(arg) + 4),
        jump(BPF_JEQ, 0, then="allow", otherwise="notify"),
    ]
