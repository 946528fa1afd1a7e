"""The spool's file handling: its directories, reading one request, writing one result.

Everything here works through directory descriptors (`dir_fd=`), never through joined paths,
so a directory swapped for a symlink after the spool was opened changes nothing, and every
open of an agent-supplied name uses O_NOFOLLOW: a request that is a symlink to a host file is
refused without the target being read. The protocol itself is described in spool.py.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import secrets
import stat
from typing import TYPE_CHECKING, Literal, NamedTuple

from corral.errors import UsageError

if TYPE_CHECKING:
    from corral.bridge.service import JobView

Access = Literal["private", "shared"]
ACCESSES: tuple[Access, ...] = ("private", "shared")

# A request file is small JSON: a command name and a few arguments. Anything bigger is a
# mistake or an attempt to make corral read and hold a large file.
MAX_REQUEST_BYTES = 64 * 1024
ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")
REQUEST_SUFFIX = ".json"
# Names the agent may use while writing; never taken, never refused.
TEMP_SUFFIX = ".tmp"
SUBDIRS = ("requests", "processing", "results")
LOCK_NAME = ".corral-spool.lock"
# How much of an unusable name is kept in its error file's name (plus a hash, for uniqueness).
SANITIZED_KEEP = 40

_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: opening a FIFO planted as a request must not block the server.
_OPEN_REQUEST = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


class SpoolDirs(NamedTuple):
    """Open descriptors of the spool directory and its three subdirectories."""

    path: str
    root: int
    requests: int
    processing: int
    results: int
    lock: int
    file_mode: int
    """Mode of the result files: 0600, or 0644 in a shared folder (the agent may be another
    uid there; the folder's own permissions are the user's choice)."""

    def close(self) -> None:
        for fd in (self.lock, self.results, self.processing, self.requests, self.root):
            os.close(fd)


class RequestProblem(Exception):
    """A request file that cannot be used; carries the bridge error code for its error file."""

    def __init__(self, code: str, message: str, *, hint: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.hint = hint


class Request(NamedTuple):
    command: str
    args: dict[str, object]


# -- the directory ---------------------------------------------------------------------------


def open_spool(directory: str, *, access: Access) -> SpoolDirs:
    """Open (creating 0700 where absent) DIR and DIR/{requests,processing,results}, check who
    may write there, and take the spool's lock. Raises UsageError when it cannot be used."""
    path = os.path.abspath(directory)
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        root = os.open(path, _OPEN_DIR)
    except OSError as exc:
        raise UsageError(f"cannot open the spool directory {path}: {exc.strerror}") from exc
    opened = [root]
    try:
        _check_owner(path, root, access=access)
        mode = 0o700 if access == "private" else stat.S_IMODE(os.fstat(root).st_mode)
        for name in SUBDIRS:
            opened.append(_open_subdir(path, root, name, mode=mode, access=access))
        opened.append(_take_lock(path, root))
    except BaseException:
        for fd in opened:
            os.close(fd)
        raise
    root, requests, processing, results, lock = opened
    file_mode = 0o600 if access == "private" else 0o644
    return SpoolDirs(path, root, requests, processing, results, lock, file_mode)


def _check_owner(path: str, fd: int, *, access: Access) -> None:
    """A private spool must be ours and writable by nobody else: whoever can write requests
    can ask for every declared command. A shared folder is the user's explicit choice."""
    if access == "shared":
        return
    info = os.fstat(fd)
    if info.st_uid != os.geteuid():
        raise UsageError(
            f"the spool directory {path} belongs to uid {info.st_uid}, not to you",
            hint="use a directory of your own, or --spool-access shared for the folder you "
            "share with the agent",
        )
    if info.st_mode & 0o022:
        raise UsageError(
            f"the spool directory {path} is writable by other users "
            f"(mode {stat.S_IMODE(info.st_mode):04o})",
            hint=f"chmod go-w {path}, or pass --spool-access shared if it is the folder you "
            "share with the agent on purpose",
        )


def _open_subdir(path: str, root: int, name: str, *, mode: int, access: Access) -> int:
    created = True
    try:
        os.mkdir(name, mode, dir_fd=root)
    except FileExistsError:
        created = False
    except OSError as exc:
        raise UsageError(f"cannot create {path}/{name}: {exc.strerror}") from exc
    try:
        fd = os.open(name, _OPEN_DIR, dir_fd=root)
    except OSError as exc:
        why = "it is a symlink" if exc.errno in (errno.ELOOP, errno.ENOTDIR) else exc.strerror
        raise UsageError(f"cannot use {path}/{name}: {why}") from exc
    try:
        if created:
            # Through the descriptor: a name swapped for a symlink meanwhile changes nothing.
            # And the umask must not take away what the agent needs in a shared folder.
            os.fchmod(fd, mode)
        _check_owner(f"{path}/{name}", fd, access=access)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _take_lock(path: str, root: int) -> int:
    """One server per spool: its leftovers in processing/ are then known to be a dead
    server's (see `recover`). A file system without flock support gets no lock."""
    fd = os.open(
        LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=root
    )
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        os.close(fd)
        raise UsageError(
            f"another corral serve --spool is already serving {path}",
            hint="stop it first; two servers on one spool would answer the same requests",
        ) from exc
    except OSError as exc:
        if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            os.close(fd)
            raise
    return fd


# -- names -----------------------------------------------------------------------------------


