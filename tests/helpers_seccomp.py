"""The fork-install-attempt harness shared by the seccomp kernel tests.

Each attempt runs in a forked child, with or without the filter, and reports its errno (0 for
success) through a pipe; the parent waits. `refused_and_not_otherwise` runs both and demands
that the filter's errno appears only with the filter, so a test fails if its rule goes missing.
"""

from __future__ import annotations

import ctypes
import errno
import os
import resource
import traceback
from collections.abc import Callable
from typing import NamedTuple

import pytest

from corral.backends.seccomp import SeccompOptions, build_filter, host_arch, install
from corral.backends.seccomp_bpf import ARCHES

ARCH = host_arch()
NR = ARCHES[ARCH].syscalls
NONE = SeccompOptions("none")
LOCAL = SeccompOptions("local")
OPEN = SeccompOptions("filtered", allow_unix_sockets=True, allow_ptrace=True)
HIGH = 1 << 32
MISSING = b"/nonexistent-corral-test"
SELF = "self"  # stands for the child's pid in an argument list
BAD_FLAG = 0x80000000  # an unknown flag: most calls check flags before anything else

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long


def syscall(nr: int, *args: int | bytes | str) -> int:
    """Make a raw system call; 0 when it succeeds, else its errno."""
    raw: list[ctypes.c_long | ctypes.c_char_p] = []
    for arg in args:
        if isinstance(arg, bytes):
            raw.append(ctypes.c_char_p(arg))
        else:
            raw.append(ctypes.c_long(os.getpid() if arg == SELF else int(arg)))
    ctypes.set_errno(0)
    return 0 if libc.syscall(ctypes.c_long(nr), *raw) >= 0 else ctypes.get_errno()


class Outcome(NamedTuple):
    error: int
    """The attempt's errno, 0 for success."""
    signal: int = 0
    """The signal that killed the child, 0 if it exited."""


def in_child(attempt: Callable[[], int], *, program: bytes | None) -> Outcome:
    """Fork, install `program` (if any), run `attempt`, and report its errno to the parent."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        status = 0
        try:
            os.close(read_end)
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a SIGSYS kill dumps no core
            if program is not None:
                install(program)
            os.write(write_end, str(attempt()).encode())
        except BaseException:
            traceback.print_exc()
            status = 70
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        report = pipe.read()
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return Outcome(-1, os.WTERMSIG(status))
    assert os.WEXITSTATUS(status) == 0, "the child failed before reporting"
    return Outcome(int(report))


def refused_and_not_otherwise(
    attempt: Callable[[], int], expected: int, options: SeccompOptions = NONE
) -> None:
    filtered = in_child(attempt, program=build_filter(options, arch=ARCH))
    unfiltered = in_child(attempt, program=None)
    assert filtered == Outcome(expected), errno.errorcode.get(filtered.error, filtered)
    if unfiltered.error == expected and os.geteuid() != 0:
        pytest.skip(f"as uid {os.geteuid()} the call fails with {expected} even unfiltered")
    assert unfiltered.signal == 0
    assert unfiltered.error != expected
