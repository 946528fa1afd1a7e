"""`corral run` leaves its story in the audit log: the session, and what was blocked."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import Layout
from tests.helpers_cli import run_cli

pytestmark = pytest.mark.usefixtures("sandbox_available")


def corral(layout: Layout, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "corral", *args],
        cwd=layout.workspace,
        env=layout.env,
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout


def test_a_run_and_its_blocked_write_are_logged(layout: Layout) -> None:
    target = f"{layout.outside}/loot"
    done = run_cli(layout, "--", "sh", "-c", f"echo x > {target}; exit 3")
    assert done.returncode == 3
    sessions = [json.loads(line) for line in corral(layout, "log", "--json").splitlines()]
    ours = [s for s in sessions if "exit 3" in json.dumps(s)]
    assert ours and ours[0].get("exit_code", ours[0].get("exit_status")) == 3, sessions
    violations = [json.loads(x) for x in corral(layout, "violations", "--json").splitlines()]
    assert [v["path"] for v in violations] == [target]
    assert violations[0]["operation"] == "write"
