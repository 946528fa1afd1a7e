"""The Landlock runner: builds a ruleset through ctypes and restricts the calling process.

Two users, one code path:
- inside a bubblewrap sandbox, as the launcher run just before the command:
      python3 -I -S /proc/self/fd/N --rules FD -- CMD ARGS...
  where N is a memfd holding this file compiled (`compiled_script`). It reads the ruleset
  from FD, restricts itself and execs CMD (see `script_argv`);
- on the host, for the namespace-free mode: `prepare` runs in corral's process (opens every
  path, builds the ruleset) and `restrict` runs in the forked child just before exec.

This file is self-contained on purpose (os and sys, `_ctypes` imported when a ruleset is
built): it runs from a memfd, so it needs neither corral's package visible in the sandbox
and on its sys.path, nor the cost of importing it (corral's package imports `typing`). What the
rules say is decided by the pure planner in `corral.backends.landlock`; this file only follows
a ruleset already reduced to numbers and paths.

The wire format is NUL-separated fields (paths cannot contain NUL, so no quoting exists):
    corral-landlock-1 \\0 HANDLED_FS \\0 HANDLED_NET \\0 SCOPED \\0
    then any number of:  path \\0 ACCESS \\0 PATH \\0   or   port \\0 ACCESS \\0 PORT \\0
Numbers are decimal. Anything else is refused: a launcher that cannot read its rules must not
run the command.

Exit statuses of the launcher itself (never the command's): 125 when the rules cannot be
read or applied, 126 when CMD cannot be executed, 127 when CMD is not found (as a shell says).
"""

from __future__ import annotations

import os
import sys

MAGIC = b"corral-landlock-1"

# landlock_create_ruleset, landlock_add_rule, landlock_restrict_self: 444-446 on every
# architecture since the syscall table unification (Linux 5.1), except alpha (+110).
SYSCALL_BASE = 554 if os.uname().machine == "alpha" else 444
LANDLOCK_RULE_PATH_BENEATH = 1
LANDLOCK_RULE_NET_PORT = 2
PR_SET_NO_NEW_PRIVS = 38

# Rights a rule on a non-directory may carry; the kernel refuses the others with EINVAL.
ACCESS_FILE = (1 << 0) | (1 << 1) | (1 << 2) | (1 << 14) | (1 << 15)

EXIT_LAUNCHER = 125
EXIT_CANNOT_EXECUTE = 126
EXIT_NOT_FOUND = 127

# (handled_fs, handled_net, scoped, path rules, port rules)
RawRuleset = tuple[int, int, int, tuple[tuple[int, str], ...], tuple[tuple[int, int], ...]]


def encode_ruleset(ruleset: RawRuleset) -> bytes:
    handled_fs, handled_net, scoped, paths, ports = ruleset
    fields = [MAGIC, b"%d" % handled_fs, b"%d" % handled_net, b"%d" % scoped]
    for access, path in paths:
        raw = os.fsencode(path)
        if b"\0" in raw:
            raise ValueError(f"a path with a NUL byte cannot be a rule: {path!r}")
        fields += [b"path", b"%d" % access, raw]
    for access, port in ports:
        fields += [b"port", b"%d" % access, b"%d" % port]
    return b"\0".join(fields) + b"\0"


def decode_ruleset(data: bytes) -> RawRuleset:
    """The ruleset `encode_ruleset` wrote; ValueError for anything else."""
    if not data.endswith(b"\0"):
        raise ValueError("truncated rules")
    fields = data[:-1].split(b"\0")
    if len(fields) < 4 or fields[0] != MAGIC:
        raise ValueError("not corral's Landlock rules")
    handled_fs, handled_net, scoped = (_number(f) for f in fields[1:4])
    rest = fields[4:]
    if len(rest) % 3:
        raise ValueError("a rule is incomplete")
    paths: list[tuple[int, str]] = []
    ports: list[tuple[int, int]] = []
    for at in range(0, len(rest), 3):
        kind, access, target = rest[at : at + 3]
        if kind == b"path" and target.startswith(b"/"):
            paths.append((_number(access), os.fsdecode(target)))
        elif kind == b"port":
            ports.append((_number(access), _number(target)))
        else:
            raise ValueError(f"unknown rule {kind!r}")
    return handled_fs, handled_net, scoped, tuple(paths), tuple(ports)


