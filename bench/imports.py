"""Which imports `corral run -- true` pays for, as medians over repeated `-X importtime` runs.

    .venv/bin/python bench/imports.py [--repeat K] [--top N] [--entry module|script]

Runs `python -X importtime -m corral run -- true` (or the console script, `--entry script`)
K times in a scratch workspace, once per bytecode state of the corral package (see
benchenv.py), and prints the N imports with the largest median cumulative time. "first corral
importer" is the nearest corral module above the import in the import tree: the place to
defer or drop it. A dash under "imported by" means the import sits at the top of the tree:
the interpreter's start-up (`site`, `encodings`) or a lazy import inside a function, whose
caller `-X importtime` does not show. `-m corral` also pays for `runpy`, which the console
script does not.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from collections.abc import Iterable, Sequence
from typing import NamedTuple

from benchenv import BenchEnv, Bytecode, bench_env

PREFIX = "import time:"


class ImportLine(NamedTuple):
    name: str
    self_us: int
    cumulative_us: int
    parent_chain: tuple[str, ...]
    """The importing modules, nearest first."""


def parse_importtime(text: str) -> list[ImportLine]:
    """`-X importtime` prints each module after its children, indented two spaces per level."""
    rows: list[tuple[str, int, int, int]] = []
    for line in text.splitlines():
        if not line.startswith(PREFIX) or "self [us]" in line:
            continue
        self_text, cumulative_text, name = line[len(PREFIX) :].split("|")
        depth = (len(name) - len(name.lstrip(" ")) - 1) // 2
        rows.append((name.strip(), int(self_text), int(cumulative_text), depth))
    stack: list[str] = []
    parsed: list[ImportLine] = []
    for name, self_us, cumulative, depth in reversed(rows):  # parents now come first
        del stack[depth:]
        parsed.append(ImportLine(name, self_us, cumulative, tuple(reversed(stack))))
        stack.append(name)
    return parsed


def command(bench: BenchEnv, entry: str) -> list[str]:
    start = ["-m", "corral"] if entry == "module" else [bench.corral_script]
    return [bench.python, "-X", "importtime", *start, "run", "--", "true"]


def sample(bench: BenchEnv, bytecode: Bytecode, entry: str, repeat: int) -> list[list[ImportLine]]:
    runs = []
    for _ in range(repeat):
        done = subprocess.run(
            command(bench, entry),
            cwd=bench.ws_corral,
            env=bench.env_for(bytecode),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            raise SystemExit(f"corral run failed (exit {done.returncode}): {done.stderr[-500:]}")
        runs.append(parse_importtime(done.stderr))
    return runs


def first_corral(chain: Iterable[str]) -> str:
    return next((name for name in chain if name.startswith("corral")), "")


def report(runs: Sequence[Sequence[ImportLine]], top: int) -> str:
    by_name: dict[str, list[ImportLine]] = {}
    for run in runs:
        for line in run:
            by_name.setdefault(line.name, []).append(line)
    total_ms = statistics.median(sum(line.self_us for line in run) for run in runs) / 1000

    def median_cumulative(group: list[ImportLine]) -> float:
        return statistics.median(x.cumulative_us for x in group)

    ranked = sorted(by_name.values(), key=median_cumulative, reverse=True)
    lines = [
        f"all imports: {total_ms:.1f} ms (median over {len(runs)} runs)",
        "",
        "| # | Module | Cumulative (ms) | Self (ms) | Imported by | First corral importer |",
        "|---:|---|---:|---:|---|---|",
    ]
    for rank, group in enumerate(ranked[:top], 1):
        cumulative = median_cumulative(group) / 1000
        self_ms = statistics.median(x.self_us for x in group) / 1000
        chain = group[0].parent_chain
        parent = chain[0] if chain else "-"
        lines.append(
            f"| {rank} | `{group[0].name}` | {cumulative:.1f} | {self_ms:.1f} | `{parent}`"
            f" | `{first_corral(chain) or '-'}` |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=15, metavar="K")
    parser.add_argument("--top", type=int, default=15, metavar="N")
    parser.add_argument("--entry", choices=("module", "script"), default="module")
    args = parser.parse_args(argv)
    with bench_env() as bench:
        for bytecode in ("compiled", "source"):
            runs = sample(bench, bytecode, args.entry, args.repeat)
            print(f"## corral package bytecode: {bytecode}, entry: {args.entry}\n")
            print(report(runs, args.top), end="\n\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
