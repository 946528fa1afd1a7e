"""Resource limits: a policy's `Limits` become rlimits (and cgroup v2 files, see cgroup.py).

How a launch applies them (the runner in sandbox.py does the steps; this module decides):
1. bwrap starts with `--block-fd`: it sets up the namespaces, then waits before it forks the
   command. `--json-status-fd` has already named the sandbox's pid 1 (its host pid).
2. corral calls `prlimit` on that pid 1 (`apply_rlimits`), moves it into the sandbox's cgroup
   when there is one (cgroup.py), and only then writes to the block fd (`release_gate`).
3. pid 1 forks the command, which inherits every limit; so does everything it starts.
If step 2 fails, the runner kills bwrap instead of releasing it: no command runs unlimited.
No `preexec_fn` is needed, so subprocess keeps its fast, thread-safe spawn path; the one
exception is a setuid bwrap (rule 4).

Rules:
1. Limits only tighten. Each rlimit is the lower of the policy's value and what corral
   inherited, soft and hard apart, so a user's lower `ulimit` stands and the soft limit of
   open files stays at its usual 1024 (`select()` breaks above it) while the hard one drops.
2. Processes: RLIMIT_NPROC counts a user's processes and threads, but since Linux 5.14 the
   count is kept per user namespace (ucounts) and checked at every level up to the host. Set
   inside the sandbox's own user namespace, as step 2 does, it counts only the sandbox's
   processes: the user's other work neither starves the sandbox nor is starved by it.
   Before 5.14 the count is per user on the whole machine, so the limit becomes the user's
   processes at launch plus the allowance (`NprocScope` "user"): approximate, since other
   work started later takes from the sandbox's share, but still bounded.
   Root is exempt from RLIMIT_NPROC in the kernel; only a cgroup's pids.max holds for root.
3. Memory is RLIMIT_DATA, not RLIMIT_AS. DATA (Linux >= 4.7) counts the heap and private
   writable mappings, which is where every allocator takes memory, so a runaway allocation
   fails with ENOMEM (MemoryError, std::bad_alloc) instead of meeting the OOM killer. AS
   would also count address space reserved and never used, and breaks programs that reserve
   large ranges up front: V8's pointer cage and WebAssembly guard regions, the JVM's heap and
   class space, sanitizers' shadow memory. What DATA does not count: shared mappings
   (memfd, MAP_SHARED|MAP_ANONYMOUS) and files in a tmpfs (the private /tmp, /dev/shm), so a
   deliberate hog can pass it; only a cgroup's memory.max bounds those.
4. A setuid bwrap keeps privileges in pid 1 until just before it blocks, and `prlimit` on a
   process with other credentials fails; there the rlimits are set on bwrap itself before it
   runs (`make_preexec`), and processes are counted per user (rule 2's "user" scope).
5. CPU time: SIGXCPU at the limit, SIGKILL `CPU_GRACE_SECONDS` later, so a program that
   handles SIGXCPU can still save its work. All rlimits but NPROC are per process.

This module is on the launch path: `resource` is imported inside the functions that need it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Literal

from corral.policy.model import LIMIT_KEYS, Limits
from corral.probe_verdicts import leading_int

if TYPE_CHECKING:
    from corral.probe import MachineFacts

RLimit = tuple[int, int, int]
"""(resource, soft, hard) as `resource.prlimit` takes them; -1 is unlimited."""

NprocScope = Literal["namespace", "user"]
ApplyPoint = Literal["sandbox-init", "bwrap"]

UNLIMITED = -1  # resource.RLIM_INFINITY on Linux
CPU_GRACE_SECONDS = 5
# The first kernel that counts RLIMIT_NPROC per user namespace (ucounts, commit 21d1c5e386bc).
NPROC_PER_NAMESPACE_SINCE = (5, 14)
NOT_ENFORCED = "not enforced"


def kernel_version(release: str) -> tuple[int, int]:
    """`6.8.0-45-generic` -> (6, 8); (0, 0) when it does not parse."""
    parts = [*release.split(".")[:2], "0"]
    major, minor = leading_int(parts[0]), leading_int(parts[1])
    return (major, minor) if major is not None and minor is not None else (0, 0)


def apply_point(facts: MachineFacts) -> ApplyPoint:
    """Where the rlimits are set: on the sandbox's pid 1 (rule 1 of the launch) or, for a
    setuid bwrap, on bwrap before it runs (rule 4)."""
    return "bwrap" if facts.bwrap_setuid else "sandbox-init"


def nproc_scope(facts: MachineFacts) -> NprocScope:
    """What RLIMIT_NPROC counts once set: the sandbox's namespace, or all the user's tasks."""
    if apply_point(facts) == "bwrap":
        return "user"
    since = kernel_version(facts.kernel) >= NPROC_PER_NAMESPACE_SINCE
    return "namespace" if since else "user"


def _lower(a: int, b: int) -> int:
    if a == UNLIMITED:
        return b
    if b == UNLIMITED:
        return a
    return min(a, b)


def _tightened(
    resource: int, soft: int, hard: int, current: Mapping[int, tuple[int, int]]
) -> RLimit:
    cur_soft, cur_hard = current.get(resource, (UNLIMITED, UNLIMITED))
    new_hard = _lower(cur_hard, hard)
    return resource, _lower(_lower(cur_soft, soft), new_hard), new_hard


def rlimits_for(
    limits: Limits,
    *,
    scope: NprocScope,
    user_processes_now: int = 0,
    current: Mapping[int, tuple[int, int]],
) -> list[RLimit]:
    """The rlimits that enforce `limits`, tightened against `current` (rule 1). Pure.

    `user_processes_now` (tasks of the user at launch) matters only in the "user" scope.
    """
    import resource

    wanted: list[tuple[int, int, int]] = []
    if limits.cpu_seconds is not None:
        grace = limits.cpu_seconds + CPU_GRACE_SECONDS
        wanted.append((resource.RLIMIT_CPU, limits.cpu_seconds, grace))
    if limits.memory_bytes is not None:
        wanted.append((resource.RLIMIT_DATA, limits.memory_bytes, limits.memory_bytes))
    if limits.processes is not None:
        allowance = limits.processes + (user_processes_now if scope == "user" else 0)
        wanted.append((resource.RLIMIT_NPROC, allowance, allowance))
    if limits.open_files is not None:
        wanted.append((resource.RLIMIT_NOFILE, limits.open_files, limits.open_files))
    if limits.file_size_bytes is not None:
        size = limits.file_size_bytes
        wanted.append((resource.RLIMIT_FSIZE, size, size))
    return [_tightened(res, soft, hard, current) for res, soft, hard in wanted]


def current_rlimits(resources: Iterable[int] | None = None) -> dict[int, tuple[int, int]]:
    """corral's own (soft, hard) limits, which the sandbox would otherwise inherit."""
    import resource

    if resources is None:
        resources = (
            resource.RLIMIT_CPU,
            resource.RLIMIT_DATA,
            resource.RLIMIT_NPROC,
            resource.RLIMIT_NOFILE,
            resource.RLIMIT_FSIZE,
        )
    return {res: resource.getrlimit(res) for res in resources}