def _number(field: bytes) -> int:
    if not field.isdigit():
        raise ValueError(f"not a number: {field!r}")
    return int(field)


def _u64(value: int) -> bytes:
    return value.to_bytes(8, sys.byteorder)


def ruleset_attr(handled_fs: int, handled_net: int, scoped: int) -> bytes:
    """struct landlock_ruleset_attr, only as long as the fields in use: an older kernel knows
    only the first field (ABI 1-3) or two (ABI 4-5) and refuses a longer non-zero struct."""
    if scoped:
        return _u64(handled_fs) + _u64(handled_net) + _u64(scoped)
    if handled_net:
        return _u64(handled_fs) + _u64(handled_net)
    return _u64(handled_fs)


class Libc:
    """syscall, prctl and capset, called through `_ctypes`, the C half of ctypes.

    Why not ctypes itself: importing it costs about 9 ms per launch (median, measured on the
    2-core CI VM) and `_ctypes` under 1 ms, and the launcher runs before every sandboxed
    command. Only what ctypes would do for these three calls is rebuilt here: every int is
    passed as a C long (syscall(2) and prctl(2) are variadic and read machine words), bytes as
    a pointer to their buffer, and the result is a long.
    """

    def __init__(self) -> None:
        import _ctypes

        class Long(_ctypes._SimpleCData):  # type: ignore[type-arg]  # generic in stubs only
            _type_ = "l"

        class Function(_ctypes.CFuncPtr):
            _flags_ = _ctypes.FUNCFLAG_CDECL | _ctypes.FUNCFLAG_USE_ERRNO
            _restype_ = Long

        class Library:
            _handle = _ctypes.dlopen(None, os.RTLD_NOW)  # type: ignore[arg-type]

        self._long = Long
        self._get_errno = _ctypes.get_errno
        self._set_errno = _ctypes.set_errno
        self._functions = {
            name: Function((name, Library))  # type: ignore[arg-type]  # ctypes reads _handle
            for name in ("syscall", "prctl", "capset")
        }

    def call(self, function: str, *args: int | bytes, what: str) -> int:
        """Call a libc function; OSError with its errno when it returns -1."""
        self._set_errno(0)
        raw = [arg if isinstance(arg, bytes) else self._long(arg) for arg in args]
        result = int(self._functions[function](*raw))
        if result == -1:
            number = self._get_errno()
            raise OSError(number, f"{what}: {os.strerror(number)}")
        return result


class Prepared:
    """A built ruleset, ready to be applied by `restrict` (after fork, before exec).

    Holds the ruleset fd (close-on-exec, as the kernel always makes it) and the libc entry
    points, so `restrict` only makes two system calls. `skipped` lists the paths that could not
    be opened (missing, a symlink, no permission): their rules are absent, which only ever
    means less access.
    """

    def __init__(self, ruleset_fd: int, libc: Libc) -> None:
        self.ruleset_fd = ruleset_fd
        self.skipped: tuple[str, ...] = ()
        self._libc = libc

    def restrict(self) -> None:
        """no_new_privs, then landlock_restrict_self. Raises OSError; meant for the child."""
        self._libc.call("prctl", PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0, what="prctl(NO_NEW_PRIVS)")
        restrict_self = SYSCALL_BASE + 2
        self._libc.call("syscall", restrict_self, self.ruleset_fd, 0, what="landlock_restrict_self")

    def close(self) -> None:
        if self.ruleset_fd >= 0:
            os.close(self.ruleset_fd)
            self.ruleset_fd = -1


def _open_beneath(path: str) -> tuple[int, bool] | None:
    """An O_PATH fd of `path` and whether it is a directory; None when it cannot be a rule.

    O_NOFOLLOW: a rule must land on the path named, never on where a symlink points (a link
    beside a hidden directory could point into it). A symlink is skipped; its target has, or
    lacks, its own rule.
    """
    try:
        fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    mode = os.fstat(fd).st_mode
    if (mode & 0o170000) == 0o120000:  # S_IFLNK, without importing stat
        os.close(fd)
        return None
    return fd, (mode & 0o170000) == 0o040000


