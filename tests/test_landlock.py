"""Landlock: rights per ABI, the rules of a plan, the wire format, and the kernel enforcing them.

Kernel tests run each attempt in a forked child twice, once under the rules and once without,
so every test fails if the Landlock layer goes missing. The in-bubblewrap test runs the same
bwrap argv with and without `corral.inner` in front of the command.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import subprocess
import sys
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from corral import inner
from corral.backends.bubblewrap import BwrapOptions, bwrap_argv
from corral.backends.facts import gather_disk_facts
from corral.backends.fsplan import FilesystemPlan, plan_filesystem
from corral.backends.landlock import (
    FS_ABI_1,
    FS_IOCTL_DEV,
    FS_READ,
    FS_REFER,
    FS_TRUNCATE,
    NET_BIND_TCP,
    NET_CONNECT_TCP,
    SCOPE_ABSTRACT_UNIX_SOCKET,
    SCOPE_SIGNAL,
    LandlockRules,
    Ruleset,
    apply,
    compile_ruleset,
    enforcement,
    handled_access_fs,
    handled_access_net,
    handled_scope,
    make_rules,
    memfd_with,
    open_rules_fd,
    rules_for_plan,
)
from corral.probe import landlock_abi
from tests.conftest import SECRET, Layout, accepted

ABI = landlock_abi(os.uname().machine)

needs_landlock = pytest.mark.skipif(ABI < 1, reason="LANDLOCK TESTS SKIPPED: no Landlock here")
needs_net = pytest.mark.skipif(ABI < 4, reason=f"Landlock ABI {ABI} < 4: no TCP rules")


# --- Rights per ABI ------------------------------------------------------------------------

ALL_FS = FS_ABI_1 | FS_REFER | FS_TRUNCATE | FS_IOCTL_DEV


@pytest.mark.parametrize(
    ("abi", "fs", "net", "scope"),
    [
        (-1, 0, 0, 0),
        (0, 0, 0, 0),
        (1, 0x1FFF, 0, 0),
        (2, 0x1FFF | FS_REFER, 0, 0),
        (3, 0x1FFF | FS_REFER | FS_TRUNCATE, 0, 0),
        (4, 0x1FFF | FS_REFER | FS_TRUNCATE, 3, 0),
        (5, ALL_FS, 3, 0),
        (6, ALL_FS, 3, 3),
        (7, ALL_FS, 3, 3),
        (9, ALL_FS, 3, 3),  # newer than corral knows: only the rights it knows are handled
    ],
)
def test_handled_rights_per_abi(abi: int, fs: int, net: int, scope: int) -> None:
    assert handled_access_fs(abi) == fs
    assert handled_access_net(abi) == net
    assert handled_scope(abi) == scope


def test_each_abi_adds_only_rights() -> None:
    for abi in range(1, 8):
        assert handled_access_fs(abi) & handled_access_fs(abi - 1) == handled_access_fs(abi - 1)


@pytest.mark.parametrize(
    ("abi", "level", "gap_words"),
    [
        (0, "none", []),
        (2, "partial", ["truncate", "ioctls", "TCP", "scoped"]),
        (4, "partial", ["ioctls", "scoped"]),
        (5, "partial", ["scoped"]),
        (6, "full", []),
        (7, "full", []),
    ],
)
def test_gaps_and_enforcement_per_abi(abi: int, level: str, gap_words: list[str]) -> None:
    rules = make_rules(abi, read=["/"], write=[], connect_ports=(80,), bind_ports=())
    assert enforcement(rules) == level
    assert len(rules.gaps) == len(gap_words)
    for gap, word in zip(rules.gaps, gap_words, strict=True):
        assert word in gap
    if abi < 4:
        assert rules.connect_ports is None and rules.bind_ports is None
    assert rules.scope_signals == rules.scope_abstract_unix == (abi >= 6)


def test_unwanted_network_is_no_gap() -> None:
    rules = make_rules(3, read=["/"], write=[], connect_ports=None, bind_ports=None, scope="none")
    assert rules.gaps == ("device ioctls are not restricted (Landlock ABI < 5)",)


def test_ports_are_checked_sorted_and_unique() -> None:
    rules = make_rules(7, read=[], write=[], connect_ports=(443, 80, 443), bind_ports=None)
    assert rules.connect_ports == (80, 443)
    with pytest.raises(ValueError, match="not a TCP port"):
        make_rules(7, read=[], write=[], connect_ports=(70000,), bind_ports=None)


def test_compile_ruleset_exact() -> None:
    rules = make_rules(7, read=["/usr", "/usr"], write=["/w"], connect_ports=(3128,), bind_ports=())
    assert compile_ruleset(rules) == Ruleset(
        handled_fs=ALL_FS,
        handled_net=NET_BIND_TCP | NET_CONNECT_TCP,
        scoped=SCOPE_SIGNAL | SCOPE_ABSTRACT_UNIX_SOCKET,
        paths=((FS_READ, "/usr"), (ALL_FS, "/w")),
        ports=((NET_CONNECT_TCP, 3128),),
    )


def test_compile_leaves_unwanted_tcp_unhandled() -> None:
    rules = make_rules(7, read=[], write=[], connect_ports=None, bind_ports=(), scope="none")
    ruleset = compile_ruleset(rules)
    assert (ruleset.handled_net, ruleset.ports, ruleset.scoped) == (NET_BIND_TCP, (), 0)


# --- The rules of a bubblewrap plan ---------------------------------------------------------


def plan(readable: tuple[str, ...], writable: tuple[str, ...]) -> FilesystemPlan:
    return FilesystemPlan((), (), readable, writable, (), ())


def test_rules_for_plan_mirror_the_roots_and_the_sandbox_dev() -> None:
    rules = rules_for_plan(plan(("/",), ("/home/u/p", "/tmp")), abi=7, network="local")
    assert rules.read_paths == ("/", "/dev", "/proc")
    assert rules.write_paths[:2] == ("/home/u/p", "/tmp")
    assert {"/dev/null", "/dev/tty", "/dev/ptmx", "/dev/pts", "/dev/shm"} <= set(rules.write_paths)
    assert (rules.connect_ports, rules.bind_ports) == (None, None)  # its own network namespace


def test_rules_for_plan_refuse_tcp_when_network_is_none() -> None:
    rules = rules_for_plan(plan(("/usr",), ()), abi=7, network="none")
    assert (rules.connect_ports, rules.bind_ports) == ((), ())


# --- The wire format read by corral.inner ----------------------------------------------------


def test_encoding_round_trips() -> None:
    ruleset = Ruleset(7, 3, 1, ((5, "/a b"), (ALL_FS, "/x\nnew line")), ((2, 80), (1, 0)))
    assert inner.decode_ruleset(inner.encode_ruleset(ruleset)) == ruleset


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"corral-landlock-1\x001\x000\x000",  # no final NUL: truncated
        b"corral-landlock-2\x001\x000\x000\x00",
        b"corral-landlock-1\x001\x000\x00",
        b"corral-landlock-1\x00-1\x000\x000\x00",
        b"corral-landlock-1\x001\x000\x000\x00path\x005\x00",
        b"corral-landlock-1\x001\x000\x000\x00path\x005\x00relative\x00",
        b"corral-landlock-1\x001\x000\x000\x00exec\x005\x00/x\x00",
        b"corral-landlock-1\x001\x000\x000\x00port\x002\x0080x\x00",
    ],
)
def test_decoding_refuses_anything_else(data: bytes) -> None:
    with pytest.raises(ValueError):
        inner.decode_ruleset(data)


def test_a_nul_in_a_path_cannot_be_encoded() -> None:
    with pytest.raises(ValueError, match="NUL"):
        inner.encode_ruleset((1, 0, 0, ((1, "/a\0b"),), ()))


# --- The kernel ------------------------------------------------------------------------------


def in_child(attempt: Callable[[], int], *, rules: LandlockRules | None) -> int:
    """Fork, apply `rules` (if any), run `attempt`; its result (0 or an errno) comes back."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        status = 0
        try:
            os.close(read_end)
            if rules is not None:
                assert apply(rules) != "none"
            os.write(write_end, str(attempt()).encode())
        except BaseException:
            traceback.print_exc()
            status = 70
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        report = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the child failed before reporting"
    return int(report)


