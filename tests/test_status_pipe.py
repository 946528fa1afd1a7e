"""Reading bwrap's --json-status-fd: the sandbox's pid is taken as soon as it is whole, without
waiting for the rest of bwrap's first line, and never from a number cut short."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator

import pytest

from corral.backends.fsplan import FilesystemPlan
from corral.process import SandboxProcess, _whole_int

CASES = [
    (b'{ "child-pid": 4242', None),  # more digits may follow
    (b'{ "child-pid": 4242,', 4242),
    (b'{ "child-pid": 4242, "cgroup-namespace": 1', 4242),
    (b'{ "child-pid": 4242 }\n', 4242),
    (b'{ "child-pid": ', None),
    (b'{ "child-', None),
    (b"", None),
    (b'{ "exit-code": 3 }\n', None),
]


@pytest.mark.parametrize(("text", "expected"), CASES)
def test_whole_int(text: bytes, expected: int | None) -> None:
    assert _whole_int(text, b"child-pid") == expected


EMPTY_PLAN = FilesystemPlan((), (), (), (), (), ())


@pytest.fixture
def stand_in() -> Iterator[subprocess.Popen[bytes]]:
    """A process standing in for bwrap; the test writes bwrap's status itself."""
    popen = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=-1)
    yield popen
    assert popen.stdin is not None
    popen.stdin.close()
    popen.wait()


def bounded(seconds: int) -> None:
    """Turn a read that would block forever into a failure (SIGALRM), not a hung suite."""

    def fail(*_: object) -> None:
        raise AssertionError("init_pid waited for more than the pid")

    signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)


def test_the_pid_is_known_before_bwrap_ends_its_first_line(
    stand_in: subprocess.Popen[bytes],
) -> None:
    status_r, status_w = os.pipe()
    proc = SandboxProcess(
        stand_in, status_fd=status_r, session="new", journal=None, plan=EMPTY_PLAN, sandbox_id="t"
    )
    try:
        os.write(status_w, b'{ "child-pid": 4242')
        os.write(status_w, b', "cgroup-namespace": 4026532444')
        bounded(10)
        try:
            assert proc.init_pid() == 4242
        finally:
            signal.alarm(0)
        os.write(status_w, b' }\n{ "exit-code": 7 }\n')
    finally:
        os.close(status_w)
    assert stand_in.stdin is not None
    stand_in.stdin.close()
    assert proc.wait() == 7


def test_a_pid_cut_short_by_bwrap_exiting_is_still_read(
    stand_in: subprocess.Popen[bytes],
) -> None:
    status_r, status_w = os.pipe()
    proc = SandboxProcess(
        stand_in, status_fd=status_r, session="new", journal=None, plan=EMPTY_PLAN, sandbox_id="t"
    )
    os.write(status_w, b'{ "child-pid": 4242')
    os.close(status_w)
    assert proc.init_pid() == 4242
    assert stand_in.stdin is not None
    stand_in.stdin.close()
    assert proc.wait() == 0
