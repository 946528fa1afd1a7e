"""Helpers for tests that drive the `corral` command as a user would: run it, write its settings,
wait for a line it prints, watch the processes it leaves, and talk to it through a terminal.

Rules these helpers keep, so that no test depends on timing:
- every wait has an overall deadline and fails with what was seen so far; nothing sleeps to guess
  when something happened;
- processes are identified by (pid, start time), so a recycled pid is never mistaken for a
  survivor.
"""

from __future__ import annotations

import fcntl
import json
import os
import select
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import IO, NamedTuple

import pytest

from tests.conftest import Layout

CORRAL = (sys.executable, "-m", "corral")
DEADLINE = 20.0
"""Seconds any single wait may take: far above what a slow 2-core CI machine needs, so reaching
it means a hang, not slowness."""


def corral_run(*args: str) -> list[str]:
    return [*CORRAL, "run", *args]


def run_cli(
    layout: Layout,
    *args: str,
    input: bytes | None = None,
    pass_fds: Sequence[int] = (),
) -> subprocess.CompletedProcess[bytes]:
    """`corral run ARGS` from the workspace, stdin closed unless `input` is given."""
    return subprocess.run(
        corral_run(*args),
        cwd=layout.workspace,
        env=layout.env,
        input=input,
        stdin=subprocess.DEVNULL if input is None else None,
        capture_output=True,
        pass_fds=pass_fds,
        start_new_session=True,  # no controlling terminal: nobody could answer a question
        timeout=60,
    )


def write_settings(
    layout: Layout, content: str | dict[str, object], *, where: str = "project"
) -> str:
    """Write the project (or, `where="user"`, the user's) settings file (text as is, a dict as
    JSON); returns its path."""
    directory = (
        f"{layout.workspace}/.corral" if where == "project" else f"{layout.home}/.config/corral"
    )
    os.makedirs(directory, exist_ok=True)
    path = f"{directory}/settings.json"
    with open(path, "w") as f:
        f.write(content if isinstance(content, str) else json.dumps(content))
    return path


def open_leaky_fd(path: str, *, at_least: int = 50) -> int:
    """Open `path` for appending as an inheritable fd numbered >= `at_least` (a number no
    program opens by chance), the way a careless parent process leaks one."""
    low = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    fd = fcntl.fcntl(low, fcntl.F_DUPFD, at_least)
    os.close(low)
    os.set_inheritable(fd, True)
    return fd


def fd_listing(ls_output: bytes) -> dict[int, str]:
    """fd number -> target, from `ls -l /proc/self/fd`."""
    fds = {}
    for line in ls_output.decode(errors="replace").splitlines():
        if " -> " in line:
            left, target = line.split(" -> ", 1)
            fds[int(left.split()[-1])] = target
    return fds


def wait_for_line(stream: IO[bytes] | None, expected: bytes, *, what: str) -> bytes:
    """Read `stream` (unbuffered, straight from its fd) until a line equal to `expected`."""
    assert stream is not None
    seen = b""
    end = time.monotonic() + DEADLINE
    while expected not in seen.splitlines():
        left = end - time.monotonic()
        ready, _, _ = select.select([stream], [], [], max(left, 0))
        if not ready:
            pytest.fail(f"no {expected!r} line within {DEADLINE:g} s ({what}); got {seen!r}")
        chunk = os.read(stream.fileno(), 4096)
        if not chunk:
            pytest.fail(f"output ended before {expected!r} ({what}); got {seen!r}")
        seen += chunk
    return seen


# --- processes ---------------------------------------------------------------------------------


class Proc(NamedTuple):
    pid: int
    start: int
    """Start time in clock ticks since boot (field 22 of /proc/PID/stat)."""
    ppid: int
    ns_pids: tuple[int, ...]
    """NSpid: the pid in each nested pid namespace, host first, innermost last."""


def read_proc(pid: int) -> Proc | None:
    """The process `pid` if it is alive (zombies count as dead: they run nothing)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        with open(f"/proc/{pid}/status") as f:
            status = f.read()
    except OSError:
        return None
    # The command name may hold spaces and parentheses; the fields start after the last ")".
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):
        return None
    ns_pids: tuple[int, ...] = ()
    for line in status.splitlines():
        if line.startswith("NSpid:"):
            ns_pids = tuple(int(p) for p in line.split()[1:])
    return Proc(pid, int(fields[19]), int(fields[1]), ns_pids)


def descendants(root: int) -> list[Proc]:
    """Every live process below `root` (not `root` itself), from the host's /proc."""
    procs = [p for p in map(read_proc, _all_pids()) if p is not None]
    below: list[Proc] = []
    parents = {root}
    while True:
        found = [p for p in procs if p.ppid in parents and p not in below]
        if not found:
            return below
        below += found
        parents = {p.pid for p in found}


def still_alive(procs: Sequence[Proc]) -> list[Proc]:
    """Those of `procs` that still run (same pid and the same start time)."""
    return [p for p in procs if (now := read_proc(p.pid)) is not None and now.start == p.start]


def _all_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


# --- a terminal --------------------------------------------------------------------------------

# The child makes the terminal on its stdin its controlling terminal, then becomes the command.
# A separate interpreter does this so that the test process never forks without exec.
_TAKE_TERMINAL = (
    "import fcntl, os, sys, termios\n"
    "fcntl.ioctl(0, termios.TIOCSCTTY, 0)\n"
    "os.execvp(sys.argv[1], sys.argv[1:])\n"
)


class Terminal:
    """A command running on a fresh pseudo-terminal, as if a user had typed it in a shell.

    `expect` waits for output after the previous match, `send` types, `finish` reads to the end
    and returns the exit status. All waits share one deadline, so a hang fails the test.
    """

    def __init__(self, argv: Sequence[str], *, cwd: str, env: dict[str, str]) -> None:
        self.master, slave = os.openpty()
        self.output = b""
        self._matched = 0
        self._end = time.monotonic() + DEADLINE
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _TAKE_TERMINAL, *argv],
                stdin=slave,
                stdout=slave,
                stderr=slave,
                cwd=cwd,
                env=env,
                start_new_session=True,
            )
        finally:
            os.close(slave)  # else reading the master never sees the end

    def send(self, text: bytes) -> None:
        os.write(self.master, text)

    def expect(self, text: bytes) -> None:
        while (at := self.output.find(text, self._matched)) < 0:
            if not self._read():
                pytest.fail(f"terminal output ended before {text!r}: {self.output!r}")
        self._matched = at + len(text)

    def finish(self) -> int:
        """Read until the terminal closes, then return the exit status (128 + N for signal N)."""
        while self._read():
            pass
        try:
            code = self.proc.wait(max(self._end - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            pytest.fail(f"the command did not exit within {DEADLINE:g} s: {self.output!r}")
        return 128 - code if code < 0 else code

    def _read(self) -> bool:
        """Read what is there; False once the other side has closed the terminal."""
        left = self._end - time.monotonic()
        ready, _, _ = select.select([self.master], [], [], max(left, 0))
        if not ready:
            pytest.fail(f"terminal hung for {DEADLINE:g} s; output so far: {self.output!r}")
        try:
            chunk = os.read(self.master, 4096)
        except OSError:  # EIO: every slave fd is closed
            return False
        self.output += chunk
        return bool(chunk)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.master)

    def __enter__(self) -> Terminal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- network evidence --------------------------------------------------------------------------
