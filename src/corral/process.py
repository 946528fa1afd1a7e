"""A running sandboxed command, shaped like `subprocess.Popen`, and its exit status.

bwrap reports on its --json-status-fd: first the host pid of the sandbox's pid 1, then the
command's exit code. Signals go to the command (bwrap's pid 1 would ignore them); the exit
status is reported as a shell does: the code, or 128 + N when signal N killed the command.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess

from corral.backends.bubblewrap import Session
from corral.backends.fsplan import FilesystemPlan
from corral.backends.placeholders import remove_placeholders
from corral.errors import LaunchError

NAMESPACE_TEARDOWN_SECONDS = 30  # killing is immediate; this only bounds a wedged kernel


def shell_status(returncode: int) -> int:
    """subprocess's -N (killed by signal N) becomes the shell's 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


class SandboxProcess:
    """A running sandboxed command, shaped like `subprocess.Popen`."""

    def __init__(
        self,
        popen: subprocess.Popen[bytes],
        *,
        status_fd: int,
        session: Session,
        journal: str | None,
        plan: FilesystemPlan,
        sandbox_id: str,
    ) -> None:
        self._popen = popen
        self._status = os.fdopen(status_fd, "rb")
        self._status_text = b""
        self.session = session
        self._journal = journal
        self.plan = plan
        self.sandbox_id = sandbox_id
        self.pid = popen.pid
        self.stdin = popen.stdin
        self.stdout = popen.stdout
        self.stderr = popen.stderr
        self.returncode: int | None = None
        self._init_pidfd: int | None = None

    def _read_status_line(self) -> bytes:
        line = self._status.readline()
        self._status_text += line
        return line

    def init_pid(self) -> int | None:
        """Host pid of the sandbox's pid 1, from bwrap's --json-status-fd (read on demand)."""
        if b"child-pid" not in self._status_text:
            self._read_status_line()
        return _json_int(self._status_text, b"child-pid")

    def send_signal(self, sig: int) -> None:
        """Deliver `sig` to the sandboxed command (bwrap's pid 1 would ignore it)."""
        if self.returncode is not None:
            return
        init = self.init_pid()
        if init is None:
            return
        try:
            if self.session == "new":
                # bwrap's --new-session made pid 1 a session and group leader; the command
                # and its children share that group.
                os.killpg(init, sig)
            else:
                for child in _children(init):
                    os.kill(child, sig)
        except ProcessLookupError:
            pass

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """Kill the whole sandbox. Killing a pid namespace's pid 1 kills every process in it,
        and pid 1 exits only once they are all gone; `wait` waits for that, so after it
        returns nothing started inside (daemons, grandchildren) survives."""
        if self.returncode is not None:
            return
        init = self.init_pid()
        if init is not None and self._init_pidfd is None:
            self._init_pidfd = _pidfd_of_child_of(init, self._popen.pid)
        if self._init_pidfd is not None:
            signal.pidfd_send_signal(self._init_pidfd, signal.SIGKILL)
        self._popen.kill()

    def poll(self) -> int | None:
        if self.returncode is None and self._popen.poll() is not None:
            self._finish()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            self._popen.wait(timeout)
            self._finish()
        assert self.returncode is not None
        return self.returncode

    def communicate(
        self, input: bytes | None = None, timeout: float | None = None
    ) -> tuple[bytes | None, bytes | None]:
        out, err = self._popen.communicate(input, timeout)
        self._finish()
        return out, err

    def _finish(self) -> None:
        if self.returncode is not None:
            return
        rest = self._status.read()
        self._status_text += rest
        self._status.close()
        if self._init_pidfd is not None:
            # The kernel tears the namespace down after bwrap is gone: wait until it has.
            select.select([self._init_pidfd], [], [], NAMESPACE_TEARDOWN_SECONDS)
            os.close(self._init_pidfd)
            self._init_pidfd = None
        if self._journal is not None:
            remove_placeholders(self._journal)
            self._journal = None
        code = _json_int(self._status_text, b"exit-code")
        bwrap_code = self._popen.returncode
        if code is None and _json_int(self._status_text, b"child-pid") is None and bwrap_code > 0:
            self.returncode = shell_status(bwrap_code)
            raise LaunchError(
                f"bubblewrap could not start the sandbox (exit {bwrap_code})",
                hint="its message is above; `corral doctor` checks this machine",
            )
        self.returncode = code if code is not None else shell_status(bwrap_code)

    def __enter__(self) -> SandboxProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.returncode is None:
            self.kill()
            self.wait()


def _json_int(text: bytes, key: bytes) -> int | None:
    """Read `"key": N` from bwrap's status lines without importing json on the launch path."""
    at = text.find(b'"' + key + b'"')
    if at < 0:
        return None
    digits = text[text.index(b":", at) + 1 :].lstrip().split(b",")[0].split(b"}")[0].strip()
    return int(digits) if digits.lstrip(b"-").isdigit() else None


def _pidfd_of_child_of(pid: int, parent: int) -> int | None:
    """A pidfd for `pid`, checked (after opening, so no pid reuse can slip in) to be a child
    of `parent`, our own unreaped bwrap."""
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return None
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        ppid = -1
    if ppid != parent:
        os.close(fd)
        return None
    return fd


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children", encoding="ascii") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []
