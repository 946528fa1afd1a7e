"""The bwrap argv as an exact list: nothing runs."""

from __future__ import annotations

from corral.backends.bubblewrap import BwrapOptions, bwrap_argv
from corral.backends.fsplan import FilesystemPlan, Mount

PLAN = FilesystemPlan(
    mounts=(
        Mount("ro-bind", "/", "/"),
        Mount("dev", "/dev"),
        Mount("proc", "/proc"),
        Mount("tmpfs", "/tmp"),
        Mount("bind", "/w", "/w"),
        Mount("ro-bind", "/w/.git/hooks", "/w/.git/hooks"),
        Mount("placeholder", "/w/.envrc"),
        Mount("hide-file", "/h/.netrc"),
        Mount("hide-dir", "/h/.ssh"),
    ),
    placeholders=("/w/.envrc",),
    readable=("/",),
    writable=("/tmp", "/w"),
    denied=(),
    notes=(),
)

HEAD = [
    "bwrap",
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
    "1000",
    "--gid",
    "1000",
    "--hostname",
    "corral",
    "--disable-userns",
]
MOUNTS = [
    "--ro-bind", "/", "/",
    "--dev", "/dev",
    "--proc", "/proc",
    "--tmpfs", "/tmp",
    "--bind", "/w", "/w",
    "--ro-bind", "/w/.git/hooks", "/w/.git/hooks",
    "--ro-bind", "/dev/null", "/w/.envrc",
    "--ro-bind", "/run/empty", "/h/.netrc",
    "--tmpfs", "/h/.ssh", "--remount-ro", "/h/.ssh",
]  # fmt: skip


def test_new_session_argv() -> None:
    options = BwrapOptions(cwd="/w", uid=1000, gid=1000, status_fd=5, empty_file="/run/empty")
    argv = bwrap_argv(PLAN, options, ["make", "test"])
    assert argv == [
        *HEAD,
        "--new-session",
        *MOUNTS,
        "--chdir",
        "/w",
        "--json-status-fd",
        "5",
        "--",
        "make",
        "test",
    ]


def test_interactive_session_keeps_the_terminal_and_seccomp_goes_last() -> None:
    options = BwrapOptions(cwd="/w", uid=1000, gid=1000, session="inherit", seccomp_fd=7)
    argv = bwrap_argv(PLAN, options, ["bash"])
    assert "--new-session" not in argv
    assert argv[-4:] == [
        "--seccomp",
        "7",
        "--",
        "bash",
    ]


def test_old_bwrap_gets_no_disable_userns() -> None:
    options = BwrapOptions(cwd="/w", uid=1, gid=1, bwrap_version=(0, 6, 2))
    assert "--disable-userns" not in bwrap_argv(PLAN, options, ["true"])
