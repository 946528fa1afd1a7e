"""`corral serve`: where it listens (127.0.0.1 or a private unix socket), and the real server
started as a process and called over real HTTP."""

from __future__ import annotations

import argparse
import http.client
import json
import os
import select
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from typing import NamedTuple

import httpx
import pytest

from corral.bridge import serve
from corral.bridge.token import load_or_create
from corral.errors import UsageError
from tests.conftest import Layout
from tests.helpers_bridge_http import write_declarations

STARTUP_BOUND_S = 60.0  # only bounds a broken start; a healthy one prints at once


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    serve.add_serve_command(parser.add_subparsers(dest="command"))
    return parser.parse_args(["serve", *argv])


# -- arguments and sockets ----------------------------------------------------------------------


def test_serve_arguments() -> None:
    args = _parse(["--port", "0", "--workspace", "/w"])
    assert (args.port, args.socket, args.workspace, args.handler) == (
        0,
        None,
        "/w",
        serve.cmd_serve,
    )
    assert _parse([]).port is None  # DEFAULT_PORT, decided when listening
    assert _parse(["--spool", "/s"]).spool_access == "private"


@pytest.mark.parametrize(
    "argv", [["--port", "1", "--socket", "/s"], ["--port", "65536"], ["--port", "x"]]
)
def test_serve_refuses_bad_arguments(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        _parse(argv)


def test_loopback_listener_is_on_127_0_0_1_only() -> None:
    with serve.bind_loopback(0) as sock:
        address, port = sock.getsockname()
        assert address == "127.0.0.1" and port > 0
        # asyncio turns on TCP_NODELAY for accepted connections only when proto says TCP;
        # without it every response waits ~40 ms for a delayed ACK (Nagle).
        assert sock.proto == socket.IPPROTO_TCP


def test_unix_socket_is_0600_in_a_new_0700_directory(tmp_path: object) -> None:
    path = f"{tmp_path}/run/corral/bridge.sock"
    old_umask = os.umask(0)  # the loosest umask must not loosen the socket or its directory
    try:
        sock = serve.bind_unix_socket(path)
    finally:
        os.umask(old_umask)
    with sock:
        st = os.lstat(path)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
        assert stat.S_IMODE(os.lstat(os.path.dirname(path)).st_mode) == 0o700


@pytest.mark.parametrize("mode", [0o755, 0o750, 0o701, 0o770])
def test_unix_socket_refuses_a_directory_open_to_others(tmp_path: object, mode: int) -> None:
    directory = f"{tmp_path}/shared"
    os.mkdir(directory)
    os.chmod(directory, mode)
    with pytest.raises(UsageError, match="must be yours with mode 0700"):
        serve.bind_unix_socket(f"{directory}/bridge.sock")
    assert os.listdir(directory) == []  # no socket was created there


def test_unix_socket_replaces_a_stale_one_and_refuses_a_live_one(tmp_path: object) -> None:
    directory = f"{tmp_path}/run"
    path = f"{directory}/bridge.sock"
    with serve.bind_unix_socket(path), pytest.raises(UsageError, match="another server is"):
        serve.bind_unix_socket(path)
    assert stat.S_ISSOCK(os.lstat(path).st_mode)  # closed but left behind: stale
    with serve.bind_unix_socket(path) as again:
        probe = socket.socket(socket.AF_UNIX)
        probe.connect(path)  # the new one listens
        probe.close()
        again.close()


def test_unix_socket_never_replaces_a_file(tmp_path: object) -> None:
    directory = f"{tmp_path}/run"
    os.mkdir(directory, 0o700)
    with open(f"{directory}/bridge.sock", "w") as f:
        f.write("keep me")
    with pytest.raises(UsageError, match="not a socket"):
        serve.bind_unix_socket(f"{directory}/bridge.sock")
    with open(f"{directory}/bridge.sock") as f:
        assert f.read() == "keep me"


# -- the real server, as a process --------------------------------------------------------------


class Server(NamedTuple):
    proc: subprocess.Popen[bytes]
    where: str
    token: str
    state_dir: str
    early: str
    """What it printed up to and including the line saying where it listens."""


def _read_until(proc: subprocess.Popen[bytes], needle: str) -> tuple[str, str]:
    """(everything read so far, the line holding `needle`). Reads the pipe unbuffered, so that
    select() sees every byte that has not been read yet."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    seen = b""
    while True:
        ready, _, _ = select.select([fd], [], [], STARTUP_BOUND_S)
        chunk = os.read(fd, 65536) if ready else b""
        if not chunk:
            proc.kill()
            _, err = proc.communicate()
            pytest.fail(f"corral serve did not say {needle!r}: {seen!r} {err!r}")
        seen += chunk
        text = seen.decode()
        for line in text.splitlines(keepends=True):
            if needle in line and line.endswith("\n"):
                return text, line.strip()


@pytest.fixture
def started(layout: Layout) -> Iterator[list[Server]]:
    servers: list[Server] = []
    yield servers
    for server in servers:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.communicate()


def start_server(layout: Layout, servers: list[Server], *where: str) -> Server:
    write_declarations(layout)
    proc = subprocess.Popen(
        [sys.executable, "-m", "corral.bridge.serve", *where, "--workspace", layout.workspace],
        env=layout.env,
        cwd=layout.workspace,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        bufsize=0,
    )
    early, line = _read_until(proc, "listening on ")
    state_dir = f"{layout.home}/.local/state/corral"
    address = line.split("listening on ", 1)[1]
    server = Server(proc, address, load_or_create(state_dir), state_dir, early)
    servers.append(server)
    return server


def stop(server: Server) -> tuple[int, str, str]:
    """SIGTERM, then (exit status, all it printed on stdout, stderr)."""
    server.proc.send_signal(signal.SIGTERM)
    out, err = server.proc.communicate(timeout=60)
    return server.proc.returncode, server.early + out.decode(), err.decode()


def _audit_lines(state_dir: str) -> list[dict[str, object]]:
    found = []
    spool = f"{state_dir}/spool"
    for name in sorted(os.listdir(spool)):
        with open(f"{spool}/{name}") as f:
            found += [json.loads(line) for line in f if line.strip()]
    return found


@pytest.mark.usefixtures("sandbox_available")
def test_real_server_over_tcp(layout: Layout, started: list[Server]) -> None:
    server = start_server(layout, started, "--port", "0")
    assert server.where.startswith("http://127.0.0.1:")
    auth = {"Authorization": f"Bearer {server.token}"}
    with httpx.Client(base_url=server.where, timeout=60) as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        assert client.get("/v1/commands").status_code == 401
        ran = client.post("/v1/commands/echo/run", json={"args": {"word": "hi"}}, headers=auth)
        assert ran.status_code == 200 and ran.json()["stdout"] == "hi\n"
        with client.stream("GET", f"/v1/jobs/{ran.json()['id']}/output", headers=auth) as out:
            assert out.headers["transfer-encoding"] == "chunked"
            assert out.read() == b"hi\n"
        evil = client.get("/v1/commands", headers={**auth, "Host": "evil.example:80"})
        assert evil.status_code == 403
        # An approval left pending when the server stops must end denied, not dangling.
        asked = client.post(
            "/v1/commands/touch/run", json={"args": {"p": "never.txt"}, "wait": False}, headers=auth
        )
        assert asked.json()["state"] == "awaiting_approval"
    code, printed, err = stop(server)
    assert code == 0, err
    assert server.token not in printed and server.token not in err
    assert "corral token" in printed
    assert not os.path.exists(f"{layout.workspace}/never.txt")
    decisions = [
        line["fields"] for line in _audit_lines(server.state_dir) if line["kind"] == "bridge"
    ]
    by = {(f["command"], f["decision"], f["decided_by"]) for f in decisions}  # type: ignore[index]
    assert ("echo", "allow", "policy") in by
    assert ("touch", "deny", "shutdown") in by


def test_real_server_refuses_oversized_bodies_on_the_wire(
    layout: Layout, started: list[Server]
) -> None:
    server = start_server(layout, started, "--port", "0")
    host, port = server.where.removeprefix("http://").split(":")
    headers = {"Authorization": f"Bearer {server.token}", "Content-Type": "application/json"}
    path = "/v1/commands/echo/run"
    # Chunked, no Content-Length: counted as it arrives. 70 KiB fits the socket buffers, so the
    # client finishes sending before it reads the answer.
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    chunks = (b"x" * 1024 for _ in range(70))
    conn.request("POST", path, body=chunks, headers=headers, encode_chunked=True)
    response = conn.getresponse()
    assert response.status == 413
    assert json.loads(response.read())["error"]["code"] == "request_too_large"
    conn.close()
    # A Content-Length over the limit is refused before any body byte is sent.
    with socket.create_connection((host, int(port)), timeout=60) as raw:
        raw.sendall(
            f"POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {server.token}\r\n"
            "Content-Type: application/json\r\nContent-Length: 1000000000\r\n\r\n".encode()
        )
        answer = http.client.HTTPResponse(raw)
        answer.begin()
        assert answer.status == 413
        assert json.loads(answer.read())["error"]["code"] == "request_too_large"
    code, _, err = stop(server)
    assert code == 0, err


def test_real_server_on_a_unix_socket(layout: Layout, started: list[Server]) -> None:
    path = f"{layout.root}/run/bridge.sock"
    server = start_server(layout, started, "--socket", path)
    assert server.where == f"unix:{path}"
    assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.lstat(os.path.dirname(path)).st_mode) == 0o700
    transport = httpx.HTTPTransport(uds=path)
    with httpx.Client(transport=transport, base_url="http://localhost", timeout=60) as client:
        assert client.get("/healthz").status_code == 200
        listed = client.get("/v1/commands", headers={"Authorization": f"Bearer {server.token}"})
        assert [c["name"] for c in listed.json()["commands"]][:2] == ["echo", "count"]
    code, _, err = stop(server)
    assert code == 0, err
    assert not os.path.exists(path)  # removed on the way out


def test_serve_rejects_a_missing_workspace(layout: Layout) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "corral.bridge.serve", "--workspace", f"{layout.root}/missing"],
        env=layout.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "not a directory" in done.stderr


def _drop_request(spool: str, rid: str, request: dict[str, object]) -> None:
    os.makedirs(f"{spool}/requests", exist_ok=True)
    with open(f"{spool}/requests/.{rid}.json.tmp", "w") as f:
        json.dump(request, f)
    os.rename(f"{spool}/requests/.{rid}.json.tmp", f"{spool}/requests/{rid}.json")


def _await_result(proc: subprocess.Popen[bytes], path: str) -> dict[str, object]:
    """Polls for the result file; a dead server fails at once, a stuck one after the bound."""
    for _ in range(int(STARTUP_BOUND_S / 0.05)):
        if os.path.exists(path):
            with open(path) as f:
                result: dict[str, object] = json.load(f)
                return result
        if proc.poll() is not None:
            pytest.fail(f"corral serve exited with {proc.returncode}")
        select.select([], [], [], 0.05)
    pytest.fail(f"no result at {path}")


@pytest.mark.usefixtures("sandbox_available")
def test_real_server_with_a_spool_beside_http(layout: Layout, started: list[Server]) -> None:
    spool = f"{layout.root}/spool"
    server = start_server(layout, started, "--port", "0", "--spool", spool)
    assert stat.S_IMODE(os.lstat(spool).st_mode) == 0o700  # created private
    _drop_request(spool, "r1", {"command": "echo", "args": {"word": "from-spool"}})
    result = _await_result(server.proc, f"{spool}/results/r1.json")
    assert result["ok"] is True
    assert result["job"]["stdout"] == "from-spool\n"  # type: ignore[index]
    with httpx.Client(base_url=server.where, timeout=60) as client:  # HTTP still served
        assert client.get("/healthz").status_code == 200
    code, _, err = stop(server)
    assert code == 0, err


@pytest.mark.usefixtures("sandbox_available")
def test_spool_alone_serves_no_http(layout: Layout) -> None:
    write_declarations(layout)
    spool = f"{layout.root}/spool"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "corral.bridge.serve",
            "--spool",
            spool,
            "--workspace",
            layout.workspace,
        ],
        env=layout.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        bufsize=0,
    )
    try:
        early, _ = _read_until(proc, "serving the spool")
        assert "listening on" not in early
        _drop_request(spool, "r2", {"command": "count", "args": {"n": 2}})
        result = _await_result(proc, f"{spool}/results/r2.json")
        assert result["job"]["stdout"] == "1\n2\n"  # type: ignore[index]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