def errno_of(action: Callable[[], object]) -> Callable[[], int]:
    def attempt() -> int:
        try:
            action()
        except OSError as failure:
            return failure.errno or -1
        return 0

    return attempt


@pytest.fixture
def tree() -> Iterator[Path]:
    """A directory under /var/tmp (not /tmp: nothing here may depend on /tmp being special)."""
    import shutil
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="corral-landlock-", dir="/var/tmp"))
    (root / "ro").mkdir()
    (root / "ro" / "file").write_text("original\n")
    (root / "rw").mkdir()
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def system_rules(tree: Path, **extra: object) -> LandlockRules:
    read = ["/usr", "/etc", "/lib", "/lib64", "/proc", "/dev", str(tree / "ro")]
    return make_rules(
        ABI,
        read=read,
        write=[str(tree / "rw")],
        connect_ports=None,
        bind_ports=None,
        **extra,  # type: ignore[arg-type]
    )


@needs_landlock
def test_write_outside_the_write_paths_fails_and_the_host_file_is_unchanged(tree: Path) -> None:
    target = tree / "ro" / "file"

    def overwrite() -> None:
        target.write_text("changed\n")

    assert in_child(errno_of(overwrite), rules=system_rules(tree)) == errno.EACCES
    assert target.read_text() == "original\n"
    assert in_child(errno_of(overwrite), rules=None) == 0
    assert target.read_text() == "changed\n"