def count_user_processes(uid: int, *, proc: str = "/proc") -> int:
    """Tasks (processes and threads, as RLIMIT_NPROC counts them) whose real uid is `uid`."""
    total = 0
    for name in os.listdir(proc):
        if not name.isdigit():
            continue
        try:
            with open(f"{proc}/{name}/status", "rb") as f:
                status = f.read()
        except OSError:
            continue  # gone meanwhile
        real_uid = threads = None
        for line in status.splitlines():
            if line.startswith(b"Uid:"):
                real_uid = int(line.split()[1])
            elif line.startswith(b"Threads:"):
                threads = int(line.split()[1])
        if real_uid == uid:
            total += threads or 1
    return total


def launch_rlimits(limits: Limits, facts: MachineFacts) -> list[RLimit]:
    """The rlimits for one launch on this machine: `rlimits_for` with the facts it needs."""
    scope = nproc_scope(facts)
    now = 0
    if scope == "user" and limits.processes is not None:
        now = count_user_processes(os.getuid())  # only on old kernels or a setuid bwrap
    return rlimits_for(limits, scope=scope, user_processes_now=now, current=current_rlimits())


def apply_rlimits(pid: int, rlimits: Sequence[RLimit]) -> None:
    """Set `rlimits` on `pid` (the sandbox's pid 1 while bwrap blocks). Raises OSError."""
    import resource

    for res, soft, hard in rlimits:
        resource.prlimit(pid, res, (soft, hard))


