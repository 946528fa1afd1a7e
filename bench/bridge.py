"""The bridge's HTTP API against the sandbox launch it wraps: rate and latency, in one run.

    .venv/bin/python bench/bridge.py [--quick] [--json]

One declared command, `ok` = `echo ok` in mode strict with approval auto, is run at 1, 8 and
64 concurrent clients by every path below; each client sends its requests back to back and
checks every answer (exit 0, stdout "ok"). A failed or refused request counts as an error and
its time is left out of the latencies.

- launch: `Sandbox(policy).run(argv, cwd, env, capture_output)` from this process, with the
  policy, argv, cwd and environment the bridge builds for `ok` (taken from a Bridge of the
  same workspace); one Sandbox shared by the client threads, as the bridge shares one.
- HTTP API: `POST /v1/commands/ok/run` with `{"wait": true}` (200 once finished), one
  keep-alive connection per client (http.client), to a server in a child process built as
  `corral serve` builds it (bridge/serve.py: SpoolSink audit, token file, create_app, uvicorn
  with h11 and the same options) except for the limits: `corral serve` has no option for them,
  and its defaults (120 submissions a minute, 20 requests a second per token) would refuse a
  benchmark. Two servers run: "jobs = clients" (max_concurrent_jobs 64, so the bridge launches
  as many commands at once as the launch rows do) and "4 jobs" (the default
  max_concurrent_jobs, queue raised to 64 so no client is refused: with the default 32, a
  burst of 64 gets 503 too_many_jobs once 4 run and 32 wait).
- At 1 client only, where the time goes: the bridge core in this process (`Bridge.submit` +
  `Bridge.wait`, no HTTP), and two HTTP floors on the jobs = clients server: `GET /healthz`
  (uvicorn, the gate's Host check, FastAPI routing) and `GET /v1/jobs/{id}` (plus the token,
  the rate bucket, a thread-pool hop and the response model).

Drift (CPU frequency, other processes on this 2-core machine) is spread over every path alike:
each level runs in rounds (the first one is warm-up, not counted), and in every round the order
of the paths is shuffled with a fixed seed. Latency is the time of one request as its client
sees it (perf_counter_ns); p50 and p99 are nearest-rank (measured values); req/s is the
successful requests of a path over the wall time of its blocks.

CPU/req is the user + system time of this process, the servers and every child they reaped
(bwrap and the command) over a path's blocks, per request: what a request costs the machine.
From 8 clients on, 2 cores are saturated by either path, so latency there is mostly waiting
for a core (p50 grows with clients x CPU/req / cores), and the order in which a process's
threads get the GIL decides who waits: compare req/s and CPU/req at those levels.

The target (issue 8): bridge p50 - launch p50 < 3 ms, per level, for the jobs = clients server;
the 4-jobs server queues by design once there are more than 4 clients, and is shown for that.
"""

from __future__ import annotations

import argparse
import functools
import http.client
import json
import os
import platform
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from corral.bridge.service import Bridge, BridgeLimits

LEVELS = (1, 8, 64)
TARGET_MS = 3.0
COMMAND = "ok"
DECLARATION = {"description": "Print ok", "argv": ["echo", "ok"], "mode": "strict"}
EXPECTED_STDOUT = "ok\n"
RUN_BODY = json.dumps({"args": {}, "wait": True, "timeout_s": 300}).encode()
UNTHROTTLED = 10**9  # rates and bursts: the benchmark measures the bridge, not its throttles
WARMUP_ROUNDS = 1  # starts worker threads, fills the probe and page caches; not counted
SEED = 8
SCRATCH_PARENT = "/var/tmp"  # strict mode gives the sandbox a private /tmp that would hide it
# A /healthz slower than this is no CPU cost: it is TCP's delayed ACK (40 ms on Linux) meeting
# Nagle's algorithm on a response written in two sends (a server socket without TCP_NODELAY).
STALL_MS = 20.0

LAUNCH = "launch: Sandbox.run"
HTTP = "HTTP API, jobs = clients"
HTTP_4 = "HTTP API, 4 jobs (default)"
CORE = "bridge core, no HTTP: submit + wait"
HEALTHZ = "HTTP floor: GET /healthz"
JOB = "HTTP floor: GET /v1/jobs/{id}"


class Plan(NamedTuple):
    rounds: Mapping[int, int]
    """Counted rounds, by number of clients."""
    per_client: Mapping[int, int]
    """Requests each client sends in one block, by number of clients."""


