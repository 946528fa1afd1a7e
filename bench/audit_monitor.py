"""The violation monitor's overhead on a file-heavy workload, monitor on against monitor off.

    .venv/bin/python bench/audit.py --part monitor [--rounds R] [--markdown]

Two workloads run in the sandbox (standard preset, the Python API, one Sandbox per side),
phase by phase, each phase its own sandboxed command:
- project, the issue's example: unpack a source tarball and run its test suite. The tarball
  holds three packages with test suites from this environment (jsonschema, referencing,
  jsonschema_specifications, about 130 files); `python -m unittest` then runs the 400 tests of
  theirs that need no checkout of an outside suite, from the unpacked copy (imports read the
  sources and write .pyc files beside them);
- stress, the monitor's worst case: `tar xf` of the standard library's sources (about 1,000
  files: each costs an open for writing, and directories a mkdir, chmod and utimensat, every
  one notified), then `python3 -m compileall` over them (one write and one rename per module,
  and the compiling itself). Few real tasks create files at this rate.
Before each round the unpacked trees are removed outside the sandbox, and before each phase
dirty pages are written back (neither timed). Each side goes first in turn, so drift in page
cache or other load hits all sides alike.
Three sides: monitor off, "writes" (the default: only calls that may write are watched) and
"all" (every open too). The table gives, per phase and for the whole workload, the median wall
time of each side, the ratio of the medians to "off", the ratio of the fastest rounds (the
least disturbed by other load on the machine), the median of each round's own ratio (the sides
of a round run back to back, so drift between rounds cancels out), and the calls the monitor
was notified of and how long it held them in all (from receiving a call to answering it, as a
share of the run without the monitor: a floor of the overhead, to which each call adds the
kernel's round trip). On a shared VM wall times of file work drift by tens of percent between
rounds; trust the paired column most.
Target (issue 7): under 1.05 on a file-heavy workload such as the project one; above 1.10 is a
failure.
"""

from __future__ import annotations

import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from typing import NamedTuple

from corral.hostpaths import host_paths
from corral.policy.model import MonitorViolations
from corral.policy.presets import preset_policy
from corral.sandbox import Sandbox

SCRATCH_ROOT = "/var/tmp"  # a real disk; the sandbox's /tmp is private
PACKAGES = ("jsonschema", "referencing", "jsonschema_specifications")
TESTS = tuple(
    f"jsonschema.tests.test_{name}" for name in ("validators", "format", "types", "utils", "cli")
) + tuple(
    f"referencing.tests.test_{name}" for name in ("core", "exceptions", "jsonschema", "retrieval")
)
"""Every test module of the two packages that runs without a checkout of an outside suite."""
SIDES: tuple[MonitorViolations, ...] = ("off", "writes", "all")
"""Each Sandbox's `monitor`: unwatched, only writing calls (the default), every call."""


class Phase(NamedTuple):
    workload: str
    name: str
    argv: list[str]
    cwd: str


class Timing(NamedTuple):
    seconds: float
    calls: int
    held: float = 0.0
    """Seconds the supervisor held the calls (Sandbox.monitor_held_seconds)."""


def make_tarballs(scratch: str) -> tuple[str, str]:
    """project.tar (the test-suite packages) and stdlib.tar (the standard library's sources)."""
    import jsonschema

    stdlib = os.path.dirname(os.__file__)
    site = os.path.dirname(os.path.dirname(str(jsonschema.__file__)))
    ignore = shutil.ignore_patterns("__pycache__", "site-packages", "dist-packages")
    staging = os.path.join(scratch, "staging")
    for name in PACKAGES:
        shutil.copytree(
            os.path.join(site, name), os.path.join(staging, "site", name), ignore=ignore
        )
    shutil.copytree(stdlib, os.path.join(staging, "stdlib"), ignore=ignore, symlinks=True)
    tarballs = os.path.join(scratch, "project.tar"), os.path.join(scratch, "stdlib.tar")
    for tarball, tree in zip(tarballs, ("site", "stdlib"), strict=True):
        subprocess.run(["tar", "cf", tarball, "-C", staging, tree], check=True)
    shutil.rmtree(staging)
    return tarballs


def phases(workspace: str, project: str, stdlib: str) -> list[Phase]:
    tree = os.path.join(workspace, "tree")
    return [
        Phase("project", "unpack", ["tar", "xf", project], tree),
        Phase(
            "project",
            "test suite",
            [sys.executable, "-m", "unittest", "-q", *TESTS],
            f"{tree}/site",
        ),
        Phase("stress", "unpack stdlib", ["tar", "xf", stdlib], tree),
        Phase("stress", "byte-compile", ["python3", "-m", "compileall", "-q", "stdlib"], tree),
    ]


