"""The filesystem violation monitor: what a sandboxed command tried and the sandbox refused.

A seccomp user-notification filter (backends/seccomp_notify.py) is installed on the host side,
in the child that is about to exec bubblewrap (or, with the Landlock-only backend, the
command), so it covers every process of the sandbox without changing the launchers inside.
It only observes: corral answers every notification with "continue" and the kernel's own
layers decide (docs/monitoring.md has the design, what is and is not seen, and the costs).

One launch, step by step (`MonitorLaunch.spawn`):
1. the supervisor thread starts (monitor/supervisor.py) and waits for a listener;
2. a short-lived launcher thread sets no_new_privs and installs the filter on itself with
   SECCOMP_FILTER_FLAG_NEW_LISTENER (both are per thread: the rest of corral is untouched),
   hands the listener fd (close-on-exec) to the supervisor, and starts bubblewrap or the
   command with subprocess. The child inherits the thread's filter; exec keeps it; no
   process of the sandbox ever holds the listener. Because the filter is on the thread, not
   installed in the child between fork and exec, subprocess keeps its fast vfork path (a
   preexec_fn would cost about 3 ms per launch);
3. the launcher thread waits, as the parent of what it started, until the sandbox has ended
   and `Monitor.stop` lets it end, and with it its own use of the filter; the supervisor
   then ends when no process is left under the filter.
The supervisor already runs when the child makes its first watched call (Python's subprocess
lists /proc/self/fd in the child to close fds), so nothing waits for it.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable, Collection
from typing import TypeVar

from corral.audit.violations import Attempt
from corral.backends.seccomp import PR_SET_NO_NEW_PRIVS, SECCOMP_SET_MODE_FILTER, host_arch
from corral.backends.seccomp_bpf import ARCHES
from corral.backends.seccomp_notify import (
    SECCOMP_FILTER_FLAG_NEW_LISTENER,
    Opens,
    watched_calls,
)
from corral.monitor.boundary import METADATA_OPERATIONS, Boundary
from corral.monitor.supervisor import Report, Supervisor

T = TypeVar("T")

# SECCOMP_USER_NOTIF_FLAG_CONTINUE, without which an observer cannot let a call through.
MIN_KERNEL = (5, 5)
# A waiting SECCOMP_IOCTL_NOTIF_RECV returns once the filter has no process left.
RECEIVE_ENDS_KERNEL = (6, 11)
STOP_SECONDS = 5.0
"""How long `stop` waits for the last process under the filter: bubblewrap's pid namespace is
gone once the command has ended, only an orphan of the Landlock-only backend lingers."""


def kernel_version(kernel: str) -> tuple[int, int]:
    """(major, minor) of `uname -r`; (0, 0) when it cannot be read."""
    parts = kernel.split("-")[0].split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (ValueError, IndexError):
        return 0, 0


def monitor_unavailable(kernel: str, *, bwrap_setuid: bool) -> str | None:
    """Why the monitor cannot run on this machine, or None. `kernel` is `uname -r`."""
    if kernel_version(kernel) < MIN_KERNEL:
        return f"the violation monitor needs Linux {'.'.join(map(str, MIN_KERNEL))} or newer"
    if host_arch() not in ARCHES:
        return f"the violation monitor has no system call table for {host_arch()}"
    if bwrap_setuid:
        # no_new_privs, which an unprivileged seccomp filter needs, would stop a setuid
        # bubblewrap from gaining the privileges it runs on.
        return "the violation monitor cannot watch a setuid bubblewrap"
    return None


class MonitorLaunch:
    """The steps of the module docstring for one command."""

    def __init__(
        self,
        program: bytes,
        boundary: Boundary,
        report: Report,
        *,
        kernel: str,
        opens: Opens,
        launchers: Collection[str] = (),
        refused: Callable[[str], None] | None = None,
    ) -> None:
        """`program` is `build_notify_filter(opens=opens)`. `kernel`: `uname -r`. `launchers`
        are executables whose own calls are not reports (bubblewrap). `refused` hears why,
        when the kernel will not install the filter here and the command runs unwatched."""
        self._refused = refused
        import ctypes
        from _queue import SimpleQueue

        libc = ctypes.CDLL(None, use_errno=True)
        self._prctl = libc.prctl
        self._prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4
        self._syscall = libc.syscall
        self._syscall.restype = ctypes.c_long
        self._get_errno = ctypes.get_errno

        class SockFprog(ctypes.Structure):
            _fields_ = (("len", ctypes.c_ushort), ("filter", ctypes.c_void_p))

        self._program = ctypes.create_string_buffer(program, len(program))
        self._fprog = SockFprog(len(program) // 8, ctypes.addressof(self._program))
        self._args = (
            ctypes.c_long(ARCHES[host_arch()].syscalls["seccomp"]),
            ctypes.c_long(SECCOMP_SET_MODE_FILTER),
            ctypes.c_long(SECCOMP_FILTER_FLAG_NEW_LISTENER),
            ctypes.byref(self._fprog),
        )
        # Python before 3.12 holds the GIL across vfork() until the child execs (gh-104372),
        # so the supervisor could not answer the child's own watched calls in between:
        # subprocess lists /proc/self/fd there, a read that "all" watches. Fork then.
        self.vfork_safe = opens == "writes" or sys.version_info >= (3, 12)
        self._listeners: SimpleQueue[int | None] = SimpleQueue()
        self._supervisor = Supervisor(
            self._listeners.get,
            calls=watched_calls(host_arch()),
            boundary=boundary,
            report=report,
            launchers=_identities(launchers),
            receive_ends=kernel_version(kernel) >= RECEIVE_ENDS_KERNEL,
        )

    def spawn(self, start: Callable[[], T]) -> tuple[T, Monitor | None]:
        """Run `start` (which starts the sandbox's first process, e.g. subprocess.Popen) on a
        launcher thread under the filter, with the supervisor answering. Raises what `start`
        raises. Where the kernel refuses the filter (EBUSY under another supervisor's
        listener, as in a sandbox nested in one corral watches; no user notification in some
        container runtimes), `start` runs unwatched on the caller's thread, `refused` is told
        why, and there is no Monitor: the monitor only observes, so the command must not lose
        its run for it.

        The launcher thread then waits until `Monitor.stop`: it is the parent of the process
        it started, and bubblewrap's --die-with-parent (PR_SET_PDEATHSIG) fires when the
        parent *thread* exits, not the process."""
        self._supervisor.start()
        started = threading.Event()
        release = threading.Event()
        outcome: list[T] = []
        failure: list[BaseException] = []

        refusal: list[OSError] = []

        def launcher() -> None:
            try:
                listener = self._install()
            except OSError as exc:
                self._listeners.put(None)  # the supervisor ends
                refusal.append(exc)
                started.set()
                return
            self._listeners.put(listener)
            try:
                outcome.append(start())
            except BaseException as exc:  # re-raised on the caller's thread
                failure.append(exc)
            started.set()
            if not failure:
                release.wait()

        thread = threading.Thread(target=launcher, name="corral-monitor-launch", daemon=True)
        thread.start()
        started.wait()
        if refusal:
            thread.join()
            if self._refused is not None:
                self._refused(str(refusal[0]))
            return start(), None
        if failure:
            thread.join()
            raise failure[0]
        return outcome[0], Monitor(self._supervisor, release)

    def _install(self) -> int:
        """no_new_privs and the filter, on the calling thread only; the listener fd."""
        if self._prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            raise OSError(self._get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
        listener = int(self._syscall(*self._args))
        if listener < 0:
            failed = self._get_errno()
            raise OSError(
                failed, f"seccomp(SECCOMP_FILTER_FLAG_NEW_LISTENER): {os.strerror(failed)}"
            )
        return listener


def _identities(paths: Collection[str]) -> list[tuple[int, int]]:
    found = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            continue
        found.append((st.st_dev, st.st_ino))
    return found


class Monitor:
    """A running monitor: `stop` once the sandbox has ended (SandboxProcess does)."""

    def __init__(self, supervisor: Supervisor, release: threading.Event) -> None:
        self._supervisor = supervisor
        self._release = release

    @property
    def notifications(self) -> int:
        """How many calls were notified (for tests and the benchmark)."""
        return self._supervisor.notifications

    @property
    def held(self) -> float:
        """Seconds the supervisor held the notified calls, all together."""
        return self._supervisor.held

    def stop(self, timeout: float = STOP_SECONDS) -> bool:
        """Let the launcher thread go, then wait until no process is left under the filter,
        at most `timeout` seconds: after that every attempt has been reported. False if a
        process is still there."""
        self._release.set()
        return self._supervisor.stop(timeout)


__all__ = [
    "METADATA_OPERATIONS",
    "Attempt",
    "Boundary",
    "Monitor",
    "MonitorLaunch",
    "monitor_unavailable",
]