@needs_landlock
def test_a_path_without_a_rule_is_unreadable(tree: Path) -> None:
    (tree / "other").write_text(SECRET)
    attempt = errno_of(lambda: (tree / "other").read_text())
    assert in_child(attempt, rules=system_rules(tree)) == errno.EACCES
    assert in_child(attempt, rules=None) == 0


@needs_landlock
def test_the_write_paths_are_writable_and_the_host_sees_it(tree: Path) -> None:
    new = tree / "rw" / "new"
    assert in_child(errno_of(lambda: new.write_text("made\n")), rules=system_rules(tree)) == 0
    assert new.read_text() == "made\n"


@needs_landlock
def test_missing_rule_paths_are_skipped(tree: Path) -> None:
    rules = system_rules(tree)._replace(read_paths=(*system_rules(tree).read_paths, "/nonexistent"))
    attempt = errno_of(lambda: (tree / "ro" / "file").read_text())
    assert in_child(attempt, rules=rules) == 0


def connect_to(port: int) -> Callable[[], int]:
    def attempt() -> int:
        with socket.socket() as client:
            return errno_of(lambda: client.connect(("127.0.0.1", port)))()

    return attempt


@pytest.fixture
def listeners() -> Iterator[tuple[socket.socket, socket.socket]]:
    pair = []
    for _ in range(2):
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        pair.append(listener)
    yield pair[0], pair[1]
    for listener in pair:
        listener.close()


@needs_net
def test_tcp_connect_only_to_the_allowed_port(
    tree: Path, listeners: tuple[socket.socket, socket.socket]
) -> None:
    allowed, other = listeners
    allowed_port, other_port = allowed.getsockname()[1], other.getsockname()[1]
    rules = system_rules(tree)._replace(connect_ports=(allowed_port,), bind_ports=())
    assert in_child(connect_to(other_port), rules=rules) == errno.EACCES
    assert not accepted(other)
    assert in_child(connect_to(allowed_port), rules=rules) == 0
    assert accepted(allowed)
    assert in_child(connect_to(other_port), rules=None) == 0
    assert accepted(other)


@needs_net
def test_bind_refused_unless_allowed(tree: Path) -> None:
    def bind() -> int:
        with socket.socket() as server:
            return errno_of(lambda: server.bind(("127.0.0.1", 0)))()

    refusing = system_rules(tree)._replace(bind_ports=())
    assert in_child(bind, rules=refusing) == errno.EACCES
    assert in_child(bind, rules=refusing._replace(bind_ports=None)) == 0


# --- Inside bubblewrap: corral.inner in front of the command ----------------------------------


SCRIPT = inner.compiled_script()
PYTHON = os.path.realpath(sys.executable)


@contextlib.contextmanager
def launcher_fds(rules_data: bytes) -> Iterator[tuple[int, int]]:
    script_fd = memfd_with("corral-inner", SCRIPT)
    rules_fd = memfd_with("corral-landlock", rules_data)
    try:
        yield script_fd, rules_fd
    finally:
        os.close(script_fd)
        os.close(rules_fd)


