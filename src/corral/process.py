"""A running sandboxed command, shaped like `subprocess.Popen`, and its exit status.

bwrap reports on its --json-status-fd: first the host pid of the sandbox's pid 1, then the
command's exit code. Signals go to the command (bwrap's pid 1 would ignore them); the exit
status is reported as a shell does: the code, or 128 + N when signal N killed the command.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
from collections.abc import Callable
from typing import IO

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
        status_fd: int | None,
        session: Session,
        journal: str | None,
        plan: FilesystemPlan,
        sandbox_id: str,
        cleanup: Callable[[], None] | None = None,
    ) -> None:
        """`status_fd`: bwrap's --json-status-fd; None for a command run directly (the
        Landlock-only backend), whose own pid is then the top of the sandbox."""
        self._popen = popen
        self._direct = status_fd is None
        # Unbuffered: each read is one read(2), so init_pid can stop as soon as the pid is in.
        self._status = os.fdopen(status_fd, "rb", buffering=0) if status_fd is not None else None
        self._cleanup = cleanup
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

    def _read_status_until_child_pid(self) -> None:
        """Read bwrap's status until the sandbox's pid is in whole, or bwrap closed the pipe.

        bwrap writes its first status line in pieces, the pid first and then one piece per
        namespace; waiting for the whole line (readline) woke corral up once per piece,
        eight times a launch. The pid is whole once anything follows its digits."""
        while self._status is not None and _whole_int(self._status_text, b"child-pid") is None:
            chunk = self._status.read(4096)
            if not chunk:
                return
            self._status_text += chunk

    def init_pid(self) -> int | None:
        """Host pid of the sandbox's pid 1, from bwrap's --json-status-fd (read on demand)."""
        if self._direct:
            return self._popen.pid
        self._read_status_until_child_pid()
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
                # bwrap's --new-session made pid 1 a session and group leader (a direct
                # command is started as its own group's leader); the command and its
                # children share that group.
                os.killpg(init, sig)
            elif self._direct:
                os.kill(init, sig)
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
        if self._direct:
            _kill_tree(self._popen.pid)
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
            if timeout is not None and self._popen.returncode is None:
                self._sleep_until_exit(timeout)
            self._popen.wait()
            self._finish()
        assert self.returncode is not None
        return self.returncode

    def _sleep_until_exit(self, timeout: float) -> None:
        """Sleeps until the child exits or `timeout` passes (TimeoutExpired).

        Popen.wait(timeout) polls with sleeps that grow to 50 ms, so every command waited on
        that way ended up to a poll step late (about 4 ms a launch); a pidfd becomes readable
        the moment the child exits. The child is ours and not yet reaped, so its pid cannot
        have been reused.
        """
        try:
            fd = os.pidfd_open(self._popen.pid)
        except OSError:
            self._popen.wait(timeout)
            return
        try:
            if not select.select([fd], [], [], timeout)[0]:
                raise subprocess.TimeoutExpired(self._popen.args, timeout)
        finally:
            os.close(fd)

    def communicate(
        self, input: bytes | None = None, timeout: float | None = None
    ) -> tuple[bytes | None, bytes | None]:
        out, err = self._popen.communicate(input, timeout)
        self._finish()
        return out, err

    def _finish(self) -> None:
        if self.returncode is not None:
            return
        if self._status is not None:
            self._status_text += self._status.read()
            self._status.close()
            self._status = None
        if self._cleanup is not None:
            self._cleanup()
            self._cleanup = None
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
        started = _json_int(self._status_text, b"child-pid") is not None
        if not self._direct and code is None and not started and bwrap_code > 0:
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


def _whole_int(text: bytes, key: bytes) -> int | None:
    """`_json_int`, but None while nothing follows the digits yet (more may be on the way)."""
    at = text.find(b'"' + key + b'"')
    colon = text.find(b":", at) if at >= 0 else -1
    if colon < 0:
        return None
    rest = text[colon + 1 :].lstrip()
    number = rest[: len(rest) - len(rest.lstrip(b"-0123456789"))]
    return _json_int(text, key) if number and len(rest) > len(number) else None


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


def _kill_tree(root: int) -> None:
    """SIGKILL a direct command's whole tree: its process group, then every descendant still
    found under it. Without a pid namespace a process that double-forked away from the tree
    is not found (docs/security-model.md)."""
    seen: list[int] = []
    todo = [root]
    while todo:
        pid = todo.pop()
        seen.append(pid)
        todo += _children(pid)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(root, signal.SIGKILL)
    for pid in seen:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children", encoding="ascii") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def communicate(
    proc: SandboxProcess, input: bytes | None, timeout: float | None
) -> tuple[bytes | None, bytes | None, bool]:
    try:
        out, err = proc.communicate(input, timeout)
        return out, err, False
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        return out, err, True


def capture_bounded(
    proc: SandboxProcess, input: bytes | None, timeout: float | None, limit: int
) -> tuple[bytes, bytes, bool, bool]:
    """Like communicate, but keep at most `limit` bytes of each stream and drain the rest, so
    a command cannot exhaust corral's memory through its output."""
    import threading

    kept: dict[str, list[bytes]] = {"out": [], "err": []}
    over: list[str] = []

    def read(name: str, stream: IO[bytes]) -> None:
        size = 0
        while chunk := stream.read1(65536):  # type: ignore[attr-defined]
            take = chunk[: max(limit - size, 0)]
            size += len(take)
            kept[name].append(take)
            if len(take) < len(chunk):
                over.append(name)
        stream.close()

    assert proc.stdout is not None and proc.stderr is not None
    readers = [
        threading.Thread(target=read, args=("out", proc.stdout), daemon=True),
        threading.Thread(target=read, args=("err", proc.stderr), daemon=True),
    ]
    for reader in readers:
        reader.start()
    if proc.stdin is not None:
        try:
            if input:
                proc.stdin.write(input)
            proc.stdin.close()
        except BrokenPipeError:
            pass
    timed_out = False
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        proc.kill()
        proc.wait()
    for reader in readers:
        reader.join()
    return b"".join(kept["out"]), b"".join(kept["err"]), timed_out, bool(over)
