"""Facts about this machine, gathered once per boot, and the small decisions made from them.

`gather_facts()` reads /proc and /sys and runs `bwrap --version` once; `probe()` caches the
result per boot so that `corral run` normally pays for a few small file reads only. The deciders
(`userns_verdict`, `bwrap_verdict`, ...) are pure functions of the facts, so each rule is tested
with hand-built facts rather than with whatever kernel the tests happen to run on.

Rules of the cache:
1. One file per boot: `<cache_dir>/probe-<boot_id>.txt`. Files of earlier boots are removed.
2. It is also stale when the bwrap binary changed (path, size, mtime, inode, mode): an upgrade or
   a `chmod u+s` changes what bwrap can do without a reboot.
3. The sysctls a user is told to change by `corral doctor` are re-read on every hit, and the
   cached bwrap path must be the one found on PATH now; when one differs the cache is stale.
   This keeps a fixed machine from looking broken until the next boot, and keeps a forged
   cache from lying about them or naming another program as bwrap.
4. The format is `key=value` lines (no json or re on the launch path). A file that does not parse
   is ignored and rewritten, never an error. Writes are atomic (temporary file, then rename).

This module is on the `corral run` launch path: `subprocess` and `ctypes` are imported only when
the cache misses.
"""

from __future__ import annotations

import contextlib
import os
import stat
from typing import TYPE_CHECKING, NamedTuple

# The deciders live in their own module to keep this one short; they are part of this API.
from corral.probe_verdicts import (
    MIN_BWRAP_VERSION,
    Verdict,
    bwrap_verdict,
    can_use_namespaces,
    landlock_verdict,
    leading_int,
    tiocsti_verdict,
    userns_verdict,
)

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = [
    "MIN_BWRAP_VERSION",
    "MachineFacts",
    "Verdict",
    "bwrap_verdict",
    "can_use_namespaces",
    "gather_facts",
    "landlock_verdict",
    "probe",
    "tiocsti_verdict",
    "userns_verdict",
]

BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"

MAX_USER_NAMESPACES = "/proc/sys/user/max_user_namespaces"
UNPRIVILEGED_USERNS_CLONE = "/proc/sys/kernel/unprivileged_userns_clone"
APPARMOR_RESTRICT_USERNS = "/proc/sys/kernel/apparmor_restrict_unprivileged_userns"
LEGACY_TIOCSTI = "/proc/sys/dev/tty/legacy_tiocsti"

# landlock_create_ruleset: 444 on every architecture since the syscall table unification
# (Linux 5.1), except alpha, which offsets new syscalls by 110.
LANDLOCK_CREATE_RULESET = {"alpha": 554}
LANDLOCK_CREATE_RULESET_DEFAULT = 444
LANDLOCK_CREATE_RULESET_VERSION = 1

# Bump when MachineFacts changes shape: an old file then fails to parse and is rewritten.
CACHE_FORMAT = "1"

# Seconds `bwrap --version` may take; it answers in milliseconds unless something is wrong.
BWRAP_VERSION_TIMEOUT = 10


class MachineFacts(NamedTuple):
    kernel: str
    """`uname -r`"""
    arch: str
    """`uname -m`"""
    is_root: bool
    bwrap_path: str | None
    bwrap_version: tuple[int, int, int] | None
    bwrap_setuid: bool
    max_user_namespaces: int | None
    unprivileged_userns_clone: int | None
    """Debian and Ubuntu only."""
    apparmor_restrict_userns: int | None
    """Ubuntu 23.10 and later."""
    landlock_abi: int
    """0 when Landlock is unavailable."""
    seccomp: bool
    container: str | None
    """"docker", "podman", "lxc", ... or None when not in a container."""
    legacy_tiocsti: int | None
    """None before Linux 6.2, where TIOCSTI cannot be turned off."""
    cgroup_v2_writable: str | None
    """A cgroup v2 directory this user may create children in."""


# ---------------------------------------------------------------------------------------------
# Gathering


