"""Proxy throughput, connection rate and memory, each against a direct loopback connection.

    .venv/bin/python bench/proxy.py [--megabytes 512] [--connections 2000] [--tunnels 1000]
                                    [--repeat 3] [--no-srt]

Everything runs on this machine, in separate processes: a download server on 127.0.0.1
(threads; `/big` sends --megabytes, `/small` a few bytes, `HOLD` keeps a connection open), the
corral proxy server (its own process, a JSON Lines audit sink, a policy allowing 127.0.0.1)
and the in-sandbox forwarder in front of it, as a sandbox would reach them (on the host here).

1. Throughput: `curl -o /dev/null` downloads /big directly and through each proxy path; rounds
   repeat --repeat times, variants interleaved, medians compared. Target: >= 0.9 of direct for
   the tunnel paths (CONNECT and SOCKS5).
2. Short connections per second: --connections request/response exchanges, 4 client threads,
   each on a new connection, directly and through the forwarder and proxy (SOCKS5, CONNECT).
3. Memory: the proxy's resident set size (VmRSS) idle and with --tunnels tunnels open at once
   through the forwarder. Target: < 60 MB with 1,000 tunnels.

Optional comparison: when `node` and `npm` are present and `npm install
@anthropic-ai/sandbox-runtime` works into a temporary directory, its HTTP proxy
(`createHttpProxyServer` with a filter allowing everything) is timed as one more CONNECT path.
Otherwise the reason it was skipped is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import socketserver
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

CHUNK = 4 * 1024 * 1024
SMALL_BODY = b"ok\n"
CLIENT_THREADS = 4
THROUGHPUT_TARGET = 0.9
RSS_TARGET_MB = 60.0


# --- the download server (a child process) ---------------------------------------------------


class _Handler(socketserver.BaseRequestHandler):
    size = 0

    def handle(self) -> None:
        sock: socket.socket = self.request
        head = b""
        while b"\r\n\r\n" not in head and not head.startswith(b"HOLD"):
            data = sock.recv(65536)
            if not data:
                return
            head += data
        if head.startswith(b"HOLD"):
            sock.sendall(b"held\n")
            while sock.recv(65536):
                pass
            return
        if head.startswith(b"GET /big"):
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % self.size)
            payload = memoryview(b"x" * CHUNK)
            left = self.size
            while left > 0:
                sent = sock.send(payload[: min(left, CHUNK)])
                left -= sent
        else:
            sock.sendall(
                b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
                % (len(SMALL_BODY), SMALL_BODY)
            )


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 4096


def serve_downloads(size: int) -> None:
    _Handler.size = size
    with _Server(("127.0.0.1", 0), _Handler) as server:
        print(server.server_address[1], flush=True)
        server.serve_forever()


# --- the proxy (a child process) -------------------------------------------------------------


def serve_proxy(directory: str) -> None:
    from corral.audit.events import JsonLinesSink
    from corral.policy.model import NetworkPolicy, Origin, Rule
    from corral.proxy.server import ProxyServer

    policy = NetworkPolicy("filtered", allowed_domains=(Rule("127.0.0.1", Origin("bench")),))
    sink = JsonLinesSink(os.path.join(directory, "audit.jsonl"))
    server = ProxyServer(
        policy=policy, sink=sink, sandbox_id="bench", socket_dir=os.path.join(directory, "s")
    )
    endpoints = server.start()
    print(json.dumps(endpoints._asdict()), flush=True)
    sys.stdin.read()  # until the benchmark closes our stdin
    server.stop()
    sink.close()


# --- measuring -------------------------------------------------------------------------------


class Paths(NamedTuple):
    server_port: int
    http_port: int
    socks_port: int
    socks_socket: str
    srt_port: int | None


def curl_speed(args: list[str], url: str) -> float:
    """Bytes per second of one download, as curl measured it."""
    result = subprocess.run(
        ["curl", "-sS", "-o", "/dev/null", "-w", "%{speed_download}", *args, url],
        capture_output=True, text=True, check=True, env={"PATH": os.environ["PATH"]},
    )  # fmt: skip
    return float(result.stdout)


def throughput_variants(paths: Paths) -> dict[str, list[str]]:
    via_http = f"http://127.0.0.1:{paths.http_port}"
    variants = {
        "direct": [],
        "CONNECT via forwarder": ["-p", "-x", via_http],
        "SOCKS5 via forwarder": ["--socks5-hostname", f"127.0.0.1:{paths.socks_port}"],
        "SOCKS5 on the unix socket": ["--proxy", f"socks5h://localhost{paths.socks_socket}"],
        "plain HTTP via forwarder": ["-x", via_http],
    }
    if paths.srt_port is not None:
        variants["sandbox-runtime CONNECT (TCP)"] = [
            "-p",
            "-x",
            f"http://127.0.0.1:{paths.srt_port}",
        ]
    return variants


def measure_throughput(paths: Paths, repeat: int) -> dict[str, float]:
    url = f"http://127.0.0.1:{paths.server_port}/big"
    variants = throughput_variants(paths)
    speeds: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeat):
        for name, args in variants.items():
            speeds[name].append(curl_speed(args, url))
    return {name: statistics.median(values) for name, values in speeds.items()}


def _exchange_direct(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"GET /small HTTP/1.1\r\nHost: x\r\n\r\n")
        _read_to_end(sock)


def _exchange_socks(socks_port: int, port: int) -> None:
    with socket.create_connection(("127.0.0.1", socks_port)) as sock:
        sock.sendall(b"\x05\x01\x00\x05\x01\x00\x01\x7f\x00\x00\x01" + port.to_bytes(2, "big"))
        reply = _read_exactly(sock, 12)
        assert reply[3] == 0, reply
        sock.sendall(b"GET /small HTTP/1.1\r\nHost: x\r\n\r\n")
        _read_to_end(sock)


def _exchange_connect(http_port: int, port: int) -> None:
    with socket.create_connection(("127.0.0.1", http_port)) as sock:
        sock.sendall(f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(4096)
        assert head.startswith(b"HTTP/1.1 200"), head
        sock.sendall(b"GET /small HTTP/1.1\r\nHost: x\r\n\r\n")
        _read_to_end(sock)


def _read_exactly(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        more = sock.recv(count - len(data))
        if not more:
            raise ConnectionError("closed early")
        data += more
    return data


def _read_to_end(sock: socket.socket) -> None:
    while sock.recv(65536):
        pass


def connections_per_second(exchange: Callable[[], None], count: int) -> float:
    per_thread = count // CLIENT_THREADS

    def worker() -> None:
        for _ in range(per_thread):
            exchange()

    start = time.perf_counter()
    with ThreadPoolExecutor(CLIENT_THREADS) as pool:
        for future in [pool.submit(worker) for _ in range(CLIENT_THREADS)]:
            future.result()
    return per_thread * CLIENT_THREADS / (time.perf_counter() - start)


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def open_tunnels(paths: Paths, count: int) -> list[socket.socket]:
    tunnels = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", paths.socks_port))
        sock.sendall(
            b"\x05\x01\x00\x05\x01\x00\x01\x7f\x00\x00\x01" + paths.server_port.to_bytes(2, "big")
        )
        tunnels.append(sock)
    for sock in tunnels:
        assert _read_exactly(sock, 12)[3] == 0
        sock.sendall(b"HOLD")
    for sock in tunnels:
        assert _read_exactly(sock, 5) == b"held\n"
    return tunnels


# --- sandbox-runtime (optional) --------------------------------------------------------------

SRT_DRIVER = """
import { createHttpProxyServer } from '%s';
const server = createHttpProxyServer({ filter: () => true });
server.listen(0, '127.0.0.1', () => console.log(server.address().port));
"""


def start_srt(scratch: str) -> tuple[subprocess.Popen[str] | None, int | None, str]:
    """sandbox-runtime's HTTP proxy, or (None, None, why it was skipped)."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        return None, None, "node or npm is not installed"
    where = os.path.join(scratch, "srt")
    os.makedirs(where)
    try:
        subprocess.run(
            ["npm", "install", "--silent", "--no-audit", "--no-fund",
             "@anthropic-ai/sandbox-runtime"],
            cwd=where, check=True, capture_output=True, timeout=300,
        )  # fmt: skip
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        return None, None, f"npm install @anthropic-ai/sandbox-runtime failed: {exc}"
    module = os.path.join(
        where, "node_modules/@anthropic-ai/sandbox-runtime/dist/sandbox/http-proxy.js"
    )
    if not os.path.exists(module):
        return None, None, "the installed package has no dist/sandbox/http-proxy.js"
    driver = os.path.join(where, "driver.mjs")
    with open(driver, "w") as f:
        f.write(SRT_DRIVER % module)
    process = subprocess.Popen(["node", driver], stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    line = process.stdout.readline().strip()
    if not line.isdigit():
        process.kill()
        return None, None, f"its proxy did not start (printed {line!r})"
    return process, int(line), ""


# --- the run ---------------------------------------------------------------------------------


def _spawn(args: list[str]) -> tuple[subprocess.Popen[str], str]:
    process = subprocess.Popen(
        [sys.executable, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert process.stdout is not None
    return process, process.stdout.readline().strip()


def raise_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(needed, hard), hard))


def verdict(ok: bool) -> str:
    return "yes" if ok else "**no**"


def run(args: argparse.Namespace) -> None:
    raise_fd_limit(args.tunnels * 4 + 1024)  # inherited by the children
    scratch = tempfile.mkdtemp(prefix="corral-bench-proxy-")
    children: list[subprocess.Popen[str]] = []
    try:
        server, port = _spawn([__file__, "--serve-downloads", str(args.megabytes << 20)])
        proxy, endpoints_json = _spawn([__file__, "--serve-proxy", scratch])
        children += [server, proxy]
        endpoints = json.loads(endpoints_json)
        forwarder, ready = _spawn(
            ["-m", "corral.proxy.forwarder", f"0={endpoints['http_socket']}",
             f"0={endpoints['socks_socket']}"]
        )  # fmt: skip
        children.append(forwarder)
        _, http_port, socks_port = ready.split()
        srt = None
        srt_port: int | None = None
        if args.no_srt:
            print("sandbox-runtime: skipped (--no-srt)")
        else:
            srt, srt_port, why = start_srt(scratch)
            if srt is None:
                print(f"sandbox-runtime: skipped: {why}")
            else:
                children.append(srt)
        paths = Paths(
            int(port), int(http_port), int(socks_port), endpoints["socks_socket"], srt_port
        )
        report(args, paths, proxy.pid, forwarder.pid)
    finally:
        for child in children:
            if child.stdin is not None:
                child.stdin.close()
            child.terminate()
            child.wait()
        shutil.rmtree(scratch, ignore_errors=True)


def report(args: argparse.Namespace, paths: Paths, proxy_pid: int, forwarder_pid: int) -> None:
    python = sys.version.split()[0]
    print(f"machine: {os.cpu_count()} CPUs, Linux {os.uname().release}, Python {python}")
    print(f"\n## Throughput: {args.megabytes} MB download with curl, median of {args.repeat}\n")
    speeds = measure_throughput(paths, args.repeat)
    direct = speeds["direct"]
    print("| path | MB/s | / direct | >= 0.9 |\n|---|---|---|---|")
    for name, speed in speeds.items():
        ratio = speed / direct
        target = (
            verdict(ratio >= THROUGHPUT_TARGET)
            if "via forwarder" in name and "plain" not in name
            else ""
        )
        print(f"| {name} | {speed / 1e6:.0f} | {ratio:.2f} | {target} |")

    exchanges = f"{args.connections} request/response exchanges"
    print(f"\n## Short connections: {exchanges}, {CLIENT_THREADS} threads\n")
    rates = {
        "direct": connections_per_second(
            lambda: _exchange_direct(paths.server_port), args.connections
        ),
        "SOCKS5 via forwarder": connections_per_second(
            lambda: _exchange_socks(paths.socks_port, paths.server_port), args.connections
        ),
        "CONNECT via forwarder": connections_per_second(
            lambda: _exchange_connect(paths.http_port, paths.server_port), args.connections
        ),
    }
    print("| path | connections/s | / direct |\n|---|---|---|")
    for name, rate in rates.items():
        print(f"| {name} | {rate:.0f} | {rate / rates['direct']:.2f} |")

    idle_proxy, idle_forwarder = rss_mb(proxy_pid), rss_mb(forwarder_pid)
    tunnels = open_tunnels(paths, args.tunnels)
    busy_proxy, busy_forwarder = rss_mb(proxy_pid), rss_mb(forwarder_pid)
    for sock in tunnels:
        sock.close()
    print(f"\n## Memory (VmRSS) with {args.tunnels} open tunnels through the forwarder\n")
    print("| process | idle MB | with tunnels MB | < 60 MB |\n|---|---|---|---|")
    ok = verdict(busy_proxy < RSS_TARGET_MB)
    print(f"| proxy server | {idle_proxy:.1f} | {busy_proxy:.1f} | {ok} |")
    print(f"| forwarder | {idle_forwarder:.1f} | {busy_forwarder:.1f} | |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--megabytes", type=int, default=512)
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument("--tunnels", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-srt", action="store_true", help="skip sandbox-runtime")
    parser.add_argument("--serve-downloads", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--serve-proxy", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_downloads is not None:
        serve_downloads(args.serve_downloads)
    elif args.serve_proxy is not None:
        serve_proxy(args.serve_proxy)
    else:
        run(args)


if __name__ == "__main__":
    main()