def request_id(name: str) -> str | None:
    """The id of a request file name, or None when the name is not `<id>.json`."""
    if not name.endswith(REQUEST_SUFFIX):
        return None
    stem = name[: -len(REQUEST_SUFFIX)]
    return stem if ID_PATTERN.fullmatch(stem) else None


def is_ignored(name: str) -> bool:
    """Dot files and `*.tmp` are the agent's work in progress (or an editor's)."""
    return name.startswith(".") or name.endswith(TEMP_SUFFIX)


def sanitized(name: str) -> str:
    """A result name for a request file whose own name is unusable: the usable characters of
    the name (others become `_`, at most 40 kept), `-`, then 8 hex digits of its SHA-256."""
    raw = name.encode("utf-8", "surrogateescape")
    kept = re.sub(r"[^A-Za-z0-9_-]", "_", name)[:SANITIZED_KEEP]
    return f"{kept}-{hashlib.sha256(raw).hexdigest()[:8]}"


# -- reading a request -----------------------------------------------------------------------


def read_request(dir_fd: int, name: str) -> bytes:
    """The bytes of a request file, refusing symlinks, non-regular files and big files."""
    try:
        fd = os.open(name, _OPEN_REQUEST, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise RequestProblem(
                "malformed_request",
                "the request file is a symlink; corral does not follow links in the spool",
                hint="write the request as a regular file",
            ) from exc
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise RequestProblem("malformed_request", "the request is not a regular file")
        _check_size(info.st_size)
        data = os.read(fd, MAX_REQUEST_BYTES + 1)
        _check_size(len(data))
        return data
    finally:
        os.close(fd)


def _check_size(size: int) -> None:
    if size > MAX_REQUEST_BYTES:
        raise RequestProblem(
            "request_too_large",
            f"the request file has more than {MAX_REQUEST_BYTES} bytes",
            hint="send a command name and its arguments only",
        )


def _refuse_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    document = dict(pairs)
    if len(document) != len(pairs):
        # Two readers of one document must not disagree on which value counts.
        raise ValueError("a key appears twice in one object")
    return document


def parse_json(data: bytes) -> object:
    """Strict JSON: UTF-8, no NaN/Infinity, no key given twice. ValueError otherwise."""
    return json.loads(
        data.decode("utf-8"),
        parse_constant=_refuse_constant,
        object_pairs_hook=_no_duplicate_keys,
    )


def parse_request(data: bytes) -> Request:
    """`{"command": NAME, "args": {...}}` ("args" may be left out), or RequestProblem."""
    try:
        document = parse_json(data)
    except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise RequestProblem(
            "malformed_request",
            f"the request is not valid JSON: {exc}",
            hint='write {"command": NAME, "args": {...}} to requests/ID.json.tmp, then rename it',
        ) from exc
    if not isinstance(document, dict):
        raise RequestProblem("malformed_request", "the request must be a JSON object")
    extra = sorted(set(document) - {"command", "args"})
    if extra:
        raise RequestProblem(
            "malformed_request", f"unknown keys in the request: {', '.join(extra)}"
        )
    command = document.get("command")
    args = document.get("args", {})
    if not isinstance(command, str) or not command:
        raise RequestProblem("malformed_request", '"command" must be a non-empty string')
    if not isinstance(args, dict):
        raise RequestProblem("malformed_request", '"args" must be a JSON object')
    return Request(command, args)


# -- answers ---------------------------------------------------------------------------------


def error_json(code: str, message: str, hint: str = "") -> dict[str, object]:
    return {"error": {"code": code, "message": message, "hint": hint}}


def problem_json(problem: RequestProblem) -> dict[str, object]:
    return error_json(problem.code, problem.message, problem.hint)


def interrupted_json(rid: str, state: str) -> dict[str, object]:
    return {
        "id": rid,
        **error_json(
            "internal",
            f"the spool server stopped while this request was in progress (state: {state}); "
            "it may or may not have run",
            hint="check its effects before sending it again, under a new id",
        ),
    }


def denial_code(job: JobView) -> str:
    """approval_timeout when nobody decided in time (the bridge's reason says so), else denied."""
    return "approval_timeout" if job.reason.startswith("approval_timeout") else "denied"


def result_json(rid: str, job: JobView) -> dict[str, object]:
    document: dict[str, object] = {"id": rid, "ok": job.state == "succeeded", "job": job.as_json()}
    if job.state == "denied":
        document.update(
            error_json(
                denial_code(job),
                job.reason or "a human refused this request, or nobody approved it in time",
                hint="do not send it again unless the user asks you to",
            )
        )
    return document


# -- writing a result ------------------------------------------------------------------------


def write_json_atomically(dir_fd: int, name: str, document: object, *, mode: int) -> None:
    """Write `name` in the directory so that readers see the whole file or nothing: a
    temporary dot file in the same directory, fsync, rename over the name, fsync the
    directory (so the rename itself survives a crash)."""
    data = (json.dumps(document, indent=2, ensure_ascii=True) + "\n").encode()
    temp = f".{name}.{secrets.token_hex(6)}{TEMP_SUFFIX}"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(temp, flags, mode, dir_fd=dir_fd)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        remove_quietly(dir_fd, temp)
        raise
    os.fsync(dir_fd)


def remove_quietly(dir_fd: int, name: str) -> None:
    """unlink(2) never follows a symlink: removing a planted link leaves its target alone."""
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    except IsADirectoryError:
        pass


def exists(dir_fd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True
