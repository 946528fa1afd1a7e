"""Sustained audit-log throughput: events per second from `emit` to committed, in one table.

    .venv/bin/python bench/audit.py [--events N] [--repeat R] [--markdown]

Each variant opens a fresh log in a scratch directory under /var/tmp (a real disk, not a
tmpfs /tmp), emits N network events as fast as a producer can build them (the
`network_event` constructor is part of the cost, as it is for the proxy) and calls `flush()`;
the rate is N over the time from the first emit to the return of that flush, so it counts
only committed events. Every emit is timed too: `emit` must never hold its caller up for
long, so the table shows its median, p99 and worst case. Rounds repeat R times; the table
gives the median round. Target: >= 50,000 events/s sustained with durability "normal".

The "processes" variant runs P writer processes against one file at once (each emits N/P
events, flushing every 1,000, after a common start signal) and reports the aggregate rate.

    .venv/bin/python bench/audit.py --part monitor [--rounds R] [--markdown]

The violation monitor's overhead (`bench/audit_monitor.py`): a file-heavy workload run in the
sandbox with the monitor on and off, phase by phase, R rounds interleaved; the table gives the
median time of each side and their ratio. Target: under 1.05 on the whole workload (above
1.10 is a failure).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

from corral.audit.db import Durability
from corral.audit.events import network_event
from corral.audit.store import AuditLog

DEFAULT_EVENTS = 200_000
DEFAULT_REPEAT = 5
PROCESSES = 4
CHILD_FLUSH_EVERY = 1000
SCRATCH_ROOT = "/var/tmp"


class Round(NamedTuple):
    events: int
    seconds: float
    emit_ns: list[int]
    """Per-emit latencies (empty for the multi-process variant)."""

    @property
    def rate(self) -> float:
        return self.events / self.seconds


class Variant(NamedTuple):
    name: str
    run: Callable[[str, int], Round]
    """Given a fresh database path and an event count, runs one round."""


def emit_burst(log: AuditLog, count: int, *, session: str, flush_every: int = 0) -> list[int]:
    latencies = [0] * count
    clock = time.perf_counter_ns
    for i in range(count):
        event = network_event(
            session, host="pypi.example", port=443, decision="allow", rule="r", bytes_up=i
        )
        start = clock()
        log.emit(event)
        latencies[i] = clock() - start
        if flush_every and i % flush_every == flush_every - 1:
            log.flush()
    return latencies


def one_producer(durability: Durability) -> Callable[[str, int], Round]:
    def run(path: str, count: int) -> Round:
        with AuditLog(path, durability=durability) as log:
            start = time.perf_counter()
            latencies = emit_burst(log, count, session="bench")
            log.flush()
            seconds = time.perf_counter() - start
        return Round(count, seconds, latencies)

    return run


def many_processes(path: str, count: int) -> Round:
    share = count // PROCESSES
    children = [
        subprocess.Popen(
            [sys.executable, __file__, "--child", path, str(share), f"p{i}"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for i in range(PROCESSES)
    ]
    for child in children:  # every child has opened the log and waits for "go"
        assert child.stdout is not None and child.stdout.readline() == "ready\n"
    start = time.perf_counter()
    for child in children:
        assert child.stdin is not None
        child.stdin.write("go\n")
        child.stdin.flush()
    for child in children:
        assert child.stdout is not None and child.stdout.readline() == "done\n"
    seconds = time.perf_counter() - start
    for child in children:
        child.communicate()
        if child.returncode != 0:
            raise SystemExit(f"writer process failed with status {child.returncode}")
    return Round(share * PROCESSES, seconds, [])


def child_main(path: str, count: int, session: str) -> None:
    with AuditLog(path) as log:
        print("ready", flush=True)
        sys.stdin.readline()
        emit_burst(log, count, session=session, flush_every=CHILD_FLUSH_EVERY)
        log.flush()
        print("done", flush=True)


VARIANTS = [
    Variant("1 producer, durability normal", one_producer("normal")),
    Variant("1 producer, durability full", one_producer("full")),
    Variant(f"{PROCESSES} processes, durability normal", many_processes),
]


def check_stored(path: str, expected: int) -> None:
    conn = sqlite3.connect(path)
    stored = conn.execute("SELECT count(*) FROM network_events").fetchone()[0]
    conn.close()
    if stored != expected:
        raise SystemExit(f"{path}: {stored} events stored, {expected} emitted")


def percentile(values: Sequence[int], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] / 1000


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], *, markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]
    return "\n".join(
        "  ".join(
            cell.rjust(w) if i else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in [headers, *rows]
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--events", type=int, default=DEFAULT_EVENTS)
    parser.add_argument("--repeat", type=int, default=DEFAULT_REPEAT)
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--child", nargs=3, metavar=("PATH", "COUNT", "SESSION"))
    parser.add_argument("--part", choices=["all", "throughput", "monitor"], default="all")
    parser.add_argument("--rounds", type=int, default=None, help="monitor rounds (default 5)")
    args = parser.parse_args(argv)
    if args.child:
        path, count, session = args.child
        child_main(path, int(count), session)
        return
    if args.part in ("all", "throughput"):
        throughput(args)
    if args.part in ("all", "monitor"):
        from audit_monitor import monitor_overhead  # bench/ is the script's own directory

        monitor_overhead(rounds=args.rounds or 5, markdown=args.markdown)


def throughput(args: argparse.Namespace) -> None:

    scratch = tempfile.mkdtemp(prefix="corral-bench-audit-", dir=SCRATCH_ROOT)
    rows: list[list[str]] = []
    try:
        for variant in VARIANTS:
            rounds: list[Round] = []
            for index in range(args.repeat):
                path = os.path.join(scratch, f"{len(rows)}-{index}.db")
                result = variant.run(path, args.events)
                check_stored(path, result.events)
                rounds.append(result)
            median = sorted(rounds, key=lambda r: r.rate)[len(rounds) // 2]
            latency = ["-", "-", "-"]
            if median.emit_ns:
                latency = [
                    f"{percentile(median.emit_ns, 0.5):.1f}",
                    f"{percentile(median.emit_ns, 0.99):.1f}",
                    f"{max(median.emit_ns) / 1000:.0f}",
                ]
            rows.append(
                [
                    variant.name,
                    f"{median.events:,}",
                    f"{median.seconds:.3f}",
                    f"{median.rate:,.0f}",
                    f"{min(r.rate for r in rounds):,.0f}",
                    *latency,
                ]
            )
    finally:
        shutil.rmtree(scratch)
    print(
        f"audit log throughput, {args.repeat} rounds, median round; python "
        f"{platform.python_version()}, sqlite {sqlite3.sqlite_version}, {os.cpu_count()} CPUs"
    )
    headers = ["variant", "events", "seconds", "events/s", "worst events/s",
               "emit p50 µs", "emit p99 µs", "emit max µs"]  # fmt: skip
    print(table(headers, rows, markdown=args.markdown))


if __name__ == "__main__":
    main()
