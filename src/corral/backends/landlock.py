"""Landlock: a filesystem plan becomes a ruleset of allowed paths and TCP ports (pure), plus
a thin runner (`apply`) over `corral.inner`, which makes the system calls through ctypes.

Landlock is a second wall. bubblewrap decides what exists in the sandbox by mounting; Landlock
decides, in the kernel, what the process may do with whatever it can reach, so an fd smuggled
in or a mount mistake still meets it. In the namespace-free mode (landlock_nsfree.py) it is
the only filesystem wall.

The model:
1. Landlock only allows. A ruleset "handles" a set of rights; each handled right is refused
   everywhere except beneath the paths (and on the ports) a rule names. Rights the kernel does
   not know at its ABI are not handled, so they stay unrestricted: `gaps` says which.
2. Read rules grant execute, read-file and read-dir beneath a path; write rules grant every
   handled filesystem right beneath it (create, remove, rename, truncate, device ioctls).
3. A rule sits on the inode the path names when the rules are built (symlinks are not
   followed). A file the host replaces later through a rename is a new inode without the rule.
4. TCP rules (ABI >= 4) name ports only: Landlock cannot tell loopback from the internet.
   `connect_ports=None` leaves TCP connect unrestricted; `()` refuses every TCP connect.
5. Scopes (ABI >= 6) stop signals to, and abstract unix sockets of, processes outside the
   sandbox's Landlock domain.
6. ptrace and /proc/PID/{mem,environ} of processes outside the domain are refused by
   Landlock itself, whatever the ruleset.

Rights per ABI: 1 (Linux 5.13) the 13 basic rights; 2 (5.19) REFER, renames and links across
directories (without it they are always refused); 3 (6.2) TRUNCATE; 4 (6.7) TCP bind/connect;
5 (6.10) IOCTL_DEV; 6 (6.12) scopes; 7 (6.15) audit logging only, no new rights.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Literal, NamedTuple

from corral.backends.fsplan import FilesystemPlan
from corral.policy.model import NetworkAccess

Enforcement = Literal["full", "partial", "none"]
"""full: every restriction the rules ask for is enforced; partial: Landlock is on but the
kernel's ABI lacks some of them (`LandlockRules.gaps`); none: no Landlock on this kernel."""

FS_EXECUTE = 1 << 0
FS_WRITE_FILE = 1 << 1
FS_READ_FILE = 1 << 2
FS_READ_DIR = 1 << 3
FS_REMOVE_DIR = 1 << 4
FS_REMOVE_FILE = 1 << 5
FS_MAKE_CHAR = 1 << 6
FS_MAKE_DIR = 1 << 7
FS_MAKE_REG = 1 << 8
FS_MAKE_SOCK = 1 << 9
FS_MAKE_FIFO = 1 << 10
FS_MAKE_BLOCK = 1 << 11
FS_MAKE_SYM = 1 << 12
FS_REFER = 1 << 13
FS_TRUNCATE = 1 << 14
FS_IOCTL_DEV = 1 << 15

FS_ABI_1 = (1 << 13) - 1  # EXECUTE .. MAKE_SYM
FS_READ = FS_EXECUTE | FS_READ_FILE | FS_READ_DIR

NET_BIND_TCP = 1 << 0
NET_CONNECT_TCP = 1 << 1

SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0
SCOPE_SIGNAL = 1 << 1

NEWEST_KNOWN_ABI = 7
"""A newer kernel is treated as this ABI: its new rights stay unhandled (unrestricted)."""

# Device files every program expects to open for writing. /dev/tty is the caller's own
# controlling terminal, whichever it is.
DEV_READ_WRITE = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom", "/dev/tty")
# Inside bubblewrap /dev is a fresh tmpfs with its own devpts instance and /dev/shm: the
# terminals and shared memory there belong to the sandbox alone.
BWRAP_DEV_WRITABLE_DIRS = ("/dev/pts", "/dev/shm")


