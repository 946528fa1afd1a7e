"""The seccomp program handed to bubblewrap as `--seccomp FD`, as corral's runner will do.

What bwrap 0.8 does with the fd, seen from inside: it reads the program to EOF and closes the
fd while parsing its arguments, so the sandboxed command never inherits it; it loads the
filter (prctl PR_SET_SECCOMP, after no_new_privs) both into its own pid-1 reaper and into the
command, just before exec, so its own mounts are not subject to it.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from typing import Any, Literal

import pytest

from corral.backends.seccomp import SeccompOptions, build_filter, host_arch, open_program_fd

pytestmark = pytest.mark.sandbox

PYTHON = "/usr/bin/python3"  # the system interpreter: the sandbox sees the host's /usr

# Run inside the sandbox: report the fd, the seccomp mode of itself and of bwrap's pid 1,
# and what socket(AF_UNIX) + connect and socket(AF_INET) give.
REPORT = r"""
import json, os, socket, sys

def seccomp_mode(pid):
    with open(f"/proc/{pid}/status") as status:
        return next(int(l.split()[1]) for l in status if l.startswith("Seccomp:"))

def attempt(family, address):
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            if address:
                s.connect(address)
    except OSError as failure:
        return failure.errno
    return 0

try:
    os.fstat(int(sys.argv[1]))
    fd_open = True
except OSError:
    fd_open = False
print(json.dumps({
    "fd_open": fd_open,
    "mode": seccomp_mode("self"),
    "pid1_mode": seccomp_mode(1),
    "unix": attempt(socket.AF_UNIX, sys.argv[2]),
    "inet": attempt(socket.AF_INET, None),
}))
"""

Source = Literal["memfd", "pipe"]


def program_fd(program: bytes, source: Source) -> int:
    if source == "memfd":
        return open_program_fd(program)
    read_end, write_end = os.pipe()
    os.write(write_end, program)  # far below a pipe's capacity
    os.close(write_end)  # bwrap reads to EOF
    return read_end


def run_in_bwrap(program: bytes | None, socket_path: str, *, source: Source) -> dict[str, Any]:
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        pytest.skip("bubblewrap is not installed")
    fd = program_fd(program, source) if program is not None else None
    argv = [bwrap, "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--unshare-all"]
    if fd is not None:
        argv += ["--seccomp", str(fd)]
    argv += ["--", PYTHON, "-c", REPORT, str(fd if fd is not None else 99), socket_path]
    try:
        done = subprocess.run(
            argv, pass_fds=() if fd is None else (fd,), capture_output=True, text=True, check=False
        )
    finally:
        if fd is not None:
            os.close(fd)
    assert done.returncode == 0, done.stderr
    report: dict[str, Any] = json.loads(done.stdout)
    return report


@pytest.fixture
def listener(tmp_path_factory: pytest.TempPathFactory) -> Iterator[socket.socket]:
    """A unix socket on the host; --ro-bind / / makes its path visible in the sandbox."""
    path = str(tmp_path_factory.mktemp("bwrap") / "s")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(path)
        server.listen(4)
        server.setblocking(False)
        yield server


def accepted(server: socket.socket) -> bool:
    try:
        server.accept()[0].close()
    except BlockingIOError:
        return False
    return True


@pytest.mark.parametrize("source", ["memfd", "pipe"])
def test_bwrap_loads_the_filter_and_closes_its_fd(listener: socket.socket, source: Source) -> None:
    program = build_filter(SeccompOptions("none"), arch=host_arch())
    report = run_in_bwrap(program, listener.getsockname(), source=source)
    assert report == {
        "fd_open": False,
        "mode": 2,
        "pid1_mode": 2,
        "unix": 1,  # EPERM
        "inet": 13,  # EACCES
    }
    assert not accepted(listener)


def test_without_the_filter_the_same_sandbox_connects(listener: socket.socket) -> None:
    report = run_in_bwrap(None, listener.getsockname(), source="memfd")
    assert (report["mode"], report["unix"], report["inet"]) == (0, 0, 0)
    assert accepted(listener)


def test_network_local_keeps_inet_inside_bwrap(listener: socket.socket) -> None:
    program = build_filter(SeccompOptions("local", allow_unix_sockets=True), arch=host_arch())
    report = run_in_bwrap(program, listener.getsockname(), source="memfd")
    assert (report["mode"], report["unix"], report["inet"]) == (2, 0, 0)
    assert accepted(listener)
