"""A sandbox with a filtered network and the loopback servers it may or may not reach, for the
tests that run real clients inside real sandboxes (test_network_*.py).

Names resolve only through the test resolver: "allowed.test", "pypi.test" and "git.test" lead
to servers on 127.0.0.2, which the policy allows; "denied.test" (in deniedDomains) and
"other.test" (in neither list) lead to the "denied" server on 127.0.0.3, which counts every
connection it accepts: the host-side evidence that a refusal let nothing through. No real
host name is used anywhere.
"""

from __future__ import annotations

import hashlib
import http.server
import os
import socket
import subprocess
import threading
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

from corral.audit.events import MemorySink
from corral.policy.model import NetworkPolicy, Origin, Policy, Rule
from corral.policy.presets import preset_policy
from corral.sandbox import Sandbox
from tests.conftest import Layout
from tests.test_proxy_support import ALLOWED_ADDRESS, DENIED_ADDRESS, LoopbackServer

ALLOWED_NAMES = ("allowed.test", "pypi.test", "git.test")
DENIED_NAMES = ("denied.test", "other.test")


def resolve(host: str) -> list[str]:
    if host in ALLOWED_NAMES:
        return [ALLOWED_ADDRESS]
    if host in DENIED_NAMES:
        return [DENIED_ADDRESS]
    raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")


def filtered_policy(
    layout: Layout, *, host_ports: tuple[int, ...] = (), publish_ports: tuple[int, ...] = ()
) -> Policy:
    """The standard preset with a filtered network: the allowed names, and their server's
    address (a name that resolves to loopback must be allowed by address too: rebinding)."""
    origin = Origin("test")
    network = NetworkPolicy(
        "filtered",
        allowed_domains=tuple(Rule(v, origin) for v in (*ALLOWED_NAMES, ALLOWED_ADDRESS)),
        denied_domains=(Rule("denied.test", origin),),
        host_ports=host_ports,
        publish_ports=publish_ports,
    )
    return preset_policy("standard", layout.host())._replace(network=network)


class Servers(NamedTuple):
    allowed: LoopbackServer
    denied: LoopbackServer


@contextmanager
def loopback_servers() -> Iterator[Servers]:
    pair = Servers(
        LoopbackServer("allowed", ALLOWED_ADDRESS), LoopbackServer("denied", DENIED_ADDRESS)
    )
    try:
        yield pair
    finally:
        pair.allowed.close()
        pair.denied.close()


class World(NamedTuple):
    layout: Layout
    sandbox: Sandbox
    sink: MemorySink
    servers: Servers

    def run(self, script: str, *, timeout: float = 60) -> tuple[int, str, str, str]:
        """A bash script in the workspace: (exit code, stdout, stderr, sandbox id)."""
        result = self.sandbox.run(
            ["bash", "-c", script], env=self.layout.env, capture_output=True, timeout=timeout
        )
        assert not result.timed_out, result
        out = (result.stdout or b"").decode(errors="replace")
        err = (result.stderr or b"").decode(errors="replace")
        return result.returncode, out, err, result.sandbox_id

    def events(self, host: str | None = None, *, at_least: int = 0) -> list[dict[str, object]]:
        """The network events so far. `at_least`: wait (up to 10 s) until there are that many:
        a tunnel's event is recorded when the proxy has closed it, which can be just after
        the client inside has exited."""
        import time

        deadline = time.monotonic() + 10
        while True:
            found = [
                {"sandbox_id": e.sandbox_id, **e.fields}
                for e in self.sink.of_kind("network")
                if host is None or e.fields["host"] == host
            ]
            if len(found) >= at_least or time.monotonic() > deadline:
                return found
            time.sleep(0.01)


@contextmanager
def filtered_world(
    layout: Layout, servers: Servers, policy: Policy | None = None
) -> Iterator[World]:
    sink = MemorySink()
    with Sandbox(policy or filtered_policy(layout), resolver=resolve, sink=sink) as sandbox:
        yield World(layout, sandbox, sink, servers)


class HttpServer:
    """A threaded http.server on 127.0.0.2 that remembers each request line it served."""

    def __init__(self, handler: type[http.server.BaseHTTPRequestHandler]) -> None:
        self.requests: list[str] = []
        requests = self.requests

        class Recording(handler):  # type: ignore[valid-type,misc]  # a class made per server
            def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
                requests.append(f"{self.command} {self.path} {code}")

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer((ALLOWED_ADDRESS, 0), Recording)
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)


# --- a package index ---------------------------------------------------------------------


