"""Launch overhead of corral against the floor it cannot go below, in one run.

    .venv/bin/python bench/launch.py [--repeat N] [--markdown]

Every variant launches `true` (or nothing) once per round; rounds repeat N times and the
order of variants is shuffled in each round, so drift (CPU frequency, page cache, another
process) hits all variants alike. Each variant is timed with perf_counter_ns around exactly
one launch, and the report gives the median and p90 of each, then the ratios that have
targets:

- CLI: `corral run -- true` against the floor `python -c pass` (the interpreter of the corral
  console script) + bare `bwrap <corral's argv> -- true`. Both sides start two processes, so
  the ratio is corral's own work: imports, policy, planning, placeholders. Target <= 1.3.
- API: `Sandbox.run(["true"])` in a loop in this process against `subprocess.run` of the same
  bwrap argv from this process. Target <= 1.15.

To add a row (seccomp on, Landlock on, Landlock-only mode): append a `Variant` to
`cli_variants` or `api_variants` and, when it has a baseline, a `Comparison` to `comparisons`.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Literal, NamedTuple

from benchenv import BenchEnv, bench_env, installed_bytecode_state
from corral.backends.seccomp import open_program_fd
from corral.sandbox import Sandbox

Side = Literal["cli", "api"]

# Measured on a noisy 2-core VM: from 150 rounds on, medians move by well under 2 % between
# runs, and 150 rounds of all variants take about a minute.
DEFAULT_REPEAT = 150
WARMUP_ROUNDS = 3  # fill the probe cache and the page cache; not counted
SEED = 4  # a fixed shuffle order, so two runs of the script launch in the same order

# Launch stdin, stdout and stderr on /dev/null: corral then picks a new session, as the bare
# bwrap argv does, and nothing is printed.
_DEVNULL_FDS = [
    (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
    (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
    (os.POSIX_SPAWN_OPEN, 2, os.devnull, os.O_WRONLY, 0),
]


CORRAL_RUN = "corral run -- true"
BWRAP = "bwrap <corral's argv> -- true"
BWRAP_NO_SECCOMP = "bwrap <corral's argv, no --seccomp> -- true"
SANDBOX_RUN = 'Sandbox.run(["true"]), all layers'
SANDBOX_RUN_NO_LANDLOCK = 'Sandbox.run(["true"]), Landlock off'
SANDBOX_RUN_LANDLOCK_ONLY = 'Sandbox.run(["true"]), Landlock-only backend'
SANDBOX_RUN_MONITORED = 'Sandbox.run(["true"]), all layers + violation monitor (the default)'
SUBPROCESS_BWRAP = "subprocess.run(<corral's bwrap argv>)"


class Variant(NamedTuple):
    name: str
    side: Side
    launch: Callable[[], int]
    """Launches once and returns the nanoseconds that one launch took."""


class Comparison(NamedTuple):
    subject: str
    baseline: tuple[str, ...]
    """Variant names whose medians add up to the baseline."""
    target: float | None


class Stats(NamedTuple):
    median_ms: float
    p90_ms: float


def spawn_once(argv: list[str], env: Mapping[str, str]) -> int:
    """posix_spawn + waitpid: the least the harness can add to a command's own time."""
    start = time.perf_counter_ns()
    pid = os.posix_spawn(argv[0], argv, env, file_actions=_DEVNULL_FDS)
    _, status = os.waitpid(pid, 0)
    elapsed = time.perf_counter_ns() - start
    if os.waitstatus_to_exitcode(status) != 0:
        explain_failure(argv, env=env)
    return elapsed


def explain_failure(argv: Sequence[str], *, env: Mapping[str, str]) -> None:
    done = subprocess.run(argv, env=dict(env), capture_output=True, text=True)
    raise SystemExit(f"{argv[0]} failed (exit {done.returncode}): {done.stderr.strip()}")


def spawn_timer(argv: Sequence[str], *, env: Mapping[str, str], cwd: str) -> Callable[[], int]:
    argv, env = list(argv), dict(env)

    def launch() -> int:
        os.chdir(cwd)
        return spawn_once(argv, env)

    return launch