def handled_access_fs(abi: int) -> int:
    """The filesystem rights a ruleset handles at `abi`; 0 when Landlock is unavailable."""
    if abi <= 0:
        return 0
    rights = FS_ABI_1
    if abi >= 2:
        rights |= FS_REFER
    if abi >= 3:
        rights |= FS_TRUNCATE
    if abi >= 5:
        rights |= FS_IOCTL_DEV
    return rights


def handled_access_net(abi: int) -> int:
    return NET_BIND_TCP | NET_CONNECT_TCP if abi >= 4 else 0


def handled_scope(abi: int) -> int:
    return SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL if abi >= 6 else 0


class LandlockRules(NamedTuple):
    abi: int
    read_paths: tuple[str, ...]
    """Execute, read files and list directories beneath each."""
    write_paths: tuple[str, ...]
    """Every filesystem right handled at `abi` beneath each (reading included)."""
    connect_ports: tuple[int, ...] | None
    """None: TCP connect unrestricted (not wanted, or ABI < 4); (): no TCP connect at all."""
    bind_ports: tuple[int, ...] | None
    scope_signals: bool
    scope_abstract_unix: bool
    gaps: tuple[str, ...] = ()
    """What the rules would restrict but this kernel's ABI cannot, one sentence each."""


class Ruleset(NamedTuple):
    """The rules reduced to numbers and paths: what `corral.inner` reads (see RawRuleset)."""

    handled_fs: int
    handled_net: int
    scoped: int
    paths: tuple[tuple[int, str], ...]
    ports: tuple[tuple[int, int], ...]


def make_rules(
    abi: int,
    *,
    read: Iterable[str],
    write: Iterable[str],
    connect_ports: Sequence[int] | None,
    bind_ports: Sequence[int] | None,
    scope: Literal["sandbox", "none"] = "sandbox",
) -> LandlockRules:
    """Rules for `abi`, dropping what it cannot enforce and saying so in `gaps`."""
    gaps: list[str] = []
    if 0 < abi < 3:
        gaps.append(
            "truncate(2) is not restricted (Landlock ABI < 3): read-only files can be emptied"
        )
    if 0 < abi < 5:
        gaps.append("device ioctls are not restricted (Landlock ABI < 5)")
    if abi < 4 and (connect_ports is not None or bind_ports is not None):
        if abi > 0:
            gaps.append("TCP connect and bind are not restricted (Landlock ABI < 4)")
        connect_ports = bind_ports = None
    scoped = scope == "sandbox" and abi >= 6
    if 0 < abi < 6 and scope == "sandbox":
        gaps.append("signals and abstract unix sockets are not scoped (Landlock ABI < 6)")
    return LandlockRules(
        abi=abi,
        read_paths=tuple(dict.fromkeys(read)),
        write_paths=tuple(dict.fromkeys(write)),
        connect_ports=_ports(connect_ports),
        bind_ports=_ports(bind_ports),
        scope_signals=scoped,
        scope_abstract_unix=scoped,
        gaps=tuple(gaps),
    )


def _ports(ports: Sequence[int] | None) -> tuple[int, ...] | None:
    if ports is None:
        return None
    for port in ports:
        if not 0 <= port <= 65535:
            raise ValueError(f"not a TCP port: {port}")
    return tuple(sorted(set(ports)))


def enforcement(rules: LandlockRules) -> Enforcement:
    if handled_access_fs(rules.abi) == 0:
        return "none"
    return "partial" if rules.gaps else "full"


def compile_ruleset(rules: LandlockRules) -> Ruleset:
    abi = min(rules.abi, NEWEST_KNOWN_ABI)
    handled_fs = handled_access_fs(abi)
    handled_net = 0
    ports: list[tuple[int, int]] = []
    if handled_access_net(abi):
        if rules.connect_ports is not None:
            handled_net |= NET_CONNECT_TCP
            ports += [(NET_CONNECT_TCP, port) for port in rules.connect_ports]
        if rules.bind_ports is not None:
            handled_net |= NET_BIND_TCP
            ports += [(NET_BIND_TCP, port) for port in rules.bind_ports]
    scoped = 0
    if rules.scope_signals:
        scoped |= SCOPE_SIGNAL
    if rules.scope_abstract_unix:
        scoped |= SCOPE_ABSTRACT_UNIX_SOCKET
    paths = [(handled_fs & FS_READ, path) for path in rules.read_paths]
    paths += [(handled_fs, path) for path in rules.write_paths]
    return Ruleset(handled_fs, handled_net, scoped & handled_scope(abi), tuple(paths), tuple(ports))


