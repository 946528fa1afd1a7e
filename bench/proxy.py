"""The proxy as a sandbox uses it: throughput, connection rate and memory against direct loopback.

    .venv/bin/python bench/proxy.py [--megabytes 512] [--connections 2000] [--tunnels 1000]
                                    [--repeat 3] [--launches 30] [--no-srt]

A download server runs on the host's 127.0.0.1 in a child process (threads; `/big` sends
--megabytes, `/small` a few bytes, `HOLD` keeps a connection open). This process holds a
`Sandbox` with a filtered network (standard preset, `bench.test` allowed and resolved to the
server), so the proxy runs here, in its background thread, exactly as for `corral run`. The
clients run inside real sandboxes: curl for downloads, this file's `--client` modes (plain
Python, standard library only) for connections and tunnels. Every connection goes in-sandbox
client -> the launcher's forwarder -> (its socket passed over the channel) -> the proxy here
-> the server. "direct" runs the same client on the host, straight to the server.

1. Throughput: `curl -o /dev/null` of /big, directly and inside the sandbox through each proxy
   path; rounds repeat --repeat times, medians compared. Target: >= 0.9 of direct for the
   tunnels (CONNECT and SOCKS5, relayed with splice); plain HTTP forwarding reads the body in
   Python and is shown for reference. So is a bare relay (blocking splice, a thread per
   direction, in a child process): loopback-to-loopback, direct is bound by two processes'
   copies, and any relay adds a third process and a second TCP connection; the bare relay
   shows what that costs on this machine before any proxy work.
2. Short connections per second: --connections request/response exchanges, 4 client threads,
   each on a new connection, directly and inside the sandbox (SOCKS5, CONNECT).
3. Memory: this process's resident set size (VmRSS: corral, the sandbox API and the proxy)
   idle and with --tunnels tunnels held open at once from inside. Target: < 60 MB.
4. Launch: `Sandbox.run(["true"])` with the filtered network (the launcher runs before the
   command) against the standard "local" network (no launcher), median of --launches.

Optional comparison: when `node` and `npm` are present and `npm install
@anthropic-ai/sandbox-runtime` works into a temporary directory, its HTTP proxy
(`createHttpProxyServer` with a filter allowing everything) is timed on the host as one more
CONNECT path, for throughput and for short connections. That proxy runs without its sandbox
(whose clients reach it through a socat bridge), so its figures are an upper bound for it,
while corral's are measured from inside a sandbox; for short connections, the same client
is also run by its `srt` CLI (bubblewrap, socat, its token-checking proxy) when bwrap, socat
and rg are installed. Otherwise the reason each was skipped is printed.
"""

from __future__ import annotations

import argparse
import os
import resource
import shlex
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
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:  # corral is imported by the driver only: the clients run inside sandboxes
    from corral.sandbox import Sandbox

CHUNK = 4 * 1024 * 1024
SMALL_BODY = b"ok\n"
CLIENT_THREADS = 4
THROUGHPUT_TARGET = 0.9
RSS_TARGET_MB = 60.0
NAME = "bench.test"
RELAY_PIPE_SIZE = 64 * 1024  # the default pipe: no fcntl, nothing tuned
HTTP_PROXY = "127.0.0.1:3128"
SOCKS_PROXY = "127.0.0.1:1080"


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


# --- a reference relay (a child process) -----------------------------------------------------


def _splice_one_way(src: socket.socket, dst: socket.socket) -> None:
    read_end, write_end = os.pipe()
    try:
        while count := os.splice(src.fileno(), write_end, RELAY_PIPE_SIZE):
            while count:
                count -= os.splice(read_end, dst.fileno(), count)
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    finally:
        os.close(read_end)
        os.close(write_end)


def serve_relay(target_port: int) -> None:
    """The least a userspace relay can do: blocking splice, a thread per direction, no
    parsing, no policy. What it reaches is the ceiling for any proxy on this machine."""
    import threading

    with socket.create_server(("127.0.0.1", 0)) as listener:
        print(listener.getsockname()[1], flush=True)
        while True:
            client, _ = listener.accept()
            upstream = socket.create_connection(("127.0.0.1", target_port))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=_splice_one_way, args=(a, b), daemon=True).start()


