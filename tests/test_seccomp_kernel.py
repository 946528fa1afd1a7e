"""The seccomp program run by the kernel: every rule refuses, and the same call does not.

Each attempt runs twice in a forked child (tests/helpers_seccomp.py), once with the filter
installed and once without. A rule passes only when the filtered call fails with the rule's
errno AND the unfiltered call does not, so every test fails if its rule goes missing.
Arguments are chosen so the unfiltered call fails harmlessly (a missing path, a bad fd, an
invalid flag) even as root, or succeeds where success changes nothing outside the child.
Where the host can see the effect, test_seccomp_evidence.py checks it.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import signal
import socket
import subprocess
import threading
from collections.abc import Callable
from functools import partial

import pytest

from corral.backends.seccomp import build_filter
from tests.helpers_seccomp import (
    ARCH,
    BAD_FLAG,
    HIGH,
    MISSING,
    NONE,
    NR,
    OPEN,
    SELF,
    Outcome,
    in_child,
    refused_and_not_otherwise,
    syscall,
)

# Arguments that fail early without the filter (see the module docstring).
DENIED_CALLS: list[tuple[str, tuple[int | bytes | str, ...], int]] = [
    ("ptrace", (3, 1, 0, 0), errno.EPERM),  # PEEKUSER on init, which we do not trace: ESRCH
    ("process_vm_readv", (SELF, 0, 0, 0, 0, 0), errno.EPERM),  # nothing to copy: succeeds
    ("process_vm_writev", (SELF, 0, 0, 0, 0, 0), errno.EPERM),
    ("keyctl", (9999,), errno.EPERM),
    ("add_key", (0, 0, 0, 0, 0), errno.EPERM),
    ("request_key", (0, 0, 0, 0), errno.EPERM),
    ("bpf", (9999, 0, 0), errno.EPERM),
    ("perf_event_open", (0, 0, -1, -1, 0), errno.EPERM),
    ("userfaultfd", (1 | 2,), errno.EPERM),  # UFFD_USER_MODE_ONLY plus an unknown flag
    ("kexec_load", (0, 0, 0, 0xFFFF8000), errno.EPERM),
    ("kexec_file_load", (-1, -1, 0, 0, 0x8000), errno.EPERM),
    ("init_module", (0, 0, 0), errno.EPERM),
    ("finit_module", (-1, b"", 0), errno.EPERM),
    ("delete_module", (b"corral_no_such_module", 0), errno.EPERM),
    ("mount", (b"none", MISSING, b"tmpfs", 0, 0), errno.EPERM),
    ("umount2", (MISSING, BAD_FLAG), errno.EPERM),
    ("pivot_root", (MISSING, MISSING), errno.EPERM),
    ("move_mount", (-1, b"", -1, b"", BAD_FLAG), errno.EPERM),
    ("open_tree", (-1, b"", BAD_FLAG), errno.EPERM),
    ("open_tree_attr", (-1, b"", BAD_FLAG, 0, 0), errno.EPERM),
    ("fsopen", (0, 0), errno.EPERM),
    ("fsconfig", (-1, 0, 0, 0, 0), errno.EPERM),
    ("fsmount", (-1, BAD_FLAG, 0), errno.EPERM),
    ("fspick", (-1, b"", BAD_FLAG), errno.EPERM),
    ("mount_setattr", (-1, b"", BAD_FLAG, 0, 0), errno.EPERM),
    ("io_uring_setup", (0, 0), errno.EPERM),
    ("io_uring_enter", (-1, 0, 0, 0, 0, 0), errno.EPERM),
    ("io_uring_register", (-1, 0, 0, 0), errno.EPERM),
    ("swapon", (MISSING, 0), errno.EPERM),
    ("swapoff", (MISSING,), errno.EPERM),
    ("reboot", (0, 0, 0, 0), errno.EPERM),  # wrong magic numbers: EINVAL, never a reboot
    ("acct", (MISSING,), errno.EPERM),
    ("quotactl", (0xFF, MISSING, 0, 0), errno.EPERM),  # quota type 255 does not exist
    ("quotactl_fd", (-1, 0, 0, 0), errno.EPERM),
    ("lookup_dcookie", (0, 0, 0), errno.EPERM),
    ("setns", (-1, 0), errno.EPERM),
    ("name_to_handle_at", (-100, MISSING, 0, 0, 0), errno.EPERM),
    ("open_by_handle_at", (-1, 0, 0), errno.EPERM),
    ("clone3", (0, 0), errno.ENOSYS),
    ("clone", (0x10000000 | 0x200, 0, 0, 0, 0), errno.EPERM),  # NEWUSER|FS: EINVAL unfiltered
    ("clone", (0x00020000 | 0x200, 0, 0, 0, 0), errno.EPERM),  # NEWNS|FS: EINVAL unfiltered
    ("unshare", (0x10000000,), errno.EPERM),  # a real new user namespace, in the child only
    *(
        ("unshare", (flag | 0x1, 0), errno.EPERM)  # 0x1 is invalid for unshare: EINVAL
        for flag in (0x80, 0x20000, 0x2000000, 0x4000000, 0x8000000, 0x20000000, 0x40000000)
    ),
    ("personality", (0x0040000,), errno.EPERM),
    ("personality", (HIGH | 0x0040000,), errno.EPERM),
    ("socket", (HIGH | socket.AF_UNIX, socket.SOCK_STREAM, 0), errno.EPERM),
    ("socket", (socket.AF_INET6, socket.SOCK_STREAM, 0), errno.EACCES),
    ("socket", (socket.AF_PACKET, socket.SOCK_RAW, 0), errno.EACCES),
    ("socket", (40, socket.SOCK_STREAM, 0), errno.EACCES),  # AF_VSOCK
    ("ioctl", (-1, 0x5412, 0), errno.EPERM),  # TIOCSTI; the pty tests below show its effect
    ("ioctl", (-1, 0x541C, 0), errno.EPERM),  # TIOCLINUX
]


@pytest.mark.parametrize(("name", "args", "expected"), DENIED_CALLS)
def test_denied_call(name: str, args: tuple[int | bytes | str, ...], expected: int) -> None:
    refused_and_not_otherwise(partial(syscall, NR[name], *args), expected)


def test_ptrace_calls_allowed_when_asked() -> None:
    attempt = partial(syscall, NR["process_vm_readv"], SELF, 0, 0, 0, 0, 0)
    assert in_child(attempt, program=build_filter(OPEN, arch=ARCH)) == Outcome(0)


def test_x32_abi_refused() -> None:
    if ARCH != "x86_64":
        pytest.skip(f"x32 exists only on x86_64, not {ARCH}")
    refused_and_not_otherwise(partial(syscall, 0x40000000 | 39), errno.EPERM)  # x32 getpid


def test_syscall_minus_one_still_answers_enosys() -> None:
    attempt = partial(syscall, -1)
    assert in_child(attempt, program=build_filter(NONE, arch=ARCH)) == Outcome(errno.ENOSYS)


def int80_getpid() -> int:
    """i386 getpid through `int 0x80` from this 64-bit process: 0 if it returns our pid."""
    code = b"\xb8\x14\x00\x00\x00\xcd\x80\xc3"  # mov eax, 20; int 0x80; ret
    page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    page.write(code)
    function = ctypes.CFUNCTYPE(ctypes.c_int)(ctypes.addressof(ctypes.c_char.from_buffer(page)))
    return 0 if function() == os.getpid() else 1


def test_i386_entry_kills_the_process() -> None:
    if ARCH != "x86_64":
        pytest.skip(f"the i386 entry exists only on x86_64, not {ARCH}")
    unfiltered = in_child(int80_getpid, program=None)
    filtered = in_child(int80_getpid, program=build_filter(OPEN, arch=ARCH))
    assert filtered == Outcome(-1, signal.SIGSYS)
    assert unfiltered.signal != signal.SIGSYS  # returns our pid, or SIGSEGV without ia32


# --- Allowed things still work under the strictest options --------------------------------


def file_round_trip() -> int:
    path = f"/tmp/corral-seccomp-{os.getpid()}"
    with open(path, "w", encoding="utf-8") as f:
        f.write("data")
    with open(path, encoding="utf-8") as f:
        ok = f.read() == "data"
    os.unlink(path)
    return 0 if ok else 1


def socketpair_talks() -> int:
    left, right = socket.socketpair()
    left.sendall(b"x")
    return 0 if right.recv(1) == b"x" else 1


def thread_runs() -> int:
    seen: list[int] = []
    worker = threading.Thread(target=lambda: seen.append(1))  # clone3 -> ENOSYS -> clone
    worker.start()
    worker.join()
    return 0 if seen == [1] else 1


def fork_and_exec() -> int:
    pid = os.fork()
    if pid == 0:
        os._exit(7)
    forked = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 7
    spawned = subprocess.run(["/bin/sh", "-c", "exit 3"], check=False).returncode == 3
    return 0 if forked and spawned else 1


def netlink_socket() -> int:
    socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0).close()
    return 0


ALLOWED: list[tuple[str, Callable[[], int]]] = [
    ("file", file_round_trip),
    ("socketpair", socketpair_talks),
    ("thread", thread_runs),
    ("fork and exec", fork_and_exec),
    ("netlink", netlink_socket),
    ("personality query", partial(syscall, NR["personality"], 0xFFFFFFFF)),
    ("personality PER_LINUX", partial(syscall, NR["personality"], 0)),
    ("unshare CLONE_FILES", partial(syscall, NR["unshare"], 0x400)),
]


@pytest.mark.parametrize(("what", "attempt"), ALLOWED)
def test_allowed_under_the_strictest_filter(what: str, attempt: Callable[[], int]) -> None:
    assert in_child(attempt, program=build_filter(NONE, arch=ARCH)) == Outcome(0)
