"""bubblewrap: a filesystem plan and launch options become the bwrap argv.

`bwrap_argv` is a pure function, tested as exact lists. What the argv asks of bwrap:
- new user, mount, pid, ipc, uts, cgroup and network namespaces. Every mode gets its own
  network namespace: "none" and "local" differ only in the seccomp layer, "filtered" adds the
  proxy's sockets. The user namespace maps the caller's own uid and gid, and
  `--disable-userns` (bwrap >= 0.8) stops nested user namespaces inside.
- all capabilities dropped, even when the caller is root;
- `--die-with-parent`, so nothing outlives corral;
- `--new-session`, so the command has no controlling terminal and cannot push keystrokes
  into the user's shell with TIOCSTI. An interactive program on a TTY needs its terminal,
  so there the session is inherited and TIOCSTI/TIOCLINUX are refused by the seccomp layer
  instead (and by the kernel itself where dev.tty.legacy_tiocsti is 0).
- the mounts of the plan, in the plan's order (see fsplan.py for why that order).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple

from corral.backends.fsplan import FilesystemPlan, Mount

Session = Literal["new", "inherit"]

# --disable-userns and --json-status-fd need these bubblewrap versions.
DISABLE_USERNS_SINCE = (0, 8, 0)


class BwrapOptions(NamedTuple):
    cwd: str
    uid: int
    gid: int
    session: Session = "new"
    bwrap_version: tuple[int, int, int] = (0, 8, 0)
    seccomp_fd: int | None = None
    status_fd: int | None = None
    block_fd: int | None = None
    """bwrap waits to read this fd before starting the command (resource limits go on first)."""
    hostname: str = "corral"
    extra_binds: tuple[tuple[str, str], ...] = ()
    """(host path, sandbox path) pairs bound read-only last, e.g. the proxy's sockets."""
    empty_file: str = "/dev/null"
    """An empty, read-only regular file on the host, shown in place of each hidden file."""


def mount_args(mount: Mount, *, empty_file: str) -> list[str]:
    if mount.kind == "ro-bind":
        return ["--ro-bind", mount.source, mount.dest]
    if mount.kind == "bind":
        return ["--bind", mount.source, mount.dest]
    if mount.kind == "dev":
        return ["--dev", mount.dest]
    if mount.kind == "proc":
        return ["--proc", mount.dest]
    if mount.kind == "tmpfs":
        return ["--tmpfs", mount.dest]
    if mount.kind == "hide-dir":
        return ["--tmpfs", mount.dest, "--remount-ro", mount.dest]
    if mount.kind == "hide-file":
        return ["--ro-bind", empty_file, mount.dest]
    if mount.kind == "placeholder":
        # A device node on bwrap's nodev mounts: opening it fails, and git ignores it, so a
        # placeholder never shows up as an untracked file inside.
        return ["--ro-bind", "/dev/null", mount.dest]
    return ["--symlink", mount.source, mount.dest]


def bwrap_argv(
    plan: FilesystemPlan,
    options: BwrapOptions,
    command: Sequence[str],
    *,
    bwrap: str = "bwrap",
) -> list[str]:
    argv = [
        bwrap,
        "--unshare-user",
        "--unshare-ipc",
        "--unshare-pid",
        "--unshare-uts",
        "--unshare-net",
        "--unshare-cgroup-try",
        "--die-with-parent",
        "--cap-drop",
        "ALL",
        "--uid",
        str(options.uid),
        "--gid",
        str(options.gid),
        "--hostname",
        options.hostname,
    ]
    if options.bwrap_version >= DISABLE_USERNS_SINCE:
        argv.append("--disable-userns")
    if options.session == "new":
        argv.append("--new-session")
    for mount in plan.mounts:
        argv += mount_args(mount, empty_file=options.empty_file)
    for source, dest in options.extra_binds:
        argv += ["--ro-bind", source, dest]
    argv += ["--chdir", options.cwd]
    if options.seccomp_fd is not None:
        argv += ["--seccomp", str(options.seccomp_fd)]
    if options.status_fd is not None:
        argv += ["--json-status-fd", str(options.status_fd)]
    if options.block_fd is not None:
        argv += ["--block-fd", str(options.block_fd)]
    argv.append("--")
    argv += command
    return argv
