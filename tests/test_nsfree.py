"""The namespace-free mode: the allow-list expansion (with a fake disk) and the blocks it
keeps on the real host, with no bubblewrap, also while user namespaces are switched off.

Each host test runs one bash script twice: through `prepare_nsfree` as preexec_fn, and
directly as the control. A block passes only when the host shows its effect under Landlock
and the control shows the script would have done it otherwise.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

from corral.backends.facts import gather_disk_facts
from corral.backends.fsplan import Denied, FilesystemPlan, plan_filesystem
from corral.backends.landlock import LandlockRules
from corral.backends.landlock_nsfree import (
    expand_allowlist,
    expand_read_allowlist,
    nsfree_ports,
    nsfree_rules,
    prepare_nsfree,
)
from corral.backends.seccomp import SeccompOptions, build_filter, host_arch
from corral.policy.model import NetworkPolicy, Origin, Rule
from corral.policy.presets import preset_policy
from corral.probe import landlock_abi
from tests.conftest import BASHRC, SECRET, Layout

ABI = landlock_abi(os.uname().machine)

# --- The expansion, on a fake disk -----------------------------------------------------------

DISK = {
    "/": ["usr", "home", "dev", "bin"],
    "/home": ["u", "v"],
    "/home/u": [".ssh", ".aws", ".bashrc", "proj"],
    "/home/u/proj": [".git", ".envrc", "src", "README"],
    "/home/u/proj/.git": ["config", "hooks", "objects", "HEAD"],
}


class FakeDisk:
    def __init__(self) -> None:
        self.listed: list[str] = []

    def __call__(self, path: str) -> Iterable[str]:
        self.listed.append(path)
        return DISK.get(path, [])


@pytest.mark.parametrize(
    ("roots", "hidden", "granted"),
    [
        (["/"], [], ["/"]),
        (["/usr"], ["/home/u/.ssh"], ["/usr"]),  # hidden outside the root: one rule
        (
            ["/"],
            ["/home/u/.ssh"],
            ["/bin", "/dev", "/home/u/.aws", "/home/u/.bashrc", "/home/u/proj", "/home/v", "/usr"],
        ),
        (
            ["/home/u"],
            ["/home/u/.ssh", "/home/u/.aws"],
            ["/home/u/.bashrc", "/home/u/proj"],
        ),
        # A missing hidden path: its parent is still never granted, so it cannot be created.
        (
            ["/home/u"],
            ["/home/u/.netrc"],
            ["/home/u/.aws", "/home/u/.bashrc", "/home/u/.ssh", "/home/u/proj"],
        ),
        (
            ["/home/u"],
            ["/home/u/.x/y"],
            ["/home/u/.aws", "/home/u/.bashrc", "/home/u/.ssh", "/home/u/proj"],
        ),
        (["/home/u/.ssh"], ["/home/u/.ssh"], []),  # the root itself hidden
        (["/home/u/.ssh/k"], ["/home/u/.ssh"], []),  # the root inside a hidden path
        (
            ["/home/u", "/home/u/proj"],
            ["/home/u/.ssh"],
            ["/home/u/.aws", "/home/u/.bashrc", "/home/u/proj"],
        ),
        (["/home"], ["/home/u", "/home/u/.ssh"], ["/home/v"]),
    ],
)
def test_expand_read_allowlist(roots: list[str], hidden: list[str], granted: list[str]) -> None:
    assert expand_read_allowlist(roots, hidden, listdir=FakeDisk()) == tuple(granted)


def test_only_the_directories_on_the_way_are_listed() -> None:
    disk = FakeDisk()
    expand_read_allowlist(["/"], ["/home/u/.ssh"], listdir=disk)
    assert disk.listed == ["/", "/home", "/home/u"]


def test_write_expansion_leaves_the_parents_of_protected_paths_frozen() -> None:
    protected = ["/home/u/proj/.git/hooks", "/home/u/proj/.git/config", "/home/u/proj/.envrc"]
    granted = expand_allowlist(["/home/u/proj"], protected, listdir=FakeDisk())
    assert granted == (
        "/home/u/proj/.git/HEAD",
        "/home/u/proj/.git/objects",
        "/home/u/proj/README",
        "/home/u/proj/src",
    )


ORIGIN = Rule("x", Origin("test"))


def fake_plan(*, readable: tuple[str, ...], writable: tuple[str, ...]) -> FilesystemPlan:
    denied = (
        Denied("/home/u/.ssh", "read", ORIGIN),
        Denied("/home/u/proj/.envrc", "write", ORIGIN),
    )
    return FilesystemPlan((), (), readable, writable, denied, ())


def test_nsfree_rules_from_a_plan() -> None:
    plan = fake_plan(readable=("/",), writable=("/home/u/proj", "/tmp"))
    rules = nsfree_rules(
        plan,
        abi=7,
        network=NetworkPolicy("filtered", host_ports=(5432,)),
        proxy_ports=(3128,),
        tmp_dir="/tmp/corral-abc",
        terminals=("/dev/pts/3",),
        listdir=FakeDisk(),
    )
    # /dev is the host's (other terminals of the user): only named devices, never beneath it.
    assert "/dev" not in rules.read_paths and "/bin" in rules.read_paths
    assert "/home/u/proj" in rules.read_paths and "/proc" in rules.read_paths
    assert "/home/u" not in rules.read_paths and "/home/u/.ssh" not in rules.read_paths
    assert rules.write_paths[:4] == (
        "/home/u/proj/.git",
        "/home/u/proj/README",
        "/home/u/proj/src",
        "/tmp/corral-abc",
    )
    assert "/tmp" not in rules.write_paths and "/home/u/proj" not in rules.write_paths
    assert {"/dev/null", "/dev/tty", "/dev/pts/3"} <= set(rules.write_paths)
    assert (rules.connect_ports, rules.bind_ports) == ((3128, 5432), ())


@pytest.mark.parametrize(
    ("network", "connect", "bind"),
    [
        (NetworkPolicy("none", host_ports=(80,), allow_local_binding=True), (), ()),
        (NetworkPolicy("local"), (3128,), ()),
        (NetworkPolicy("filtered", host_ports=(5432,)), (3128, 5432), ()),
        (NetworkPolicy("filtered", allow_local_binding=True), (3128,), None),
    ],
)
def test_nsfree_ports(network: NetworkPolicy, connect: tuple[int, ...], bind: object) -> None:
    assert nsfree_ports(network, proxy_ports=(3128,)) == (connect, bind)


# --- The host --------------------------------------------------------------------------------

needs_landlock = pytest.mark.skipif(ABI < 4, reason=f"NSFREE TESTS SKIPPED: ABI {ABI} < 4")


class Host(NamedTuple):
    layout: Layout
    rules: LandlockRules
    tmp_dir: str


@pytest.fixture
def host(layout: Layout) -> Iterator[Host]:
    """A standard-mode layout with protected paths inside the writable workspace."""
    ws = Path(layout.workspace)
    (ws / ".git" / "hooks").mkdir(parents=True)
    (ws / ".git" / "config").write_text("[core]\n")
    (ws / ".git" / "objects").mkdir()
    (ws / ".envrc").write_text("# envrc\n")
    (ws / "src").mkdir()
    (ws / "src" / "main.txt").write_text("main\n")
    Path(layout.outside, "visible").write_text("visible\n")
    policy = preset_policy("standard", layout.host())
    plan = plan_filesystem(policy, gather_disk_facts(policy))
    tmp_dir = tempfile.mkdtemp(prefix="corral-nsfree-")
    rules = nsfree_rules(plan, abi=ABI, network=policy.network, tmp_dir=tmp_dir)
    try:
        yield Host(layout, rules, tmp_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def run(host: Host, script: str, *, confined: bool, seccomp: bytes | None = None) -> str:
    env = {**host.layout.env, "TMPDIR": host.tmp_dir}
    argv = ["bash", "-c", script]
    cwd = host.layout.workspace
    if not confined:
        done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True)
        return done.stdout + done.stderr
    with prepare_nsfree(host.rules, seccomp_program=seccomp) as launcher:
        assert launcher.enforcement != "none"
        done = subprocess.run(
            argv, cwd=cwd, env=env, capture_output=True, text=True, preexec_fn=launcher
        )
    return done.stdout + done.stderr


def check_hidden_unreadable_siblings_readable(host: Host) -> None:
    home = host.layout.home
    script = f"cat {home}/.ssh/id_rsa; ls {home}/.ssh; cat {host.layout.outside}/visible"
    confined = run(host, script, confined=True)
    assert SECRET not in confined and "cannot open directory" in confined  # no listing either
    assert "visible" in confined
    assert SECRET in run(host, script, confined=False)


def check_writes_outside_fail_and_the_host_is_unchanged(host: Host) -> None:
    home, outside = host.layout.home, host.layout.outside
    script = f"echo evil >> {home}/.bashrc; echo evil > {outside}/visible; touch {outside}/new"
    run(host, script, confined=True)
    assert host.layout.read("home/.bashrc") == BASHRC
    assert host.layout.read("outside/visible") == "visible\n"
    assert not os.path.exists(f"{outside}/new")
    run(host, script, confined=False)
    assert host.layout.read("outside/visible") == "evil\n"


PROTECTED_ATTACKS = [
    "echo evil > .envrc",
    "rm -f .envrc",
    "mv .envrc moved",
    "mv .git .git-old && mkdir -p .git/hooks",
    "echo evil > .git/config",
    "mv .git/config .git/config-old",
    "echo evil > .git/hooks/pre-commit",
    "ln -s ../../src/main.txt .git/hooks/post-checkout",
]


def protected_state(host: Host) -> tuple[str, str, list[str], bool]:
    ws = host.layout.workspace
    return (
        Path(ws, ".envrc").read_text(),
        Path(ws, ".git", "config").read_text(),
        sorted(os.listdir(f"{ws}/.git/hooks")),
        os.path.exists(f"{ws}/.git-old"),
    )


def check_protected_inside_writable(host: Host) -> None:
    before = protected_state(host)
    script = "; ".join(PROTECTED_ATTACKS) + "; echo edited >> src/main.txt; touch src/new"
    run(host, script, confined=True)
    assert protected_state(host) == before
    ws = host.layout.workspace
    assert Path(ws, "src", "main.txt").read_text() == "main\nedited\n"  # a sibling: writable
    assert os.path.exists(f"{ws}/src/new")
    run(host, "echo evil > .envrc; echo x > .git/hooks/pre-commit", confined=False)
    assert protected_state(host) != before


@needs_landlock
def test_hidden_dir_unreadable_while_its_siblings_are_readable(host: Host) -> None:
    check_hidden_unreadable_siblings_readable(host)


@needs_landlock
def test_writes_outside_the_write_paths_fail(host: Host) -> None:
    check_writes_outside_fail_and_the_host_is_unchanged(host)


@needs_landlock
def test_protected_paths_inside_a_writable_dir_cannot_be_written_or_replaced(host: Host) -> None:
    check_protected_inside_writable(host)


@needs_landlock
def test_hard_links_cannot_carry_a_denied_file_into_a_writable_dir(host: Host) -> None:
    """Landlock's rules sit on directories: a second name under a granted one would be
    readable (and writable). link(2) across directories needs REFER on both sides."""
    ws, home = host.layout.workspace, host.layout.home
    links = {f"{ws}/src/key": f"{home}/.ssh/id_rsa", f"{ws}/src/envrc": f"{ws}/.envrc"}
    script = "; ".join(f"ln {target} {name}" for name, target in links.items())
    run(host, script, confined=True)
    assert not any(os.path.exists(name) for name in links)
    run(host, script, confined=False)
    assert all(os.path.samefile(name, target) for name, target in links.items())


@needs_landlock
def test_private_tmp_is_writable_and_the_host_tmp_is_not_readable(host: Host) -> None:
    with tempfile.NamedTemporaryFile("w", prefix="corral-host-", dir="/tmp") as other:
        other.write(SECRET)
        other.flush()
        script = f'cat {other.name}; echo in-tmp > "$TMPDIR/f"; cat "$TMPDIR/f"'
        confined = run(host, script, confined=True)
        assert SECRET not in confined and "in-tmp" in confined
        assert SECRET in run(host, script, confined=False)


class Listeners(NamedTuple):
    allowed: socket.socket
    other: socket.socket

    def port(self, which: socket.socket) -> int:
        return int(which.getsockname()[1])


@pytest.fixture
def listeners() -> Iterator[Listeners]:
    with socket.socket() as allowed, socket.socket() as other:
        for listener in (allowed, other):
            listener.bind(("127.0.0.1", 0))
            listener.listen(4)
            listener.setblocking(False)
        yield Listeners(allowed, other)


def connections(listener: socket.socket) -> int:
    count = 0
    with contextlib.suppress(BlockingIOError):
        while True:
            listener.accept()[0].close()
            count += 1
    return count


def check_tcp_only_to_the_allowed_port(host: Host, ports: Listeners) -> None:
    allowed, other = ports.port(ports.allowed), ports.port(ports.other)
    network = NetworkPolicy("filtered")
    proxied = host._replace(rules=host.rules._replace(connect_ports=(allowed,), bind_ports=()))
    assert nsfree_ports(network, proxy_ports=(allowed,)) == ((allowed,), ())
    script = f"exec 3<>/dev/tcp/127.0.0.1/{other}; exec 4<>/dev/tcp/127.0.0.1/{allowed}"
    out = run(proxied, script, confined=True)
    assert "Permission denied" in out
    assert connections(ports.other) == 0  # the other server saw nothing
    assert connections(ports.allowed) == 1
    run(proxied, script, confined=False)
    assert connections(ports.other) == 1


@needs_landlock
def test_tcp_connect_only_to_the_allowed_port(host: Host, listeners: Listeners) -> None:
    check_tcp_only_to_the_allowed_port(host, listeners)


@needs_landlock
def test_network_none_adds_seccomp_and_landlock(host: Host, listeners: Listeners) -> None:
    port = listeners.port(listeners.other)
    program = build_filter(SeccompOptions("none"), arch=host_arch())
    script = f"exec 3<>/dev/tcp/127.0.0.1/{port}"
    assert host.rules.connect_ports == ()  # standard mode's "local": no host ports listed
    out = run(host, script, confined=True, seccomp=program)
    assert "Permission denied" in out  # EACCES from seccomp's socket() refusal
    assert connections(listeners.other) == 0


def sleeper(extra_env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(["sleep", "60"], env={"PATH": os.defpath, **(extra_env or {})})


@needs_landlock
def test_host_processes_cannot_be_signalled(host: Host) -> None:
    if ABI < 6:
        pytest.skip(f"Landlock ABI {ABI} < 6 cannot scope signals")
    victim = sleeper()
    try:
        out = run(host, f"kill -TERM {victim.pid}; echo status=$?", confined=True)
        assert "status=1" in out and victim.poll() is None  # still alive
        run(host, f"kill -TERM {victim.pid}", confined=False)
        assert victim.wait(10) == -signal.SIGTERM
    finally:
        victim.kill()
        victim.wait()


@needs_landlock
def test_host_process_environment_is_unreadable_but_its_command_line_is_not(host: Host) -> None:
    victim = sleeper({"CORRAL_CANARY": SECRET})
    try:
        script = f"cat /proc/{victim.pid}/environ; cat /proc/{victim.pid}/cmdline"
        confined = run(host, script, confined=True)
        assert SECRET not in confined and "sleep" in confined  # cmdline stays readable
        assert SECRET in run(host, script, confined=False)
    finally:
        victim.kill()
        victim.wait()


@needs_landlock
def test_abstract_unix_socket_of_the_host_is_unreachable(host: Host) -> None:
    if ABI < 6:
        pytest.skip(f"Landlock ABI {ABI} < 6 cannot scope abstract sockets")
    name = f"\0corral-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(name)
        listener.listen(4)
        listener.setblocking(False)
        connect = f"import socket; socket.socket(socket.AF_UNIX).connect({name!r})"
        attempt = [os.path.realpath(sys.executable), "-I", "-S", "-c", connect]
        # Landlock alone: seccomp would refuse every unix socket before Landlock is asked.
        with prepare_nsfree(host.rules, seccomp_program=None) as launcher:
            done = subprocess.run(attempt, capture_output=True, text=True, preexec_fn=launcher)
        assert "PermissionError" in done.stderr
        assert connections(listener) == 0
        subprocess.run(attempt, check=True)
        assert connections(listener) == 1


# --- With user namespaces switched off (as in Docker or Ubuntu's restricted userns) ----------

MAX_USERNS = "/proc/sys/user/max_user_namespaces"
CLONE_NEWUSER = 0x10000000


def with_host_sysctl_off(check: Callable[[], None]) -> None:
    """sysctl user.max_user_namespaces=0 machine-wide, always restored. Kept to the few
    launches of one test: other bubblewrap runs on this machine would fail meanwhile."""
    previous = Path(MAX_USERNS).read_text()
    Path(MAX_USERNS).write_text("0\n")  # PermissionError without CAP_SYS_RESOURCE
    try:
        check()
    finally:
        Path(MAX_USERNS).write_text(previous)
    assert Path(MAX_USERNS).read_text() == previous


# Each written with one write(2), as the kernel requires of these files.
MAPS = (
    ("/proc/self/uid_map", "0 0 1\n"),  # only our own uid: no capability needed
    ("/proc/self/setgroups", "deny"),
    ("/proc/self/gid_map", "0 0 1\n"),
    (MAX_USERNS, "0\n"),
)


def write_once(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        assert os.write(fd, text.encode()) == len(text)
    finally:
        os.close(fd)


def with_private_sysctl_off(check: Callable[[], None]) -> None:
    """The same sysctl set to 0 in a private user namespace, for root without
    CAP_SYS_RESOURCE on the host (this CI machine). The limit is per user namespace and
    counts every nested one, so nothing inside can create a namespace, as on a host with the
    sysctl at 0; the host's own value is never touched."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        status = 1
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.unshare(CLONE_NEWUSER) != 0:
                raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWUSER)")
            for name, text in MAPS:
                write_once(name, text)
            check()
            status = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(status)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "a check failed with namespaces off (above)"