def prepare(ruleset: RawRuleset) -> Prepared:
    """Create the ruleset and add every rule. Raises OSError (the kernel's errno)."""
    libc = Libc()
    handled_fs, handled_net, scoped, paths, ports = ruleset
    attr = ruleset_attr(handled_fs, handled_net, scoped)
    ruleset_fd = libc.call("syscall", SYSCALL_BASE, attr, len(attr), 0, what="create_ruleset")
    prepared = Prepared(ruleset_fd, libc)
    try:
        prepared.skipped = _add_path_rules(libc, ruleset_fd, paths)
        for access, port in ports:
            _add_rule(libc, ruleset_fd, LANDLOCK_RULE_NET_PORT, _u64(access) + _u64(port))
    except BaseException:
        prepared.close()
        raise
    return prepared


def _add_rule(libc: Libc, ruleset_fd: int, kind: int, rule: bytes) -> None:
    libc.call("syscall", SYSCALL_BASE + 1, ruleset_fd, kind, rule, 0, what="landlock_add_rule")


def _add_path_rules(
    libc: Libc, ruleset_fd: int, paths: tuple[tuple[int, str], ...]
) -> tuple[str, ...]:
    skipped: list[str] = []
    for access, path in paths:
        opened = _open_beneath(path)
        if opened is None:
            skipped.append(path)
            continue
        fd, is_dir = opened
        try:
            allowed = access if is_dir else access & ACCESS_FILE
            if allowed:
                # struct landlock_path_beneath_attr is packed: u64 access, s32 fd.
                rule = _u64(allowed) + fd.to_bytes(4, sys.byteorder, signed=True)
                _add_rule(libc, ruleset_fd, LANDLOCK_RULE_PATH_BENEATH, rule)
        finally:
            os.close(fd)
    return tuple(skipped)


PR_CAPBSET_DROP = 24
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
LINUX_CAPABILITY_VERSION_3 = 0x20080522
CAP_LAST_CAP = "/proc/sys/kernel/cap_last_cap"


class CapabilityDrop:
    """Drops every capability for good: bounding set, ambient, effective, permitted, inherited.

    For the namespace-free mode, where nothing else drops them (bubblewrap does inside its
    sandbox). Root keeps uid 0 but loses what makes it root: CAP_MKNOD alone would let it make
    a disk's device node in a writable directory, which Landlock would then allow to open.
    Built in the parent; calling it in the child makes only prctl and capset calls.
    """

    def __init__(self) -> None:
        self._libc = Libc()
        with open(CAP_LAST_CAP, encoding="ascii") as f:
            self._last_cap = int(f.read())
        self._effective = _effective_capabilities()
        version = LINUX_CAPABILITY_VERSION_3.to_bytes(4, sys.byteorder)
        self._header = version + bytes(4)  # pid 0: this thread
        self._data = bytes(24)  # two zeroed struct __user_cap_data_struct

    def __call__(self) -> None:
        call = self._libc.call
        if self._effective:
            # Needs CAP_SETPCAP, so before the capset below. Without any capability there is
            # nothing to drop: no_new_privs already stops file capabilities at exec.
            for cap in range(self._last_cap + 1):
                call("prctl", PR_CAPBSET_DROP, cap, 0, 0, 0, what="prctl(PR_CAPBSET_DROP)")
        clear = PR_CAP_AMBIENT_CLEAR_ALL
        call("prctl", PR_CAP_AMBIENT, clear, 0, 0, 0, what="prctl(PR_CAP_AMBIENT_CLEAR_ALL)")
        call("capset", self._header, self._data, what="capset")


def _effective_capabilities() -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0


