"""A cgroup v2 per sandbox, where this user has one delegated: limits over the whole sandbox.

rlimits (limits.py) are per process, except RLIMIT_NPROC; a cgroup bounds the sandbox as a
whole: `pids.max` counts every task in it and `memory.max` every page it charges, shared
memory and tmpfs files included. It is used only where the probe found a cgroup v2 directory
this user may write (`MachineFacts.cgroup_v2_writable`, corral's own cgroup) that offers the
pids and memory controllers. On cgroup v1 or hybrid machines there is none, and rlimits are
all there is.

Steps (the runner calls them; every file write goes through `write`, a seam for tests):
1. `create_sandbox_cgroup`: enable the controllers for children of the parent, make
   `<parent>/corral-<id>`, write the limits into it.
2. `join_cgroup`: write the sandbox's pid 1 into its `cgroup.procs` while bwrap waits on
   `--block-fd` (or `limits.make_preexec(cgroup=...)` moves a setuid bwrap itself).
3. `remove_cgroup` after the sandbox has exited (the kernel refuses while tasks remain).

cgroup v2's "no internal processes" rule: a cgroup that hands controllers to its children
may not hold processes itself. corral's own cgroup holds corral, so enabling controllers
there fails with EBUSY. When corral is alone in it (started under `systemd-run --user
--scope -p Delegate=yes`, say), corral first moves itself into a leaf child, `corral-host`;
when other processes share it (the user's shell), corral does not move them and falls back
to rlimits.

cpu.max is not written: it throttles a rate (a share of CPUs), while `cpuSeconds` is a total
per process, which RLIMIT_CPU enforces; a rate needs a setting of its own.

Not exercised for real on the machine this was written on (cgroup v1); the tests run every
write against a fake directory.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from corral.policy.model import Limits

if TYPE_CHECKING:
    from corral.probe import MachineFacts

LEAF = "corral-host"
PREFIX = "corral-"
CONTROLLER_OF = {"pids.max": "pids", "memory.max": "memory", "memory.swap.max": "memory"}
# Written when present: without it a hog past memory.max goes on into swap, and the machine
# slows to a crawl instead of the sandbox's allocation failing.
OPTIONAL = ("memory.swap.max",)

Write = Callable[[str, str], None]


def write_file(path: str, text: str) -> None:
    """One write(2) of `text`: cgroup files take one value per write, and never create."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, text.encode("ascii"))
    finally:
        os.close(fd)


def _read(path: str) -> str:
    try:
        with open(path, encoding="ascii") as f:
            return f.read()
    except OSError:
        return ""


def cgroup_files(limits: Limits) -> list[tuple[str, str]]:
    """(file, value) pairs to write in the sandbox's cgroup. Pure."""
    files = []
    if limits.processes is not None:
        files.append(("pids.max", str(limits.processes)))
    if limits.memory_bytes is not None:
        files += [("memory.max", str(limits.memory_bytes)), ("memory.swap.max", "0")]
    return files


def controllers_for(limits: Limits) -> list[str]:
    return list(dict.fromkeys(CONTROLLER_OF[name] for name, _ in cgroup_files(limits)))


def usable_cgroup_parent(facts: MachineFacts, limits: Limits) -> str | None:
    """The writable cgroup v2 directory the sandbox's cgroup goes in; None when there is none
    or it does not offer the controllers `limits` need."""
    parent = facts.cgroup_v2_writable
    needed = controllers_for(limits)
    if parent is None or not needed:
        return None
    offered = _read(f"{parent}/cgroup.controllers").split()
    return parent if all(name in offered for name in needed) else None


def enable_controllers(
    parent: str, controllers: list[str], *, own_pid: int, write: Write = write_file
) -> None:
    """Hand `controllers` to the children of `parent` (see the no-internal-processes rule)."""
    enabled = _read(f"{parent}/cgroup.subtree_control").split()
    missing = [name for name in controllers if name not in enabled]
    if not missing:
        return
    request = " ".join(f"+{name}" for name in missing)
    try:
        write(f"{parent}/cgroup.subtree_control", request)
        return
    except OSError as exc:
        if exc.errno != errno.EBUSY:
            raise
        if _read(f"{parent}/cgroup.procs").split() != [str(own_pid)]:
            raise  # other processes share it: not ours to move
    os.makedirs(f"{parent}/{LEAF}", exist_ok=True)
    write(f"{parent}/{LEAF}/cgroup.procs", str(own_pid))
    write(f"{parent}/cgroup.subtree_control", request)


def create_sandbox_cgroup(
    parent: str, sandbox_id: str, limits: Limits, *, own_pid: int, write: Write = write_file
) -> str:
    """Make `<parent>/corral-<sandbox_id>` with the limits written; return its path.
    Raises OSError; nothing is left behind then but the enabled controllers."""
    enable_controllers(parent, controllers_for(limits), own_pid=own_pid, write=write)
    path = f"{parent}/{PREFIX}{sandbox_id}"
    os.mkdir(path, 0o755)
    try:
        for name, value in cgroup_files(limits):
            try:
                write(f"{path}/{name}", value)
            except FileNotFoundError:
                if name not in OPTIONAL:
                    raise  # swap accounting may be off; the others must exist
    except OSError:
        os.rmdir(path)
        raise
    return path


def join_cgroup(path: str, pid: int, *, write: Write = write_file) -> None:
    """Move `pid` (the sandbox's pid 1, before it starts the command) into the cgroup."""
    write(f"{path}/cgroup.procs", str(pid))


def remove_cgroup(path: str) -> None:
    """Remove the sandbox's cgroup once it is empty (after the sandbox exited). A cgroup the
    kernel still counts as busy is left for the next run's owner to see, never an error."""
    with contextlib.suppress(OSError):
        os.rmdir(path)