# --- the clients (inside a sandbox, or on the host for "direct") -----------------------------


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


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def _socks(port: int) -> socket.socket:
    sock = socket.create_connection(_address(SOCKS_PROXY))
    name = NAME.encode()
    request = b"\x05\x01\x00\x03" + bytes((len(name),)) + name + port.to_bytes(2, "big")
    sock.sendall(b"\x05\x01\x00" + request)
    reply = _read_exactly(sock, 12)
    if reply[3] != 0:
        raise ConnectionError(f"SOCKS5 reply {reply[3]}")
    return sock


def _proxy_from_environment() -> tuple[str, str]:
    """(host:port, extra header lines) of $HTTP_PROXY, whose user info (sandbox-runtime puts
    its session token there) becomes a Proxy-Authorization header."""
    import base64
    from urllib.parse import unquote, urlsplit

    url = urlsplit(os.environ["HTTP_PROXY"])
    header = ""
    if url.username is not None:
        token = f"{unquote(url.username)}:{unquote(url.password or '')}".encode()
        header = f"Proxy-Authorization: Basic {base64.b64encode(token).decode()}\r\n"
    return f"{url.hostname}:{url.port}", header


def _connect(port: int, proxy: str = HTTP_PROXY, target: str = NAME) -> socket.socket:
    """A CONNECT tunnel through `proxy` (host:port, or "env": $HTTP_PROXY, with its user info)."""
    header = ""
    if proxy == "env":
        proxy, header = _proxy_from_environment()
    sock = socket.create_connection(_address(proxy))
    sock.sendall(f"CONNECT {target}:{port} HTTP/1.1\r\n{header}\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(4096)
    if not head.startswith(b"HTTP/1.1 200"):
        raise ConnectionError(head[:40].decode(errors="replace"))
    return sock


def open_to(via: str, port: int, proxy: str, target: str) -> socket.socket:
    if via == "socks":
        return _socks(port)
    if via == "connect":
        return _connect(port, proxy, target)
    return socket.create_connection(("127.0.0.1", port))


def client_rate(
    via: str, port: int, count: int, *, proxy: str = HTTP_PROXY, target: str = NAME
) -> None:
    """Print exchanges per second: `count` exchanges, each on a new connection (CONNECT goes
    to `proxy`, asking for `target`:`port`)."""
    per_thread = count // CLIENT_THREADS

    def worker() -> None:
        for _ in range(per_thread):
            with open_to(via, port, proxy, target) as sock:
                sock.sendall(b"GET /small HTTP/1.1\r\nHost: x\r\n\r\n")
                _read_to_end(sock)

    start = time.perf_counter()
    with ThreadPoolExecutor(CLIENT_THREADS) as pool:
        for future in [pool.submit(worker) for _ in range(CLIENT_THREADS)]:
            future.result()
    print(per_thread * CLIENT_THREADS / (time.perf_counter() - start), flush=True)


def client_hold(port: int, count: int) -> None:
    """Open `count` SOCKS5 tunnels, print "held" once all are established, keep them until
    stdin closes."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(max(soft, count + 256), hard), hard))
    tunnels = [_socks(port) for _ in range(count)]
    for sock in tunnels:
        sock.sendall(b"HOLD")
    for sock in tunnels:
        assert _read_exactly(sock, 5) == b"held\n"
    print("held", flush=True)
    sys.stdin.read()
    for sock in tunnels:
        sock.close()


# --- the sandbox ------------------------------------------------------------------------------


def make_sandbox(scratch: str, *, filtered: bool) -> tuple[Sandbox, dict[str, str]]:
    """A Sandbox on a scratch workspace; `filtered`: the proxy allows bench.test only."""
    from corral.audit.events import JsonLinesSink
    from corral.hostpaths import host_paths
    from corral.policy.model import NetworkPolicy, Origin, Rule
    from corral.policy.presets import preset_policy
    from corral.sandbox import Sandbox

    home = f"{scratch}/home"
    os.makedirs(f"{home}/project", exist_ok=True)
    env = {"HOME": home, "PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
    for name in ("XDG_CONFIG_HOME", "XDG_CACHE_HOME", "XDG_STATE_HOME"):
        env[name] = f"{scratch}/{name.lower()}"
    policy = preset_policy("standard", host_paths(f"{home}/project", env))
    if not filtered:
        return Sandbox(policy), env
    allowed = tuple(Rule(v, Origin("bench")) for v in (NAME, "127.0.0.1"))
    policy = policy._replace(network=NetworkPolicy("filtered", allowed_domains=allowed))
    sink = JsonLinesSink(f"{scratch}/audit.jsonl")  # constant memory, unlike a MemorySink
    return Sandbox(policy, sink=sink, resolver=lambda host: ["127.0.0.1"]), env


def inside(sandbox: Sandbox, env: dict[str, str], argv: list[str]) -> str:
    result = sandbox.run(argv, env=env, capture_output=True, timeout=600)
    if result.returncode != 0:
        raise RuntimeError(f"{argv[:3]} failed inside: {(result.stderr or b'').decode()}")
    return (result.stdout or b"").decode()


# --- measuring -------------------------------------------------------------------------------


def curl_args(via: str) -> list[str]:
    return {
        "HTTP proxy (plain)": [],  # HTTP_PROXY from the sandbox's environment
        "CONNECT": ["-p"],
        "SOCKS5": ["--socks5-hostname", SOCKS_PROXY],
    }[via]


def measure_throughput(
    sandbox: Sandbox, env: dict[str, str], ports: tuple[int, int], repeat: int, srt: Srt | None
) -> dict[str, float]:
    """Median bytes/s per path; `ports` are the download server's and the reference relay's."""
    port, relay_port = ports
    curl = ["curl", "-sS", "-o", "/dev/null", "-w", "%{speed_download}"]
    speeds: dict[str, list[float]] = {}

    def on_host(name: str, args: list[str], url: str) -> None:
        done = subprocess.run([*curl, *args, url], capture_output=True, text=True, check=True)
        speeds.setdefault(name, []).append(float(done.stdout))

    for _ in range(repeat):
        on_host("direct (host)", [], f"http://127.0.0.1:{port}/big")
        on_host("reference: bare splice relay (host)", [], f"http://127.0.0.1:{relay_port}/big")
        for via in ("CONNECT", "SOCKS5", "HTTP proxy (plain)"):
            out = inside(sandbox, env, [*curl, *curl_args(via), f"http://{NAME}:{port}/big"])
            speeds.setdefault(f"{via} from the sandbox", []).append(float(out))
        if srt is not None:
            proxy = ["-p", "-x", f"http://127.0.0.1:{srt.port}"]
            on_host("sandbox-runtime CONNECT (host)", proxy, f"http://127.0.0.1:{port}/big")
    return {name: statistics.median(values) for name, values in speeds.items()}


def measure_rates(
    sandbox: Sandbox, env: dict[str, str], port: int, count: int, srt: Srt | None
) -> dict[str, float]:
    client = [sys.executable, os.path.abspath(__file__), "--client", "rate"]
    args = ["--port", str(port), "--count", str(count)]

    def on_host(*extra: str) -> float:
        done = subprocess.run([*client, *args, *extra], capture_output=True, text=True, check=True)
        return float(done.stdout)

    rates = {"direct (host)": on_host("--via", "direct")}
    python = os.path.realpath(sys.executable)  # the venv's link may not resolve inside
    for via, name in (("socks", "SOCKS5"), ("connect", "CONNECT")):
        argv = [python, os.path.abspath(__file__), "--client", "rate", *args, "--via", via]
        rates[f"{name} from the sandbox"] = float(inside(sandbox, env, argv))
    if srt is not None:
        # Its proxy alone, on the host: without its sandbox's socat bridge in front, so this
        # is the most it could reach.
        proxy = ["--proxy", f"127.0.0.1:{srt.port}", "--target", "127.0.0.1"]
        rates["sandbox-runtime CONNECT (host)"] = on_host("--via", "connect", *proxy)
        rate, why = rate_inside_srt(srt, [python, *client[1:], *args])
        if rate is None:
            print(f"sandbox-runtime from its sandbox: skipped: {why}")
        else:
            rates["sandbox-runtime CONNECT from its sandbox"] = rate
    return rates


def rate_inside_srt(srt: Srt, client: list[str]) -> tuple[float | None, str]:
    """The rate client run by sandbox-runtime's own CLI (bubblewrap, its socat bridge, its
    proxy with a session token), as its users' commands run; or (None, why not)."""
    missing = [tool for tool in ("bwrap", "socat", "rg") if shutil.which(tool) is None]
    if missing:
        return None, f"its CLI needs {', '.join(missing)}"
    settings = os.path.join(os.path.dirname(srt.cli), "bench-settings.json")
    with open(settings, "w") as f:
        f.write(SRT_SETTINGS)
    # Its NO_PROXY lists 127.0.0.1, so the client is told to use $HTTP_PROXY regardless.
    command = shlex.join([*client, "--via", "connect", "--proxy", "env", "--target", "127.0.0.1"])
    done = subprocess.run(
        [srt.cli, "--settings", settings, "-c", command], capture_output=True, text=True
    )
    last = (done.stdout.strip().splitlines() or [""])[-1]
    try:
        return float(last), ""
    except ValueError:
        return None, f"exit {done.returncode}: {(done.stderr or done.stdout).strip()[-300:]}"


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def measure_rss(
    sandbox: Sandbox, env: dict[str, str], port: int, tunnels: int
) -> tuple[float, float]:
    """(idle MB, MB with `tunnels` open) of this process."""
    idle = rss_mb()
    python = os.path.realpath(sys.executable)
    argv = [python, os.path.abspath(__file__), "--client", "hold"]
    argv += ["--port", str(port), "--count", str(tunnels)]
    proc = sandbox.spawn(argv, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    line = proc.stdout.readline()
    if line != b"held\n":
        proc.kill()
        raise RuntimeError(f"the tunnel holder printed {line!r}")
    busy = rss_mb()
    proc.stdin.close()
    proc.wait()
    return idle, busy


def measure_launch(filtered: Sandbox, local: Sandbox, env: dict[str, str], n: int) -> list[float]:
    """Median milliseconds of Sandbox.run(["true"]), with the proxy's launcher and without."""
    times: dict[int, list[float]] = {0: [], 1: []}
    for _ in range(n):
        for index, sandbox in enumerate((filtered, local)):
            start = time.perf_counter()
            sandbox.run(["true"], env=env)
            times[index].append((time.perf_counter() - start) * 1000)
    return [statistics.median(times[0]), statistics.median(times[1])]


# --- sandbox-runtime (optional) --------------------------------------------------------------

SRT_SETTINGS = """{
  "network": {"allowedDomains": ["127.0.0.1"], "deniedDomains": []},
  "filesystem": {"denyRead": [], "allowWrite": [], "denyWrite": []}
}
"""


class Srt(NamedTuple):
    port: int
    """Its HTTP proxy's, started on its own on the host."""
    cli: str
    """Its `srt` command."""


SRT_DRIVER = """
import { createHttpProxyServer } from '%s';
const server = createHttpProxyServer({ filter: () => true });
server.listen(0, '127.0.0.1', () => console.log(server.address().port));
"""


def start_srt(scratch: str) -> tuple[subprocess.Popen[str] | None, Srt | None, str]:
    """sandbox-runtime's HTTP proxy and CLI, or (None, None, why it was skipped)."""
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
    return process, Srt(int(line), os.path.join(where, "node_modules/.bin/srt")), ""


# --- the run ---------------------------------------------------------------------------------


def raise_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(needed, hard), hard))