@needs_landlock
@pytest.mark.skipif(os.geteuid() != 0, reason="NEEDS ROOT: switching user namespaces off")
def test_blocks_hold_with_user_namespaces_off(host: Host, listeners: Listeners) -> None:
    def check() -> None:
        assert Path(MAX_USERNS).read_text() == "0\n"
        unshare = subprocess.run(["unshare", "--user", "true"], capture_output=True, text=True)
        assert unshare.returncode != 0, "namespaces still work"  # bubblewrap could not run
        check_hidden_unreadable_siblings_readable(host)
        check_writes_outside_fail_and_the_host_is_unchanged(host)
        check_protected_inside_writable(host)
        check_tcp_only_to_the_allowed_port(host, listeners)

    try:
        with_host_sysctl_off(check)
    except PermissionError:
        print("host sysctl not writable (no CAP_SYS_RESOURCE): private user namespace instead")
        with_private_sysctl_off(check)


@needs_landlock
@pytest.mark.skipif(os.geteuid() != 0, reason="NEEDS ROOT: only root has capabilities to drop")
def test_root_loses_its_capabilities(host: Host) -> None:
    """CAP_MKNOD would make a device node in a writable dir that Landlock then lets it open."""
    node = Path(host.layout.workspace, "src", "node")
    script = f"mknod {node} c 1 3; grep CapEff /proc/self/status"
    confined = run(host, script, confined=True)
    assert not node.exists() and "CapEff:\t0000000000000000" in confined
    run(host, script, confined=False)
    assert node.is_char_device()
