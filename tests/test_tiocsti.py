"""An interactive program keeps its terminal, but cannot type into the user's shell.

With a TTY, corral does not start a new session (the program needs its terminal), so the
TIOCSTI ioctl, which pushes bytes into the terminal's input queue as if the user typed them,
would let a sandboxed program run commands in the user's shell after it exits. The seccomp
layer refuses it; this test proves it from the host side by reading the terminal's queue.
"""

from __future__ import annotations

import fcntl
import os
import select
import subprocess
import sys
import termios

import pytest

from tests.conftest import Layout

pytestmark = pytest.mark.usefixtures("sandbox_available")

INJECT = (
    "import fcntl, termios\n"
    "for ch in b'echo pwned\\n':\n"
    "    try:\n"
    "        fcntl.ioctl(0, termios.TIOCSTI, bytes([ch]))\n"
    "    except OSError as e:\n"
    "        print('refused', e.errno); break\n"
)


def _queued_input(slave: int) -> bytes:
    """What sits in the terminal's input queue: what the user's shell would read next."""
    os.set_blocking(slave, False)
    data = b""
    while select.select([slave], [], [], 0)[0]:
        try:
            chunk = os.read(slave, 1024)
        except BlockingIOError:
            break
        if not chunk:
            break
        data += chunk
    return data


@pytest.mark.parametrize("sandboxed", [False, True], ids=["unsandboxed", "sandboxed"])
def test_tiocsti_cannot_type_into_the_terminal(layout: Layout, sandboxed: bool) -> None:
    master, slave = os.openpty()
    attrs = termios.tcgetattr(slave)
    attrs[3] &= ~termios.ICANON  # raw-ish: queued bytes are readable without a newline
    termios.tcsetattr(slave, termios.TCSANOW, attrs)

    def controlling_terminal() -> None:
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    inject = ["python3", "-c", INJECT]
    argv = [sys.executable, "-m", "corral", "run", "--", *inject] if sandboxed else inject
    try:
        done = subprocess.run(
            argv,
            cwd=layout.workspace,
            env=layout.env,
            stdin=slave,
            capture_output=True,
            start_new_session=True,
            preexec_fn=controlling_terminal,
            timeout=60,
        )
        queued = _queued_input(slave)
    finally:
        os.close(master)
        os.close(slave)
    injected = b"pwned" in queued
    assert injected != sandboxed, (queued, done.stdout, done.stderr)
    if sandboxed:
        assert b"refused" in done.stdout