def compiled_script() -> bytes:
    """This file as a .pyc image, for `python3 -I -S /proc/self/fd/N` (see `script_argv`).

    Compiled, because compiling this file's source on every launch costs more than the rest
    of the launcher together (7 of 9 ms, measured); Python runs a file that starts with its
    bytecode magic as bytecode, whatever its name. Build it once per process and keep it.
    """
    import marshal
    from _frozen_importlib_external import MAGIC_NUMBER  # loaded at startup: costs nothing

    # An installed package has this file's bytecode already (pip compiles on install): a .pyc
    # is exactly the image needed, header included. Use it when it is current.
    cached = globals().get("__cached__")
    if cached:
        try:
            with open(cached, "rb") as f:
                image = f.read()
            source = os.stat(__file__)
            fresh = int.from_bytes(image[8:12], "little") == int(source.st_mtime) & 0xFFFFFFFF
            if image[:4] == MAGIC_NUMBER and image[4:8] == bytes(4) and fresh:
                return image
        except OSError:
            pass

    with open(__file__, encoding="utf-8") as f:
        code = compile(f.read(), "<corral.inner>", "exec", dont_inherit=True, optimize=2)
    # Header: magic, flags 0 (timestamp-based), then mtime and size, unchecked when run directly.
    return MAGIC_NUMBER + bytes(12) + marshal.dumps(code)


def script_argv(
    python: str,
    *,
    script_fd: int,
    rules_fd: int,
    command: list[str],
    reset_terminal_signals: bool = False,
) -> list[str]:
    """The command line that applies the rules in `rules_fd` and then execs `command`.

    `script_fd` holds `compiled_script()` (a memfd). Both fds are closed before the exec.
    `python` must be visible inside the sandbox: pass the resolved interpreter
    (os.path.realpath(sys.executable)), not a virtual environment's link to it.
    """
    script = f"/proc/self/fd/{script_fd}"
    reset = ["--reset-terminal-signals"] if reset_terminal_signals else []
    return [python, "-I", "-S", script, *reset, "--rules", str(rules_fd), "--", *command]


def close_script_fd(argv0: str) -> None:
    """Close the memfd this launcher was run from, so the command does not inherit it."""
    prefix = "/proc/self/fd/"
    if argv0.startswith(prefix) and argv0[len(prefix) :].isdigit():
        os.close(int(argv0[len(prefix) :]))


def read_rules_fd(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks)


def main(argv: list[str]) -> int:
    """`[--reset-terminal-signals] --rules FD -- CMD...`: apply the rules read from FD, then
    exec CMD (no return). With the flag, SIGINT and SIGQUIT go back to their defaults first:
    corral starts bwrap with them ignored when the command shares the user's terminal."""
    import _signal  # type: ignore[import-not-found]  # the C module: no enum import

    # Python ignores SIGPIPE and SIGXFSZ for itself; the command must not inherit that.
    resets = [_signal.SIGPIPE, _signal.SIGXFSZ]
    if argv[:1] == ["--reset-terminal-signals"]:
        resets += [_signal.SIGINT, _signal.SIGQUIT]
        argv = argv[1:]
    for number in resets:
        _signal.signal(number, _signal.SIG_DFL)
    if len(argv) < 4 or argv[0] != "--rules" or argv[2] != "--" or not argv[1].isdigit():
        sys.stderr.write("corral-inner: usage: [--reset-terminal-signals] --rules FD -- CMD\n")
        return EXIT_LAUNCHER
    fd, command = int(argv[1]), argv[3:]
    try:
        ruleset = decode_ruleset(read_rules_fd(fd))
        os.close(fd)
        prepared = prepare(ruleset)
        prepared.restrict()
        prepared.close()
    except (OSError, ValueError) as failure:
        sys.stderr.write(f"corral-inner: Landlock not applied, command not run: {failure}\n")
        return EXIT_LAUNCHER
    try:
        os.execvp(command[0], command)  # noqa: S606 - running the command is the point
    except FileNotFoundError:
        sys.stderr.write(f"corral-inner: {command[0]}: command not found\n")
        return EXIT_NOT_FOUND
    except OSError as failure:
        sys.stderr.write(f"corral-inner: {command[0]}: {failure.strerror}\n")
        return EXIT_CANNOT_EXECUTE


if __name__ == "__main__":
    close_script_fd(sys.argv[0])
    sys.exit(main(sys.argv[1:]))