def run_phase(box: Sandbox, phase: Phase, env: dict[str, str]) -> Timing:
    # Dirty pages of the previous phase (or round) are written back first, untimed: tar's
    # time otherwise depends on how much writeback the previous run left behind.
    os.sync()
    before, held = box.monitored_calls, box.monitor_held_seconds
    start = time.perf_counter()
    result = box.run(phase.argv, cwd=phase.cwd, env=env, capture_output=True, timeout=600)
    seconds = time.perf_counter() - start
    if result.returncode != 0 and phase.name != "byte-compile":  # a few stdlib files are
        # Python 2 or deliberately broken; compileall reports them and goes on.
        error = (result.stderr or b"").decode(errors="replace")[-800:]
        raise SystemExit(f"{phase.name} failed: {error}")
    return Timing(seconds, box.monitored_calls - before, box.monitor_held_seconds - held)


def one_round(
    boxes: Mapping[str, Sandbox], order: Sequence[str], work: list[Phase], env: dict[str, str]
) -> dict[str, list[Timing]]:
    timings: dict[str, list[Timing]] = {}
    for side in order:
        tree = work[0].cwd
        shutil.rmtree(tree, ignore_errors=True)
        os.mkdir(tree)
        timings[side] = [run_phase(boxes[side], phase, env) for phase in work]
    return timings


def monitor_overhead(*, rounds: int, markdown: bool) -> None:
    scratch = tempfile.mkdtemp(prefix="corral-bench-monitor-", dir=SCRATCH_ROOT)
    try:
        home = os.path.join(scratch, "home")
        workspace = os.path.join(home, "ws")
        os.makedirs(workspace)
        env = {
            "HOME": home,
            "PATH": "/usr/local/bin:/usr/bin:/bin",  # the system's tools, no shims
            "LANG": "C.UTF-8",
            "XDG_CONFIG_HOME": os.path.join(scratch, "config"),
            "XDG_CACHE_HOME": os.path.join(scratch, "cache"),
            "XDG_STATE_HOME": os.path.join(scratch, "state"),
        }
        policy = preset_policy("standard", host_paths(workspace, env))
        boxes: dict[str, Sandbox] = {side: Sandbox(policy, monitor=side) for side in SIDES}
        if boxes["all"].monitoring != "all":
            raise SystemExit("the violation monitor cannot run on this machine")
        work = phases(workspace, *make_tarballs(scratch))
        one_round(boxes, SIDES, work, env)  # warm-up: page cache, probe cache
        results: list[dict[str, list[Timing]]] = []
        for index in range(rounds):
            order = SIDES[index % 3 :] + SIDES[: index % 3]  # each side first in turn
            results.append(one_round(boxes, order, work, env))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print_table(work, results, markdown=markdown)


def row_of(name: str, members: list[int], results: list[dict[str, list[Timing]]]) -> list[str]:
    """One table row: the phases `members` of each round summed, per side."""

    def pick(side: str, result: dict[str, list[Timing]]) -> Timing:
        found = [result[side][index] for index in members]
        return Timing(
            sum(t.seconds for t in found), sum(t.calls for t in found), sum(t.held for t in found)
        )

    median = {side: statistics.median(pick(side, r).seconds for r in results) for side in SIDES}
    best = {side: min(pick(side, r).seconds for r in results) for side in SIDES}
    row = [name, f"{median['off']:.3f}"]
    for side in SIDES[1:]:
        calls = statistics.median(pick(side, r).calls for r in results)
        held = statistics.median(pick(side, r).held for r in results)
        # Each round's sides ran back to back: their ratio cancels drift between rounds.
        paired = statistics.median(pick(side, r).seconds / pick("off", r).seconds for r in results)
        row += [
            f"{median[side]:.3f}",
            f"{median[side] / median['off']:.3f}",
            f"{paired:.3f}",
            f"{best[side] / best['off']:.3f}",
            f"{calls:,.0f}",
            f"{held / median['off']:.1%}",
        ]
    return row


def print_table(
    work: list[Phase], results: list[dict[str, list[Timing]]], *, markdown: bool
) -> None:
    from audit import table  # the same table renderer as the throughput part

    groups = [(f"{phase.workload}: {phase.name}", [index]) for index, phase in enumerate(work)]
    for workload in dict.fromkeys(phase.workload for phase in work):
        members = [index for index, phase in enumerate(work) if phase.workload == workload]
        groups.append((f"{workload} workload, whole", members))
    rows = [row_of(name, members, results) for name, members in groups]
    print(
        f"violation monitor overhead, {len(results)} rounds; python "
        f"{platform.python_version()}, Linux {platform.release()}, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    headers = ["phase", "off s"]
    for side in SIDES[1:]:
        headers += [f"{side} s", f"{side}/off", "paired", "best", f"{side} calls", "held"]
    print(table(headers, rows, markdown=markdown))
    print(
        "s: median wall seconds; x/off: ratio of the medians; paired: median of each round's"
        " own ratio; best: ratio of the fastest rounds; calls: watched calls per run; held:"
        " time the supervisor held them, as a share of the run with the monitor off (a floor"
        " of the cost that other load on the machine does not blur)"
    )
