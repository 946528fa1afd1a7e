"""Reading a waiting process's system-call arguments from the host: strings from its memory
(/proc/PID/mem), its working directory and directory fds (/proc/PID/cwd, /proc/PID/fd/N).

What /proc shows for a process inside bubblewrap's mount namespace is the sandbox's view of a
path, and corral mounts everything at its real path, so that view is the host's too.

Costs matter here: the supervisor calls these while a process waits (supervisor.py), and
every microsecond is paid by every watched call. So /proc/PID/mem stays open per process, and
working directories are remembered per pid until any chdir or fchdir is notified (threads
share theirs, so one thread's chdir forgets every entry) and until the pid's address space
changes (a reused pid is another process; an exec'd one keeps its directory but is read again,
which costs one readlink). Executables are remembered the same way, until the address space
changes.

Every method returns None for what cannot be read: the process died, the pointer is bad.
"""

from __future__ import annotations

import os
import struct

from corral.backends.seccomp_notify import AT_FDCWD

PATH_MAX = 4096
PAGE = 4096  # the smallest page: a read never crosses into a page that may be unmapped
FIRST_READ = 256
"""Most paths are shorter: read this much first, the rest of the page only when needed."""
MAX_OPEN_MEMORY = 128
"""/proc/PID/mem files kept open, one per recently seen process; all are closed past it."""
U64 = struct.Struct("=Q")


class ProcessReader:
    def __init__(self) -> None:
        self._memory: dict[int, int] = {}
        self._cwd: dict[int, str] = {}
        self._exe: dict[int, tuple[str, tuple[int, int]]] = {}

    def close(self) -> None:
        for fd in self._memory.values():
            os.close(fd)
        self._memory.clear()
        self._cwd.clear()
        self._exe.clear()

    def forget_directories(self) -> None:
        self._cwd.clear()

    def _read(self, pid: int, address: int, size: int) -> bytes | None:
        fd = self._memory.get(pid)
        if fd is not None:
            try:
                data = os.pread(fd, size, address)
            except OSError:
                return None
            if data:
                return data
            # Nothing read: the file belongs to an address space the pid no longer has (it
            # exec'd, or the pid was reused). Open the current one.
            os.close(self._memory.pop(pid))
        if len(self._memory) >= MAX_OPEN_MEMORY:
            self.close()
        self._cwd.pop(pid, None)
        self._exe.pop(pid, None)
        try:
            fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        self._memory[pid] = fd
        try:
            return os.pread(fd, size, address) or None
        except OSError:
            return None

    def string(self, pid: int, address: int) -> str | None:
        """The NUL-terminated string at `address`, at most PATH_MAX bytes."""
        if address == 0:
            return None
        found = b""
        size = min(FIRST_READ, PAGE - address % PAGE)
        while len(found) < PATH_MAX:
            chunk = self._read(pid, address, size)
            if chunk is None:
                return None
            end = chunk.find(0)
            if end >= 0:
                return (found + chunk[:end]).decode(errors="surrogateescape")
            found += chunk
            address += len(chunk)
            size = PAGE - address % PAGE
        return None

    def u64(self, pid: int, address: int) -> int | None:
        data = self._read(pid, address, 8) if address else None
        return int(U64.unpack(data)[0]) if data is not None and len(data) == 8 else None

    def directory(self, pid: int, dirfd: int) -> str | None:
        """Where a relative path starts: the working directory (AT_FDCWD) or the fd's path."""
        if dirfd == AT_FDCWD:
            known = self._cwd.get(pid)
            if known is not None:
                return known
            link = f"/proc/{pid}/cwd"
        else:
            link = f"/proc/{pid}/fd/{dirfd}"
        try:
            target = os.readlink(link)
        except OSError:
            return None
        if not target.startswith("/"):
            return None  # "pipe:[...]", "anon_inode:..." and the like: not a directory
        if dirfd == AT_FDCWD:
            self._cwd[pid] = target
        return target

    def executable(self, pid: int) -> tuple[str, tuple[int, int]] | None:
        """The process's executable as the sandbox names it, and its (st_dev, st_ino);
        remembered until its address space changes (an exec), like the working directory."""
        known = self._exe.get(pid)
        if known is not None:
            return known
        exe = f"/proc/{pid}/exe"
        try:
            st = os.stat(exe)
            found = os.readlink(exe), (st.st_dev, st.st_ino)
        except OSError:
            return None
        if pid in self._memory:  # only what the address-space check covers is remembered
            self._exe[pid] = found
        return found
