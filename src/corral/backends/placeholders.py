"""Placeholder files: created before a launch, removed after, and never left behind.

A denied path that does not exist yet is blocked by mounting /dev/null over an empty file made
at its place (see fsplan.py). Two peers leave such files in users' workspaces; corral records
each one it creates in a journal under its state directory before creating it, removes it after
the run, and sweeps the journals of runs that were killed before they could clean up.
"""

from __future__ import annotations

import os
from collections.abc import Iterable


def _journal_path(journal_dir: str) -> str:
    return os.path.join(journal_dir, f"{os.getpid()}-{os.urandom(4).hex()}.txt")


def ensure_private_dir(path: str) -> None:
    """`os.makedirs(path, mode=0o700, exist_ok=True)`, with one stat where it exists already
    (every launch but the first), instead of makedirs' stat, failed mkdir and stat."""
    if not os.path.isdir(path):
        os.makedirs(path, mode=0o700, exist_ok=True)


# The journal is read and written with plain os calls: a Python file object costs four more
# system calls each way (fstat, ioctl, two lseeks), on every launch.
def _write_journal(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
    try:
        data = text.encode("utf-8")
        while data:
            data = data[os.write(fd, data) :]
    finally:
        os.close(fd)


def _read_journal(path: str) -> str:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks).decode("utf-8")


def create_placeholders(paths: Iterable[str], *, journal_dir: str) -> str | None:
    """Create the missing ones; return the journal path (None when nothing was created)."""
    missing = [p for p in paths if not os.path.lexists(p)]
    if not missing:
        return None
    ensure_private_dir(journal_dir)
    journal = _journal_path(journal_dir)
    # The journal is written first, so a kill between the two steps leaves at worst a journal
    # line for a file that was never made, which the sweep skips. No fsync: a killed process
    # loses nothing from the page cache, and syncing cost 4-8 ms on every launch.
    _write_journal(journal, "\n".join(missing) + "\n")
    for path in missing:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o444)
        except FileExistsError:
            continue  # appeared meanwhile: mounting over it still denies it
        os.close(fd)
    return journal


def remove_placeholders(journal: str) -> None:
    """Remove each journalled path that is still an empty regular file, then the journal."""
    try:
        paths = [line for line in _read_journal(journal).splitlines() if line]
    except FileNotFoundError:
        return
    for path in paths:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        if st.st_size == 0 and (st.st_mode & 0o170000) == 0o100000:
            os.unlink(path)
    os.unlink(journal)


def sweep_stale(journal_dir: str) -> None:
    """Clean up after runs whose corral process died before removing its placeholders."""
    try:
        names = os.listdir(journal_dir)
    except FileNotFoundError:
        return
    for name in names:
        pid_text = name.split("-", 1)[0]
        if not pid_text.isdigit() or _alive(int(pid_text)):
            continue
        remove_placeholders(os.path.join(journal_dir, name))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
