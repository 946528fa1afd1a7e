"""`corral demo`, the README's first command: every outcome as the host sees it, and what the
violation monitor recorded about each refused file access."""

from __future__ import annotations

import re
import subprocess

import pytest

from tests.helpers_cli import CORRAL

pytestmark = pytest.mark.usefixtures("sandbox_available")


def test_the_demo_blocks_four_attempts_allows_one_write_and_names_who_tried() -> None:
    done = subprocess.run([*CORRAL, "demo"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    verdicts = re.findall(r"^  \[(ok |FAIL)\] (.+?)\s{2,}(BLOCKED|ALLOWED)", done.stdout, re.M)
    assert [(ok, verdict) for ok, _, verdict in verdicts] == [
        ("ok ", "BLOCKED"), ("ok ", "BLOCKED"), ("ok ", "BLOCKED"), ("ok ", "BLOCKED"),
        ("ok ", "ALLOWED"),
    ]  # fmt: skip
    recorded = re.findall(
        r"^  blocked (\w+) \S+/(\.bashrc|id_rsa|loot\.txt): .+ \(pid (\d+), (\S+)\)$",
        done.stdout,
        re.M,
    )
    assert sorted((op, name, exe.rsplit("/", 1)[-1]) for op, name, _, exe in recorded) == [
        ("read", "id_rsa", "cat"), ("write", ".bashrc", "bash"), ("write", "loot.txt", "bash"),
    ]  # fmt: skip
    assert all(int(pid) > 1 for _, _, pid, _ in recorded)