def bwrap_timer(bench: BenchEnv, command: list[str], *, seccomp: bool) -> Callable[[], int]:
    """Bare bwrap; the seccomp memfd and the argv naming it are made outside the timing."""

    def launch() -> int:
        os.chdir(bench.ws_bwrap)
        if not seccomp:
            return spawn_once(bench.bare_bwrap_argv(command, seccomp_fd=None), bench.env)
        fd = open_program_fd(bench.seccomp)
        try:
            os.set_inheritable(fd, True)  # posix_spawn has no pass_fds
            return spawn_once(bench.bare_bwrap_argv(command, seccomp_fd=fd), bench.env)
        finally:
            os.close(fd)

    return launch


def cli_variants(bench: BenchEnv) -> list[Variant]:
    true = shutil.which("true") or "/bin/true"
    corral_run = [bench.corral_script, "run", "--", "true"]
    return [
        Variant("true", "cli", spawn_timer([true], env=bench.env, cwd=bench.ws_corral)),
        Variant(
            "python -c pass",
            "cli",
            spawn_timer([bench.python, "-c", "pass"], env=bench.env, cwd=bench.ws_corral),
        ),
        Variant(BWRAP, "cli", bwrap_timer(bench, [true], seccomp=True)),
        Variant(BWRAP_NO_SECCOMP, "cli", bwrap_timer(bench, [true], seccomp=False)),
        Variant(
            CORRAL_RUN,
            "cli",
            spawn_timer(corral_run, env=bench.env_for("compiled"), cwd=bench.ws_corral),
        ),
        Variant(
            f"{CORRAL_RUN} (no .pyc)",
            "cli",
            spawn_timer(corral_run, env=bench.env_for("source"), cwd=bench.ws_corral),
        ),
    ]


def api_variants(bench: BenchEnv) -> list[Variant]:
    # The rows compared with bare bwrap run without the violation monitor, which only
    # observes: the same layers on both sides. Its own cost is a row of its own.
    sandbox = Sandbox(bench.policy(bench.ws_corral), monitor="off")
    monitored = Sandbox(bench.policy(bench.ws_corral))
    # The same policy with the Landlock layer off: the machine facts say "no Landlock".
    no_landlock = Sandbox(bench.policy(bench.ws_corral), monitor="off")
    no_landlock._facts = sandbox._machine()._replace(landlock_abi=0)

    def timed_run(box: Sandbox, what: str) -> Callable[[], int]:
        def launch() -> int:
            start = time.perf_counter_ns()
            code = box.run(["true"], stdin=subprocess.DEVNULL).returncode
            return check_timed(start, code, what)

        return launch

    sandbox_run = timed_run(sandbox, "Sandbox.run")
    landlock_only = Sandbox(
        bench.policy(bench.ws_corral)._replace(backend="landlock"), monitor="off"
    )

    def subprocess_run() -> int:
        fd = open_program_fd(bench.seccomp)
        try:
            argv = bench.bare_bwrap_argv(["true"], seccomp_fd=fd)
            start = time.perf_counter_ns()
            code = subprocess.run(argv, stdin=subprocess.DEVNULL, pass_fds=(fd,)).returncode
            return check_timed(start, code, "subprocess.run(bwrap)")
        finally:
            os.close(fd)

    return [
        Variant(SANDBOX_RUN, "api", sandbox_run),
        Variant(SANDBOX_RUN_MONITORED, "api", timed_run(monitored, "Sandbox.run")),
        Variant(SANDBOX_RUN_NO_LANDLOCK, "api", timed_run(no_landlock, "Sandbox.run")),
        Variant(SANDBOX_RUN_LANDLOCK_ONLY, "api", timed_run(landlock_only, "Sandbox.run")),
        Variant(SUBPROCESS_BWRAP, "api", subprocess_run),
    ]


def check_timed(start: int, code: int, what: str) -> int:
    elapsed = time.perf_counter_ns() - start
    if code != 0:
        raise SystemExit(f"{what} exited {code}")
    return elapsed


