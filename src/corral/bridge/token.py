"""The bridge's bearer token: one secret per user, in a file only that user can read.

    <state dir>/bridge/          0700, owned by the user (corral fixes a looser mode on its own dir)
    <state dir>/bridge/token     0600, one line: 43 URL-safe characters (32 random bytes)

Rules:
1. The token is made by `secrets` and never derived from anything else.
2. The file appears complete or not at all: it is written to a temporary name opened with
   O_EXCL, then linked into place (first creation: `os.link` fails if another process won the
   race, and then that one's token is used) or renamed over the old one (rotation).
3. Reading refuses what another user could have planted or read: a symlink, a file or directory
   owned by someone else, a token file readable by group or others. Fail closed, with a hint.
4. Comparison is constant-time (`hmac.compare_digest`), on bytes, so a non-ASCII header cannot
   raise.
5. A running server sees a rotation at once: `TokenFile.current()` re-reads the file whenever
   its identity (inode, size, mtime, ctime, mode, owner) changes, at one stat per request.

`corral token` prints the token (creating it on first use); `corral token --rotate` replaces it.
"""

from __future__ import annotations

import argparse
import contextlib
import hmac
import os
import secrets
import stat
import sys
from typing import TYPE_CHECKING

from corral.errors import CorralError

if TYPE_CHECKING:
    Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]

TOKEN_BYTES = 32  # 256 bits: far beyond guessing, even at the server's full request rate
MIN_TOKEN_CHARS = 32  # a shorter token in the file means it was edited by hand: refuse it
_TOKEN_ALPHABET = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def token_dir(state_dir: str) -> str:
    return os.path.join(state_dir, "bridge")


def token_path(state_dir: str) -> str:
    return os.path.join(token_dir(state_dir), "token")


def default_state_dir() -> str:
    """corral's state directory for the current user (XDG_STATE_HOME respected)."""
    from corral.hostpaths import host_paths

    return host_paths(os.getcwd(), os.environ).state_dir


def new_token() -> str:
    return secrets.token_urlsafe(TOKEN_BYTES)


def token_matches(presented: bytes, expected: str) -> bool:
    """Constant-time comparison of what a client sent with the token."""
    return hmac.compare_digest(presented, expected.encode("ascii"))


def load_or_create(state_dir: str) -> str:
    """The current token, creating the file (and its directory) on first use."""
    directory = _ensure_private_dir(token_dir(state_dir))
    path = os.path.join(directory, "token")
    token = _maybe_read(path)
    if token is not None:
        return token
    temporary = _write_temporary(directory, new_token())
    try:
        os.link(temporary, path)  # fails if the file exists: someone created it meanwhile
    except FileExistsError:
        pass
    finally:
        os.unlink(temporary)
    token = _maybe_read(path)
    if token is None:  # created and removed again between two of our calls
        raise CorralError(f"{path}: the token file vanished while it was created", hint="retry")
    return token


def rotate(state_dir: str) -> str:
    """Replace the token with a new one; the old one stops working at once."""
    directory = _ensure_private_dir(token_dir(state_dir))
    token = new_token()
    temporary = _write_temporary(directory, token)
    try:
        os.replace(temporary, os.path.join(directory, "token"))
    except OSError:
        os.unlink(temporary)
        raise
    return token


class TokenFile:
    """The token as a running server sees it: re-read when the file changes (rule 5).

    If the file disappears or becomes unsafe, `current()` returns None and every request is
    refused until it is fixed (fail closed); the reason is in `problem`.
    """

    def __init__(self, state_dir: str) -> None:
        self.path = token_path(state_dir)
        self.problem = ""
        self._identity: tuple[int, ...] | None = None
        self._token: str | None = None

    def current(self) -> str | None:
        try:
            st = os.stat(self.path, follow_symlinks=False)
        except OSError as exc:
            self.problem = f"{self.path}: {exc.strerror}"
            self._identity = self._token = None
            return None
        # ctime covers chmod and chown, which leave mtime alone.
        identity = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_mode, st.st_uid)
        if identity != self._identity:
            try:
                self._token = _maybe_read(self.path)
                self.problem = "" if self._token else f"{self.path}: missing"
            except CorralError as exc:
                self._token, self.problem = None, exc.message
            self._identity = identity
        return self._token


# -- files -----------------------------------------------------------------------------------


def _ensure_private_dir(directory: str) -> str:
    os.makedirs(os.path.dirname(directory), mode=0o700, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        os.mkdir(directory, 0o700)
    st = os.lstat(directory)
    if not stat.S_ISDIR(st.st_mode):
        raise CorralError(
            f"{directory}: not a directory (a symlink or a file is in the way)",
            hint="remove it; corral creates the directory itself",
        )
    if st.st_uid != os.geteuid():
        raise CorralError(
            f"{directory}: owned by uid {st.st_uid}, not by you",
            hint="remove it; corral creates the directory itself",
        )
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(directory, 0o700)  # our own directory: tighten it rather than refuse
    return directory


def _write_temporary(directory: str, token: str) -> str:
    path = os.path.join(directory, f".token.{os.getpid()}.{secrets.token_hex(4)}")
    flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(path, flags, 0o600)
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
        os.write(fd, f"{token}\n".encode("ascii"))
        os.fsync(fd)
    except OSError:
        os.close(fd)
        os.unlink(path)
        raise
    os.close(fd)
    return path


def _maybe_read(path: str) -> str | None:
    """The token in `path`, None if there is no file; CorralError if it is unsafe or damaged."""
    hint = "run `corral token --rotate` to write a new one"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise CorralError(f"{path}: cannot open the token file: {exc.strerror}", hint=hint) from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            raise CorralError(f"{path}: not a regular file of yours", hint=hint)
        if stat.S_IMODE(st.st_mode) & 0o077:
            raise CorralError(
                f"{path}: readable by others (mode {stat.S_IMODE(st.st_mode):o})", hint=hint
            )
        raw = os.read(fd, 4096)
    finally:
        os.close(fd)
    token = raw.decode("ascii", "replace").strip()
    if len(token) < MIN_TOKEN_CHARS or not set(token) <= _TOKEN_ALPHABET:
        raise CorralError(f"{path}: the token file is damaged", hint=hint)
    return token


# -- corral token ----------------------------------------------------------------------------


def add_token_command(commands: Subparsers) -> None:
    parser = commands.add_parser(
        "token",
        help="print the bridge's bearer token (created on first use)",
        description="Prints the token clients of `corral serve` send as "
        "`Authorization: Bearer TOKEN`. It lives in <state dir>/bridge/token, readable only "
        "by you. --rotate replaces it; a running server accepts only the new one at once.",
    )
    parser.add_argument(
        "--rotate", action="store_true", help="replace the token; the old one stops working"
    )
    parser.set_defaults(handler=cmd_token)


def cmd_token(args: argparse.Namespace) -> int:
    state_dir = default_state_dir()
    if args.rotate:
        token = rotate(state_dir)
        print("corral: token replaced; the old one no longer works", file=sys.stderr)
    else:
        token = load_or_create(state_dir)
    print(token)
    return 0
