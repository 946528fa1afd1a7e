"""Shared fixtures: a throwaway host layout with canaries, and a sandbox check that never skips
silently.

Layouts live under /var/tmp, not /tmp: standard mode gives the sandbox a private /tmp, so a
canary under /tmp would be invisible inside and every block would pass for the wrong reason.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from typing import NamedTuple

import pytest

from corral.hostpaths import host_paths
from corral.policy.model import HostPaths, Mode
from corral.policy.presets import preset_policy
from corral.sandbox import RunResult, Sandbox

SECRET = "corral-test-canary-7f3a9"
BASHRC = "# original bashrc\n"
LAYOUT_ROOT = "/var/tmp"


def _sandbox_problem() -> str | None:
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        return "bubblewrap (bwrap) is not installed"
    probe = subprocess.run(
        [bwrap, "--unshare-all", "--ro-bind", "/", "/", "--dev", "/dev", "true"],
        capture_output=True,
        text=True,
    )
    if probe.returncode != 0:
        return f"bwrap cannot create namespaces here: {probe.stderr.strip()}"
    return None


@pytest.fixture(scope="session")
def sandbox_available() -> None:
    """Sandbox tests need bubblewrap. In CI (CORRAL_REQUIRE_SANDBOX=1) its absence is a failure."""
    problem = _sandbox_problem()
    if problem is None:
        return
    if os.environ.get("CORRAL_REQUIRE_SANDBOX"):
        pytest.fail(f"sandbox required but unavailable: {problem}")
    pytest.skip(f"SANDBOX TESTS SKIPPED: {problem}")


class Layout(NamedTuple):
    root: str
    home: str
    workspace: str
    outside: str
    env: dict[str, str]

    def host(self) -> HostPaths:
        return host_paths(self.workspace, self.env)

    def sandbox(self, mode: Mode = "standard") -> Sandbox:
        return Sandbox(preset_policy(mode, self.host()))

    def read(self, relative: str) -> str:
        with open(os.path.join(self.root, relative)) as f:
            return f.read()

    def listing(self) -> list[str]:
        """Every path under the layout but corral's own cache and state directories (for
        "nothing was left behind" checks)."""
        own = (f"{self.home}/.cache", f"{self.home}/.local")
        found = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            found += [os.path.join(dirpath, n) for n in dirnames + filenames]
        return sorted(p for p in found if not p.startswith(own))


def make_layout(root: str) -> Layout:
    home = f"{root}/home"
    workspace = f"{home}/project"
    outside = f"{root}/outside"
    for d in (f"{home}/.ssh", workspace, outside):
        os.makedirs(d)
    with open(f"{home}/.ssh/id_rsa", "w") as f:
        f.write(SECRET)
    with open(f"{home}/.bashrc", "w") as f:
        f.write(BASHRC)
    env = {
        "HOME": home,
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
    }
    return Layout(root, home, workspace, outside, env)


@pytest.fixture
def layout() -> Iterator[Layout]:
    root = tempfile.mkdtemp(prefix="corral-test-", dir=LAYOUT_ROOT)
    os.chmod(root, 0o755)
    try:
        yield make_layout(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run_script(
    layout: Layout,
    script: str,
    *,
    sandboxed: bool,
    mode: Mode = "standard",
    env: dict[str, str] | None = None,
) -> RunResult:
    """Run a bash script in the workspace, in the sandbox or (for the control case) directly."""
    full_env = {**layout.env, **(env or {})}
    argv = ["bash", "-c", script]
    if sandboxed:
        return layout.sandbox(mode).run(argv, env=full_env, capture_output=True, timeout=60)
    done = subprocess.run(argv, cwd=layout.workspace, env=full_env, capture_output=True, timeout=60)
    return RunResult(done.returncode, done.stdout, done.stderr, False, "unsandboxed")


def accepted(listener: socket.socket) -> bool:
    """Whether a connection waits in the backlog (connect on loopback queues it at once)."""
    listener.setblocking(False)
    try:
        listener.accept()[0].close()
    except BlockingIOError:
        return False
    return True


class Canary:
    """A host listener that only counts the connections made to it: the host-side evidence of
    network blocks. No thread accepts them: the kernel completes each handshake into the
    backlog, and `count()` drains it afterwards, so no thread has to have run in time."""

    def __init__(self, address: str = "127.0.0.1", port: int = 0) -> None:
        self.sock = socket.create_server((address, port), backlog=64)
        self.port: int = self.sock.getsockname()[1]
        self.sock.setblocking(False)

    def count(self) -> int:
        accepted = 0
        while True:
            try:
                conn, _ = self.sock.accept()
            except BlockingIOError:
                return accepted
            accepted += 1
            conn.close()

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Canary:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
