"""The Landlock-only backend through Sandbox: the key blocks hold with no namespaces at all.

Each attack is first seen to escape when run directly (tests/test_blocks.py runs the same
scripts unsandboxed); here the host-side evidence is checked under the Landlock-only backend.
"""

from __future__ import annotations

import os
import socket

import pytest

from corral.launch import choose_backend
from corral.probe import probe
from corral.sandbox import RunResult, Sandbox
from tests.conftest import BASHRC, SECRET, Layout

pytestmark = pytest.mark.usefixtures("sandbox_available")


def nsfree(layout: Layout) -> Sandbox:
    policy = layout.sandbox().policy._replace(backend="landlock")
    box = Sandbox(policy)
    if box._machine().landlock_abi == 0:
        pytest.fail("this kernel has no Landlock; the Landlock-only backend cannot be tested")
    return box


def run(layout: Layout, script: str) -> RunResult:
    return nsfree(layout).run(
        ["bash", "-c", script], env=layout.env, capture_output=True, timeout=60
    )


def test_secret_read_is_refused(layout: Layout) -> None:
    result = run(layout, "cat ~/.ssh/id_rsa")
    assert SECRET not in (result.stdout or b"").decode()


def test_shell_startup_file_stays_intact(layout: Layout) -> None:
    run(layout, "echo pwned >> ~/.bashrc; echo pwned > ~/.zshrc")
    assert layout.read("home/.bashrc") == BASHRC
    assert not os.path.exists(f"{layout.home}/.zshrc")


def test_write_outside_the_workspace_is_refused(layout: Layout) -> None:
    run(layout, f"echo loot > {layout.outside}/loot")
    assert not os.path.exists(f"{layout.outside}/loot")


def test_workspace_subdirectory_write_works(layout: Layout) -> None:
    os.makedirs(f"{layout.workspace}/src")
    result = run(layout, "echo hello > src/out.txt")
    assert result.returncode == 0, result.stderr
    assert layout.read("home/project/src/out.txt") == "hello\n"


def test_tcp_connection_to_the_host_is_refused(layout: Layout) -> None:
    server = socket.create_server(("127.0.0.1", 0), backlog=8)
    port = server.getsockname()[1]
    try:
        run(layout, f"exec 3<>/dev/tcp/127.0.0.1/{port} && echo hi >&3")
        server.setblocking(False)
        try:
            server.accept()[0].close()
            reached = True
        except BlockingIOError:
            reached = False
    finally:
        server.close()
    assert not reached


def test_auto_falls_back_to_landlock_and_says_so(
    layout: Layout, capsys: pytest.CaptureFixture[str]
) -> None:
    facts = probe(cache_dir=layout.host().machine_cache_dir)
    no_userns = facts._replace(max_user_namespaces=0, bwrap_setuid=False)
    assert choose_backend(layout.sandbox().policy, no_userns) == "landlock"
    assert "Landlock-only backend" in capsys.readouterr().err
    assert choose_backend(layout.sandbox().policy, facts) == "bwrap"
