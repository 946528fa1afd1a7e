"""The supervisor: one thread per sandbox that answers the monitor's notifications.

Each notification is a system call of `seccomp_notify.WATCHED`, its process blocked until the
answer. While it waits:
1. read the path arguments from its memory and resolve a relative one against its working
   directory or directory fd (process.py), as the kernel is about to;
2. test each path against the boundary on the name alone (prefix tests, boundary.py rules
   1-3); only a suspect is confirmed on the real path and gets its executable read, while
   the process still exists, and then the notification is checked to be still valid (the
   pid still names the process whose memory was read);
3. report what was confirmed (so a call's record exists by the time it returns), and answer
   "continue": the kernel runs the call exactly as without the monitor, and the mount
   namespace, Landlock and corral's seccomp filter decide it.
After the answer, rule 4's link test runs for calls that follow a link in the writable paths
(the one disk read of the common case, kept out of the wait), and reports what it finds.

Every notification costs the waiting process a round trip through this thread (about 15 to
50 microseconds here, docs/monitoring.md), which is why the wait holds nothing but string work.

Reports are deduplicated: one per (operation, path, executable), at most MAX_REPORTS per
sandbox, so a loop that retries cannot flood the log. The launchers' own calls (bubblewrap
setting up its mounts, where paths mean something else) are not reported: their executable is
compared with the launchers' by device and inode.

The thread ends when no process is left under the filter, and closes the listener then: on
Linux 6.11+ a waiting receive returns at that point; before, the thread waits in poll(2) for
POLLHUP ahead of each receive (a few microseconds more per call). `stop` waits for that end.
A process still under the filter keeps being answered; when corral itself exits, the kernel
answers ENOSYS to its watched calls (only possible with the Landlock-only backend, whose
command's descendants can outlive it).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import select
import struct
import threading
from collections.abc import Callable, Collection, Mapping, Sequence
from time import perf_counter
from typing import NamedTuple

from corral.audit.violations import Attempt
from corral.backends.seccomp_notify import (
    AT_FDCWD,
    AT_REMOVEDIR,
    O_CREAT,
    O_EXCL,
    SECCOMP_USER_NOTIF_FLAG_CONTINUE,
    WRITE_FLAGS,
    Watched,
)
from corral.monitor.boundary import Boundary, Intent
from corral.monitor.process import ProcessReader

# ioctls of the listener, from <linux/seccomp.h> (SECCOMP_IOWR('!', n, type) and friends).
NOTIF_RECV = 0xC0502100
NOTIF_SEND = 0xC0182101
NOTIF_ID_VALID = 0x40082102
NOTIF_SET_FLAGS = 0x40082104
USER_NOTIF_FD_SYNC_WAKE_UP = 1
"""Linux 6.6+: the woken supervisor runs on the notifying task's CPU and back, which saves a
cross-CPU wake-up per call; older kernels refuse the flag and the monitor works without it."""

# struct seccomp_notif: id, pid, flags, then struct seccomp_data (nr, arch, ip, args[6]).
NOTIF = struct.Struct("=QIIiIQ6Q")
RESPONSE = struct.Struct("=QqiI")  # struct seccomp_notif_resp: id, val, error, flags
ID = struct.Struct("=Q")
CREATE_EXCLUSIVE = O_CREAT | O_EXCL
MAX_ERRORS = 10
MAX_REPORTS = 1000
"""Distinct attempts reported per sandbox; past that they are counted in `dropped` only."""

Report = Callable[[Attempt], None]


class Access(NamedTuple):
    """One path a notified call acts on."""

    operation: str
    intent: Intent
    path: str
    """Absolute and normalised, symlinks not resolved: as the program named it."""
    follows: bool
    """The kernel follows a symlink in the last component (boundary.py, rule 4)."""


def _signed32(value: int) -> int:
    """A directory fd is an int to the kernel: the low half, signed (AT_FDCWD is -100)."""
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value & 0x80000000 else value


def _normal(path: str) -> str:
    """os.path.normpath, skipped for the usual path that has nothing to normalise."""
    if "/." in path or "//" in path or path.endswith("/"):
        return os.path.normpath(path)
    return path


def decode(call: Watched, pid: int, args: Sequence[int], reader: ProcessReader) -> list[Access]:
    """The paths a notified call acts on, each with its operation and intent."""
    operation: str = call.operation
    intent: Intent = "write"
    follows = call.follows
    if operation == "open":
        if call.name == "creat":
            flags: int | None = WRITE_FLAGS
        elif call.flags is not None:
            flags = args[call.flags] & 0xFFFFFFFF
        else:  # openat2: the flags are the first field of struct open_how
            flags = reader.u64(pid, args[2])
        if flags is None:
            return []
        intent = "write" if flags & WRITE_FLAGS else "read"
        operation = intent
        # O_CREAT|O_EXCL fails on a symlink rather than following it.
        follows = flags & CREATE_EXCLUSIVE != CREATE_EXCLUSIVE
    elif operation == "unlink" and call.flags is not None and args[call.flags] & AT_REMOVEDIR:
        operation = "rmdir"
    found: list[Access] = []
    for index, where in enumerate(call.paths):
        text = reader.string(pid, args[where.path])
        if not text:  # NULL, unreadable, or "" with AT_EMPTY_PATH: an fd, not a path
            continue
        if text[0] != "/":
            dirfd = AT_FDCWD if where.dirfd is None else _signed32(args[where.dirfd])
            base = reader.directory(pid, dirfd)
            if base is None:
                continue
            text = f"{base}/{text}"
        # A link's source is only looked up; a rename's source is removed from its directory.
        source_read = operation == "link" and index == 0
        found.append(Access(operation, "read" if source_read else intent, _normal(text), follows))
    return found


class Supervisor:
    """Answers the notifications of one sandbox's listener on a thread of its own."""

    def __init__(
        self,
        receive: Callable[[], int | None],
        *,
        calls: Mapping[int, Watched],
        boundary: Boundary,
        report: Report,
        launchers: Collection[tuple[int, int]] = (),
        receive_ends: bool = False,
    ) -> None:
        """`receive`: called first on the thread, returns the listener fd (owned from then
        on), or None when the launch failed before handing it over. `launchers`: (st_dev,
        st_ino) of executables whose calls are never reported (bubblewrap). `receive_ends`:
        a waiting SECCOMP_IOCTL_NOTIF_RECV returns once no process is left under the filter
        (Linux 6.11+), so the thread need not poll before each notification."""
        self._receive = receive
        self._calls = calls
        self._boundary = boundary
        self._report = report
        self._launchers = frozenset(launchers)
        self._receive_ends = receive_ends
        self._listener = -1
        self._reader = ProcessReader()
        self._seen: set[tuple[str, str, str]] = set()
        self.dropped = 0
        """Attempts not reported: repeats, and distinct ones past MAX_REPORTS."""
        self.notifications = 0
        self.errors: list[Exception] = []
        """What went wrong while judging (a failing sink...): kept, never raised on the
        thread, where it would leave the sandbox's calls unanswered. At most MAX_ERRORS."""
        self.held = 0.0
        """Seconds the supervisor held calls, from receiving each to answering it: what it
        cost the sandbox beyond the kernel's round trip (the benchmark reports it)."""
        self._thread = threading.Thread(target=self._run, name="corral-monitor", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for the last process under the filter to go (the
        thread then closes the listener); False if one is left. The thread keeps answering
        for such a process (an orphan of the Landlock-only backend) until it ends too."""
        if self._thread.ident is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        listener = self._receive()
        if listener is None:
            return
        self._listener = listener
        try:
            with contextlib.suppress(OSError):  # before Linux 6.6: the answers are slower
                fcntl.ioctl(listener, NOTIF_SET_FLAGS, USER_NOTIF_FD_SYNC_WAKE_UP)
            self._serve(listener)
        finally:
            os.close(listener)
            self._reader.close()

    def _serve(self, listener: int) -> None:
        buffer = bytearray(NOTIF.size)
        empty = bytes(NOTIF.size)
        poller = select.poll()
        poller.register(listener, select.POLLIN)
        while True:
            # Before 6.11 a waiting receive never returns once the processes are gone: wait in
            # poll, which reports POLLHUP then.
            if not self._receive_ends and not all(e & select.POLLIN for _, e in poller.poll()):
                return
            buffer[:] = empty  # the kernel refuses a receive buffer that is not zeroed
            try:
                fcntl.ioctl(listener, NOTIF_RECV, buffer, True)
            except OSError as exc:
                if exc.errno not in (errno.ENOENT, errno.EINTR):
                    raise
                # A process killed while its notification waited, or (6.11+) none left.
                if any(not events & select.POLLIN for _, events in poller.poll(0)):
                    return
                continue
            received = perf_counter()
            self.notifications += 1
            self._handle(NOTIF.unpack_from(buffer), received)

    def _handle(self, notif: tuple[int, ...], received: float) -> None:
        """Judge one notification and answer it. The answer is sent whatever happens while
        judging: a call left without one would wait forever."""
        notif_id, pid = notif[0], notif[1]
        later: list[Access] = []
        try:
            later = self._judge(notif_id, pid, notif[3], notif[6:])
        except Exception as exc:  # a reporting sink that failed, a bug: never block the call
            self._keep(exc)
        finally:
            try:
                response = RESPONSE.pack(notif_id, 0, 0, SECCOMP_USER_NOTIF_FLAG_CONTINUE)
                self.held += perf_counter() - received
                fcntl.ioctl(self._listener, NOTIF_SEND, response)
            except OSError:
                pass  # ENOENT: the process was killed meanwhile; nothing waits for the answer
        try:
            for access in later:
                if self._boundary.may_be_planted_link(access.path):
                    for attempt in self._attempt(pid, access):  # its executable may be gone
                        self._report(attempt)
        except Exception as exc:
            self._keep(exc)

    def _keep(self, error: Exception) -> None:
        if len(self.errors) < MAX_ERRORS:
            self.errors.append(error)

    def _judge(self, notif_id: int, pid: int, nr: int, args: Sequence[int]) -> list[Access]:
        """Confirm and report the suspects of one call while it waits; return the accesses
        whose link test runs after the answer."""
        call = self._calls.get(nr)
        accesses: list[Access] = []
        if call is not None and call.operation == "chdir":
            self._reader.forget_directories()
        elif call is not None:
            accesses = decode(call, pid, args, self._reader)
        found: list[Attempt] = []
        later: list[Access] = []
        unrefused = self._boundary.unrefused
        for access in accesses:
            if access.operation in unrefused:
                continue
            if self._boundary.suspect(access.intent, access.path):
                found += self._attempt(pid, access)
            elif access.follows and self._boundary.in_planted_area(access.path):
                later.append(access)
        if found:
            try:
                fcntl.ioctl(self._listener, NOTIF_ID_VALID, ID.pack(notif_id))
            except OSError:
                return later  # the process is gone: what was read may be another's
            # Reported before the answer: once the call returns, its record exists (rare, so
            # the wait is no cost worth saving).
            for attempt in found:
                self._report(attempt)
        return later

    def _attempt(self, pid: int, access: Access) -> list[Attempt]:
        """The attempt a suspect access is, confirmed on the real path; [] when it is none,
        a launcher's, or already reported."""
        executable, identity = self._reader.executable(pid) or ("", (0, 0))
        if identity in self._launchers:
            return []
        verdict = self._boundary.verdict(access.intent, access.path)
        if verdict is None:
            return []
        key = (access.operation, verdict.path, executable)
        if key in self._seen or len(self._seen) >= MAX_REPORTS:
            self.dropped += 1
            return []
        self._seen.add(key)
        return [Attempt(pid, executable, access.operation, verdict.path, verdict.because,
                        verdict.fix)]  # fmt: skip