def verdict(ok: bool) -> str:
    return "yes" if ok else "**no**"


def table(
    rows: dict[str, float], unit: str, scale: float, *, target: Callable[[str], bool]
) -> None:
    base = next(iter(rows.values()))
    print(f"| path | {unit} | / direct | >= {THROUGHPUT_TARGET} |\n|---|---|---|---|")
    for name, value in rows.items():
        ratio = value / base
        mark = verdict(ratio >= THROUGHPUT_TARGET) if target(name) else ""
        print(f"| {name} | {value / scale:.0f} | {ratio:.2f} | {mark} |")


def run(args: argparse.Namespace) -> None:
    raise_fd_limit(args.tunnels * 4 + 1024)
    scratch = tempfile.mkdtemp(prefix="corral-bench-proxy-", dir="/var/tmp")
    children: list[subprocess.Popen[str]] = []

    def start_child(*flags: str) -> int:
        """Start this file with `flags` and return the port it prints."""
        process = subprocess.Popen(
            [sys.executable, __file__, *flags], stdout=subprocess.PIPE, text=True
        )
        children.append(process)
        assert process.stdout is not None
        return int(process.stdout.readline())

    try:
        port = start_child("--serve-downloads", str(args.megabytes << 20))
        relay_port = start_child("--serve-relay", str(port))
        srt_info = None
        if args.no_srt:
            print("sandbox-runtime: skipped (--no-srt)")
        else:
            srt, srt_info, why = start_srt(scratch)
            print(f"sandbox-runtime: skipped: {why}" if srt is None else "sandbox-runtime: on")
            children += [srt] if srt is not None else []
        filtered, env = make_sandbox(scratch, filtered=True)
        local, _ = make_sandbox(scratch, filtered=False)
        with filtered, local:
            report(args, filtered, local, env, (port, relay_port), srt_info)
    finally:
        for child in children:
            child.terminate()
            child.wait()
        shutil.rmtree(scratch, ignore_errors=True)


