"""The policy's limits, applied by Sandbox itself (the kernel-level cases are in
test_limits_kernel.py; this checks the wiring)."""

from __future__ import annotations

import os

import pytest

from corral.sandbox import Sandbox
from tests.conftest import Layout

pytestmark = pytest.mark.usefixtures("sandbox_available")

HOG = "x = bytearray(512 * 1024 * 1024); print('allocated')"
BIG_FILE = "open('big', 'wb').write(b'x' * 4 * 1024 * 1024); print('written')"


def sandbox(layout: Layout, **limits: object) -> Sandbox:
    policy = layout.sandbox().policy
    return Sandbox(policy._replace(limits=policy.limits._replace(**limits)))  # type: ignore[arg-type]


@pytest.mark.parametrize("limited", [False, True], ids=["default", "memory-256MiB"])
def test_memory_limit_from_the_policy(layout: Layout, limited: bool) -> None:
    box = sandbox(layout, memory_bytes=256 * 1024 * 1024) if limited else layout.sandbox()
    result = box.run(["python3", "-c", HOG], env=layout.env, capture_output=True, timeout=60)
    assert (b"allocated" in (result.stdout or b"")) != limited
    if limited:
        assert b"MemoryError" in (result.stderr or b"")


@pytest.mark.parametrize("limited", [False, True], ids=["default", "file-1MiB"])
def test_file_size_limit_from_the_policy(layout: Layout, limited: bool) -> None:
    box = sandbox(layout, file_size_bytes=1024 * 1024) if limited else layout.sandbox()
    box.run(["python3", "-c", BIG_FILE], env=layout.env, capture_output=True, timeout=60)
    size = os.path.getsize(f"{layout.workspace}/big")
    assert (size <= 1024 * 1024) == limited


def test_policy_timeout_kills_the_whole_sandbox(layout: Layout) -> None:
    script = "sleep 1000 & echo $! > pid; setsid sleep 1000 & wait"
    result = sandbox(layout, timeout_seconds=2).run(["bash", "-c", script], env=layout.env)
    assert result.timed_out
    with open(f"{layout.workspace}/pid") as f:
        inner_pid = int(f.read())  # a pid inside the sandbox's namespace, not the host's
    assert inner_pid > 0
    # Nothing of the sandbox is left: no host process runs in its workspace any more.
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        try:
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            continue
        assert cwd != layout.workspace, f"process {pid} survived the timeout"


@pytest.mark.parametrize("limited", [False, True], ids=["default", "output-64KiB"])
def test_output_limit_keeps_the_first_bytes_and_drains_the_rest(
    layout: Layout, limited: bool
) -> None:
    box = sandbox(layout, output_bytes=64 * 1024) if limited else layout.sandbox()
    script = "import sys; sys.stdout.write('x' * 4_000_000); sys.stderr.write('done')"
    result = box.run(["python3", "-c", script], env=layout.env, capture_output=True, timeout=60)
    assert result.returncode == 0  # the command was never blocked on a full pipe
    assert len(result.stdout or b"") == (64 * 1024 if limited else 4_000_000)
    assert result.truncated == limited
    assert result.stderr == b"done"