def read_text(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return f.read().decode(errors="replace")
    except OSError:
        return None


def read_int(path: str) -> int | None:
    text = read_text(path)
    if text is None:
        return None
    try:
        return int(text.strip())
    except ValueError:
        return None


def find_executable(name: str, *, path: str | None = None) -> str | None:
    """`shutil.which` for a bare name, without importing shutil on the launch path."""
    search = os.environ.get("PATH", os.defpath) if path is None else path
    for directory in search.split(os.pathsep):
        candidate = os.path.join(directory or ".", name)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def parse_bwrap_version(text: str) -> tuple[int, int, int] | None:
    """`bubblewrap 0.8.0` -> (0, 8, 0). Suffixes such as `-rc1` are ignored; junk gives None."""
    words = text.split()
    if len(words) < 2 or words[0] != "bubblewrap":
        return None
    numbers = [leading_int(part) for part in [*words[1].split(".")[:3], "0", "0"][:3]]
    if numbers[0] is None or numbers[1] is None or numbers[2] is None:
        return None
    return numbers[0], numbers[1], numbers[2]


def run_bwrap_version(bwrap: str) -> tuple[int, int, int] | None:
    import subprocess

    try:
        done = subprocess.run(
            [bwrap, "--version"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=BWRAP_VERSION_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return parse_bwrap_version(done.stdout.decode(errors="replace"))


def landlock_abi(arch: str) -> int:
    """The Landlock ABI version the kernel offers, 0 when it offers none."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.restype = ctypes.c_long
        number = LANDLOCK_CREATE_RULESET.get(arch, LANDLOCK_CREATE_RULESET_DEFAULT)
        # Every argument as a long: syscall(2) is variadic and reads machine words.
        result = libc.syscall(
            ctypes.c_long(number),
            ctypes.c_long(0),
            ctypes.c_long(0),
            ctypes.c_long(LANDLOCK_CREATE_RULESET_VERSION),
        )
    except (OSError, AttributeError, ImportError):
        return 0
    return int(result) if result > 0 else 0


def has_seccomp(status: str | None) -> bool:
    return status is not None and any(line.startswith("Seccomp:") for line in status.splitlines())


def detect_container(
    *, dockerenv: bool, containerenv: bool, pid1_environ: str | None, pid1_cgroup: str | None
) -> str | None:
    if dockerenv:
        return "docker"
    if containerenv:
        return "podman"
    for entry in (pid1_environ or "").split("\0"):
        if entry.startswith("container=") and entry != "container=":
            return entry.removeprefix("container=")
    cgroup = pid1_cgroup or ""
    for marker, name in (("docker", "docker"), ("kubepods", "kubernetes"), ("lxc", "lxc")):
        if marker in cgroup:
            return name
    if "libpod" in cgroup:
        return "podman"
    return None


def cgroup_v2_dir(mountinfo: str | None, self_cgroup: str | None) -> str | None:
    """Where this process's cgroup v2 directory is mounted, from /proc/self/{mountinfo,cgroup}."""
    own = None
    for line in (self_cgroup or "").splitlines():
        if line.startswith("0::"):
            own = line[3:]
    if own is None:
        return None
    for line in (mountinfo or "").splitlines():
        before, sep, after = line.partition(" - ")
        fields = before.split()
        if not sep or not after.startswith("cgroup2 ") or len(fields) < 5:
            continue
        root, mount_point = fields[3], fields[4]
        if own != root and not own.startswith(root.rstrip("/") + "/"):
            continue
        relative = own[len(root.rstrip("/")) :]
        return mount_point.rstrip("/") + relative if relative != "/" else mount_point
    return None


def writable_cgroup_v2() -> str | None:
    directory = cgroup_v2_dir(read_text("/proc/self/mountinfo"), read_text("/proc/self/cgroup"))
    if directory is None or not os.path.isdir(directory):
        return None
    return directory if os.access(directory, os.W_OK | os.X_OK) else None


def gather_facts() -> MachineFacts:
    uname = os.uname()
    bwrap = find_executable("bwrap")
    return MachineFacts(
        kernel=uname.release,
        arch=uname.machine,
        is_root=os.geteuid() == 0,
        bwrap_path=bwrap,
        bwrap_version=run_bwrap_version(bwrap) if bwrap else None,
        bwrap_setuid=is_setuid(bwrap_stat(bwrap)),
        max_user_namespaces=read_int(MAX_USER_NAMESPACES),
        unprivileged_userns_clone=read_int(UNPRIVILEGED_USERNS_CLONE),
        apparmor_restrict_userns=read_int(APPARMOR_RESTRICT_USERNS),
        landlock_abi=landlock_abi(uname.machine),
        seccomp=has_seccomp(read_text("/proc/self/status")),
        container=detect_container(
            dockerenv=os.path.exists("/.dockerenv"),
            containerenv=os.path.exists("/run/.containerenv"),
            pid1_environ=read_text("/proc/1/environ"),
            pid1_cgroup=read_text("/proc/1/cgroup"),
        ),
        legacy_tiocsti=read_int(LEGACY_TIOCSTI),
        cgroup_v2_writable=writable_cgroup_v2(),
    )


def bwrap_stat(path: str | None) -> tuple[str, int, int, int, int]:
    """(path, size, mtime_ns, inode, mode) of the bwrap binary; zeros when it is missing."""
    if path is None:
        return "", 0, 0, 0, 0
    try:
        st = os.stat(path)
    except OSError:
        return path, 0, 0, 0, 0
    return path, st.st_size, st.st_mtime_ns, st.st_ino, st.st_mode


def is_setuid(bwrap: tuple[str, int, int, int, int]) -> bool:
    return bool(bwrap[4] & stat.S_ISUID)


# ---------------------------------------------------------------------------------------------
# The cache


def probe(
    *,
    cache_dir: str,
    refresh: bool = False,
    gather: Callable[[], MachineFacts] = gather_facts,
) -> MachineFacts:
    """The machine's facts, from the per-boot cache while it is valid (see the module doc)."""
    boot_id = (read_text(BOOT_ID_PATH) or "").strip()
    if not boot_id or "/" in boot_id or boot_id.startswith("."):
        return gather()  # nothing to key a cache on: still correct, only slower
    cache_file = os.path.join(cache_dir, f"probe-{boot_id}.txt")
    # Taken before gathering: if bwrap is replaced meanwhile, the next run sees a stale stamp.
    bwrap = bwrap_stat(find_executable("bwrap"))
    stamp = encode_stamp(bwrap)
    if not refresh:
        cached = load_cache(read_text(cache_file), boot_id=boot_id, stamp=stamp)
        if cached is not None and still_true(cached, bwrap):
            return cached
    facts = gather()
    store_cache(cache_file, encode_cache(facts, boot_id=boot_id, stamp=stamp))
    return facts


def still_true(cached: MachineFacts, bwrap: tuple[str, int, int, int, int]) -> bool:
    """Whether the cheap-to-read facts in a cache entry match the machine now.

    The bwrap path is checked against the one just found so that a forged cache cannot send
    `corral run` to another program (rule 3 of the module doc covers the sysctls)."""
    if cached.bwrap_path != (bwrap[0] or None) or cached.bwrap_setuid != is_setuid(bwrap):
        return False
    return all(getattr(cached, name) == value for name, value in read_volatile().items())


def read_volatile() -> dict[str, int | None]:
    """The sysctls `corral doctor` tells users to change, by MachineFacts field name."""
    return {
        "max_user_namespaces": read_int(MAX_USER_NAMESPACES),
        "unprivileged_userns_clone": read_int(UNPRIVILEGED_USERNS_CLONE),
        "apparmor_restrict_userns": read_int(APPARMOR_RESTRICT_USERNS),
        "legacy_tiocsti": read_int(LEGACY_TIOCSTI),
    }


def encode_stamp(bwrap: tuple[str, int, int, int, int]) -> str:
    path, size, mtime_ns, inode, mode = bwrap
    return f"{size}:{mtime_ns}:{inode}:{mode}:{path}"  # the path last: it may hold colons


# How each MachineFacts field is written. An empty value means None.
FIELD_KINDS = {
    "kernel": "str",
    "arch": "str",
    "is_root": "bool",
    "bwrap_path": "str?",
    "bwrap_version": "version?",
    "bwrap_setuid": "bool",
    "max_user_namespaces": "int?",
    "unprivileged_userns_clone": "int?",
    "apparmor_restrict_userns": "int?",
    "landlock_abi": "int",
    "seccomp": "bool",
    "container": "str?",
    "legacy_tiocsti": "int?",
    "cgroup_v2_writable": "str?",
}


def encode_value(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, tuple):
        return ".".join(str(part) for part in value)
    return str(value)


def decode_value(kind: str, text: str) -> object:
    """Raises ValueError for anything `encode_value` would not have written."""
    if kind.endswith("?"):
        if text == "":
            return None
        kind = kind[:-1]
    if kind == "str":
        return text
    if kind == "bool":
        if text not in ("0", "1"):
            raise ValueError(text)
        return text == "1"
    if kind == "int":
        return int(text)
    parts = tuple(int(part) for part in text.split("."))
    if len(parts) != 3:
        raise ValueError(text)
    return parts


def encode_cache(facts: MachineFacts, *, boot_id: str, stamp: str) -> str | None:
    """The cache file's text, or None when a value cannot be written on one line."""
    lines = [f"format={CACHE_FORMAT}", f"boot_id={boot_id}", f"bwrap={stamp}"]
    lines += [
        f"{name}={encode_value(value)}" for name, value in zip(FIELD_KINDS, facts, strict=True)
    ]
    if any("\n" in line for line in lines):
        return None
    return "\n".join(lines) + "\n"


def load_cache(text: str | None, *, boot_id: str, stamp: str) -> MachineFacts | None:
    """The facts in a cache file's text, or None when it is missing, stale or corrupt."""
    if text is None:
        return None
    entries: dict[str, str] = {}
    for line in text.split("\n"):
        if not line:
            continue
        key, sep, value = line.partition("=")
        if not sep or key in entries:
            return None
        entries[key] = value
    header = (entries.pop("format", None), entries.pop("boot_id", None), entries.pop("bwrap", None))
    if header != (CACHE_FORMAT, boot_id, stamp) or entries.keys() != FIELD_KINDS.keys():
        return None
    try:
        return MachineFacts._make(decode_value(FIELD_KINDS[k], entries[k]) for k in FIELD_KINDS)
    except ValueError:
        return None


def store_cache(cache_file: str, text: str | None) -> None:
    """Write atomically and drop earlier boots' files. Failing to cache is never an error."""
    if text is None:
        return
    directory, name = os.path.split(cache_file)
    temporary = f"{cache_file}.{os.getpid()}.tmp"
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(temporary, cache_file)
        for other in os.listdir(directory):
            if other.startswith("probe-") and other.endswith(".txt") and other != name:
                os.unlink(os.path.join(directory, other))
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