def report(
    args: argparse.Namespace,
    filtered: Sandbox,
    local: Sandbox,
    env: dict[str, str],
    ports: tuple[int, int],
    srt: Srt | None,
) -> None:
    port = ports[0]
    python = sys.version.split()[0]
    print(f"machine: {os.cpu_count()} CPUs, Linux {os.uname().release}, Python {python}")
    print(f"\n## Throughput: {args.megabytes} MB download with curl, median of {args.repeat}\n")
    speeds = measure_throughput(filtered, env, ports, args.repeat, srt)
    tunnels = ("CONNECT from the sandbox", "SOCKS5 from the sandbox")
    table(speeds, "MB/s", 1e6, target=lambda name: name in tunnels)

    exchanges = f"{args.connections} request/response exchanges"
    print(f"\n## Short connections: {exchanges}, {CLIENT_THREADS} threads\n")
    rates = measure_rates(filtered, env, port, args.connections, srt)
    print("| path | connections/s | / direct |\n|---|---|---|")
    for name, rate in rates.items():
        print(f"| {name} | {rate:.0f} | {rate / rates['direct (host)']:.2f} |")

    idle, busy = measure_rss(filtered, env, port, args.tunnels)
    print(f"\n## Memory (VmRSS of corral with its proxy), {args.tunnels} tunnels from inside\n")
    print(f"| idle MB | with tunnels MB | < {RSS_TARGET_MB:.0f} MB |\n|---|---|---|")
    print(f"| {idle:.1f} | {busy:.1f} | {verdict(busy < RSS_TARGET_MB)} |")

    with_proxy, without = measure_launch(filtered, local, env, args.launches)
    print(f"\n## Launch: Sandbox.run(['true']), median of {args.launches}\n")
    print("| network | ms |\n|---|---|")
    print(f"| filtered (proxy launcher) | {with_proxy:.1f} |\n| local (none) | {without:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--megabytes", type=int, default=512)
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument("--tunnels", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--launches", type=int, default=30)
    parser.add_argument("--no-srt", action="store_true", help="skip sandbox-runtime")
    parser.add_argument("--serve-downloads", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--serve-relay", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--client", choices=["rate", "hold"], help=argparse.SUPPRESS)
    parser.add_argument("--via", choices=["direct", "socks", "connect"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--proxy", default=HTTP_PROXY, help=argparse.SUPPRESS)
    parser.add_argument("--target", default=NAME, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_downloads is not None:
        serve_downloads(args.serve_downloads)
    elif args.serve_relay is not None:
        serve_relay(args.serve_relay)
    elif args.client == "rate":
        client_rate(args.via, args.port, args.count, proxy=args.proxy, target=args.target)
    elif args.client == "hold":
        client_hold(args.port, args.count)
    else:
        run(args)


if __name__ == "__main__":
    main()