def release_gate(block_fd: int) -> None:
    """Let bwrap, waiting on `--block-fd`, go on and start the command."""
    try:
        os.write(block_fd, b"1")
    finally:
        os.close(block_fd)


def make_preexec(rlimits: Sequence[RLimit], *, cgroup: str | None = None) -> Callable[[], None]:
    """For a setuid bwrap (rule 4): a `preexec_fn` that sets the rlimits on bwrap itself and
    moves it into `cgroup` before it runs. Everything is computed before the fork."""
    import resource

    setrlimit = resource.setrlimit
    procs = f"{cgroup}/cgroup.procs" if cgroup is not None else None

    def preexec() -> None:
        if procs is not None:
            with open(procs, "w", encoding="ascii") as f:
                f.write("0")  # "0" is the writing process itself
        for res, soft, hard in rlimits:
            setrlimit(res, (soft, hard))

    return preexec


# ---------------------------------------------------------------------------------------------
# What is in force, for `corral doctor` and `corral policy show`


def _size(value: float) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if value >= size and value % size == 0:
            return f"{int(value // size)} {unit}"
    return f"{int(value)} bytes"


def _shown(key: str, value: float) -> str:
    if key == "timeoutSeconds":
        return f"{value:g} s"
    if key == "cpuSeconds":
        return f"{int(value)} s"
    if key.endswith("Bytes"):
        return _size(value)
    return str(int(value))


def _processes_mechanism(limits: Limits, facts: MachineFacts, cgroup_parent: str | None) -> str:
    if cgroup_parent is not None:
        return f"cgroup v2 pids.max over the whole sandbox (under {cgroup_parent})"
    if facts.is_root:
        return (
            f"{NOT_ENFORCED}: the kernel exempts root from RLIMIT_NPROC and no cgroup v2 is"
            " delegated; run corral as a normal user"
        )
    if nproc_scope(facts) == "namespace":
        return "RLIMIT_NPROC in the sandbox's user namespace: counts the sandbox's tasks only"
    return (
        f"RLIMIT_NPROC over all your tasks: those at launch + {limits.processes}"
        " (approximate: Linux < 5.14 or a setuid bwrap count per user)"
    )


def _mechanism(key: str, limits: Limits, facts: MachineFacts, cgroup_parent: str | None) -> str:
    if key == "timeoutSeconds":
        return "wall clock: bwrap is killed and its pid namespace with it"
    if key == "cpuSeconds":
        return f"RLIMIT_CPU per process: SIGXCPU, SIGKILL {CPU_GRACE_SECONDS} s later"
    if key == "memoryBytes":
        per_process = "RLIMIT_DATA per process (shared memory and tmpfs files not counted)"
        if cgroup_parent is not None:
            return f"cgroup v2 memory.max over the whole sandbox, and {per_process}"
        return per_process
    if key == "processes":
        return _processes_mechanism(limits, facts, cgroup_parent)
    if key == "openFiles":
        return "RLIMIT_NOFILE per process (a lower inherited soft limit is kept)"
    if key == "fileSizeBytes":
        return "RLIMIT_FSIZE per file written: SIGXFSZ, or EFBIG when it is ignored"
    return "captured stdout and stderr are cut at this size"


def limits_in_force(
    limits: Limits, facts: MachineFacts, *, cgroup_parent: str | None = None
) -> list[tuple[str, str]]:
    """(limit, mechanism) for each limit, in settings order. Pure.

    `cgroup_parent` is `cgroup.usable_cgroup_parent(facts, limits)`: where the sandbox's
    cgroup would be made, None when there is none. A mechanism starting with `NOT_ENFORCED`
    is not enforced.
    """
    rows = []
    for key, field in LIMIT_KEYS:
        value = getattr(limits, field)
        if value is None:
            rows.append((key, "no limit"))
        else:
            rows.append(
                (f"{key} {_shown(key, value)}", _mechanism(key, limits, facts, cgroup_parent))
            )
    return rows