def comparisons() -> list[Comparison]:
    floor = ("python -c pass", BWRAP)
    return [
        Comparison(CORRAL_RUN, floor, 1.3),
        Comparison(f"{CORRAL_RUN} (no .pyc)", floor, 1.3),
        Comparison(CORRAL_RUN, ("true",), None),
        # Issue 4: corral's own API work over bwrap with the same layers (seccomp).
        Comparison(SANDBOX_RUN_NO_LANDLOCK, (SUBPROCESS_BWRAP,), 1.15),
        # Issue 6: every layer (seccomp + Landlock through corral.inner) over bwrap.
        Comparison(SANDBOX_RUN, (SUBPROCESS_BWRAP,), 1.10),
        # Issue 6: the namespace-free backend should launch faster than bare bwrap.
        Comparison(SANDBOX_RUN_LANDLOCK_ONLY, (SUBPROCESS_BWRAP,), 1.0),
        Comparison(BWRAP, (BWRAP_NO_SECCOMP,), None),  # what the seccomp layer costs bwrap
        Comparison(SANDBOX_RUN_MONITORED, (SANDBOX_RUN,), None),  # what the monitor adds
    ]


def measure(variants: Sequence[Variant], *, repeat: int, progress: bool) -> dict[str, list[int]]:
    order = list(variants)
    rng = random.Random(SEED)
    samples: dict[str, list[int]] = {v.name: [] for v in variants}
    for round_no in range(WARMUP_ROUNDS + repeat):
        rng.shuffle(order)
        for variant in order:
            elapsed = variant.launch()
            if round_no >= WARMUP_ROUNDS:
                samples[variant.name].append(elapsed)
        if progress:
            print(f"\rround {round_no + 1}/{WARMUP_ROUNDS + repeat}", end="", file=sys.stderr)
    if progress:
        print(file=sys.stderr)
    return samples


def percentile(values: Sequence[int], q: float) -> int:
    """Nearest-rank percentile: a value that was actually measured."""
    ranked = sorted(values)
    index = max(0, min(len(ranked) - 1, -(-len(ranked) * q // 100) - 1))
    return ranked[int(index)]


def summarise(samples: Mapping[str, Sequence[int]]) -> dict[str, Stats]:
    return {
        name: Stats(statistics.median(values) / 1e6, percentile(values, 90) / 1e6)
        for name, values in samples.items()
    }


def machine_line(bench: BenchEnv, repeat: int) -> str:
    fresh, total = installed_bytecode_state()
    version = ".".join(map(str, bench.bwrap_version))
    return (
        f"{repeat} rounds, variants shuffled in each round; Python {platform.python_version()}"
        f" ({bench.python}), bubblewrap {version}, {os.cpu_count()} CPUs, Linux"
        f" {platform.release()}; installed package: {fresh}/{total} modules have an"
        f" up-to-date .pyc (the rows name the bytecode state they used)"
    )


def format_tables(
    variants: Sequence[Variant], stats: Mapping[str, Stats], compared: Sequence[Comparison]
) -> str:
    lines = ["| Launch | Side | Median (ms) | p90 (ms) |", "|---|---|---:|---:|"]
    for v in variants:
        s = stats[v.name]
        lines.append(f"| `{v.name}` | {v.side} | {s.median_ms:.1f} | {s.p90_ms:.1f} |")
    lines += ["", "| Ratio (of medians) | Value | Target | Met |", "|---|---:|---:|---|"]
    for c in compared:
        base = sum(stats[name].median_ms for name in c.baseline)
        ratio = stats[c.subject].median_ms / base
        target = "" if c.target is None else f"<= {c.target:.2f}"
        met = "" if c.target is None else ("yes" if ratio <= c.target else "**no**")
        over = " + ".join(f"`{name}`" for name in c.baseline)
        lines.append(f"| `{c.subject}` / ({over}) | {ratio:.2f} | {target} | {met} |")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=DEFAULT_REPEAT, metavar="N")
    parser.add_argument(
        "--markdown", action="store_true", help="print only the tables (for the README)"
    )
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.monotonic()
    with bench_env() as bench:
        variants = [*cli_variants(bench), *api_variants(bench)]
        samples = measure(variants, repeat=args.repeat, progress=sys.stderr.isatty())
        stats = summarise(samples)
        header = machine_line(bench, args.repeat)
        os.chdir("/")  # leave the scratch root before it is removed
    tables = format_tables(variants, stats, comparisons())
    if args.markdown:
        print(f"{tables}\n\n{header}.")
    else:
        print(f"{header}\n\n{tables}\n\n(took {time.monotonic() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