WHEEL_FILES = {
    "tinypkg/__init__.py": "VALUE = 42\n",
    "tinypkg-1.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: tinypkg\nVersion: 1.0\n",
    "tinypkg-1.0.dist-info/WHEEL": (
        "Wheel-Version: 1.0\nGenerator: corral-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    ),
}
WHEEL_NAME = "tinypkg-1.0-py3-none-any.whl"


def build_wheel(directory: str) -> str:
    """A minimal pure-Python wheel, written by hand (no build tools needed)."""
    import base64

    path = os.path.join(directory, WHEEL_NAME)
    record = []
    with zipfile.ZipFile(path, "w") as wheel:
        for name, text in WHEEL_FILES.items():
            data = text.encode()
            wheel.writestr(name, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
            record.append(f"{name},sha256={digest.decode()},{len(data)}")
        record.append("tinypkg-1.0.dist-info/RECORD,,")
        wheel.writestr("tinypkg-1.0.dist-info/RECORD", "\n".join(record) + "\n")
    return path


def package_index(root: str) -> HttpServer:
    """A PEP 503 simple index of one wheel, served from `root`."""
    os.makedirs(f"{root}/packages")
    wheel = build_wheel(f"{root}/packages")
    with open(wheel, "rb") as data:
        digest = hashlib.sha256(data.read()).hexdigest()
    os.makedirs(f"{root}/simple/tinypkg")
    link = f"../../packages/{WHEEL_NAME}#sha256={digest}"
    pages = {
        "simple/index.html": '<a href="tinypkg/">tinypkg</a>',
        "simple/tinypkg/index.html": f'<a href="{link}">{WHEEL_NAME}</a>',
    }
    for page, anchor in pages.items():
        with open(f"{root}/{page}", "w") as f:
            f.write(f"<html><body>{anchor}</body></html>\n")

    class Files(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, directory=root, **kwargs)

    return HttpServer(Files)


# --- a git server ------------------------------------------------------------------------


def bare_repository(root: str, env: dict[str, str]) -> str:
    """`root`/repo.git with one commit holding README (text "hello from git.test")."""
    work = f"{root}/work"
    os.makedirs(work)
    with open(f"{work}/README", "w") as f:
        f.write("hello from git.test\n")
    identity = ["-c", "user.name=t", "-c", "user.email=t@t", "-c", "init.defaultBranch=main"]
    for args in (
        ["init", "-q", work],
        ["-C", work, "add", "README"],
        ["-C", work, "commit", "-q", "-m", "one"],
        ["clone", "-q", "--bare", work, f"{root}/repo.git"],
    ):
        subprocess.run(["git", *identity, *args], check=True, env=env, capture_output=True)
    return f"{root}/repo.git"


def git_http_backend(project_root: str) -> HttpServer:
    """`git http-backend` behind a small CGI wrapper (smart HTTP, protocol v2)."""

    class GitCgi(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive through the proxy, as real servers do

        def do_GET(self) -> None:
            self._cgi()

        def do_POST(self) -> None:
            self._cgi()

        def _cgi(self) -> None:
            path, _, query = self.path.partition("?")
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            env = {
                "PATH": os.environ["PATH"],
                "GIT_PROJECT_ROOT": project_root,
                "GIT_HTTP_EXPORT_ALL": "1",
                "REQUEST_METHOD": self.command,
                "PATH_INFO": path,
                "QUERY_STRING": query,
                "CONTENT_TYPE": self.headers.get("Content-Type", ""),
                "CONTENT_LENGTH": str(len(body)),
                "HTTP_CONTENT_ENCODING": self.headers.get("Content-Encoding", ""),
                "GIT_PROTOCOL": self.headers.get("Git-Protocol", ""),
                "REMOTE_ADDR": "127.0.0.1",
            }
            done = subprocess.run(["git", "http-backend"], input=body, env=env, capture_output=True)
            head, payload = _split_cgi_output(done.stdout)
            status, headers = 200, []
            for line in head.decode("latin-1").splitlines():
                name, _, value = line.partition(":")
                if name.lower() == "status":
                    status = int(value.split()[0])
                elif name.lower() != "content-length":
                    headers.append((name, value.strip()))
            self.send_response(status)
            for name, value in headers:
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

    return HttpServer(GitCgi)


def _split_cgi_output(output: bytes) -> tuple[bytes, bytes]:
    """CGI headers end at the first empty line, written with CRLF or LF."""
    ends = [(at, len(sep)) for sep in (b"\r\n\r\n", b"\n\n") if (at := output.find(sep)) >= 0]
    at, size = min(ends)
    return output[:at], output[at + size :]


def test_resolver_maps_only_test_names() -> None:
    assert resolve("pypi.test") == [ALLOWED_ADDRESS]
    assert resolve("other.test") == [DENIED_ADDRESS]


def test_the_wheel_is_a_zip_with_its_record(tmp_path: object) -> None:
    path = build_wheel(str(tmp_path))
    with zipfile.ZipFile(path) as wheel:
        assert "tinypkg-1.0.dist-info/RECORD" in wheel.namelist()
