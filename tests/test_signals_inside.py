"""The command starts with default signal dispositions, whatever launchers ran before it.

Python ignores SIGPIPE and SIGXFSZ for itself, and corral's in-sandbox launchers are Python:
without a reset, `yes | head` inside would get EPIPE instead of dying quietly.
"""

from __future__ import annotations

import pytest

from corral.probe import probe
from corral.sandbox import Sandbox
from tests.conftest import Layout

pytestmark = pytest.mark.usefixtures("sandbox_available")


@pytest.mark.parametrize("landlock", [True, False], ids=["with-landlock", "without"])
def test_no_signal_is_ignored_inside(layout: Layout, landlock: bool) -> None:
    box = Sandbox(layout.sandbox().policy)
    facts = probe(cache_dir=layout.host().machine_cache_dir)
    box._facts = facts if landlock else facts._replace(landlock_abi=0)
    result = box.run(
        ["sh", "-c", "grep SigIgn /proc/self/status; yes | head -1 >/dev/null; echo $?"],
        env=layout.env,
        capture_output=True,
        timeout=60,
    )
    lines = (result.stdout or b"").decode().split()
    assert lines[:2] == ["SigIgn:", "0000000000000000"], result
    assert lines[2] == "0"