def host_side_rules_for_plan(
    plan: FilesystemPlan,
    *,
    abi: int,
    network: NetworkAccess,
) -> LandlockRules:
    """The same second wall as `rules_for_plan`, for a ruleset built on the host before the
    sandbox exists (the native launcher, landlock_exec.py).

    Bind mounts keep the host's inodes, so rules on the host's paths hold inside for them.
    Directories that exist only inside (the private /tmp, /dev/pts, /dev/shm) cannot be
    reached from here: Landlock skips the directory a mount hides, so a rule on the host's
    /tmp would not cover the tmpfs on it. The launcher adds those rules itself, inside, just
    before restricting (`inside_paths`).
    """
    ports: tuple[int, ...] | None = () if network == "none" else None
    return make_rules(
        abi,
        read=(*plan.readable, "/dev", "/proc"),
        write=(*(w for w in plan.writable if w != "/tmp"), *DEV_READ_WRITE),
        connect_ports=ports,
        bind_ports=ports,
    )


def inside_paths_for_plan(plan: FilesystemPlan) -> tuple[str, ...]:
    """The writable directories that only exist inside the sandbox (see above)."""
    return (*(["/tmp"] if "/tmp" in plan.writable else []), *BWRAP_DEV_WRITABLE_DIRS)


def rules_for_plan(
    plan: FilesystemPlan,
    *,
    abi: int,
    network: NetworkAccess,
) -> LandlockRules:
    """The second wall inside a bubblewrap sandbox: the plan's roots, as seen inside.

    Mirrors the plan: readable roots are read rules, writable binds (and the private /tmp)
    are write rules, plus the sandbox's own /dev and /proc. Hidden and protected paths need no
    rule of their own here: the mounts already replace them with empty read-only ones, and a
    write rule on a directory does not make a read-only mount inside it writable.

    TCP: the sandbox has its own network namespace, so its loopback (and, in "filtered" mode,
    the proxy's port on it) is all it can reach; only "none" refuses TCP here, as a second
    wall behind seccomp's refusal of inet sockets.
    """
    ports: tuple[int, ...] | None = () if network == "none" else None
    return make_rules(
        abi,
        read=(*plan.readable, "/dev", "/proc"),
        write=(*plan.writable, *DEV_READ_WRITE, "/dev/ptmx", *BWRAP_DEV_WRITABLE_DIRS),
        connect_ports=ports,
        bind_ports=ports,
    )


def apply(rules: LandlockRules) -> Enforcement:
    """Restrict the calling thread (and everything it execs or forks later). Raises OSError.

    Call it in a single-threaded process (a forked child): other threads stay unrestricted.
    Paths that do not exist are skipped (less access, never more).
    """
    level = enforcement(rules)
    if level == "none":
        return level
    from corral import inner

    prepared = inner.prepare(compile_ruleset(rules))
    try:
        prepared.restrict()
    finally:
        prepared.close()
    return level


def open_rules_fd(rules: LandlockRules) -> int:
    """A memfd holding the encoded ruleset for `corral.inner --rules FD` (close-on-exec: pass
    it with pass_fds). The launcher reads it to EOF from offset 0."""
    from corral import inner

    return memfd_with("corral-landlock", inner.encode_ruleset(compile_ruleset(rules)))


def memfd_with(name: str, data: bytes) -> int:
    """A close-on-exec memfd holding `data`, positioned at 0. For `corral.inner`, the launcher's
    code goes the same way: memfd_with("corral-inner", inner.compiled_script())."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        os.write(fd, data)
        os.lseek(fd, 0, os.SEEK_SET)
    except OSError:
        os.close(fd)
        raise
    return fd