def run_inner(rules_data: bytes, command: list[str]) -> subprocess.CompletedProcess[str]:
    with launcher_fds(rules_data) as (script_fd, rules_fd):
        argv = inner.script_argv(PYTHON, script_fd=script_fd, rules_fd=rules_fd, command=command)
        return subprocess.run(argv, pass_fds=(script_fd, rules_fd), capture_output=True, text=True)


def encoded(rules: LandlockRules) -> bytes:
    return inner.encode_ruleset(compile_ruleset(rules))


@needs_landlock
def test_inner_applies_the_rules_then_execs(tree: Path) -> None:
    (tree / "other").write_text(SECRET)
    script = f"cat {tree}/ro/file; cat {tree}/other; echo new > {tree}/rw/new; ls /proc/self/fd"
    done = run_inner(encoded(system_rules(tree)), ["bash", "-c", script])
    assert "original" in done.stdout
    assert SECRET not in done.stdout and "Permission denied" in done.stderr
    assert (tree / "rw" / "new").read_text() == "new\n"
    assert done.returncode == 0  # the last command succeeded
    # The launcher's two fds were closed before the exec: 0-2 and ls's own directory fd only.
    assert done.stdout.split()[-4:] == ["0", "1", "2", "3"]


@needs_landlock
def test_inner_refuses_to_run_without_readable_rules(tree: Path) -> None:
    marker = tree / "rw" / "ran"
    done = run_inner(b"corral-landlock-1\x00garbage\x00", ["touch", str(marker)])
    assert done.returncode == inner.EXIT_LAUNCHER
    assert "command not run" in done.stderr
    assert not marker.exists()


@needs_landlock
def test_inner_reports_a_missing_command_like_a_shell(tree: Path) -> None:
    done = run_inner(encoded(system_rules(tree)), ["corral-no-such-command"])
    assert done.returncode == inner.EXIT_NOT_FOUND and "command not found" in done.stderr


def test_compiled_script_is_bytecode_of_this_python() -> None:
    from importlib.util import MAGIC_NUMBER

    assert SCRIPT.startswith(MAGIC_NUMBER)


@needs_landlock
@pytest.mark.usefixtures("sandbox_available")
def test_landlock_inside_bubblewrap_is_a_second_wall(layout: Layout) -> None:
    """The plan makes the workspace writable; Landlock rules that leave it out still refuse."""
    policy = layout.sandbox("standard").policy
    os.makedirs(policy.package_cache or "", exist_ok=True)
    fs_plan = plan_filesystem(policy, gather_disk_facts(policy))
    target = f"{layout.workspace}/file"
    options = BwrapOptions(cwd=layout.workspace, uid=os.getuid(), gid=os.getgid())
    script = ["bash", "-c", f"echo written > {target}"]

    full = rules_for_plan(fs_plan, abi=ABI, network="local")
    narrowed = full._replace(
        write_paths=tuple(p for p in full.write_paths if p != layout.workspace)
    )
    for rules, expected in ((narrowed, None), (full, "written\n")):
        with launcher_fds(encoded(rules)) as (script_fd, rules_fd):
            command = inner.script_argv(
                PYTHON, script_fd=script_fd, rules_fd=rules_fd, command=script
            )
            done = subprocess.run(
                bwrap_argv(fs_plan, options, command),
                env=layout.env,
                pass_fds=(script_fd, rules_fd),
                capture_output=True,
                text=True,
            )
        written = Path(target).read_text() if os.path.exists(target) else None
        assert written == expected, done.stderr
    # Without Landlock the same bwrap argv writes: the refusal above was Landlock's.
    os.unlink(target)
    subprocess.run(bwrap_argv(fs_plan, options, script), env=layout.env, check=True)
    assert Path(target).read_text() == "written\n"


def test_open_rules_fd_holds_the_encoded_ruleset() -> None:
    rules = make_rules(7, read=["/usr"], write=["/w"], connect_ports=(), bind_ports=None)
    fd = open_rules_fd(rules)
    try:
        assert inner.decode_ruleset(inner.read_rules_fd(fd)) == compile_ruleset(rules)
    finally:
        os.close(fd)