# About 2 minutes on this 2-core machine while other work runs on it; --quick about 30 s.
FULL = Plan(rounds={1: 10, 8: 10, 64: 5}, per_client={1: 40, 8: 6, 64: 2})
QUICK = Plan(rounds={1: 3, 8: 3, 64: 3}, per_client={1: 15, 8: 3, 64: 1})

Once = Callable[[], "str | None"]
"""One request: None if it succeeded, else what went wrong."""
Connect = Callable[[], tuple[Once, Callable[[], None]]]
"""Opens one client: (its request, its close)."""


class Variant(NamedTuple):
    name: str
    connect: Connect
    levels: tuple[int, ...]


class Row(NamedTuple):
    clients: int
    path: str
    requests: int
    errors: int
    per_s: float
    p50_ms: float
    p99_ms: float
    cpu_ms: float
    """CPU time of this process, the servers and every child they reaped, per request"""


# --- the scratch world and the servers --------------------------------------------------------


def scratch_world(root: str) -> tuple[str, dict[str, str]]:
    """(workspace, environment): a private HOME and XDG directories, `ok` declared in the
    workspace's settings, so no settings of the user running the benchmark apply."""
    home = os.path.join(root, "home")
    workspace = os.path.join(home, "project")
    os.makedirs(os.path.join(workspace, ".corral"))
    with open(os.path.join(workspace, ".corral", "settings.json"), "w") as f:
        json.dump({"bridge": {"commands": {COMMAND: DECLARATION}}}, f)
    env = {"HOME": home, "PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
    for name in ("XDG_CONFIG_HOME", "XDG_CACHE_HOME", "XDG_STATE_HOME"):
        env[name] = os.path.join(root, name.lower())
    return os.path.realpath(workspace), env


def bench_limits(*, jobs: int) -> BridgeLimits:
    from corral.bridge.service import BridgeLimits

    # The queue holds every client that is not running, so none is refused.
    return BridgeLimits(
        max_concurrent_jobs=jobs, max_queued_jobs=max(LEVELS), requests_per_minute=UNTHROTTLED
    )


def serve(workspace: str, jobs: int) -> None:
    """The child: `corral serve --port 0` for `workspace` (bridge/serve.py's `_bridge_for` and
    `_serve_http`) with `bench_limits`; prints its port."""
    import uvicorn

    from corral.audit.spool import SpoolSink, spool_directory
    from corral.bridge.http_api import HttpLimits, create_app
    from corral.bridge.serve import bind_loopback, uvicorn_config
    from corral.bridge.service import Bridge
    from corral.bridge.token import TokenFile, load_or_create
    from corral.hostpaths import host_paths

    host = host_paths(workspace, os.environ)
    audit = SpoolSink(spool_directory(host), f"bridge-{os.getpid()}-{os.urandom(4).hex()}")
    limits = bench_limits(jobs=jobs)
    with Bridge.from_settings(workspace, state_dir=host.state_dir, audit=audit, limits=limits) as b:
        load_or_create(host.state_dir)
        http = HttpLimits(rate_per_s=UNTHROTTLED, burst=UNTHROTTLED, max_waiters=max(LEVELS))
        app = create_app(b, token=TokenFile(host.state_dir).current, http=http)
        listener = bind_loopback(0)
        print(listener.getsockname()[1], flush=True)
        uvicorn.Server(uvicorn_config(app)).run(sockets=[listener])
    audit.close()


def start_server(
    workspace: str, env: Mapping[str, str], jobs: int
) -> tuple[subprocess.Popen[str], int]:
    argv = [sys.executable, os.path.abspath(__file__), "--serve", workspace, "--jobs", str(jobs)]
    process = subprocess.Popen(argv, env=dict(env), stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    line = process.stdout.readline().strip()
    if not line.isdigit():
        process.kill()
        raise SystemExit(f"the bridge server did not start (it printed {line!r})")
    return process, int(line)


# --- clients ---------------------------------------------------------------------------------


def http_client(
    port: int, token: str, method: str, path: str, *, body: bytes | None = None
) -> Connect:
    """A keep-alive connection per client; a run must answer 200 with a succeeded job."""
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}

    def connect() -> tuple[Once, Callable[[], None]]:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        conn.connect()

        def once() -> str | None:
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            answer = json.loads(response.read())
            if response.status != 200:
                return f"{response.status} {answer.get('error', {}).get('code', '?')}"
            if "state" in answer and answer["stdout"] != EXPECTED_STDOUT:
                return f"{answer['state']}: {answer['stdout']!r}"
            return None

        return once, conn.close

    return connect


def launch_client(bridge: Bridge, environ: Mapping[str, str]) -> Connect:
    """`Sandbox.run` of exactly what the bridge runs for `ok`: its policy, argv, cwd, env."""
    from corral.bridge.service import PASSED_ENVIRONMENT
    from corral.sandbox import Sandbox

    view = bridge.wait(bridge.submit(COMMAND, {}, client="bench").id, timeout_s=60)
    env = {name: environ[name] for name in PASSED_ENVIRONMENT if name in environ}
    sandbox = Sandbox(bridge.policy(COMMAND))

    def once() -> str | None:
        done = sandbox.run(
            view.argv, cwd=view.cwd, env=env, stdin=subprocess.DEVNULL, capture_output=True
        )
        ok = done.returncode == 0 and done.stdout == EXPECTED_STDOUT.encode()
        return None if ok else f"exit {done.returncode}: {done.stderr!r}"

    return lambda: (once, lambda: None)


def core_client(bridge: Bridge) -> Connect:
    def once() -> str | None:
        view = bridge.wait(bridge.submit(COMMAND, {}, client="bench").id, timeout_s=600)
        return None if view.stdout == EXPECTED_STDOUT else f"{view.state}: {view.reason}"

    return lambda: (once, lambda: None)


# --- measuring -------------------------------------------------------------------------------


class Block(NamedTuple):
    latencies_ns: list[int]
    errors: list[str]
    wall_ns: int
    cpu_s: float


def tree_cpu_s(servers: Sequence[int]) -> float:
    """User + system seconds of this process and the servers, with the children each has
    reaped (bwrap, and through bwrap the command): all the work a request causes."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    for pid in servers:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += sum(int(ticks) for ticks in fields[11:15]) / os.sysconf("SC_CLK_TCK")
    return total


def run_block(connect: Connect, clients: int, per_client: int, cpu: Callable[[], float]) -> Block:
    """`clients` threads, each sending `per_client` requests back to back, started together."""
    latencies: list[int] = []
    errors: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(clients + 1)

    def client() -> None:
        try:
            once, close = connect()
        except BaseException:
            start.abort()  # the other threads and the driver stop waiting and fail
            raise
        mine: list[int] = []
        bad: list[str] = []
        start.wait()
        try:
            for _ in range(per_client):
                began = time.perf_counter_ns()
                try:
                    problem = once()
                except Exception as exc:  # a failed request is counted, not fatal
                    problem = f"{type(exc).__name__}: {exc}"
                elapsed = time.perf_counter_ns() - began
                if problem:
                    bad.append(problem)
                else:
                    mine.append(elapsed)
        finally:
            close()
            with lock:
                latencies.extend(mine)
                errors.extend(bad)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    start.wait()
    began, cpu_before = time.perf_counter_ns(), cpu()
    for thread in threads:
        thread.join()
    return Block(latencies, errors, time.perf_counter_ns() - began, cpu() - cpu_before)


def measure(
    variants: Sequence[Variant], plan: Plan, *, cpu: Callable[[], float], progress: bool
) -> list[Row]:
    rng = random.Random(SEED)
    rows = []
    for level in LEVELS:
        here = [v for v in variants if level in v.levels]
        blocks: dict[str, list[Block]] = {v.name: [] for v in here}
        total = WARMUP_ROUNDS + plan.rounds[level]
        for round_no in range(total):
            rng.shuffle(here)
            for variant in here:
                block = run_block(variant.connect, level, plan.per_client[level], cpu)
                if round_no >= WARMUP_ROUNDS:
                    blocks[variant.name].append(block)
            if progress:
                print(f"\r{level} clients: round {round_no + 1}/{total}", end="", file=sys.stderr)
        if progress:
            print(file=sys.stderr)
        ordered = sorted(blocks, key=[v.name for v in variants].index)
        rows += [summarise(level, name, blocks[name]) for name in ordered]
    return rows


def percentile(values: Sequence[int], q: float) -> int:
    """Nearest-rank percentile: a value that was actually measured."""
    ranked = sorted(values)
    index = max(0, min(len(ranked) - 1, -(-len(ranked) * q // 100) - 1))
    return ranked[int(index)]


def summarise(clients: int, path: str, blocks: Sequence[Block]) -> Row:
    latencies = [ns for block in blocks for ns in block.latencies_ns]
    errors = [problem for block in blocks for problem in block.errors]
    if errors:
        print(
            f"{path}, {clients} clients: {len(errors)} errors, first: {errors[0]}", file=sys.stderr
        )
    wall_s = sum(block.wall_ns for block in blocks) / 1e9
    cpu_s = sum(block.cpu_s for block in blocks)
    nan = float("nan")
    if not latencies:
        return Row(clients, path, len(errors), len(errors), 0.0, nan, nan, nan)
    return Row(
        clients,
        path,
        requests=len(latencies) + len(errors),
        errors=len(errors),
        per_s=len(latencies) / wall_s,
        p50_ms=percentile(latencies, 50) / 1e6,
        p99_ms=percentile(latencies, 99) / 1e6,
        cpu_ms=cpu_s * 1e3 / (len(latencies) + len(errors)),
    )


# --- the report ------------------------------------------------------------------------------


class Overhead(NamedTuple):
    clients: int
    subject: str
    baseline: str
    added_ms: float
    """subject p50 - baseline p50"""
    share: float
    """baseline p50 / subject p50: the part of the subject's latency that is the baseline"""
    added_cpu_ms: float
    """subject CPU per request - baseline CPU per request"""
    target_ms: float | None


def overheads(rows: Sequence[Row]) -> list[Overhead]:
    by = {(row.clients, row.path): row for row in rows}
    pairs: list[tuple[int, str, str, float | None]]
    pairs = [(level, HTTP, LAUNCH, TARGET_MS) for level in LEVELS]
    pairs += [(1, CORE, LAUNCH, None), (1, HTTP, CORE, None)]
    pairs += [(level, HTTP_4, LAUNCH, None) for level in LEVELS if level > 1]
    return [
        Overhead(
            n,
            a,
            b,
            added_ms=by[n, a].p50_ms - by[n, b].p50_ms,
            share=by[n, b].p50_ms / by[n, a].p50_ms,
            added_cpu_ms=by[n, a].cpu_ms - by[n, b].cpu_ms,
            target_ms=target,
        )
        for n, a, b, target in pairs
    ]


def format_tables(rows: Sequence[Row], added: Sequence[Overhead]) -> str:
    lines = ["| Clients | Path | Requests | Errors | req/s | p50 (ms) | p99 (ms) | CPU/req (ms) |"]
    lines.append("|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        lines.append(
            f"| {r.clients} | {r.path} | {r.requests} | {r.errors} | {r.per_s:.0f}"
            f" | {r.p50_ms:.1f} | {r.p99_ms:.1f} | {r.cpu_ms:.1f} |"
        )
    lines += [
        "",
        "| Clients | Path | Over | Added p50 (ms) | Over's share of p50 | Added CPU/req (ms)"
        " | Target | Met |",
        "|---:|---|---|---:|---:|---:|---:|---|",
    ]
    for o in added:
        target = "" if o.target_ms is None else f"< {o.target_ms:g} ms"
        met = "" if o.target_ms is None else ("yes" if o.added_ms < o.target_ms else "**no**")
        lines.append(
            f"| {o.clients} | {o.subject} | {o.baseline} | {o.added_ms:+.1f} | {o.share:.0%}"
            f" | {o.added_cpu_ms:+.1f} | {target} | {met} |"
        )
    return "\n".join(lines)


def summary_line(added: Sequence[Overhead], seconds: float) -> str:
    from corral.bridge.service import BridgeLimits

    jobs = BridgeLimits().max_concurrent_jobs
    by = {(o.clients, o.subject, o.baseline): o for o in added}
    single = by[1, HTTP, LAUNCH]
    verdict = "met" if single.added_ms < TARGET_MS else "NOT met"
    others = ", ".join(f"{n} clients {by[n, HTTP, LAUNCH].added_ms:+.1f}" for n in LEVELS[1:])
    return (
        f"bridge over launch, p50: {single.added_ms:+.1f} ms at 1 client (target < {TARGET_MS:g}"
        f" ms: {verdict}; HTTP edge {by[1, HTTP, CORE].added_ms:+.1f}, bridge core"
        f" {by[1, CORE, LAUNCH].added_ms:+.1f}), {others}; with the default {jobs} jobs,"
        f" requests queue in the bridge from {jobs + 1} clients on; took {seconds:.0f} s"
    )


def machine_line(plan: Plan) -> str:
    import fastapi
    import uvicorn

    rounds = ", ".join(f"{level}: {count}" for level, count in plan.rounds.items())
    return (
        f"rounds (+{WARMUP_ROUNDS} warm-up) by clients: {rounds}, paths shuffled each round;"
        f" `ok` = echo ok, mode strict; Python {platform.python_version()}, FastAPI"
        f" {fastapi.__version__}, uvicorn {uvicorn.__version__} (h11), {os.cpu_count()} CPUs,"
        f" Linux {platform.release()}"
    )


# --- the run ---------------------------------------------------------------------------------


def variants_for(
    bridge: Bridge, env: Mapping[str, str], ports: Mapping[str, int], token: str
) -> list[Variant]:
    run = f"/v1/commands/{COMMAND}/run"
    job_id = bridge.submit(COMMAND, {}, client="bench").id  # any id: the floor reads a job
    bridge.wait(job_id, timeout_s=60)
    # GET /v1/jobs needs a job of the server it asks: one run there first.
    once, close = http_client(ports[HTTP], token, "POST", run, body=RUN_BODY)()
    first = once()
    close()
    if first is not None:
        raise SystemExit(f"the bridge server refused the first run: {first}")
    job_path = _last_job_path(ports[HTTP], token, run)
    return [
        Variant(LAUNCH, launch_client(bridge, env), LEVELS),
        Variant(CORE, core_client(bridge), (1,)),
        Variant(HTTP, http_client(ports[HTTP], token, "POST", run, body=RUN_BODY), LEVELS),
        Variant(HTTP_4, http_client(ports[HTTP_4], token, "POST", run, body=RUN_BODY), LEVELS[1:]),
        Variant(HEALTHZ, http_client(ports[HTTP], token, "GET", "/healthz"), (1,)),
        Variant(JOB, http_client(ports[HTTP], token, "GET", job_path), (1,)),
    ]


def _last_job_path(port: int, token: str, run: str) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        conn.request("POST", run, body=RUN_BODY, headers=headers)
        return f"/v1/jobs/{json.loads(conn.getresponse().read())['id']}"
    finally:
        conn.close()


def run(plan: Plan) -> tuple[list[Row], list[Overhead], float]:
    from corral.audit.spool import SpoolSink, spool_directory
    from corral.bridge.service import Bridge, BridgeLimits
    from corral.bridge.token import load_or_create
    from corral.hostpaths import host_paths

    began = time.monotonic()
    root = tempfile.mkdtemp(prefix="corral-bench-bridge-", dir=SCRATCH_PARENT)
    servers: list[subprocess.Popen[str]] = []
    try:
        workspace, env = scratch_world(root)
        ports = {}
        for name, jobs in ((HTTP, max(LEVELS)), (HTTP_4, BridgeLimits().max_concurrent_jobs)):
            process, ports[name] = start_server(workspace, env, jobs)
            servers.append(process)
        host = host_paths(workspace, env)
        # As the servers do: every event written to the audit spool.
        audit = SpoolSink(spool_directory(host), f"bench-{os.getpid()}")
        limits = bench_limits(jobs=max(LEVELS))
        with Bridge.from_settings(workspace, audit=audit, limits=limits, environ=env) as bridge:
            token = load_or_create(host.state_dir)
            variants = variants_for(bridge, env, ports, token)
            pids = [process.pid for process in servers]
            cpu = functools.partial(tree_cpu_s, pids)
            rows = measure(variants, plan, cpu=cpu, progress=sys.stderr.isatty())
        audit.close()
    finally:
        for process in servers:
            process.terminate()
            process.wait()
        shutil.rmtree(root, ignore_errors=True)
    return rows, overheads(rows), time.monotonic() - began


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (about 25 s)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--serve", metavar="WORKSPACE", help=argparse.SUPPRESS)
    parser.add_argument("--jobs", type=int, default=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve is not None:
        serve(args.serve, args.jobs)
        return 0
    plan = QUICK if args.quick else FULL
    rows, added, seconds = run(plan)
    if args.json:
        report = {
            "machine": machine_line(plan),
            "target_ms": TARGET_MS,
            "rows": [row._asdict() for row in rows],
            "overheads": [o._asdict() for o in added],
            "met": all(o.added_ms < o.target_ms for o in added if o.target_ms is not None),
            "seconds": round(seconds, 1),
        }
        print(json.dumps(report, indent=2))
        return 0
    print(f"{machine_line(plan)}\n\n{format_tables(rows, added)}\n")
    floor = next(row for row in rows if row.path == HEALTHZ)
    if floor.p50_ms > STALL_MS:
        print(
            f"note: GET /healthz takes {floor.p50_ms:.0f} ms: each keep-alive response waits"
            " for the client's delayed ACK (Nagle); the server's sockets lack TCP_NODELAY\n"
        )
    print(summary_line(added, seconds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
