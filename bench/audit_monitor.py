"""The violation monitor's overhead on a file-heavy workload, monitor on against monitor off.

    .venv/bin/python bench/audit.py --part monitor [--rounds R] [--markdown]

The workload runs in the sandbox (standard preset, the Python API, one Sandbox per side),
phase by phase, each phase its own sandboxed command:
1. unpack: `tar xf` of a tarball of real source trees, made once in the scratch directory:
   the standard library's /usr/lib/python3.X and three packages with test suites
   (jsonschema, referencing, jsonschema_specifications) from this environment. Each file
   costs an open for writing, and directories a mkdir, chmod and utimensat: the monitor's
   worst case, every call notified;
2. byte-compile: `python3 -m compileall` over the unpacked standard library: one read and
   one write (plus a rename) per module, and the compiling itself;
3. test suite: `python -m unittest` over jsonschema's validator tests and referencing's core
   tests from the unpacked copy: imports (read opens, .pyc writes) and CPU.
Before each round the unpacked tree is removed outside the sandbox, and before each phase dirty
pages are written back (neither timed). Each side goes first in turn, so drift in page cache or
other load hits all sides alike.
Three sides: monitor off (the default), "writes" (only calls that may write are watched) and
"all" (every open too). The table gives, per phase and for the whole workload, the median wall
time of each side, the ratio of the medians to "off", the ratio of the fastest rounds (the
least disturbed by other load on the machine), the median of each round's own ratio (the sides
of a round run back to back, so drift between rounds cancels out), and the calls the monitor
was notified of and how long it held them in all (from receiving a call to answering it, as a
share of the run without the monitor: a floor of the overhead, to which each call adds the
kernel's round trip). On a shared VM wall times of file work drift by tens of percent between
rounds; trust the paired column most.
Target: whole workload under 1.05; above 1.10 is a failure.
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
TESTS = ("jsonschema.tests.test_validators", "referencing.tests.test_core")
SIDES: tuple[MonitorViolations, ...] = ("off", "writes", "all")
"""Each Sandbox's `monitor`: unwatched (the default), only writing calls, every call."""


class Phase(NamedTuple):
    name: str
    argv: list[str]
    cwd: str


class Timing(NamedTuple):
    seconds: float
    calls: int
    held: float = 0.0
    """Seconds the supervisor held the calls (Sandbox.monitor_held_seconds)."""


def make_tarball(scratch: str) -> str:
    """src.tar: the standard library's sources and the test-suite packages."""
    import jsonschema

    stdlib = os.path.dirname(os.__file__)
    site = os.path.dirname(os.path.dirname(str(jsonschema.__file__)))
    staging = os.path.join(scratch, "staging")
    os.mkdir(staging)
    ignore = shutil.ignore_patterns("__pycache__", "site-packages", "dist-packages")
    shutil.copytree(stdlib, os.path.join(staging, "stdlib"), ignore=ignore, symlinks=True)
    for name in PACKAGES:
        shutil.copytree(
            os.path.join(site, name), os.path.join(staging, "site", name), ignore=ignore
        )
    tarball = os.path.join(scratch, "src.tar")
    subprocess.run(["tar", "cf", tarball, "-C", staging, "stdlib", "site"], check=True)
    shutil.rmtree(staging)
    return tarball


def phases(workspace: str, tarball: str) -> list[Phase]:
    tree = os.path.join(workspace, "tree")
    return [
        Phase("unpack", ["tar", "xf", tarball], tree),
        Phase("byte-compile", ["python3", "-m", "compileall", "-q", "stdlib"], tree),
        Phase("test suite", [sys.executable, "-m", "unittest", "-q", *TESTS], f"{tree}/site"),
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
        work = phases(workspace, make_tarball(scratch))
        one_round(boxes, SIDES, work, env)  # warm-up: page cache, probe cache
        results: list[dict[str, list[Timing]]] = []
        for index in range(rounds):
            order = SIDES[index % 3 :] + SIDES[: index % 3]  # each side first in turn
            results.append(one_round(boxes, order, work, env))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print_table(work, results, markdown=markdown)


def print_table(
    work: list[Phase], results: list[dict[str, list[Timing]]], *, markdown: bool
) -> None:
    from audit import table  # the same table renderer as the throughput part

    rows = []
    names = [*(phase.name for phase in work), "whole workload"]
    for index, name in enumerate(names):

        def pick(side: str, result: dict[str, list[Timing]], at: int = index) -> Timing:
            found = result[side]
            if at < len(found):
                return found[at]
            return Timing(
                sum(t.seconds for t in found),
                sum(t.calls for t in found),
                sum(t.held for t in found),
            )

        median = {side: statistics.median(pick(side, r).seconds for r in results) for side in SIDES}
        best = {side: min(pick(side, r).seconds for r in results) for side in SIDES}
        row = [name, f"{median['off']:.3f}"]
        for side in SIDES[1:]:
            calls = statistics.median(pick(side, r).calls for r in results)
            held = statistics.median(pick(side, r).held for r in results)
            # Each round's sides ran back to back: their ratio cancels drift between rounds.
            paired = statistics.median(
                pick(side, r).seconds / pick("off", r).seconds for r in results
            )
            row += [
                f"{median[side]:.3f}",
                f"{median[side] / median['off']:.3f}",
                f"{paired:.3f}",
                f"{best[side] / best['off']:.3f}",
                f"{calls:,.0f}",
                f"{held / median['off']:.1%}",
            ]
        rows.append(row)
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
